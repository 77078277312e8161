"""What the kopf handlers share (operators.run_handlers, operators.deployment_handlers), and the operator's startup.

Handlers are small, level-triggered and idempotent. Every handler computes the desired children with the pure
functions of operators.rayjob / operators.batchjob (both through operators.rayrun) / operators.inferenceservice and
writes them with apply_children (operators.children: server-side apply), which changes nothing when the cluster
already matches. Children carry a controller owner reference: deleting a parent deletes them (garbage collection);
nothing outside Kubernetes is created, so no finalizer of ours is needed (kopf keeps its own on a resource while one
of its timers runs for it). What happened is posted as Kubernetes Events on the parent (emit; unit tests replace it,
and kube).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import kopf

from kubeloop.api import Resource
from kubeloop.api.load import parse_resource
from kubeloop.errors import SpecError
from kubeloop.kube import ApiError, Kube, RestKube, kind_of
from operators import common, httproute, metrics, rayrun
from operators.children import FIELD_MANAGER, Action, Conflict, apply
from operators.settings import Settings, configure_kopf, current

log = logging.getLogger("operators")

TRAININGJOB = kind_of("kubeloop.dev/v1alpha1", "TrainingJob")
MODELVERSION = kind_of("kubeloop.dev/v1alpha1", "ModelVersion")
MODELDEPLOYMENT = kind_of("kubeloop.dev/v1alpha1", "ModelDeployment")
BATCHPREDICTION = kind_of("kubeloop.dev/v1alpha1", "BatchPrediction")
RAYJOB = kind_of(rayrun.RAYJOB_API_VERSION, "RayJob")
CONFIGMAP = kind_of("v1", "ConfigMap")
INFERENCESERVICE = kind_of("serving.kserve.io/v1beta1", "InferenceService")
HTTPROUTE = kind_of(httproute.API_VERSION, "HTTPRoute")

# --- injectable collaborators (unit tests replace them) ----------------------------------------------------------

_kube: Kube | None = None


def kube() -> Kube:
    global _kube
    if _kube is None:
        _kube = RestKube.from_environment(FIELD_MANAGER, connections=settings().workers)
    return _kube


def set_kube(client: Kube | None) -> None:
    global _kube
    _kube = client


def _post_event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    try:
        kopf.event(dict(body), type=type_, reason=reason, message=message[:1024])  # type: ignore[arg-type]
    except LookupError:  # outside a running operator (a script, a test): no event queue
        log.info("event %s %s %s", type_, reason, message)


emit: Callable[[Mapping[str, Any], str, str, str], None] = _post_event


def settings() -> Settings:
    return current()


# --- helpers ------------------------------------------------------------------------------------------------------


def plain(obj: Any) -> Any:
    """kopf's read-only views (Body, Spec, Status, …) as plain dicts and lists."""
    if isinstance(obj, Mapping):
        return {key: plain(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(value) for value in obj]
    return obj


def parse(body: Mapping[str, Any]) -> Resource:
    doc = plain(body)
    doc.pop("status", None)  # the status is the operator's; a stale or foreign field must not block a reconcile
    return parse_resource(
        doc, f"{doc.get('kind')} {doc.get('metadata', {}).get('namespace')}/{doc.get('metadata', {}).get('name')}"
    )


_RUNS = ("TrainingJob", "BatchPrediction")  # kinds with a phase (the others say ready)
R = TypeVar("R", bound=Resource)


def parse_valid(body: Mapping[str, Any], patch: kopf.Patch, kind: type[R]) -> R:
    """The resource of a create, update or resume event; an invalid spec is marked in status (`invalid`) and ends
    the handler for good."""
    try:
        resource = parse(body)
    except SpecError as error:
        invalid(body, patch, error)
    assert isinstance(resource, kind)
    return resource


def invalid(body: Mapping[str, Any], patch: kopf.Patch, error: SpecError) -> None:
    message = str(error)
    run = body.get("kind") in _RUNS
    patch.status["phase" if run else "ready"] = "Failed" if run else False
    old = (body.get("status") or {}).get("conditions")
    patch.status["conditions"] = common.merge_conditions(
        plain(old), [common.condition("Valid", False, "InvalidSpec", message)]
    )
    emit(body, "Warning", "InvalidSpec", message)
    raise kopf.PermanentError(message)


def apply_children(
    owner: Mapping[str, Any], children: list[tuple[dict[str, Any], bool]]
) -> dict[str, tuple[Action, dict[str, Any]]]:
    """Apply (desired, create_only) children in order (operators.children.apply); post one Event per action,
    naming its children."""
    done: dict[str, tuple[Action, dict[str, Any]]] = {}
    try:
        for desired, create_only in children:
            try:
                action, obj = apply(kube(), desired, create_only=create_only)
            except Conflict as error:
                emit(owner, "Warning", "NameConflict", str(error))
                raise kopf.TemporaryError(str(error), delay=settings().retry_delay * 4) from None
            except ApiError as error:
                if error.status != 404:
                    raise
                message = _not_served(desired, error)
                emit(owner, "Warning", "KindNotServed", message)
                raise kopf.TemporaryError(message, delay=settings().retry_delay * 4) from None
            if action is not Action.UNCHANGED:
                metrics.child(desired["kind"], action.value)
            done[desired["kind"]] = (action, obj)
    finally:
        _report(owner, done)
    return done


_PROVIDERS = {
    "RayJob": "install the KubeRay operator (platform/up.sh)",
    "InferenceService": "install KServe (platform/up.sh)",
    "HTTPRoute": "install the Gateway API CRDs (platform/up.sh installs them with Envoy Gateway), or run the "
    'operator without a Gateway (chart value gateway.name: ""; a canary then gets no traffic)',
}


def _not_served(desired: Mapping[str, Any], error: ApiError) -> str:
    """What a 404 on writing a child means (its kind is not installed in the cluster), and what to do."""
    meta = desired["metadata"]
    return (
        f"{desired['kind']} {meta.get('namespace')}/{meta['name']}: the apiserver does not serve "
        f"{desired['apiVersion']} {desired['kind']} ({error.message}); "
        f"{_PROVIDERS.get(desired['kind'], 'install its CRD')}"
    )


def _report(owner: Mapping[str, Any], done: Mapping[str, tuple[Action, Mapping[str, Any]]]) -> None:
    """One Event per action taken ("ConfigMap a, RayJob b created"): an Event is a write, as costly as a child."""
    for action in (Action.CREATED, Action.UPDATED):
        names = [f"{kind} {obj['metadata']['name']}" for kind, (did, obj) in done.items() if did is action]
        if names:
            emit(owner, "Normal", action.value.capitalize(), f"{', '.join(names)} {action.value}")


def timed(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            result = "ok"
            try:
                return fn(*args, **kwargs)
            except kopf.TemporaryError:
                result = "retry"
                raise
            except kopf.PermanentError:
                result = "invalid"
                raise
            except Exception:
                result = "error"
                raise
            finally:
                metrics.reconciled(kind, result, time.monotonic() - started)

        return run

    return wrap


def unchanged(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether a status patch would change nothing (conditions compared without their times)."""
    for key, value in new.items():
        if key == "conditions":
            if common.strip_times(old.get(key)) != common.strip_times(value):
                return False
        elif old.get(key) != value:
            return False
    return True


# --- startup ------------------------------------------------------------------------------------------------------


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    ours = current()  # (`settings` here is kopf's)
    configure_kopf(settings, ours)
    if ours.metrics_port:
        metrics.serve(ours.metrics_port)
    log.info(
        "kubeloop operator starting: training=%s serving=%s drift=%s storage_pvc=%s webhook=%s",
        ours.training_image,
        ours.serving_image,
        ours.drift_image,
        ours.storage_pvc or "-",
        ours.webhook_enabled,
    )
