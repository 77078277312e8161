"""Training on Ray Train: the per-worker DDP loop, the Ray driver, and the job that evaluates and registers."""

import os

# Under `uv run`, Ray (by default) re-creates the driver's environment for every worker with `uv run` and
# ships the working directory: about a minute per worker start here. kubeloop's workers already run in the
# driver's interpreter and environment. Read by Ray at import time, so it is set before ray is imported.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
