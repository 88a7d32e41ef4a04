"""The thin command line every stage shares: `python -m pipeline.<stage> [--params FILE]`."""

from __future__ import annotations

import argparse
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


def run_stage(run: Callable[[Params], dict], params_file: str) -> None:
    """Run a stage on a params file; a user-fixable failure prints its message and exits 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        run(load_params(params_file))
    except (ParamsError, StageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def stage_main(run: Callable[[Params], dict], description: str, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    run_stage(run, args.params)
