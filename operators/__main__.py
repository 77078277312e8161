"""``python -m operators``: run the kubeloop operator (standalone, all namespaces)."""

from __future__ import annotations

import asyncio
import logging
import sys

import kopf


def main() -> int:
    from operators import main as _handlers  # noqa: F401 - registers the handlers before kopf starts
    from operators.settings import current

    settings = current()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-5s %(name)s %(message)s")
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    try:
        asyncio.run(kopf.operator(standalone=True, clusterwide=True, liveness_endpoint=liveness))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
