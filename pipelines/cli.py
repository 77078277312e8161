"""`kubeloop pipeline`: compile the pipelines for the KFP dashboard, or run one locally.

The kubeloop CLI finds this command through the `kubeloop.commands` entry point (pyproject.toml), so the core
package never imports `pipelines`, an optional extra.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kubeloop.errors import KubeloopError, SpecError


def register(commands: argparse._SubParsersAction) -> None:
    pipeline = commands.add_parser("pipeline", help="Kubeflow Pipelines: compile for the dashboard, run locally")
    pipeline.add_argument("action", choices=["compile", "run"])
    pipeline.add_argument("name", nargs="?", choices=["training", "continuous"], help="the pipeline to run")
    pipeline.add_argument("-f", "--file", help="run: a TrainingJob YAML (default: the sample)")
    pipeline.add_argument("-p", "--param", action="append", default=[], help="run: KEY=VALUE (JSON values parsed)")
    pipeline.add_argument("--check", action="store_true", help="compile: exit 1 when pipelines/compiled is stale")
    pipeline.add_argument("--out", help="compile: output folder (default pipelines/compiled)")
    pipeline.set_defaults(handler=_pipeline)


def _pipeline(args: argparse.Namespace) -> int:
    try:
        import kfp  # noqa: F401
    except ModuleNotFoundError as error:
        raise KubeloopError(
            f"kubeloop pipeline needs the pipelines extra ({error}): pip install 'kubeloop[pipelines]'"
        ) from error
    if args.action == "compile":
        return _compile(args)
    if not args.name:
        raise SpecError("pipeline run needs a pipeline name: training or continuous")
    from pipelines.local import params_from_cli, run_local

    run_local(args.name, **params_from_cli(args.file, args.param))
    return 0


def _compile(args: argparse.Namespace) -> int:
    from pipelines.compile import COMPILED_DIR, check, compile_all

    out = Path(args.out) if args.out else COMPILED_DIR
    if args.check:
        stale = check(out)
        for message in stale:
            print(message, file=sys.stderr)
        if not stale:
            print("compiled pipelines are up to date")
        return 1 if stale else 0
    for path in compile_all(out):
        print(f"wrote {path}")
    return 0
