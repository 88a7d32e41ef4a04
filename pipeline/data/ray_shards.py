"""Shards computed by Ray workers (`backend: ray` in the teacher's and evaluate's sections): a few Ray
actors each load the model once, each missing shard of a plan goes to whichever worker is free, and
this process (the stage, under DVC) writes every shard as it comes back, atomically and under the
plan's name, as a local run writes it. So the outputs are one process's, a stage killed half way
keeps its finished shards and its rerun computes only the missing ones, and a worker that dies (its
node lost) hands its shard to the others: the stage fails only when no worker is left.

Workers read the models from the project folder at the same path (a shared file system, as a
process work pool has); the shards' texts go to them and the results come back through Ray, so the
shard folders need not be shared. Ray is imported here only: the local backend never loads it."""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError
from tqdm.auto import tqdm

from pipeline.cli import StageError
from pipeline.config import RayConfig

log = logging.getLogger(__name__)

STARTUP_GRACE_SECONDS = 120  # a node loading a large model beside others may take a minute


class Worker:
    """One Ray actor: what `build()` returns (a teacher, an encoder), built once, in the project folder."""

    def __init__(self, folder: str, threads: int, build: Callable[[], Any]):
        import torch

        if not os.path.isdir(folder):
            raise StageError(f"the Ray node at {ray.util.get_node_ip_address()} has no {folder}: Ray workers "
                             "read the models from the project folder at the same path (a shared file system)")
        os.chdir(folder)  # the params' relative paths (models/student, inputs/...) as the stage sees them
        torch.set_num_threads(threads)
        self.held = build()

    def call(self, work: Callable, *args):
        return work(self.held, *args)


class RayWorkers:
    """`with RayWorkers(cfg, build, "teacher") as workers:` connects to the cluster (cfg.address, or
    RAY_ADDRESS; without either, Ray starts one here) and starts the workers; on exit they stop."""

    def __init__(self, cfg: RayConfig, build: Callable[[], Any], name: str):
        self.cfg, self.build, self.name = cfg, build, name
        self.actors: list = []

    def __enter__(self) -> RayWorkers:
        self.connected_here = not ray.is_initialized()
        if self.connected_here:
            ray.init(address=os.environ.get("RAY_ADDRESS") or self.cfg.address, logging_level=logging.WARNING)
        nodes = [node for node in ray.nodes() if node["Alive"]]
        resources = {name: sum(node["Resources"].get(name, 0) for node in nodes) for name in ("CPU", "GPU")}
        gpus = self.cfg.gpus_per_worker
        if gpus == "auto":
            gpus = 1 if resources.get("GPU", 0) >= 1 else 0
        fits = min(resources.get("CPU", 0) // self.cfg.cpus_per_worker,
                   resources.get("GPU", 0) // gpus if gpus else math.inf)
        count = self.cfg.workers or max(1, int(fits))
        if count > fits:
            log.warning("%d Ray worker(s) asked, the cluster holds %d of %d CPU(s) and %g GPU(s): the rest wait",
                        count, fits, self.cfg.cpus_per_worker, gpus)
        worker = ray.remote(Worker).options(num_cpus=self.cfg.cpus_per_worker, num_gpus=gpus)
        self.actors = [worker.remote(os.getcwd(), self.cfg.cpus_per_worker, self.build) for _ in range(count)]
        self.keep_started()
        log.info("%s: %d Ray worker(s), %d CPU(s) and %g GPU(s) each, on %d node(s)", self.name, len(self.actors),
                 self.cfg.cpus_per_worker, gpus, len(nodes))
        return self

    def keep_started(self) -> None:
        """Wait for the first worker to start (load its model), then STARTUP_GRACE_SECONDS for the others;
        those still waiting for a place (more asked than the cluster holds, or a node just lost but
        still counted) are let go, so that no shard waits on them."""
        ready = {actor.__ray_ready__.remote(): actor for actor in self.actors}
        started, waiting = ray.wait(list(ready), num_returns=1)
        if waiting:
            more, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=STARTUP_GRACE_SECONDS)
            started += more
        for ref in started:
            self.get(ref)  # a build that failed fails here, with its error
        if waiting:
            log.warning("%s: %d Ray worker(s) found no place within %d s of the first; going on with %d",
                        self.name, len(waiting), STARTUP_GRACE_SECONDS, len(started))
            for ref in waiting:
                ray.kill(ready[ref])
        self.actors = [ready[ref] for ref in started]

    def __exit__(self, *exc) -> None:
        for actor in self.actors:
            ray.kill(actor)
        if self.connected_here:
            ray.shutdown()

    def agreed(self, work: Callable, *args):
        """work(held, *args) on every worker, which must all give the same answer (what names a
        shard: a cluster whose GPU and CPU nodes would compute differently is refused)."""
        answers = [self.get(actor.call.remote(work, *args)) for actor in self.actors]
        if any(answer != answers[0] for answer in answers):
            raise StageError(f"{self.name}: the Ray workers differ in {answers}; give them the same devices "
                             f"({self.name}.ray.gpus_per_worker)")
        return answers[0]

    def first(self, work: Callable, *args):
        """work(held, *args) on one worker."""
        return self.get(self.actors[0].call.remote(work, *args))

    def get(self, ref):
        try:
            return ray.get(ref)
        except RayActorError as error:  # it never started: its build failed, or its node is gone
            raise StageError(f"{self.name}: a Ray worker failed: {error}") from error

    def map(self, todo: list[int], payload: Callable[[int], tuple], work: Callable,
            write: Callable[[int, Any], None], size: Callable[[int], int], unit: str) -> int:
        """work(held, *payload(index)) for each index on a free worker, write(index, result) here as
        each comes back; a dead worker's shard goes back in the queue. Returns how many were redone."""
        queue, running, idle, redone = deque(todo), {}, list(self.actors), 0
        with tqdm(total=sum(map(size, todo)), unit=unit, disable=not todo,
                  desc=f"{self.name} on {len(self.actors)} Ray worker(s)") as progress:
            while queue or running:
                while queue and idle:
                    actor, index = idle.pop(), queue.popleft()
                    running[actor.call.remote(work, *payload(index))] = actor, index
                if not running:
                    raise StageError(f"{self.name}: every Ray worker died; {len(queue)} shard(s) are missing, the "
                                     "finished ones are on disk: rerun to compute the rest")
                [done], _ = ray.wait(list(running), num_returns=1)
                actor, index = running.pop(done)
                try:
                    result = ray.get(done)
                except RayActorError as error:
                    log.warning("%s: a Ray worker died on shard %d (%s); another takes it", self.name, index,
                                type(error).__name__)
                    queue.appendleft(index)
                    redone += 1
                    continue
                write(index, result)
                idle.append(actor)
                progress.update(size(index))
        return redone
