"""The floor under the operator: what creating a burst's objects costs the control plane.

    python -m finetune_bench.floor --namespace NS      (started by `bench/scale.py --floor`)

It stands where the operator stands in the scale benchmark (bench/finetune_bench/scale.py),
with the operator's environment, and does only what no operator can avoid: for each
FineTuneJob its watch sees, it creates the children the operator's first pass creates
(`reconcile.finetunejob.first_children`: the same builders, adopted the same way, the Job
last), through the operator's own client (`k8s.create_if_absent`: the same client,
retries and metrics), at most `max_concurrent_passes` jobs at once, as the operator.
It reads nothing but what planning reads (the GPU nodes, cached), plans once per spec,
writes no status and posts no Event. Its metrics endpoint is the operator's
(FINETUNE_METRICS_PORT), so the benchmark measures it as it measures the operator.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from prometheus_client import start_http_server

from finetune_api.common import API_VERSION
from finetune_api.finetunejob import FineTuneJob, TrainingPlan
from finetune_api.spec_hash import spec_hash
from finetune_operator import k8s
from finetune_operator.planning import plan_job
from finetune_operator.reconcile.finetunejob import first_children
from finetune_operator.reconcile.settings import OperatorSettings

log = logging.getLogger("finetune_bench.floor")


async def create_children(body: dict, settings: OperatorSettings, plans: dict) -> None:
    ftj = FineTuneJob.model_validate(body)
    shash = spec_hash(ftj.spec)
    plan: TrainingPlan | None = plans.get(shash)
    if plan is None:
        plan = plans[shash] = await plan_job(ftj, settings)
    for child in first_children(body, ftj, plan, shash, settings):
        await k8s.create_if_absent(child)


async def run(namespace: str, settings: OperatorSettings) -> None:
    await k8s.connect()
    start_http_server(settings.metrics_port)
    queue: asyncio.Queue[dict] = asyncio.Queue()
    plans: dict[str, TrainingPlan] = {}

    async def worker() -> None:
        while True:
            body = await queue.get()
            try:
                await create_children(body, settings, plans)
            except Exception:
                log.exception("children of %s", body["metadata"]["name"])

    workers = [asyncio.create_task(worker()) for _ in range(settings.max_concurrent_passes)]
    seen: set[str] = set()
    try:
        while True:  # a watch the server ends is started again; `seen` skips the re-listed
            async for event in k8s.watch_events(API_VERSION, "FineTuneJob", namespace):
                body = event["object"]
                name = body["metadata"]["name"]
                if event["type"] == "ADDED" and name not in seen:
                    seen.add(name)
                    queue.put_nowait(body)
    finally:
        for task in workers:
            task.cancel()
        await k8s.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--namespace", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(run(args.namespace, OperatorSettings.from_env()))


if __name__ == "__main__":
    main()
