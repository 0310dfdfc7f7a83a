"""Building blocks shared by every kind in `finetune.dev/v1alpha1`.

This module owns: the two model bases (strict specs, lenient statuses), the
`metav1.Condition` shape, Secret references, Kubernetes quantities (parsing to bytes and
formatting for people), bounded string types (DNS labels, URIs by scheme) and the helper
that attaches CEL rules (`x-kubernetes-validations`) to a schema.

Every constraint is stated twice on purpose, side by side: once as a pydantic check (so
the worker and the operator reject a bad spec with the same words) and once as OpenAPI /
CEL (so the API server rejects it before anything runs). `crdgen` turns these models into
the CRDs; there is no second schema.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class SpecModel(BaseModel):
    """Base for everything users write: unknown fields are errors, not silently dropped.

    The API server prunes unknown fields; the worker reads the same models and must not be
    more forgiving, or a typo (`learningrate`) would train with the default.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )


class StatusModel(BaseModel):
    """Base for what the operator and the worker write: newer fields are ignored on read,
    so an older component can still read a status written by a newer one."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        use_attribute_docstrings=True,
    )


def to_k8s(model: BaseModel) -> dict[str, Any]:
    """The JSON-ready dict to send to the API server: camelCase keys, no nulls."""
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


# --- CEL ----------------------------------------------------------------------------------


def cel(
    rule: str, message: str, *, field_path: str | None = None, reason: str | None = None
) -> dict[str, str]:
    """One `x-kubernetes-validations` entry. `field_path` makes the API server report the
    error on that child field (e.g. `.maxSteps`) instead of on the enclosing object."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """`json_schema_extra` carrying CEL rules; crdgen copies it into the CRD as is."""
    return {"x-kubernetes-validations": list(rules)}


def exactly_one_cel(a: str, b: str, where: str) -> dict[str, str]:
    return cel(
        f"has(self.{a}) != has(self.{b})", f"exactly one of {where}.{a} and {where}.{b} must be set"
    )


def at_most_one_cel(a: str, b: str, where: str) -> dict[str, str]:
    return cel(
        f"!(has(self.{a}) && has(self.{b}))",
        f"at most one of {where}.{a} and {where}.{b} may be set",
    )


# --- Quantities ---------------------------------------------------------------------------

# Non-negative quantities only: Kubernetes' own syntax (and CEL's `isQuantity`) admits a
# sign, so `-2` CPUs would pass `isQuantity` and break the operator later. The CRDs carry
# this same pattern, so the API server and the models accept exactly the same strings.
QUANTITY_PATTERN = (
    r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"([eE][-+]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$"
)
_QUANTITY = re.compile(QUANTITY_PATTERN)
_SUFFIX = {
    None: Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}


def parse_quantity_decimal(value: str | float) -> Decimal:
    """A Kubernetes quantity (`24Gi`, `500m`, `1.5e9`, `8`) as an exact decimal."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Decimal(str(value))
    text = str(value).strip()
    match = _QUANTITY.match(text)
    if not match:
        raise ValueError(
            f"{value!r} is not a Kubernetes quantity; expected a non-negative number with an "
            f"optional suffix such as 24Gi, 40G, 512Mi or 500m"
        )
    number, suffix = match.groups()
    try:
        base = Decimal(number)
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from exc
    if suffix and suffix[0] in "eE":
        return base * (Decimal(10) ** int(suffix[1:]))
    return base * _SUFFIX[suffix]


def parse_quantity(value: str | float) -> int:
    """A memory quantity in bytes, rounded up (`parse_quantity("24Gi") == 25769803776`)."""
    return math.ceil(parse_quantity_decimal(value))


def format_bytes(n: float) -> str:
    """Bytes for people, in binary units with one decimal: 18253611008 -> `17.0Gi`."""
    value = float(n)
    for unit in ("", "Ki", "Mi", "Gi", "Ti", "Pi"):
        if abs(value) < 1024 or unit == "Pi":
            return f"{int(value)}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _check_quantity(value: str) -> str:
    parse_quantity_decimal(value)
    return value


