"""What a FineTuneJob names that must exist before its Job is created, and the waiting
state the job is in until it does.

A job's Secrets (`spec.hfTokenSecretRef`, `spec.storageSecretRef`) and PVCs (`pvc://` URIs)
often arrive after it: GitOps tools sync sealed or external Secrets and claims on their own
schedule. So a missing one is a wait, not a failure: the `ReferencesResolved` condition is
False and names each missing object (and key), the job starts on the first pass that finds
them all (the periodic resync notices a new Secret: the operator only `get`s Secrets, it
never lists or watches them), and only a deadline (`FINETUNE_REFERENCE_WAIT_SECONDS`,
counted from when the condition turned False) fails it.

Pure functions over plain dicts; reconcile/finetunejob.py does the `get`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from finetune_api.constants import ConditionType as C
from finetune_api.constants import Phase, Reason
from finetune_api.finetunejob import FineTuneJob

from .builders import training
from .conditions import find, format_time, parse_time, set_condition
from .status import Outcome, apply_outcome


@dataclass(frozen=True)
class Reference:
    """One object the spec names: a Secret (and the key read from it) or a PVC."""

    kind: str
    """`Secret` or `PersistentVolumeClaim` (the API kind, for `k8s.get`)."""
    name: str
    field: str
    """The spec field that names it, for messages."""
    key: str | None = None
    """For a Secret read by key: the key that must be in it."""

    def describe(self) -> str:
        if self.kind == "Secret":
            key = f" with key {self.key!r}" if self.key else ""
            return f"Secret {self.name!r}{key} ({self.field})"
        return f"PVC {self.name!r} ({self.field})"


@dataclass(frozen=True)
class Missing:
    reference: Reference
    reason: str
    """SecretNotFound, SecretKeyNotFound or VolumeClaimNotFound."""

    def describe(self) -> str:
        ref = self.reference
        if self.reason == Reason.SECRET_KEY_NOT_FOUND:
            return f"key {ref.key!r} in Secret {ref.name!r} ({ref.field})"
        return ref.describe()


def references(ftj: FineTuneJob) -> list[Reference]:
    """Every Secret and PVC the spec names, in spec order."""
    spec = ftj.spec
    refs = []
    if spec.hf_token_secret_ref:
        refs.append(
            Reference(
                "Secret",
                spec.hf_token_secret_ref.name,
                "spec.hfTokenSecretRef",
                spec.hf_token_secret_ref.key,
            )
        )
    if spec.storage_secret_ref:
        refs.append(Reference("Secret", spec.storage_secret_ref.name, "spec.storageSecretRef"))
    for claim, (field_name, _) in training.claim_fields(ftj).items():
        refs.append(Reference("PersistentVolumeClaim", claim, field_name))
    return refs


def check(ref: Reference, obj: dict | None) -> Missing | None:
    """What is missing of `ref`, given the object a `get` returned (None: not found)."""
    if obj is None:
        return Missing(
            ref, Reason.SECRET_NOT_FOUND if ref.kind == "Secret" else Reason.VOLUME_CLAIM_NOT_FOUND
        )
    if ref.kind == "Secret" and ref.key and ref.key not in (obj.get("data") or {}):
        return Missing(ref, Reason.SECRET_KEY_NOT_FOUND)
    return None


def resolve(
    status: dict,
    missing: list[Missing],
    *,
    namespace: str,
    generation: int | None,
    wait_seconds: float,
    now: datetime | None = None,
) -> dict:
    """The status for this pass: references resolved, waiting for them, or failed for good.

    Returns a new status; the caller stops the pass (creates nothing) while its phase is
    Pending or Failed with `ReferencesResolved` False.
    """
    conds = list(status.get("conditions") or [])
    if not missing:
        conds = set_condition(
            conds,
            C.REFERENCES_RESOLVED,
            True,
            Reason.REFERENCES_FOUND,
            "every Secret and PVC the spec names exists",
            generation,
        )
        return {**status, "conditions": conds}
    now = now or datetime.now(UTC)
    previous = find(conds, C.REFERENCES_RESOLVED)
    since = (
        parse_time(previous["lastTransitionTime"])
        if previous and previous.get("status") == "False"
        else now
    )
    deadline = since + timedelta(seconds=wait_seconds)
    what = " and ".join(m.describe() for m in missing)
    reason = missing[0].reason
    if now >= deadline:
        message = (
            f"{what} still missing in namespace {namespace} after {wait_seconds:g}s "
            "(the operator's FINETUNE_REFERENCE_WAIT_SECONDS); create "
            f"{'it' if len(missing) == 1 else 'them'}, then delete and re-create this "
            "FineTuneJob (its spec is immutable)"
        )
        conds = set_condition(
            conds, C.REFERENCES_RESOLVED, False, reason, message, generation, at=format_time(now)
        )
        failed = apply_outcome(
            {**status, "conditions": conds}, Outcome(Phase.FAILED, reason, message), generation
        )
        return {**failed, "completionTime": status.get("completionTime") or format_time(now)}
    message = (
        f"waiting for {what} in namespace {namespace}: the job starts as soon as "
        f"{'it exists' if len(missing) == 1 else 'they exist'}, and fails if still "
        f"missing at {format_time(deadline)} (FINETUNE_REFERENCE_WAIT_SECONDS, "
        f"{wait_seconds:g}s)"
    )
    conds = set_condition(
        conds, C.REFERENCES_RESOLVED, False, reason, message, generation, at=format_time(now)
    )
    return apply_outcome(
        {**status, "conditions": conds}, Outcome(Phase.PENDING, reason, message), generation
    )
