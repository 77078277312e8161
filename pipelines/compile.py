"""Compile the pipelines to KFP IR YAML (pipelines/compiled/, checked in, ready to upload) and check staleness.

The compiler's output is deterministic except for the comment header it writes above the YAML: it prints the
default of a dict or list parameter from a protobuf Struct, whose key order follows Python's string hashing and
so changes from process to process. That header is rewritten with sorted keys. `sdkVersion` stays: a new kfp
may compile differently, and then the checked-in YAML should be regenerated.
"""

from __future__ import annotations

import ast
import json
import re
import tempfile
from pathlib import Path

from pipelines.cluster import require_kfp_kubernetes

COMPILED_DIR = Path(__file__).resolve().parent / "compiled"
_HEADER_DEFAULT = re.compile(r"^(#\s+\w+: (?:dict|list) \[Default: )(.*)(\])$")


def compile_pipeline(name: str) -> str:
    """The normalized IR YAML of one pipeline (`training` or `continuous`)."""
    from kfp import compiler

    from pipelines.definitions import PIPELINES

    require_kfp_kubernetes()
    if name not in PIPELINES:
        from kubeloop.errors import SpecError

        raise SpecError(f"unknown pipeline {name!r}: known are {', '.join(PIPELINES)}")
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"{name}.yaml"
        compiler.Compiler().compile(PIPELINES[name], str(path))
        return normalize(path.read_text())


def normalize(text: str) -> str:
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if not line.startswith("#"):
            break
        match = _HEADER_DEFAULT.match(line)
        if match:
            value = ast.literal_eval(match.group(2))
            lines[index] = f"{match.group(1)}{json.dumps(value, sort_keys=True)}{match.group(3)}"
    return "\n".join(lines) + "\n"


def compile_all(out_dir: Path = COMPILED_DIR) -> list[Path]:
    """Write <out_dir>/training.yaml and continuous.yaml; returns their paths."""
    from pipelines.definitions import PIPELINES

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PIPELINES:
        path = out_dir / f"{name}.yaml"
        path.write_text(compile_pipeline(name))
        written.append(path)
    return written


def check(out_dir: Path = COMPILED_DIR) -> list[str]:
    """One message per compiled file that is missing or differs from what the pipeline code compiles to."""
    from pipelines.definitions import PIPELINES

    problems = []
    for name in PIPELINES:
        path = out_dir / f"{name}.yaml"
        if not path.is_file():
            problems.append(f"{path} is missing: run `kubeloop pipeline compile`")
        elif path.read_text() != compile_pipeline(name):
            problems.append(f"{path} is stale (the pipeline code changed): run `kubeloop pipeline compile`")
    return problems
