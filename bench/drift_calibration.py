"""Measure the drift decision rule's false-positive rate and detection delay (not a test; run on demand).

    .venv/bin/python -m bench.drift_calibration [--runs 50] [--window 200] [--reference-size 2000]

Each run draws a fresh reference sample of the arrests snapshot (reference seed = run), then streams rows through
the same FeatureWiseDrift + DriftTracker the sidecar uses:
- null: 20 windows of in-distribution rows (drawn with replacement from the whole snapshot);
- shift: 3 windows in distribution, then the shift begins at a random row inside the 4th window; the delay is the
  number of windows from the one where the shift begins to the first window in state Drift (1 = that window).
Shifts: age +15 years with the colour mix inverted (the quickstart's), and age alone +1 std (about 8 years).
Compares the declared constants in monitoring.detectors against the measured values.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--reference-size", type=int, default=2000)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--correction", default="bonferroni", choices=["bonferroni", "fdr"])
    args = parser.parse_args()
    os.environ.setdefault("KUBELOOP_HOME", tempfile.mkdtemp(prefix="kubeloop-bench-"))

    from kubeloop.api.modelversion import Feature, Signature
    from kubeloop.data.snapshot import ingest, read_frame
    from monitoring import detectors
    from monitoring.schema import Schema
    from tests.support import traffic_events as traffic

    snapshot = ingest("bundled://arrests")
    frame = read_frame(snapshot)
    signature = Signature(
        label="released",
        positive_class="Yes",
        inputs=[
            Feature(name="colour", dtype="string", categories=["Black", "White"], nullable=False),
            Feature(name="year", dtype="int", nullable=False),
            Feature(name="age", dtype="int", nullable=False),
            Feature(name="sex", dtype="string", categories=["Female", "Male"], nullable=False),
            Feature(name="employed", dtype="string", categories=["No", "Yes"], nullable=False),
            Feature(name="citizen", dtype="string", categories=["No", "Yes"], nullable=False),
            Feature(name="checks", dtype="int", nullable=False),
        ],
    )
    schema = Schema.from_signature(signature, snapshot.stats)
    w = args.window
    std_age = snapshot.stats["age"].std or 1.0
    shifts = {
        "age+15y & colour inverted": lambda n, rng: traffic.shift_age_colour(frame, n, rng),
        f"age +1 std ({std_age:.1f}y)": lambda n, rng: traffic.shift_mean(frame, n, rng, "age", round(std_age)),
    }

    def windows_of(rows):
        columns = schema.encode_frame(rows)
        return [[c[i : i + w] for c in columns] for i in range(0, len(rows) - w + 1, w)]

    started = time.perf_counter()
    flagged = in_drift = runs_with_alarm = 0
    worst = 0
    delays: dict[str, list[int]] = {name: [] for name in shifts}
    seconds: list[float] = []
    for run in range(args.runs):
        reference = detectors.Reference.from_frame(schema, frame, args.reference_size, seed=run, stats=snapshot.stats)
        detector = detectors.FeatureWiseDrift(reference, args.alpha, args.correction)
        rng = np.random.default_rng(10_000 + run)
        tracker = detectors.DriftTracker()
        for cols in windows_of(traffic.in_distribution(frame, w * args.windows, rng)):
            result = detector.test(cols)
            seconds.append(result.seconds)
            tracker.update(result.flagged)
        flagged += tracker.flagged_windows
        in_drift += tracker.drift_windows
        runs_with_alarm += tracker.drift_windows > 0
        worst = max(worst, tracker.drift_windows)
        for name, shift in shifts.items():
            tracker = detectors.DriftTracker()
            offset = int(rng.integers(0, w))
            before = traffic.in_distribution(frame, 3 * w + offset, rng)
            after = shift(w * 6, rng)
            rows = traffic.pd.concat([before, after], ignore_index=True)
            delay = None
            for index, cols in enumerate(windows_of(rows)):
                if tracker.update(detector.test(cols).flagged) == "Drift" and index >= 3:
                    delay = index - 3 + 1
                    break
            delays[name].append(delay if delay is not None else 99)
    total = args.runs * args.windows
    print(f"window {w} rows, reference {args.reference_size} rows, alpha {args.alpha} ({args.correction}),")
    print(f"alarm: >= {detectors.ALARM_K} of the last {detectors.ALARM_M} windows flagged; {args.runs} runs")
    print(f"null ({args.windows} windows x {args.runs} runs, a new reference each run):")
    print(f"  windows flagged by the corrected test: {flagged}/{total} = {flagged / total:.2%}")
    print(
        f"  windows in Drift: {in_drift}/{total} = {in_drift / total:.2%} "
        f"(declared <= {detectors.DECLARED_FALSE_POSITIVE_RATE:.0%}); runs with any: {runs_with_alarm}/{args.runs}; "
        f"worst run {worst}/{args.windows}"
    )
    for name, values in delays.items():
        arr, declared = np.array(values), detectors.DECLARED_DETECTION_WINDOWS
        print(
            f"shift {name}: delay in windows median {np.median(arr):.0f}, max {arr.max()}, "
            f"within declared {declared}: {np.mean(arr <= declared):.0%}"
        )
    print(f"detector (KS x3 + Chi-square x4) per window: median {np.median(seconds) * 1000:.2f} ms")
    print(f"elapsed {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
