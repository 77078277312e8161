"""Shared pieces of the kubeloop.dev/v1alpha1 API: the base model, metadata, conditions, quantities."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator
from pydantic.alias_generators import to_camel

GROUP = "kubeloop.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# RFC 1035 label: what KubeRay (and Services) ask of a name; Kubernetes checks the 63-character cap apart.
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
_SUFFIXES = {"": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_SUFFIXES |= {"E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if not _QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (examples: 500m, 2, 4Gi)")
    return value


def quantity_value(value: int | str) -> Decimal:
    """The number a valid Quantity stands for: 500m -> 0.5, 2 -> 2, 4Gi -> 4294967296."""
    if isinstance(value, int):
        return Decimal(value)
    match = _QUANTITY.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (examples: 500m, 2, 4Gi)")
    suffix = match.group(2) or ""
    return Decimal(value.removesuffix(suffix)) * _SUFFIXES[suffix]


# Kubernetes resource quantities: 2, "500m", "4Gi" (x-kubernetes-int-or-string in the CRD, where the
# pattern applies to strings only and the minimum to integers only, as controller-gen does for Quantity).
Quantity = Annotated[
    int | str,
    Field(union_mode="left_to_right"),
    AfterValidator(_check_quantity),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "pattern": _QUANTITY.pattern, "minimum": 0}),
]

# Go-style durations as Kubernetes uses them: "30s", "5m", "1h30m".
Duration = Annotated[str, Field(pattern=r"^([0-9]+(ms|s|m|h))+$", examples=["30s", "5m"])]

DnsLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=_DNS_LABEL)]


class KubeModel(BaseModel):
    """camelCase on the wire (as in every Kubernetes API), snake_case in Python; unknown fields rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ObjectMeta(BaseModel):
    # Read back from a cluster, metadata carries server fields (uid, resourceVersion, …): keep them.
    model_config = ConfigDict(populate_by_name=True, extra="allow")

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")]
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Condition(KubeModel):
    """metav1.Condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: datetime | None = None
    observed_generation: int | None = None


class PrinterColumn(BaseModel):
    name: str
    type: Literal["string", "integer", "number", "boolean", "date"]
    json_path: str
    priority: int = 0
    description: str = ""


class Resource(KubeModel):
    """A kubeloop custom resource: apiVersion, kind, metadata, spec, status."""

    KIND: ClassVar[str]
    PLURAL: ClassVar[str]
    SHORT_NAMES: ClassVar[list[str]] = []
    PRINTER_COLUMNS: ClassVar[list[PrinterColumn]] = []

    api_version: Literal["kubeloop.dev/v1alpha1"] = API_VERSION
    kind: str
    metadata: ObjectMeta

    def to_manifest(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# KubeRay refuses a RayJob whose name is not an RFC 1035 label of at most 47 characters (its RayCluster adds 6, its
# Services up to 10 more, within 63). The operator names each RayJob after the resource it runs, so those resources
# are held to the same rule and a bad name is refused on apply rather than failing later as ValidationFailed.
RAYJOB_NAME_MAX_LENGTH = 47
_RAYJOB_NAME = re.compile(DNS1035_LABEL)


def rayjob_name_is_valid(name: str) -> bool:
    """Whether name may name a resource the operator runs as a RayJob of the same name."""
    return len(name) <= RAYJOB_NAME_MAX_LENGTH and _RAYJOB_NAME.match(name) is not None


def _rayjob_name_validation(schema: dict[str, Any], cls: type[Any]) -> None:
    schema.setdefault("x-kubernetes-validations", []).append(
        {
            "rule": f"self.metadata.name.size() <= {RAYJOB_NAME_MAX_LENGTH} && "
            f"self.metadata.name.matches('{DNS1035_LABEL}')",
            "message": cls.name_rule(),
            "reason": "FieldValueInvalid",
        }
    )


class RayJobResource(Resource):
    """A resource the operator runs as a KubeRay RayJob named after it (TrainingJob, BatchPrediction)."""

    NAME_EXAMPLE: ClassVar[str]

    model_config = ConfigDict(json_schema_extra=_rayjob_name_validation)

    @classmethod
    def name_rule(cls) -> str:
        return (
            f"metadata.name must be a DNS-1035 label of at most {RAYJOB_NAME_MAX_LENGTH} characters (lowercase "
            "letters, digits and '-', starting with a letter and ending with a letter or digit), since the RayJob "
            f"takes the {cls.KIND}'s name and KubeRay refuses any other: rename it, e.g. {cls.NAME_EXAMPLE}"
        )

    @field_validator("metadata")
    @classmethod
    def _rayjob_name(cls, metadata: ObjectMeta) -> ObjectMeta:
        if not rayjob_name_is_valid(metadata.name):
            raise ValueError(f"{cls.name_rule()} (got {metadata.name!r})")
        return metadata
