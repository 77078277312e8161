"""Traffic for the embedded mode: rows of a dataset sent to a model server's v1 endpoint (`send`: a batch, measured;
`TrafficPump`: in the background, for the closed loop, with ground-truth feedback for part of it), and a realistic
shift."""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
import pandas as pd

from kubeloop.log import event

log = logging.getLogger(__name__)


def shifted(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The population moves: arrestees 15 years older, the colour mix inverted, unemployment up."""
    rng = np.random.default_rng(seed)
    out = frame.copy()
    out["age"] = (out["age"] + 15).clip(upper=100)
    out["colour"] = out["colour"].map({"Black": "White", "White": "Black"})
    flip = rng.random(len(out)) < 0.4
    out.loc[flip, "employed"] = "No"
    return out


def payload(rows: pd.DataFrame) -> dict:
    records = rows.astype(object).where(rows.notna(), None).to_dict(orient="records")
    return {"instances": records}


@dataclass
class TrafficResult:
    requests: int = 0
    failed: int = 0
    rows: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")


def send(url: str, model: str, rows: pd.DataFrame, batch: int = 10, concurrency: int = 4) -> TrafficResult:
    """POST the rows in batches to /v1/models/{model}:predict; every answer other than 200 counts as failed."""
    result = TrafficResult()
    endpoint = f"{url}/v1/models/{model}:predict"
    batches = [rows.iloc[start : start + batch] for start in range(0, len(rows), batch)]

    with httpx.Client(timeout=30) as client:

        def one(chunk: pd.DataFrame) -> tuple[float, int, str]:
            started = time.perf_counter()
            try:
                response = client.post(endpoint, json=payload(chunk))
                return time.perf_counter() - started, response.status_code, response.text[:200]
            except httpx.HTTPError as error:
                return time.perf_counter() - started, 0, str(error)

        with ThreadPoolExecutor(concurrency) as pool:
            for (elapsed, code, text), chunk in zip(pool.map(one, batches), batches, strict=True):
                result.requests += 1
                result.rows += len(chunk)
                result.latencies.append(elapsed)
                if code != 200:
                    result.failed += 1
                    result.errors.append(f"{code}: {text}")
    return result


class TrafficPump:
    """Background traffic: batches of rows POSTed to `url` by a few threads once started; the rows switch from the
    training distribution to the shifted one on `shift()`, which records the time of the first drifted request.

    Ground truth comes back for a `label_share` of the requests answered: their rows' true labels (the label
    column's raw values, decoded by the server as training decodes them) under the id the server answered with
    (`ce-id`), posted to the feedback endpoint in batches every `feedback_every` seconds."""

    def __init__(
        self,
        model: str,
        data: pd.DataFrame,
        labels: pd.Series,
        label_share: float = 0.5,
        batch: int = 10,
        threads: int = 3,
        feedback_every: float = 0.5,
    ) -> None:
        if len(labels) != len(data) or not 0 <= label_share <= 1:
            raise ValueError(
                f"labels: {len(labels)} for {len(data)} rows with label_share {label_share}: one label per row, "
                "and a share between 0 and 1"
            )
        self.url, self.model, self.data, self.batch = "", model, data, batch
        self.labels, self.label_share, self.feedback_every = labels, label_share, feedback_every
        self.shifted_data: pd.DataFrame | None = None
        self.first_shifted: float | None = None
        self.sent = self.failed = 0
        self.feedback_sent = self.feedback_failed = 0  # feedback entries (one per labelled request)
        self._feedback: list[dict] = []  # entries waiting for the next batch
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]
        self._threads.append(threading.Thread(target=self._send_feedback, daemon=True))

    def start(self, url: str) -> None:
        self.url = url
        for thread in self._threads:
            thread.start()

    def shift(self, seed: int = 1) -> None:
        self.shifted_data = shifted(self.data, seed=seed)

    def _run(self, number: int) -> None:
        rng = random.Random(number)
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                frame = self.shifted_data if self.shifted_data is not None else self.data
                rows = rng.sample(range(len(frame)), self.batch)  # iid rows: the file is ordered
                labelled = rng.random() < self.label_share
                if frame is self.shifted_data and self.first_shifted is None:
                    with self._lock:
                        self.first_shifted = self.first_shifted or time.monotonic()
                request_id = None
                try:
                    response = client.post(f"{self.url}/v1/models/{self.model}:predict", json=payload(frame.iloc[rows]))
                    code, request_id = response.status_code, response.headers.get("ce-id")
                except httpx.HTTPError:
                    code = 0
                with self._lock:
                    self.sent += 1
                    self.failed += code != 200
                    if labelled and code == 200 and request_id:
                        self._feedback.append({"id": request_id, "labels": self.labels.iloc[rows].tolist()})
                time.sleep(0.01)

    def _send_feedback(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.wait(self.feedback_every):
                with self._lock:
                    entries, self._feedback = self._feedback, []
                if not entries:
                    continue
                try:
                    response = client.post(f"{self.url}/v1/models/{self.model}:feedback", json={"feedback": entries})
                    code, detail = response.status_code, response.text[:200]
                except httpx.HTTPError as error:
                    code, detail = 0, str(error)
                with self._lock:
                    if code == 202:
                        self.feedback_sent += len(entries)
                    else:
                        self.feedback_failed += len(entries)
                if code != 202:
                    event(
                        log, "traffic.feedback_failed", logging.WARNING, entries=len(entries), code=code, detail=detail
                    )

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=35)
