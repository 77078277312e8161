from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kubeloop.api import ModelVersion, load_resources
from kubeloop.api.validation import ValidationReport
from kubeloop.cli import main
from kubeloop.data.bundled import bundled_path
from kubeloop.registry import Registry


def test_manifests_check_passes_on_the_checkout(capsys):
    assert main(["manifests", "check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_run_rejects_an_invalid_spec_with_field_paths(tmp_path, capsys):
    doc = yaml.safe_load(Path("manifests/samples/trainingjob.yaml").read_text())
    doc["spec"]["workers"]["replicas"] = -2
    doc["spec"]["backend"] = "mpi"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["run", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.workers.replicas: Input should be greater than or equal to 1" in err
    assert "spec.backend: Input should be 'auto', 'gloo' or 'nccl'" in err


def test_run_of_a_missing_file_says_so(capsys):
    assert main(["run", "-f", "nope.yaml"]) == 2
    assert "no such file: nope.yaml" in capsys.readouterr().err


def test_data_validate_exits_non_zero_and_names_column_and_rule(tmp_path, capsys):
    assert main(["data", "ingest", "bundled://arrests"]) == 0
    baseline = capsys.readouterr().out.split()[0]
    frame = pd.read_csv(bundled_path("arrests"))
    shifted = pd.concat([frame[frame.released == "No"]] * 4 + [frame[frame.released == "Yes"]])
    path = tmp_path / "shifted.csv"
    shifted.drop(columns=["checks"]).to_csv(path, index=False)

    code = main(["data", "validate", str(path), "--baseline", baseline, "--label", "released", "--json"])
    assert code == 1
    report = json.loads(capsys.readouterr().out)
    rules = {(finding["column"], finding["rule"]) for finding in report["findings"]}
    assert ("checks", "missing_column") in rules
    assert ("released", "label_balance") in rules
    assert report["ok"] is False


def _write(path: Path, **columns: list) -> str:
    pd.DataFrame(columns).to_csv(path, index=False)
    return str(path)


def test_data_validate_with_a_label_that_is_not_a_column_exits_2_naming_both(tmp_path, capsys):
    path = _write(tmp_path / "t.csv", age=[30, 40], Target=["Yes", "No"])

    assert main(["data", "validate", path, "--label", "target"]) == 2
    err = capsys.readouterr().err
    assert "--label 'target' is not a column of" in err and "its columns are: age, Target" in err


def test_data_validate_checks_the_schemas_label_and_prints_the_report_as_json(tmp_path, capsys):
    city = ["Oslo" if i % 2 else "Lima" for i in range(100)]
    base = _write(tmp_path / "base.csv", city=city, label=["Yes"] * 30 + ["No"] * 70)
    flipped = _write(tmp_path / "now.csv", city=city, label=["Yes"] * 70 + ["No"] * 30)
    schema = tmp_path / "schema.yaml"
    schema.write_text("label: label\ncolumns:\n  - {name: city, dtype: string}\n  - {name: label, dtype: string}\n")
    assert main(["data", "ingest", base]) == 0
    digest = capsys.readouterr().out.split()[0]

    assert main(["data", "validate", base, "--baseline", digest, "--schema", str(schema)]) == 0
    assert "OK (0 errors, 0 warnings)" in capsys.readouterr().out
    assert main(["data", "validate", flipped, "--baseline", digest, "--schema", str(schema), "--json"]) == 1
    report = ValidationReport.model_validate_json(capsys.readouterr().out)
    assert [(f.column, f.rule, f.severity) for f in report.findings] == [("label", "label_balance", "error")]
    assert "L-infinity distance 0.400" in report.findings[0].message
    assert [(d.column, d.metric) for d in report.distances] == [("city", "linf"), ("label", "linf")]
    assert report.baseline_digest == digest and not report.ok


def test_data_ingest_names_a_numeric_column_read_as_text(tmp_path, capsys):
    path = _write(tmp_path / "t.csv", x=[*range(20), "?"])

    assert main(["data", "ingest", path]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("sha256:")
    assert "ERROR  x  mixed_type: 1 of 21 values do not parse as numbers ('?')" in err


def test_models_list_on_an_empty_registry_says_how_to_fill_it(capsys):
    assert main(["models", "list"]) == 0
    assert "kubeloop quickstart" in capsys.readouterr().out
    assert main(["models", "show", "arrests"]) == 1
    assert "no model named 'arrests'" in capsys.readouterr().err


def test_run_refuses_to_serve_a_rejected_version_naming_the_field(tmp_path, capsys, kubeloop_home):
    (sample,) = load_resources(Path("manifests/samples/modelversion.yaml"))
    assert isinstance(sample, ModelVersion)
    registry = Registry()
    version, _ = registry.allocate("arrests")
    reason = "rocAuc 0.61 is below the threshold 0.7"
    registry.save(sample.spec.model_copy(update={"version": version, "stage": "Rejected", "stage_reason": reason}), "")
    doc = yaml.safe_load(Path("manifests/samples/modeldeployment.yaml").read_text())
    doc["spec"]["version"] = version
    path = tmp_path / "md.yaml"
    path.write_text(yaml.safe_dump(doc))

    assert main(["run", "-f", str(path)]) == 2
    last = capsys.readouterr().err.rstrip().splitlines()[-1]
    assert last == (
        f"error: ModelDeployment arrests: spec.version: arrests:1 is Rejected ({reason}): serve a Candidate or "
        "Production version, or set spec.allowRejected: true to serve it anyway for debugging"
    )
    assert list((kubeloop_home / "deployments").glob("*")) == []  # nothing started
    assert registry.get("arrests", version).spec.stage == "Rejected"


def _training_data(tmp_path: Path, frame: pd.DataFrame, **dataset: object) -> Path:
    data = tmp_path / "data.csv"
    frame.to_csv(data, index=False)
    doc = yaml.safe_load(Path("manifests/samples/trainingjob.yaml").read_text())
    doc["spec"]["dataset"] = {"uri": str(data), "label": "outcome", "positiveClass": "yes", **dataset}
    doc["spec"]["gate"] = {}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _frame(rows: int = 60, **columns: list) -> pd.DataFrame:
    base = {
        "outcome": (["yes", "no"] * rows)[:rows],
        "age": [20 + i % 30 for i in range(rows)],
        "city": (["Oslo", "Bergen", "Molde"] * rows)[:rows],
    }
    return pd.DataFrame(base | columns)


CASES = {
    "three classes with task binary": (
        {"outcome": (["yes", "no", "maybe"] * 20)},
        {},
        2,
        "spec.task: binary (the default), but label column 'outcome' holds 3 classes",
    ),
    "positive class not in the data": ({}, {"positiveClass": "Yes"}, 2, "spec.dataset.positiveClass"),
    "slice column that does not exist": ({}, {"sliceColumn": "cty"}, 2, "did you mean 'city'?"),
    "label typo": ({}, {"label": "Outcome"}, 2, "spec.dataset.label: the data has no column 'Outcome'"),
    "one row": ({}, {"uri": None}, 2, "the data has 1 row"),
    "numbers with stray text": (
        {"age": [str(20 + i) for i in range(57)] + ["?", "12,5", "?"]},
        {},
        1,
        "3 of 60 values do not parse as numbers",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_run_refuses_a_spec_that_does_not_fit_its_data_before_training(case, tmp_path, capsys, kubeloop_home):
    columns, dataset, code, message = CASES[case]
    frame = _frame(**columns)
    if dataset.get("uri", "") is None:
        frame, dataset = frame.head(1), {}
    path = _training_data(tmp_path, frame, **dataset)
    assert main(["run", "-f", str(path)]) == code
    err = capsys.readouterr().err
    assert message in err, err
    assert not (kubeloop_home / "registry").exists() and not (kubeloop_home / "runs").exists()