def _check_positive_quantity(value: str) -> str:
    if parse_quantity_decimal(value) <= 0:
        raise ValueError(f"{value!r} must be a positive quantity such as 24Gi")
    return value


def _stringify(value: Any) -> Any:
    # YAML turns `memory: 16` into an int; a quantity is still meant.
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


# Quantities are strings in our CRDs (like `24Gi`); the CEL library checks them the same
# way Kubernetes does. Bounded length keeps CEL's cost estimate small.
Quantity = Annotated[
    str,
    BeforeValidator(_stringify),
    AfterValidator(_check_quantity),
    Field(
        max_length=64,
        json_schema_extra=validations(
            cel(
                f"self.matches(r'{QUANTITY_PATTERN}') && isQuantity(self)",
                "must be a non-negative Kubernetes quantity such as 24Gi, 512Mi, 4 or 500m "
                "(no sign)",
            )
        ),
    ),
]
PositiveQuantity = Annotated[
    str,
    BeforeValidator(_stringify),
    AfterValidator(_check_positive_quantity),
    Field(
        max_length=64,
        json_schema_extra=validations(
            cel(
                f"self.matches(r'{QUANTITY_PATTERN}') && isQuantity(self) && "
                "quantity(self).isGreaterThan(quantity('0'))",
                "must be a positive quantity such as 24Gi (no sign)",
            )
        ),
    ),
]


# --- Names and URIs -----------------------------------------------------------------------

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def _check_dns_label(value: str) -> str:
    if len(value) > 63 or not re.match(DNS_LABEL_PATTERN, value):
        raise ValueError(
            f"{value!r} is not a valid DNS label: use at most 63 lower-case letters, digits "
            f"and '-', starting and ending with a letter or digit"
        )
    return value


DNSLabel = Annotated[
    str,
    AfterValidator(_check_dns_label),
    Field(
        max_length=63,
        json_schema_extra=validations(
            cel(
                f"self.matches('{DNS_LABEL_PATTERN}')",
                "must be a DNS label: lower-case letters, digits and '-', "
                "starting and ending with a letter or digit",
            )
        ),
    ),
]

# Children are named `<object>-<suffix>` and pods add a hash; names must leave room for both
# and stay DNS labels (63), which is also what Service names and pod labels require.
MAX_NAME_LENGTH = 45


# What the API server itself requires of every object name (a DNS-1123 subdomain): a name
# that breaks this is rejected with the server's own message, so our rule stays silent on it.
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_SUBDOMAIN_MAX_LENGTH = 253


def object_name_rule(kind: str, uses: str, *, letter_first: bool = False) -> dict[str, str]:
    """Root-level CEL rule on `metadata.name` (the only metadata CEL can see), reported on
    the field `metadata.name` and only for names the API server's own check lets through,
    so one bad name gets one message."""
    first = "[a-z]" if letter_first else "[a-z0-9]"
    start = "a letter" if letter_first else "a letter or digit"
    name = "self.metadata.name"
    return cel(
        f"{name}.size() > {DNS_SUBDOMAIN_MAX_LENGTH} || "
        f"!{name}.matches(r'{DNS_SUBDOMAIN_PATTERN}') || "
        f"({name}.size() <= {MAX_NAME_LENGTH} && {name}.matches('^{first}([-a-z0-9]*[a-z0-9])?$'))",
        f"must be a DNS label of at most {MAX_NAME_LENGTH} characters (lower-case letters, digits "
        f"and '-', no '.', starting with {start}) because it names the {kind}'s {uses}",
        field_path=".metadata.name",
    )


# Hugging Face repository ids: `gpt2` or `owner/name`.
HF_REPO_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$"
URI_PATTERNS = {
    "hf": r"^hf://[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)*$",
    # The claim is a DNS label; the path inside the volume is optional.
    "pvc": r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^\s]*)?$",
    "s3": r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?$",
}
URI_EXAMPLES = {"hf": "hf://owner/name", "pvc": "pvc://claim/path", "s3": "s3://bucket/key"}


