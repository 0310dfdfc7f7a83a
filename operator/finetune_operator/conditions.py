"""Status conditions in the `metav1.Condition` shape.

`set_condition` is the one way conditions change: `lastTransitionTime` moves only when
the status value flips, so a condition's age says how long it has been true (or false),
and a reconcile that observes nothing new writes nothing new.
"""

from __future__ import annotations

from datetime import UTC, datetime

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # metav1.Time as the API server writes it


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(TIME_FORMAT)


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)


def now() -> str:
    return format_time(datetime.now(UTC))


def find(conditions: list[dict], type_: str) -> dict | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def is_true(conditions: list[dict], type_: str) -> bool:
    c = find(conditions, type_)
    return bool(c and c.get("status") == "True")


def set_condition(
    conditions: list[dict],
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    generation: int | None,
    *,
    at: str | None = None,
) -> list[dict]:
    """Return a new list with `type_` set; other conditions keep their order. `at` is the
    time of a transition (default: now), for a caller that computes with its own clock."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    old = find(conditions, type_)
    changed = old is None or old.get("status") != value
    new = {
        "type": type_,
        "status": value,
        "reason": reason,
        # The API server caps messages at 32 KiB; ours are one or two sentences.
        "message": message[:1024],
        "lastTransitionTime": (at or now()) if changed else old["lastTransitionTime"],
    }
    if generation is not None:
        new["observedGeneration"] = generation
    if old is None:
        return [*conditions, new]
    return [new if c.get("type") == type_ else c for c in conditions]
