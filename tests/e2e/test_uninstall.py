"""`helm uninstall` leaves nothing of kubeloop's behind (runs last: pytest takes files in name order). The other
tests' resources went with their namespaces; what the chart made goes with the release. Kept by design: the
CRDs (Helm never deletes a chart's crds/: deleting them would delete every TrainingJob and ModelVersion in the
cluster) and PersistentVolumeClaims (KUBELOOP_HOME: the registry and data). The release is installed again
after, with the values it had, so the suite can run again."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.support.operatorkit import REPO, SYSTEM

KEPT = {"customresourcedefinitions.apiextensions.k8s.io", "persistentvolumeclaims"}


def _run(kubeconfig: Path, *command: str) -> str:
    out = subprocess.run([*command, "--kubeconfig", str(kubeconfig)], capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(command)}: {out.stderr}"
    return out.stdout


def _ours(kubeconfig: Path) -> list[str]:
    """Every object of every listable kind labelled part-of kubeloop (or of the kubeloop release), kept kinds aside."""
    kinds = _run(kubeconfig, "kubectl", "api-resources", "--verbs=list", "-o", "name").split()
    kinds = [k for k in kinds if k not in KEPT and k.split(".")[0] not in ("events", "componentstatuses")]
    found = set()
    for selector in ("app.kubernetes.io/part-of=kubeloop", "app.kubernetes.io/instance=kubeloop"):
        out = _run(kubeconfig, "kubectl", "get", ",".join(kinds), "-A", "-l", selector, "-o", "name")
        found |= set(out.split())
    return sorted(found)


def test_helm_uninstall_leaves_no_object_of_kubeloops(
    kubeconfig: Path, chart_values: dict[str, Any], tmp_path: Path
) -> None:
    assert _ours(kubeconfig), "the installed release has objects labelled part-of kubeloop (else this proves nothing)"
    _run(kubeconfig, "helm", "uninstall", "kubeloop", "-n", SYSTEM, "--wait", "--timeout", "5m")
    try:
        deadline = time.monotonic() + 120  # the garbage collector deletes what the release's objects owned
        while (left := _ours(kubeconfig)) and time.monotonic() < deadline:
            time.sleep(2)
        assert left == [], f"left behind after helm uninstall: {left}"
    finally:
        values = tmp_path / "values.json"
        values.write_text(json.dumps(chart_values))
        _run(
            kubeconfig, "helm", "upgrade", "--install", "kubeloop", str(REPO / "helm/kubeloop"), "-n", SYSTEM,
            "-f", str(values), "--wait", "--timeout", "5m",
        )  # fmt: skip
