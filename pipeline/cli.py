"""The thin command line every stage shares: `python -m pipeline.<stage> [--params FILE]`."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from typing import Callable

from pipeline.config import PARAMS_FILE, Params, ParamsError, load_params

# Quiet by default: no telemetry from the libraries we drive (MLflow honours only "true").
for _name, _value in {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                      "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
                      "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_name, _value)


class StageError(RuntimeError):
    """A failure the user can fix (bad input, failed check): printed without a traceback."""


class GateRefused(StageError):
    """The evaluation gate (pipeline.evaluation.gate) said no: nothing is pushed or promoted, and the run is on
    record as refused. Carries the verdict (its numbers)."""

    def __init__(self, message: str, verdict: dict | None = None):
        super().__init__(message)
        self.verdict = {**(verdict or {}), "passed": False, "reason": message}


# a write the disk (or the quota, or the file-size limit) refused
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# how libraries that wrap the OS error in their own (pyarrow, torch, safetensors) still word it
DISK_FULL_WORDS = ("No space left", "Disk quota exceeded", "File too large", "file write failed")


def disk_full(exc: BaseException) -> bool:
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        if any(words in str(seen) for words in DISK_FULL_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def run_stage(run: Callable[[Params], dict], params_file: str) -> None:
    """Run a stage on a params file; a user-fixable failure (a full disk among them) prints its
    message and exits 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        run(load_params(params_file))
    except (ParamsError, StageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:
        if not disk_full(exc):
            raise
        print(f"error: the disk refused a write ({exc}): free some space and rerun; every output is "
              "written whole or not at all, so no partial file is kept", file=sys.stderr)
        sys.exit(1)


def stage_main(run: Callable[[Params], dict], description: str, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    run_stage(run, args.params)
