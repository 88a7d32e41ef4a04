"""Work cut into fixed shards, each one file written atomically, so that a killed run loses at most
the shard in progress and a rerun does only what is missing; ranks (torchrun, or RANK / WORLD_SIZE
set by hand on machines sharing the folder) split the shards, rank r taking r, r+N, ..., and rank 0
merges. File names carry a digest of everything that determines a shard's content, so shards of
other inputs or settings are never reused. The teacher's scores and the evaluation's corpus vectors
are written this way."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from pipeline.cli import StageError

log = logging.getLogger(__name__)


class ShardFiles:
    def __init__(self, folder: Path, key: dict, count: int, suffix: str):
        self.folder, self.key, self.count, self.suffix = folder, key, count, suffix
        folder.mkdir(parents=True, exist_ok=True)
        self.digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def path(self, index: int) -> Path:
        return self.folder / f"{self.digest}-{index:05d}-of-{self.count:05d}{self.suffix}"

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if not self.path(i).exists()]

    def owed(self, rank: int, world_size: int) -> tuple[range, list[int]]:
        """This rank's shards, and those of them not yet written."""
        mine = range(rank, self.count, world_size)
        return mine, [i for i in mine if not self.path(i).exists()]


def remove_stale(folder: Path, keep: set[str]) -> None:
    """Delete the shards of plans other than those whose digests are in `keep`, and files of killed writes."""
    for path in folder.iterdir():
        if not path.name.startswith(tuple(keep)) or path.suffix.startswith(".tmp"):
            path.unlink()


def wait_for_shards(plan: ShardFiles, world_size: int, wait_seconds: float, command: str,
                    poll_seconds: float = 2.0) -> None:
    """Rank 0 merges once the other ranks' shards are in. When none has arrived for `wait_seconds`
    (a rank died, or was never started) it stops, naming the missing shards and the ranks that owe
    them, and the `command` that restarts a rank."""
    missing = plan.missing()
    if missing:
        log.info("waiting for %d shard(s) from the other ranks", len(missing))
    progress = time.monotonic()
    while missing:
        if time.monotonic() - progress > wait_seconds:
            ranks = sorted({index % world_size for index in missing})
            raise StageError(
                f"no new shard for {wait_seconds:g} s: shard(s) {missing} of {plan.count} "
                f"({plan.folder}/{plan.digest}-*) are missing, owed by rank(s) {ranks} of {world_size}. "
                f"Restart those ranks (RANK=r WORLD_SIZE={world_size} {command}) and rerun")
        time.sleep(min(poll_seconds, wait_seconds))
        still = plan.missing()
        if len(still) < len(missing):
            progress = time.monotonic()
        missing = still
