from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the session (starting one costs ~5 s); training joins it."""
    import ray

    from kubeloop.training.ray_runner import connect

    os.environ.pop("RAY_ADDRESS", None)
    started = connect(workers=2)
    yield
    if started:
        ray.shutdown()
