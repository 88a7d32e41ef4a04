"""Snapshot + validation of 1M synthetic (query, positive) pairs: wall time and peak RSS of each
stage as the pipeline runs it (`python -m pipeline.stages.snapshot` / `pipeline.stages.validate`, one process
each), beside a plain pandas parquet read + write of the same file as the floor. With --eval-docs N
the evaluation set is an MS MARCO-shaped BEIR folder of N passages (~55 words; MS MARCO dev's 6,980
queries, one judged passage each) instead of the quickstart's, and the standalone BEIR check
(`python -m pipeline.stages.validate FOLDER --kind beir`) is measured on it too.

    python bench/snapshot_validate.py [--rows 1000000] [--eval-docs 2000000]
    python bench/snapshot_validate.py --smoke   # 2,000 rows and 3,000 passages (seconds)

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

PROJECT = Path(__file__).resolve().parents[1]


def make_pairs(rows: int, seed: int = 0) -> pd.DataFrame:
    """MS MARCO-like lengths: ~6-word queries, ~55-word passages, over a 30k-word vocabulary."""
    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"w{i}" for i in range(30_000)])

    def texts(low: int, high: int, salt: int) -> list[str]:
        lengths = rng.integers(low, high, size=rows)
        words = vocabulary[rng.integers(0, len(vocabulary), size=int(lengths.sum()))]
        cuts = np.cumsum(lengths)[:-1]
        return [f"{i}-{salt} " + " ".join(chunk) for i, chunk in enumerate(np.split(words, cuts))]

    return pd.DataFrame({"query": texts(3, 10, 0), "positive": texts(30, 80, 1)})


def write_beir(docs: int, folder: Path, queries: int = 6_980) -> None:
    """An MS MARCO-shaped BEIR folder: `docs` passages, `queries` queries judging one passage each."""
    pairs = make_pairs(docs)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with (folder / "corpus.jsonl").open("w") as corpus:
        for doc, text in enumerate(pairs["positive"]):
            corpus.write(json.dumps({"_id": str(doc), "title": "", "text": text}) + "\n")
    judged = np.random.default_rng(1).choice(docs, min(queries, docs), replace=False)
    with (folder / "queries.jsonl").open("w") as texts, (folder / "qrels/test.tsv").open("w") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for query, doc in enumerate(judged):
            texts.write(json.dumps({"_id": f"q{query}", "text": pairs["query"][doc]}) + "\n")
            qrels.write(f"q{query}\t{doc}\t1\n")


def timed(command: list[str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024 ** 2  # ru_maxrss is in KiB on Linux


def pandas_copy(source: Path, target: Path) -> None:
    pd.read_parquet(source).to_parquet(target, index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--eval-docs", type=int, default=0, help="an MS MARCO-shaped BEIR folder of this many "
                        "passages as the evaluation set (0: the quickstart's)")
    parser.add_argument("--smoke", action="store_true", help="2,000 rows, 3,000 passages")
    parser.add_argument("--step", choices=["generate", "generate-beir", "pandas-copy"], help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.eval_docs = 2_000, 3_000
    # every measured step runs in a child process that starts small: a forked child's peak RSS
    # would otherwise include whatever this process held
    if args.step == "generate":
        return make_pairs(args.rows).to_parquet(args.path, index=False)
    if args.step == "generate-beir":
        return write_beir(args.eval_docs, args.path)
    if args.step == "pandas-copy":
        return pandas_copy(args.path, args.path.with_name("copy.parquet"))
    this = [sys.executable, str(Path(__file__).resolve())]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = work / "pairs.parquet"
        timed(this + ["--step", "generate", "--rows", str(args.rows), "--path", str(source)], work)
        params = yaml.safe_load((PROJECT / "params.yaml").read_text())
        params["snapshot"]["train"].update(source=str(source), kind="pairs")
        params["train"]["loss"] = "mnrl"  # pairs train contrastively (no negatives to score)
        beir = work / "msmarco-shaped"
        if args.eval_docs:
            timed(this + ["--step", "generate-beir", "--eval-docs", str(args.eval_docs), "--path", str(beir)], work)
            params["snapshot"]["eval"].update(source=str(beir), format="beir", split="test")
        (work / "params.yaml").write_text(yaml.safe_dump(params))

        floor_s, floor_gb = timed(this + ["--step", "pandas-copy", "--path", str(source)], work)
        snap_s, snap_gb = timed([sys.executable, "-m", "pipeline.stages.snapshot"], work)
        val_s, val_gb = timed([sys.executable, "-m", "pipeline.stages.validate"], work)
        report = json.loads((work / "data/validation/report.json").read_text())
        standalone = {}
        if args.eval_docs:
            beir_s, beir_gb = timed([sys.executable, "-m", "pipeline.stages.validate", str(beir), "--kind", "beir",
                                     "--params", str(work / "absent.yaml")], work)
            standalone = {"eval_docs": args.eval_docs, "standalone_beir_seconds": round(beir_s, 2),
                          "standalone_beir_peak_rss_gb": round(beir_gb, 3)}
    print(json.dumps({
        "bench": "snapshot_validate", "rows": args.rows,
        "snapshot_seconds": round(snap_s, 2), "snapshot_peak_rss_gb": round(snap_gb, 3),
        "validate_seconds": round(val_s, 2), "validate_peak_rss_gb": round(val_gb, 3),
        "total_seconds": round(snap_s + val_s, 2), "peak_rss_gb": round(max(snap_gb, val_gb), 3),
        "pandas_read_write_seconds": round(floor_s, 2), "pandas_read_write_peak_rss_gb": round(floor_gb, 3),
        "snapshot_over_pandas_read_write": round(snap_s / floor_s, 2),
        "validation_success": report["success"], "checks_failed": report["errors"] + report["warnings"],
        **standalone,
    }))


if __name__ == "__main__":
    main()
