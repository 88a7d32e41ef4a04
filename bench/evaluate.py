"""The evaluation stage against sentence-transformers' evaluator: splade-tiny on SciFact test.

Each contender runs in its own process (so that its peak RSS is its own) on the same model, data,
max length and batch size, timing the whole evaluation: load the data, encode queries and corpus,
retrieve, score.
- stock: SparseInformationRetrievalEvaluator(queries, corpus, qrels)(SparseEncoder(...));
- exact: the project's evaluation in fp32 (pipeline.evaluation.scoring.evaluate_folder);
- fast: the same with a bf16 projection (and bf16 autocast on CUDA), run only where bf16 is native
  (CUDA, CPUs with AVX512-BF16 or AMX).
Prints one JSON line: seconds, documents per second (of the whole evaluation) and peak RSS of each, the speedups over stock, the largest metric
difference of exact from stock, and the largest ranking-metric difference of fast from exact.

    python bench/evaluate.py [--data PATH] [--max-seq-length 256] [--batch-size 32]
    python bench/evaluate.py --smoke   # 10 queries over ~60 documents, length 64, bf16 forced (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPLADE_SHARED", PROJECT.parent / "shared"))
sys.path.insert(0, str(PROJECT))
RANKING = ("dot_accuracy", "dot_precision", "dot_recall", "dot_ndcg", "dot_mrr", "dot_map")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def stock(args) -> dict:
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.evaluation import (
        SparseInformationRetrievalEvaluator,
    )

    from pipeline.data.sources import read_retrieval_set

    started = time.perf_counter()
    data = read_retrieval_set(Path(args.data), "test")
    model = SparseEncoder(str(args.model), device=device())
    model.max_seq_length = args.max_seq_length
    metrics = SparseInformationRetrievalEvaluator(
        data.queries, data.corpus, {q: set(d) for q, d in data.qrels.items()},
        batch_size=args.batch_size, write_csv=False)(model)
    return {"seconds": time.perf_counter() - started, "metrics": metrics}


def project(args, precision: str) -> dict:
    from pipeline.evaluation.scoring import evaluate_folder

    metrics = evaluate_folder(Path(args.model), Path(args.data), "test", args.max_seq_length,
                              args.batch_size, precision, [])
    return {"seconds": metrics.pop("seconds"), "metrics": metrics}


def worker(args) -> None:
    result = stock(args) if args.worker == "stock" else project(args, args.worker)
    print(json.dumps({**result, "peak_rss_gb": peak_rss_gb(), "device": device()}))


def run_worker(name: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--model", str(args.model), "--data", str(args.data),
               "--max-seq-length", str(args.max_seq_length), "--batch-size", str(args.batch_size)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def largest_difference(a: dict, b: dict, names) -> float:
    return max(abs(a[n] - b[n]) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models/splade-tiny"))
    parser.add_argument("--data", default=str(SHARED / "data/beir/scifact"))
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--smoke", action="store_true",
                        help="a cut of --data (10 queries), length 64, the bf16 mode even where it is emulated")
    parser.add_argument("--worker", choices=["stock", "fp32", "bf16"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch

    from pipeline.runtime import native_bf16

    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            from pipeline.data.sources import (
                cut_retrieval_set,
                read_retrieval_set,
                write_beir,
            )

            cut = Path(scratch) / Path(args.data).name
            write_beir(cut_retrieval_set(read_retrieval_set(Path(args.data), "test"), 10, 40), cut, "test")
            args.data, args.max_seq_length, args.batch_size = cut, 64, 16
        with (Path(args.data) / "corpus.jsonl").open() as corpus:
            docs = sum(1 for _ in corpus)
        runs = {"stock": run_worker("stock", args), "exact": run_worker("fp32", args)}
        bf16 = native_bf16("cuda" if torch.cuda.is_available() else "cpu")
        if bf16 or args.smoke:  # emulated bf16 is slower than fp32: no fast mode to measure
            runs["fast"] = run_worker("bf16", args)
    stock_metrics, exact_metrics = runs["stock"]["metrics"], runs["exact"]["metrics"]
    ranking = [n for n in stock_metrics if n.startswith(RANKING)]
    print(json.dumps({
        "data": Path(args.data).name, "device": runs["stock"]["device"], "native_bf16": bf16,
        "threads": torch.get_num_threads(), "max_seq_length": args.max_seq_length, "batch_size": args.batch_size,
        "corpus_docs": docs, **{f"{name}_seconds": round(run["seconds"], 1) for name, run in runs.items()},
        **{f"{name}_docs_per_s": round(docs / run["seconds"], 1) for name, run in runs.items()},
        **{f"{name}_peak_rss_gb": round(run["peak_rss_gb"], 2) for name, run in runs.items()},
        "speedup": round(runs["stock"]["seconds"] / runs["exact"]["seconds"], 2),
        "speedup_fast": round(runs["stock"]["seconds"] / runs["fast"]["seconds"], 2) if "fast" in runs else None,
        "rss_ratio": round(runs["exact"]["peak_rss_gb"] / runs["stock"]["peak_rss_gb"], 2),
        "exact_max_metric_difference": largest_difference(exact_metrics, stock_metrics, stock_metrics),
        "fast_max_ranking_difference": round(largest_difference(runs["fast"]["metrics"], exact_metrics, ranking), 4)
        if "fast" in runs else None,
        "ndcg@10": {name: round(run["metrics"]["dot_ndcg@10"], 4) for name, run in runs.items()},
    }))


if __name__ == "__main__":
    main()
