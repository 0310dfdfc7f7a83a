"""How soon a FineTuneJob's pass should run, from the events the handlers see (coalesce.Priority).

A job whose status names no Job yet goes before up-to-date ones (NEW). A job whose Job or
pod has finished while its status does not say so goes first of all (FINISHING): one short
pass makes the status current, and during a burst of new jobs such passes used to wait for
the whole burst (status lag of 30-48 s behind 1,000 new jobs on the 2-core benchmark
machine). Deciding that needs to know whether the FineTuneJob's status already records its
completion, which only the FineTuneJob's own events show: `Urgency` remembers it per job
(one small entry per FineTuneJob, dropped when the job is deleted), and remembers a finished
child whose FineTuneJob it has not seen yet, so that whichever of the two events comes second
(after a restart the watches list everything again, in no set order) asks for the early pass.
A finished Job whose FineTuneJob already records completion, as after every restart, gets an
ordinary pass.
"""

from __future__ import annotations

from .coalesce import Priority

Key = tuple[str, str]
"""(namespace, FineTuneJob name)"""

FINISHED_JOB_CONDITIONS = frozenset({"Complete", "Failed", "SuccessCriteriaMet", "FailureTarget"})
"""Job conditions that mean its pods are done (the last two: set first since Kubernetes 1.31,
before the Job controller has cleaned up)."""


def job_finished(status: dict | None) -> bool:
    return any(
        c.get("type") in FINISHED_JOB_CONDITIONS and c.get("status") == "True"
        for c in (status or {}).get("conditions") or []
    )


def pod_finished(status: dict | None) -> bool:
    return (status or {}).get("phase") in ("Succeeded", "Failed")


class Urgency:
    def __init__(self) -> None:
        self.completed: dict[Key, bool] = {}
        """FineTuneJobs seen: whether their status records a completion time."""
        self.unseen_finished: set[Key] = set()
        """FineTuneJobs not seen yet whose Job or a pod was seen finished."""

    def finetunejob(self, key: Key, status: dict | None, deleted: bool = False) -> Priority:
        """The priority of the pass for a FineTuneJob event."""
        if deleted:
            self.completed.pop(key, None)
            self.unseen_finished.discard(key)
            return Priority.OTHER
        status = status or {}
        done = bool(status.get("completionTime"))
        self.completed[key] = done
        child_finished = key in self.unseen_finished
        self.unseen_finished.discard(key)
        if done:
            return Priority.OTHER
        if child_finished:
            return Priority.FINISHING
        return Priority.NEW if not status.get("jobName") else Priority.OTHER

    def child_finished(self, key: Key, deleted: bool = False) -> Priority:
        """The priority of the pass for a FineTuneJob whose Job or pod was seen finished.
        A finished child seen deleted is no news to hurry: mostly it goes with its FineTuneJob,
        whose own deletion came first, and remembering it would outlive that job."""
        if deleted:
            return Priority.OTHER
        done = self.completed.get(key)
        if done is None:
            self.unseen_finished.add(key)  # its own event, when it comes, asks for the pass
            return Priority.OTHER
        return Priority.OTHER if done else Priority.FINISHING

    def __len__(self) -> int:
        return len(self.completed) + len(self.unseen_finished)
