from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from kubeloop.cli import main
from kubeloop.data.bundled import bundled_path


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


def test_models_list_on_an_empty_registry_says_how_to_fill_it(capsys):
    assert main(["models", "list"]) == 0
    assert "kubeloop quickstart" in capsys.readouterr().out
    assert main(["models", "show", "arrests"]) == 1
    assert "no model named 'arrests'" in capsys.readouterr().err
