"""Validating admission: what the CRD schemas (OpenAPI + CEL) cannot say, checked by the same pydantic models.

The CRDs already reject most invalid resources in the apiserver, naming the field. The webhook adds the rules
only the models know (``canary.analysis.steps`` strictly increasing, Quantity patterns the schema cannot
combine, …): it parses the object with ``kubeloop.api.parse_resource`` and rejects it with the model's message,
which names every field path. On an update it checks the CRD's transition rules too (a ModelDeployment's
``deploymentMode`` is immutable). A ModelDeployment whose ModelVersions do not exist yet is admitted with a
warning (``kubectl apply -f`` of a folder may create it first); the operator waits for them.

It runs only with ``KUBELOOP_WEBHOOK_ENABLED=true`` (chart: ``webhook.enabled``, which needs cert-manager for
the serving certificate): kopf refuses to start with admission handlers and no webhook server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubeloop.api import GROUP, VERSION, ModelDeployment, ModelVersion
from kubeloop.api.load import parse_resource
from kubeloop.api.modeldeployment import update_problem
from kubeloop.errors import SpecError

PLURALS = ("trainingjobs", "modelversions", "modeldeployments", "batchpredictions")


def problems(body: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> str | None:
    """Why a kubeloop resource is invalid (the model's message, naming the fields), or None when it is valid.

    With old (an UPDATE), also why it may not replace old: the CRD's transition rules (a ModelDeployment's
    deploymentMode is immutable), checked on both as parsed, so a field left out compares as its default.
    """
    doc = {key: value for key, value in body.items() if key != "status"}
    what = f"{doc.get('kind')} {(doc.get('metadata') or {}).get('name', '?')}"
    try:
        resource = parse_resource(doc, what)
    except SpecError as error:
        return str(error)
    if old is None or not isinstance(resource, ModelDeployment):
        return None
    try:
        before = parse_resource({key: value for key, value in old.items() if key != "status"})
    except SpecError:
        return None  # stored before a rule it breaks: nothing to compare
    assert isinstance(before, ModelDeployment)
    problem = update_problem(before.spec, resource.spec)
    return f"{what} is invalid:\n  {problem}" if problem else None


def missing_versions(body: Mapping[str, Any], exists: Any) -> list[str]:
    """ModelVersion names a ModelDeployment refers to that ``exists(namespace, name)`` does not find."""
    try:
        md = parse_resource({k: v for k, v in body.items() if k != "status"})
    except SpecError:
        return []
    if not isinstance(md, ModelDeployment):
        return []
    wanted = [md.spec.version] + ([md.spec.canary.version] if md.spec.canary else [])
    names = [ModelVersion.resource_name(md.spec.model, v) for v in wanted]
    return [name for name in names if not exists(md.metadata.namespace, name)]


def register() -> None:
    """Register the kopf validating handlers (called only when the webhook is enabled)."""
    import kopf

    from operators.handlers import MODELVERSION, kube, plain

    def validate(body: Mapping[str, Any], warnings: list[str], old: Mapping[str, Any] | None = None, **_: Any) -> None:
        doc = plain(body)
        problem = problems(doc, plain(old) if old is not None else None)
        if problem:
            raise kopf.AdmissionError(problem, code=422)
        if doc.get("kind") == "ModelDeployment":
            absent = missing_versions(doc, lambda ns, name: kube().get(MODELVERSION, ns, name) is not None)
            if absent:
                warnings.append(f"no ModelVersion {', '.join(absent)} yet: the deployment waits for it")

    for plural in PLURALS:
        kopf.on.validate(GROUP, VERSION, plural, id=f"validate-{plural}", operations=["CREATE", "UPDATE"])(validate)
