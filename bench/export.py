"""Query encoding on a CPU, one query at a time (a search service's case): stock sentence-transformers
(`SparseEncoder.encode_query`, torch fp32; bf16 autocast too where the CPU has native bf16) against
the same model with its MLM exported by the export stage's code (pipeline.modelling.onnx) and run by
ONNX Runtime, in fp32 and int8, on the same queries in the same run. Tokenisation, SPLADE pooling
and the sparse output are sentence-transformers' own in all of them.

    python bench/export.py [--model ../shared/models/splade-tiny] [--queries 300]
                           [--beir ../shared/data/beir/scifact] [--inference-free models/student]

    python bench/export.py --smoke   # 30 queries, 10 passages (seconds)
Queries are the shared MS MARCO triples' (real web queries), documents its passages. Prints one JSON
line: ms/query (median) of torch, onnx_fp32 and onnx_int8 and their speedups over torch (and torch
with the ONNX encoders' max-first SPLADE pooling, to show what the pooling alone gives); parity as
the largest difference of any vector component from torch's (queries and documents, whole vectors
before any top-k cut); with --beir, nDCG@10 of torch and of int8 on that BEIR folder; with
--inference-free, the torch ms/query of that inference-free model's queries (no transformer at all).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import MethodType

import pandas as pd
from scifact import PROJECT, SHARED  # noqa: E402  (bench/ is on sys.path)

sys.path.insert(0, str(PROJECT))


def latency_ms(model, queries: list[str], bf16: bool = False) -> float:
    """Median ms of encode_query on one query, over `queries` (after a warm-up)."""
    from contextlib import nullcontext

    import torch

    times = []
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
        for query in queries[:20]:
            model.encode_query([query], convert_to_tensor=True)
        for query in queries:
            started = time.perf_counter()
            model.encode_query([query], convert_to_tensor=True)
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def largest_difference(model, reference, texts: dict[str, list[str]]) -> dict[str, float]:
    out = {}
    for side, batch in texts.items():
        encode = {"query": "encode_query", "document": "encode_document"}[side]
        a, b = (getattr(m, encode)(batch, batch_size=16, convert_to_tensor=True).to_dense() for m in (model, reference))
        out[side] = float((a - b).abs().max())
    return out


def main() -> None:
    from pipeline.data.sources import read_retrieval_set
    from pipeline.evaluation.scoring import evaluate_model
    from pipeline.modelling.encoders import load_encoder
    from pipeline.modelling.onnx import (
        ONNX_FILES,
        export_mlm,
        max_first_pooling,
        mlm_subfolder,
        onnx_encoder,
    )
    from pipeline.modelling.splade_head import splade_route
    from pipeline.runtime import native_bf16

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models/splade-tiny"))
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--documents", type=int, default=200, help="passages compared for parity")
    parser.add_argument("--beir", help="a BEIR folder: nDCG@10 of torch and int8 on its --split")
    parser.add_argument("--split", default="test")
    parser.add_argument("--inference-free", help="an inference-free SparseEncoder folder: its query latency")
    parser.add_argument("--smoke", action="store_true", help="30 queries, 10 passages")
    args = parser.parse_args()
    if args.smoke:
        args.queries, args.documents = 30, 10

    triplets = pd.read_csv(SHARED / "data/msmarco-toy-triplets/triplets.tsv", sep="\t", header=None,
                           names=["query", "positive", "negative"])
    queries = list(dict.fromkeys(triplets["query"]))[:args.queries]
    passages = list(dict.fromkeys(triplets["positive"]))[:args.documents]
    result = {"model": args.model, "queries": len(queries), "cpu": platform.processor() or platform.machine(),
              "native_bf16": native_bf16("cpu")}
    with tempfile.TemporaryDirectory() as scratch:
        saved, exported = Path(scratch) / "model", Path(scratch) / "export"
        torch_model = load_encoder(Path(args.model))
        torch_model.save_pretrained(str(saved))  # a SparseEncoder folder, whatever --model was
        torch_model.max_active_dims = None
        mlm = splade_route(torch_model)[0]
        started = time.perf_counter()
        export_mlm(mlm.auto_model, mlm.tokenizer,
                   *(exported / mlm_subfolder(saved) / "onnx" / ONNX_FILES[v] for v in ("fp32", "int8")))
        result["export_seconds"] = round(time.perf_counter() - started, 2)

        result["torch_ms"] = latency_ms(torch_model, queries)
        # how much of the ONNX speedup is the pooling: torch with the ONNX encoders' max-first pooling
        pooled_first = load_encoder(Path(args.model))
        pooled_first.max_active_dims = None
        pooling = splade_route(pooled_first)[1]
        pooling.forward = MethodType(max_first_pooling, pooling)
        result["torch_max_first_pooling_ms"] = latency_ms(pooled_first, queries)
        if native_bf16("cpu"):
            result["torch_bf16_ms"] = latency_ms(torch_model, queries, bf16=True)
        best_torch = min(result["torch_ms"], result.get("torch_bf16_ms", float("inf")))
        for variant in ONNX_FILES:
            model = onnx_encoder(saved, exported, variant)
            model.max_active_dims = None
            result[f"onnx_{variant}_ms"] = latency_ms(model, queries)
            result[f"onnx_{variant}_speedup"] = round(best_torch / result[f"onnx_{variant}_ms"], 2)
            result[f"onnx_{variant}_max_abs_diff"] = largest_difference(
                model, torch_model, {"query": queries, "document": passages})
        if args.beir:
            data = {Path(args.beir).name: read_retrieval_set(Path(args.beir), args.split)}
            for name, options in {"torch": {}, "onnx_int8": {"onnx": "int8", "export_dir": exported}}.items():
                scores = evaluate_model(saved, data, pd.DataFrame(), 32, [], **options)["metrics"]
                result[f"{name}_ndcg@10"] = scores["dot_ndcg@10"]
            result["onnx_int8_ndcg_drop"] = result["torch_ndcg@10"] - result["onnx_int8_ndcg@10"]
    if args.inference_free:
        model = load_encoder(Path(args.inference_free))
        result["inference_free_query_ms"] = latency_ms(model, queries)
        result["inference_free_query_speedup"] = round(best_torch / result["inference_free_query_ms"], 2)
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
