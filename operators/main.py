"""The operator's kopf entry module: ``kopf run -m operators.main --standalone --all-namespaces``.

``python -m operators`` runs the same with the settings of operators.settings (standalone, cluster-wide,
liveness endpoint, webhook server when enabled).
"""

from __future__ import annotations

from operators import deployment_handlers, handlers, run_handlers  # noqa: F401 - registers the handlers
from operators.settings import current

if current().webhook_enabled:
    from operators import admission

    admission.register()
