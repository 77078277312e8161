"""What the serving tests send the arrests model server: its features and their v2 datatypes, a good row, v1 and v2
bodies (with one feature changed, for the bad-request cases), the two predict calls; the body limit and the rows
precomputed in the cache file that the servers of tests/integration/conftest.py start with."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support.serving_fixtures import Process, arrests_frame, rows

FEATURES = ["colour", "year", "age", "sex", "employed", "citizen", "checks"]
V2_TYPES = {"colour": "BYTES", "sex": "BYTES", "employed": "BYTES", "citizen": "BYTES"}  # the others: INT64
MAX_BODY = 64 * 1024  # the servers' --max-body-bytes
CACHED = 20  # the first CACHED bundled rows are precomputed in a cached server's --cache-file
GOOD = rows(arrests_frame(), 1)[0]


def v2_body(instances: list[dict], request_id: str | None = None) -> dict:
    body = {
        "inputs": [
            {
                "name": name,
                "shape": [len(instances)],
                "datatype": V2_TYPES.get(name, "INT64"),
                "data": [row[name] for row in instances],
            }
            for name in FEATURES
        ]
    }
    if request_id:
        body["id"] = request_id
    return body


def predict_v1(client: httpx.Client, server: Process, body: object, **kwargs: Any) -> httpx.Response:
    return client.post(f"{server.url}/v1/models/arrests:predict", json=body, **kwargs)


def predict_v2(client: httpx.Client, server: Process, body: object, **kwargs: Any) -> httpx.Response:
    return client.post(f"{server.url}/v2/models/arrests/infer", json=body, **kwargs)


def v1(**changes: object) -> dict:
    """A v1 body of the good row with `changes` (a value of ... drops the feature)."""
    row = {**GOOD, **changes}
    return {"instances": [{k: v for k, v in row.items() if v is not ...}]}


def v2(feature: str, **changes: object) -> dict:
    """A v2 body of the good row with `changes` to the tensor of `feature` (name=... drops it)."""
    body = v2_body([GOOD])
    for tensor in body["inputs"]:
        if tensor["name"] == feature:
            tensor.update(changes)
    body["inputs"] = [t for t in body["inputs"] if t.get("name") is not ...]
    return body