def _uri_type(*schemes: str) -> Any:
    pattern = "|".join(f"({URI_PATTERNS[s]})" for s in schemes)
    examples = ", ".join(URI_EXAMPLES[s] for s in schemes[:-1])
    examples = (
        f"{examples} or {URI_EXAMPLES[schemes[-1]]}" if examples else URI_EXAMPLES[schemes[0]]
    )
    message = f"must be a URI of the form {examples}"

    def check(value: str) -> str:
        if not re.match(pattern, value):
            raise ValueError(f"{value!r} {message}")
        return value

    return Annotated[
        str,
        AfterValidator(check),
        Field(
            max_length=1024,
            json_schema_extra=validations(
                # A raw CEL string: the pattern's backslashes (`\s`) are regex, not CEL escapes.
                cel(f"self.matches(r'{pattern}')", message)
            ),
        ),
    ]


SourceURI = _uri_type("hf", "pvc", "s3")
"""Where a model or dataset is read from."""
StorageURI = _uri_type("pvc", "s3")
"""Where an artifact is written (an adapter, a merged model)."""
OutputURI = _uri_type("pvc", "s3", "hf")
"""Where an adapter is written; `hf://` pushes to the Hugging Face Hub."""


def uri_scheme(uri: str) -> str:
    return uri.split("://", 1)[0]


# Free-form but bounded strings (CEL cost estimates need a maximum length).
ShortString = Annotated[str, Field(min_length=1, max_length=253)]
Message = Annotated[str, Field(max_length=32768)]


# --- Time ---------------------------------------------------------------------------------


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# metav1.Time: RFC 3339 at second precision in UTC, which is what the API server stores.
Timestamp = Annotated[
    datetime,
    AfterValidator(_utc),
    PlainSerializer(
        lambda v: _utc(v).strftime("%Y-%m-%dT%H:%M:%SZ"), return_type=str, when_used="json"
    ),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


# --- Shared structures --------------------------------------------------------------------


class Condition(StatusModel):
    """One observation of the object's state, in the shape of `metav1.Condition`."""

    type: Annotated[str, Field(max_length=316)]
    """CamelCase condition type, e.g. `Running`."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds: True, False or Unknown."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The `.metadata.generation` this condition was computed from."""
    last_transition_time: Timestamp
    """When `status` last changed (not when the condition was last written)."""
    reason: Annotated[str, Field(max_length=1024)]
    """CamelCase programmatic reason, one of the constants in `api.constants.Reason`."""
    message: Message = ""
    """What happened and what to do, for people."""


def conditions_schema_extra() -> dict[str, Any]:
    # Conditions are a map keyed by type: server-side apply merges them per type.
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


class SecretKeySelector(SpecModel):
    """A key of a Secret in the object's namespace. Credentials are never written inline."""

    name: Annotated[str, Field(min_length=1, max_length=253)]
    """Name of the Secret."""
    key: Annotated[str, Field(min_length=1, max_length=253)] = "token"
    """Key inside the Secret."""


class LocalSecretReference(SpecModel):
    """A whole Secret in the object's namespace, mounted as a directory of files."""

    name: Annotated[str, Field(min_length=1, max_length=253)]
    """Name of the Secret."""


class LocalObjectReference(SpecModel):
    """An object of a known kind in the same namespace."""

    name: DNSLabel
    """Name of the object, in this namespace."""


class ObjectReference(StatusModel):
    """A reference written by the operator into status."""

    name: str
    """Name of the object."""
    namespace: str | None = None
    """Namespace of the object."""
    uid: str | None = None
    """UID of the object (tells a re-created object of the same name apart)."""


class Artifact(StatusModel):
    """A file tree the system produced: where it is and how to check it."""

    uri: str
    """Where the artifact is."""
    size_bytes: int | None = None
    """Total size of its files, in bytes."""
    sha256: str | None = None
    """Digest over the artifact's files (see the adapter manifest for per-file digests)."""


class ObjectMeta(BaseModel):
    """The part of `metav1.ObjectMeta` the operator reads; everything else is kept."""

    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel, extra="allow")

    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


DType = Literal["bfloat16", "float16", "float32"]
