"""Traffic for the embedded mode: rows of a dataset sent to a model server's v1 endpoint (`send`: a batch, measured;
`TrafficPump`: in the background, for the closed loop), and a realistic shift."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
import pandas as pd


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
    training distribution to the shifted one on `shift()`, which records the time of the first drifted request."""

    def __init__(self, model: str, data: pd.DataFrame, batch: int = 10, threads: int = 3) -> None:
        self.url, self.model, self.data, self.batch = "", model, data, batch
        self.shifted_data: pd.DataFrame | None = None
        self.first_shifted: float | None = None
        self.sent = self.failed = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

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
                body = payload(frame.iloc[rng.sample(range(len(frame)), self.batch)])  # iid rows: the file is ordered
                if frame is self.shifted_data and self.first_shifted is None:
                    with self._lock:
                        self.first_shifted = self.first_shifted or time.monotonic()
                try:
                    code = client.post(f"{self.url}/v1/models/{self.model}:predict", json=body).status_code
                except httpx.HTTPError:
                    code = 0
                with self._lock:
                    self.sent += 1
                    self.failed += code != 200
                time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=35)
