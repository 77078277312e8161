"""What people look at: the model report (an HTML model card per ModelVersion) and the Grafana dashboards' sources.

`write_report` is imported lazily: `kubeloop.report.promtext` (used by `kubeloop status`) must not pull in
matplotlib, pandas and torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubeloop.report.model_card import write_report

__all__ = ["write_report"]


def __getattr__(name: str) -> Any:
    if name == "write_report":
        from kubeloop.report.model_card import write_report

        return write_report
    raise AttributeError(f"module 'kubeloop.report' has no attribute {name!r}")
