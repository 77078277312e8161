"""The kubeloop command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from kubeloop.errors import KubeloopError, SpecError
from kubeloop.log import setup

log = logging.getLogger("kubeloop.cli")
REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(args: argparse.Namespace) -> int:
    from kubeloop.runtime import run_file

    return run_file(Path(args.file))


def _quickstart(args: argparse.Namespace) -> int:
    if args.loop:
        from kubeloop.loop import main_loop

        return main_loop(
            epochs=args.epochs,
            workers=args.workers,
            interval=args.interval,
            break_candidate=args.break_candidate,
            shadow=args.shadow,
        )
    if args.break_candidate or args.shadow:
        raise SpecError("--break and --shadow need --loop")
    from kubeloop.quickstart import quickstart

    return quickstart(epochs=args.epochs, workers=args.workers)


def _manifests(args: argparse.Namespace) -> int:
    from kubeloop import chart, manifests

    root = Path(args.root)
    steps = (manifests, chart)
    if args.action == "generate":
        for step in steps:
            for path in step.generate(root):
                print(f"wrote {path}")
        return 0
    stale = [message for step in steps for message in step.check(root)]
    for message in stale:
        print(message, file=sys.stderr)
    if not stale:
        print("generated manifests are up to date")
    return 1 if stale else 0


def _models(args: argparse.Namespace) -> int:
    from kubeloop import models_view
    from kubeloop.registry import Registry, parse_ref

    registry = Registry()
    if args.action == "list":
        print(models_view.table(registry.list(args.ref)))
    elif args.action == "show":
        record = registry.resolve(args.ref)
        print(models_view.detail(record) if args.output == "text" else models_view.dump(record, args.output))
    elif args.action == "promote":
        name, version = parse_ref(args.ref)
        if version is None:
            raise SpecError("promote needs NAME:VERSION, e.g. kubeloop models promote arrests:2")
        record = registry.promote(name, version, args.reason or "promoted by kubeloop models promote")
        print(f"{record.metadata.name} is Production")
    elif args.action == "report":
        from kubeloop.report import write_report
        from kubeloop.status_view import sidecar_for

        record = registry.resolve(args.ref)
        sidecar = args.sidecar or sidecar_for(record.spec.model, record.spec.version)
        print(write_report(record, registry, Path(args.out) if args.out else None, sidecar=sidecar))
    elif args.action == "rollback":
        record = registry.rollback(parse_ref(args.ref)[0], args.reason or "rolled back by kubeloop models rollback")
        print(f"{record.metadata.name} is Production again")
    return 0


def _status(args: argparse.Namespace) -> int:
    from kubeloop.status_view import status_table

    print(status_table(interval=args.interval))
    return 0


def _data(args: argparse.Namespace) -> int:
    from kubeloop.data.snapshot import ingest, list_snapshots, load_snapshot
    from kubeloop.data.validation import DatasetSchema, type_findings, validate

    if args.action == "list":
        for snap in list_snapshots():
            print(f"{snap.digest}  rows={snap.rows}  source={snap.source}")
        return 0
    if args.action == "show":
        print(load_snapshot(args.target).model_dump_json(indent=2))
        return 0
    snapshot = ingest(args.target)
    if args.action == "ingest":
        print(f"{snapshot.digest}  rows={snapshot.rows}  columns={len(snapshot.columns)}")
        # stored as read; a column read as text for a few stray values is worth knowing before anyone trains on it
        for finding in type_findings(snapshot):
            print(finding, file=sys.stderr)
        return 0
    if args.label and args.label not in snapshot.columns:
        columns = ", ".join(snapshot.columns)
        raise SpecError(f"--label {args.label!r} is not a column of {args.target}; its columns are: {columns}")
    schema = DatasetSchema.from_yaml(Path(args.schema)) if args.schema else None
    baseline = load_snapshot(args.baseline) if args.baseline else None
    report = validate(snapshot, schema, baseline, label=args.label)
    print(report.to_json() if args.json else report.to_text())
    return 0 if report.ok else 1


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="kubeloop", description=__doc__)
    root.add_argument("-v", "--verbose", action="store_true")
    commands = root.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a TrainingJob (or other kubeloop resource) on this machine")
    run.add_argument("-f", "--file", required=True, help="YAML file with kubeloop resources")
    run.set_defaults(handler=_run)

    quick = commands.add_parser("quickstart", help="the embedded loop on the bundled dataset, no cluster")
    quick.add_argument("--epochs", type=int, default=8)
    quick.add_argument("--workers", type=int, default=2)
    quick.add_argument("--loop", action="store_true", help="close the loop: drift -> retrain -> gate -> canary")
    quick.add_argument(
        "--break",
        dest="break_candidate",
        choices=["errors", "garbage", "worse"],
        help="with --loop: a broken candidate (errors, garbage) or one worse on labels but not broken (worse)",
    )
    quick.add_argument(
        "--shadow",
        action="store_true",
        help="with --loop: the candidate is a shadow (mirrored traffic) first",
    )
    quick.add_argument("--interval", default="10s", help="with --loop: the canary analysis interval")
    quick.set_defaults(handler=_quickstart)

    manifests = commands.add_parser("manifests", help="generate or check the CRDs made from kubeloop/api")
    manifests.add_argument("action", choices=["generate", "check"])
    manifests.add_argument("--root", default=str(REPO_ROOT), help="repository root (default: this checkout)")
    manifests.set_defaults(handler=_manifests)

    models = commands.add_parser("models", help="the model registry")
    models.add_argument("action", choices=["list", "show", "report", "promote", "rollback"])
    models.add_argument("ref", nargs="?", help="NAME or NAME:VERSION")
    models.add_argument("-o", "--output", choices=["text", "yaml", "json"], default="text")
    models.add_argument("--reason", help="recorded in the stage history")
    models.add_argument("--out", help="report: HTML path (default $KUBELOOP_HOME/reports/<model>-v<N>.html)")
    models.add_argument("--sidecar", help="report: drift sidecar URL of a running deployment (local ones are found)")
    models.set_defaults(handler=_models)

    for command in entry_points(group="kubeloop.commands"):
        command.load()(commands)

    status = commands.add_parser("status", help="deployments running on this machine, live from their /metrics")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between the two scrapes")
    status.set_defaults(handler=_status)

    data = commands.add_parser("data", help="versioned snapshots and validation")
    data.add_argument("action", choices=["ingest", "validate", "show", "list"])
    data.add_argument("target", nargs="?", help="a path or URI (ingest, validate) or a digest (show)")
    data.add_argument("--schema", help="YAML DatasetSchema to validate against")
    data.add_argument("--baseline", help="digest of the baseline snapshot")
    data.add_argument("--label", help="label column, compared by class shares (default: the schema's label)")
    data.add_argument("--json", action="store_true", help="print the validation report as JSON")
    data.set_defaults(handler=_data)
    return root


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so the same cleanup runs (a LocalDeployment's
    processes stopped, its state file removed)."""


class StopSignals:
    """While a command runs: SIGINT and SIGTERM interrupt it once (KeyboardInterrupt, Terminated); a second one,
    during the cleanup that follows, is ignored, so that cleanup -- stopping child processes -- runs to its end
    (children still running `grace` seconds after their SIGTERM get SIGKILL, so it ends)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers belong to the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is not None:
            print(f"{signal.Signals(signum).name}: stopping already, waiting for the cleanup", file=sys.stderr)
            return
        self.received = signum
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup(args.verbose)
    needs_ref = {"show", "report", "promote", "rollback"}
    if args.command == "models" and args.action in needs_ref and not args.ref:
        parser().error(f"models {args.action} needs NAME or NAME:VERSION")
    if args.command == "data" and args.action != "list" and not args.target:
        parser().error(f"data {args.action} needs a path, URI or digest")
    with StopSignals() as signals:
        try:
            return args.handler(args)
        except SpecError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KubeloopError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            # 128 + the signal, as a shell reports a process the signal ended: 130 for Ctrl-C, 143 for SIGTERM
            signum = signals.received or signal.SIGINT
            print("terminated" if signum == signal.SIGTERM else "interrupted", file=sys.stderr)
            return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
