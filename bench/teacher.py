"""Teacher scoring of a realistic distillation set: the project's teacher stage against stock
`CrossEncoder.predict`, on the same model and rows, in one run.

The set: SciFact queries, each with its positive and 4 BM25 hard negatives, as triplet rows
(query, positive, negative): 4 rows per query, the way MS MARCO hard-negative sets repeat each
(query, positive). Stock scores the rows' (query, positive) and (query, negative) columns, 8 pairs a
query; the project scores each unique pair once (5 a query) through its shards. The two effects are
reported apart: `dedup_speedup` is stock on the rows against stock on the unique pairs (what not
scoring a pair twice saves), `speedup_same_pairs` the project against stock on the same unique pairs
(what the scoring itself gains); `speedup` is both together. The teacher is
MiniLM-L6-H384 (the architecture of cross-encoder/ms-marco-MiniLM-L6-v2) with the shared
all-MiniLM-L6-v2 weights and a fresh one-logit head, at max length 512.

    python bench/teacher.py [--queries 50] [--batch-size 32] [--batch-sizes 16,32,64,128]

Prints one JSON line: pairs/s of each (pairs scored per second), the three speedups above, the
largest score difference from stock (fp32), and the bf16 mode's speedup on the same pairs and its
deviation; where bf16 is native (or with --smoke, to run that path), stock in bf16 too (the model's
weights in bf16, `model_kwargs={"dtype": torch.bfloat16}`), and the bf16 mode against it.
`--smoke`: 2 queries at max length 128, no timing worth reading (the suite runs it).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scifact import PROJECT, SHARED, hard_negative_rows  # noqa: E402  (bench/ is on sys.path)

sys.path.insert(0, str(PROJECT))
NEGATIVES = 4


def minilm_cross_encoder(folder: Path, max_length: int) -> Path:
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    source = SHARED / "models/all-MiniLM-L6-v2"
    model = BertForSequenceClassification.from_pretrained(source, num_labels=1)
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(folder)
    return folder


def project_scores(model: Path, rows: pd.DataFrame, batch_size: int, precision: str,
                   shards: Path) -> tuple[np.ndarray, float, int]:
    """The teacher stage's own path: unique pairs, sharded scoring, merge, back to rows."""
    from pipeline.config import TeacherConfig
    from pipeline.modelling import teachers as teacher

    cfg = TeacherConfig(kind="cross-encoder", model=str(model), batch_size=batch_size,
                        precision=precision, shard_size=100_000)
    scorer = teacher.CrossEncoderTeacher(cfg)
    scorer.score(rows.head(8).rename(columns={"positive": "document"}), 8)  # warm-up, as for stock
    started = time.perf_counter()
    pairs, pair_index = teacher.unique_pairs(rows)
    plan = teacher.ShardPlan(shards, pairs, scorer)
    teacher.score_shards(scorer, plan, rank=0, world_size=1)
    doc_scores = plan.merged()[pair_index]
    return doc_scores, time.perf_counter() - started, len(pairs)


def stock_scores(model: Path, pairs: list[tuple[str, str]], batch_size: int,
                 bf16: bool = False) -> tuple[np.ndarray, float]:
    import torch
    from sentence_transformers import CrossEncoder

    cross_encoder = CrossEncoder(str(model), model_kwargs={"dtype": torch.bfloat16} if bf16 else None)
    cross_encoder.predict(pairs[:8], batch_size=8, show_progress_bar=False)  # warm-up
    started = time.perf_counter()
    scores = cross_encoder.predict(pairs, batch_size=batch_size, activation_fn=torch.nn.Identity(),
                                   show_progress_bar=False)
    return scores, time.perf_counter() - started


def main() -> None:
    import torch

    from pipeline.runtime import native_bf16

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batch-sizes", default="",
                        help="also time the project's fp32 scoring at each of these batch sizes")
    parser.add_argument("--smoke", action="store_true", help="2 queries, length 128: that it runs, not how fast")
    args = parser.parse_args()
    if args.smoke:
        args.queries = 2

    from pipeline.modelling.teachers import unique_pairs

    rows = hard_negative_rows(args.queries, NEGATIVES)[["query", "positive", "negative"]]
    row_pairs = list(zip(rows["query"], rows["positive"])) + list(zip(rows["query"], rows["negative"]))
    pairs, _ = unique_pairs(rows)
    with tempfile.TemporaryDirectory() as scratch:
        model = minilm_cross_encoder(Path(scratch) / "cross-encoder", 128 if args.smoke else 512)
        stock, stock_seconds = stock_scores(model, row_pairs, args.batch_size)
        stock = stock.reshape(2, len(rows)).T
        unique_pairs_list = list(zip(pairs["query"], pairs["document"]))
        stock_unique, stock_unique_seconds = stock_scores(model, unique_pairs_list, args.batch_size)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        ours, ours_seconds, unique = project_scores(model, rows, args.batch_size, "fp32",
                                                    Path(scratch) / "fp32")
        bf16, bf16_seconds, _ = project_scores(model, rows, args.batch_size, "bf16",
                                               Path(scratch) / "bf16")
        stock_bf16 = (stock_scores(model, unique_pairs_list, args.batch_size, bf16=True)
                      if native_bf16(device) or args.smoke else None)
        sweep = {}
        for size in filter(None, args.batch_sizes.split(",")):
            _, seconds, _ = project_scores(model, rows, int(size), "fp32", Path(scratch) / size)
            sweep[size] = round(unique / seconds, 2)

    labelled = 2 * len(rows)
    result = {
        "rows": len(rows), "queries": args.queries, "negatives_per_query": NEGATIVES,
        "pairs_labelled": labelled, "unique_pairs_scored": unique, "batch_size": args.batch_size,
        "stock_seconds": round(stock_seconds, 2), "stock_pairs_per_s": round(labelled / stock_seconds, 2),
        "stock_unique_seconds": round(stock_unique_seconds, 2),
        "stock_unique_pairs_per_s": round(unique / stock_unique_seconds, 2),
        "project_seconds": round(ours_seconds, 2), "project_pairs_per_s": round(unique / ours_seconds, 2),
        "dedup_speedup": round(stock_seconds / stock_unique_seconds, 3),
        "speedup_same_pairs": round(stock_unique_seconds / ours_seconds, 3),
        "speedup": round(stock_seconds / ours_seconds, 3),
        "max_abs_diff_vs_stock": float(np.abs(ours - stock).max()),
        "bf16_seconds": round(bf16_seconds, 2), "bf16_pairs_per_s": round(unique / bf16_seconds, 2),
        "bf16_speedup_same_pairs": round(stock_unique_seconds / bf16_seconds, 3),
        "bf16_max_abs_dev_vs_fp32": float(np.abs(bf16 - ours).max()),
        "score_std": float(ours.std()),  # a fresh head: bf16's deviation is best read against this
        "bf16_max_dev_over_score_std": float(np.abs(bf16 - ours).max() / ours.std()),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
        or "cpu", "threads": torch.get_num_threads(),
        "cpu_native_bf16": native_bf16("cpu"),
    }
    if stock_bf16 is not None:
        scores, seconds = stock_bf16
        result.update(stock_bf16_seconds=round(seconds, 2), stock_bf16_pairs_per_s=round(unique / seconds, 2),
                      bf16_speedup_vs_stock_bf16=round(seconds / bf16_seconds, 3),
                      stock_bf16_max_abs_dev_vs_fp32=float(np.abs(scores - stock_unique).max()))
    if sweep:
        result["project_pairs_per_s_by_batch_size"] = sweep
    print(json.dumps(result))


if __name__ == "__main__":
    main()
