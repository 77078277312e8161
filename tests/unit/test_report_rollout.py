"""The model card's rollout section: the shadow windows and canary steps that judged a version, read from the
embedded loop's histories, with the checks (a shadow's paired report, the labelled loss) they were judged on."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from kubeloop import config
from kubeloop.analysis import AnalysisState, VersionSignals, decide
from kubeloop.analysis.shadow import ShadowState, decide_shadow
from kubeloop.analysis.signals import PairedSignals
from kubeloop.api.modeldeployment import RetrainAnalysis, ShadowAnalysis
from kubeloop.api.modelversion import ModelVersion
from kubeloop.registry import Registry
from kubeloop.report import write_report
from kubeloop.report.rollout import rollout_steps
from tests.support.html_structure import structure_of

REPO = Path(__file__).resolve().parents[2]
LATENCY = [(0.01, 90.0), (0.05, 100.0), (float("inf"), 100.0)]


def signals(version: int, losses: tuple[float, ...]) -> VersionSignals:
    return VersionSignals(
        version,
        requests=200.0,
        latency=list(LATENCY),
        drift=False,
        labelled=len(losses),
        loss_sum=sum(losses),
        loss_squared_sum=sum(x * x for x in losses),
    )


def test_the_card_shows_each_shadow_window_and_canary_step_with_its_checks(kubeloop_home: Path) -> None:
    sample = ModelVersion.model_validate(yaml.safe_load((REPO / "manifests/samples/modelversion.yaml").read_text()))
    registry = Registry()
    registry.allocate(sample.spec.model)
    record = registry.save(sample.spec.model_copy(update={"version": 1}), "copied")
    good, worse = (0.3, 0.5) * 60, (0.6, 0.9) * 60
    shadow = decide_shadow(
        ShadowAnalysis(min_agreement=0.9), ShadowState(), signals(7, good), signals(1, good), PairedSignals(100, 60)
    )
    canary = decide(RetrainAnalysis(), AnalysisState(), signals(7, good), signals(1, worse))
    other = decide(RetrainAnalysis(), AnalysisState(), signals(7, good), signals(2, good))  # another version's
    history = config.loops_dir() / f"{sample.spec.model}-20261201T000000Z.jsonl"
    history.parent.mkdir(parents=True)
    lines = [json.dumps(d.record()) for d in (shadow, canary, other)]
    history.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")

    steps = rollout_steps(record)
    assert [(s.action, s.percent) for s in steps] == [("shadowHold", None), ("hold", 10)]
    assert {c.name: c.status for c in steps[0].checks}["agreement"] == "fail"
    assert {c.name: c.status for c in steps[1].checks}["labelledLoss"] == "fail"

    text = write_report(record, registry).read_text()
    assert "rollout" in structure_of(text).ids
    assert "agreed on 60 of 100 paired answers (60.0%) &lt; 90.0%" in text
    assert "labelledLoss 0.350 / 0.000 fail" in text and "mean loss 0.7500 vs stable 0.4000" in text
