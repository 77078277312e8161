"""Alert rules for served models: `promtool check rules` and `promtool test rules` pass, and the Helm chart's
PrometheusRule ships the same group as the embedded mode's rules file."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import yaml

from tests.support import tools

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "monitoring/rules/kubeloop.rules.yaml"
RULE_TESTS = REPO / "monitoring/rules/kubeloop.rules.test.yaml"
TEMPLATE = REPO / "helm/kubeloop/templates/prometheusrule.yaml"


def promtool(*args: str, cwd: Path = RULES.parent) -> subprocess.CompletedProcess:
    return subprocess.run([tools.promtool(), *args], capture_output=True, text=True, check=False, cwd=cwd)


def test_rules_cover_drift_error_rate_and_latency() -> None:
    (group,) = yaml.safe_load(RULES.read_text())["groups"]
    assert {rule["alert"] for rule in group["rules"]} == {
        "KubeloopModelDrift",
        "KubeloopHighErrorRate",
        "KubeloopHighLatency",
    }
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {t["alertname"] for case in cases for t in case["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in group["rules"]}


def test_promtool_check_rules() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 rules found" in done.stdout


def test_promtool_test_rules() -> None:
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_test_rules_catches_a_broken_rule(tmp_path: Path) -> None:
    broken = RULES.read_text().replace("> 0.05", "> 0.5")
    (tmp_path / RULES.name).write_text(broken)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    done = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert done.returncode != 0 and "KubeloopHighErrorRate" in done.stdout + done.stderr


def _unescape_helm(text: str) -> str:
    return text.replace('{{ "{{" }}', "{{").replace('{{ "}}" }}', "}}")


def test_chart_template_holds_the_same_group() -> None:
    """Without helm: the template's models group, Helm escapes undone, equals the rules file's group."""
    text = TEMPLATE.read_text()
    block = text[text.index("    - name: kubeloop-models") : text.rindex("{{- end }}")]
    (group,) = yaml.safe_load(textwrap.dedent(_unescape_helm(block)))
    assert group == yaml.safe_load(RULES.read_text())["groups"][0]


def test_rendered_prometheusrule_ships_the_rules() -> None:
    done = subprocess.run(
        [tools.helm(), "template", "kubeloop", str(REPO / "helm/kubeloop"), "--set",
         "metrics.prometheusRule.enabled=true", "--show-only", "templates/prometheusrule.yaml"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    groups = yaml.safe_load(done.stdout)["spec"]["groups"]
    assert groups[1] == yaml.safe_load(RULES.read_text())["groups"][0]
