"""Stage 5: score the trained student, and the untrained model it started from, on the held-out
evaluation set(s), with the metrics of sentence-transformers' SparseInformationRetrievalEvaluator
(those of a sentence-transformers model card; equal to it within 1e-4, tested) computed from one
encoding of each model, plus the fraction of training triplets (the first
evaluate.max_train_triplets) whose positive the model ranks above the negative.

Writes metrics/eval.json (a DVC metrics file): {"student": {...}, "base": {...}, "gain": {...}} (pooled
over the sets when there are several, as sentence-transformers' NanoBEIR mean), each set's
under "datasets": {name: {"student", "base"}}, and with evaluate.max_active_dims both models'
retrieval metrics at each top-k size ("student_max_active_dims": {"16": {...}, ...},
"base_max_active_dims"), as CSR model cards report them. A BM25 row (bm25s) on the same sets sits
beside them ("bm25"). Each headline metric has its 95% interval over queries ("intervals", per
model) and the student's paired differences from base and BM25 theirs, with one-sided p-values
("differences"); "machine" is where it ran (pipeline.runtime.machine_fingerprint). Also
metrics/per_query.csv (each model's headline metrics per query), data/runs/<set>/<model>.trec (each
model's top 100, TREC run files), metrics/ndcg_per_dataset.csv and two figures in metrics/plots/:
nDCG@10 per set and model, and the documents' active dimensions.

SPLADE models are encoded without their full logits tensor (pipeline.modelling.splade_head), the corpus into
resumable shards in data/eval_shards/ that ranks (torchrun, or RANK / WORLD_SIZE by hand) split
between them (Sharding), or that Ray workers encode (evaluate.backend ray); each query's top 100
comes from pipeline.retrieval.search: exact sparse products a shard at a time, or past
evaluate.index.exact_max_docs documents (MS MARCO's 8.8M passages) the
blockmax index within evaluate.index.memory_gb, rank-safe by default ("index" in eval.json says what
ran). Approximate settings (a query_cut, a heap_factor below 1, a recall_target, seismic) are used only
when asked, and then "index" also says, on a sample of queries searched both ways, how far each
headline metric is from exact search's ("against_exact").
evaluate.precision bf16 trades exactness for speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import pandas as pd

from pipeline.cli import StageError, run_stage
from pipeline.config import (
    BASE_MODEL_DIR,
    EVAL_METRICS,
    EVAL_SHARDS_DIR,
    EXPORT_DIR,
    NDCG_TABLE,
    PARAMS_FILE,
    PER_QUERY,
    PLOTS_DIR,
    RUNS_DIR,
    STUDENT_DIR,
    EvaluateConfig,
    IndexConfig,
    Params,
    RayConfig,
)
from pipeline.data.shards import remove_stale
from pipeline.data.snapshots import (
    read_eval_snapshot,
    read_training_snapshot,
)
from pipeline.evaluation import plots, stats
from pipeline.evaluation.gate import compare, metric_per_query, per_set
from pipeline.evaluation.measures import (
    HEADLINE,
    judged_queries,
)
from pipeline.evaluation.scoring import (
    Sharding,
    bm25_model,
    encode_helper_shards,
    evaluate_folder,
    evaluate_model,
    per_query_table,
    write_runs,
)
from pipeline.modelling.onnx import onnx_path
from pipeline.runtime import (
    machine_fingerprint,
    process_rank,
    use_local_gpu,
)
from pipeline.tracking.records import (
    stage_record,
    write_atomically,
    write_json,
)

log = logging.getLogger(__name__)


def intervals(table: pd.DataFrame, resampling: stats.Resampling) -> tuple[dict, dict]:
    """Each model's interval for each headline metric, and the paired differences student − base
    and student − BM25 (eval.json's "intervals" and "differences")."""
    values = {(model, metric): metric_per_query(table, model, metric)
              for model in table["model"].unique() for metric in HEADLINE}
    spreads = {model: {metric: stats.interval(per_set(values[model, metric]), resampling) for metric in HEADLINE}
               for model in table["model"].unique()}
    differences = {f"student - {other}": {metric: compare(values["student", metric], values[other, metric], resampling)
                                          for metric in HEADLINE} for other in ("base", "bm25")}
    return spreads, differences


def run(params: Params) -> dict:
    cfg = params.evaluate
    rank, world_size = process_rank()
    use_local_gpu()
    if cfg.backend == "ray" and world_size > 1:
        raise StageError("evaluate.backend ray encodes the corpus on Ray workers: start the stage as one process, "
                         "not under torchrun or with WORLD_SIZE set")
    sharding = Sharding(EVAL_SHARDS_DIR, cfg.shard_docs, rank, world_size, cfg.wait_seconds,
                        cfg.ray if cfg.backend == "ray" else None)
    int8 = onnx_path(EXPORT_DIR, STUDENT_DIR, "int8").exists()  # the export stage's quantized student
    if rank > 0:  # a helper rank: its share of every corpus shard rank 0 will read, in rank 0's order
        sets = read_eval_snapshot()
        scored = [(STUDENT_DIR, None), (BASE_MODEL_DIR, None)] + ([(STUDENT_DIR, "int8")] if int8 else [])
        return {f"{folder} {onnx or ''}".strip(): encode_helper_shards(folder, sets, cfg.batch_size, cfg.precision,
                                                                        sharding, onnx=onnx)
                for folder, onnx in scored}
    with stage_record("evaluate", params) as record:
        sets = read_eval_snapshot()
        train = read_training_snapshot(cfg.max_train_triplets)
        student, base = (evaluate_model(folder, sets, train, cfg.batch_size, cfg.max_active_dims,
                                        precision=cfg.precision, index=cfg.index, sharding=sharding)
                         for folder in (STUDENT_DIR, BASE_MODEL_DIR))
        bm25 = bm25_model(sets, index=cfg.index, shard_docs=cfg.shard_docs)
        result = {"student": student["metrics"], "base": base["metrics"], "bm25": bm25["metrics"],
                  "gain": {k: student["metrics"][k] - base["metrics"][k] for k in HEADLINE},
                  "datasets": {name: {"student": student["datasets"][name], "base": base["datasets"][name],
                                      "bm25": bm25["datasets"][name]} for name in sets},
                  "index": student["index"]}
        scored = {"student": student, "base": base, "bm25": bm25}
        digests = student["shard_digests"] | base["shard_digests"]
        if int8:
            quantized = evaluate_model(STUDENT_DIR, sets, pd.DataFrame(), cfg.batch_size, [], precision=cfg.precision,
                                       index=cfg.index, onnx="int8", sharding=sharding)
            result["student_onnx_int8"] = quantized["metrics"]
            result["onnx_int8_ndcg_drop"] = student["metrics"]["dot_ndcg@10"] - quantized["metrics"]["dot_ndcg@10"]
            digests |= quantized["shard_digests"]
            scored["student_onnx_int8"] = quantized
        log.info("writing run files, metrics and figures")
        table = per_query_table({model: s["per_query"] for model, s in scored.items()})
        result["intervals"], result["differences"] = intervals(table, cfg.intervals)
        result["queries"] = sum(len(judged_queries(data)) for data in sets.values())
        result["machine"] = machine_fingerprint()  # another id explains numbers no commit changed
        write_runs(RUNS_DIR, {model: s["rankings"] for model, s in scored.items()})
        write_atomically(PER_QUERY, lambda tmp: table.to_csv(tmp, index=False))
        remove_stale(EVAL_SHARDS_DIR, digests)  # other models' vectors (the base's stay: reused next run)
        if cfg.max_active_dims:
            result["student_max_active_dims"] = student["max_active_dims"]
            result["base_max_active_dims"] = base["max_active_dims"]
        write_json(EVAL_METRICS, result)
        plots.ndcg_per_dataset(result["datasets"], PLOTS_DIR / "ndcg_per_dataset.png")
        plots.active_dims_histogram({"student": student["doc_active_dims"], "base": base["doc_active_dims"]},
                                    PLOTS_DIR / "document_active_dims.png")
        write_ndcg_table(result["datasets"], NDCG_TABLE)
        record["metrics"] = {**result["student"], **{f"base_{k}": v for k, v in result["base"].items()},
                             **{f"bm25_{k}": result["bm25"][k] for k in HEADLINE},
                             **{f"gain_{k}": v for k, v in result["gain"].items()},
                             **interval_metrics(result),
                             **({f"onnx_int8_{k}": result["student_onnx_int8"][k] for k in HEADLINE}
                                | {"onnx_int8_ndcg_drop": result["onnx_int8_ndcg_drop"]}
                                if "student_onnx_int8" in result else {}),
                             **{f"max_active_dims_{k}_{name}": metrics[name]
                                for k, metrics in result.get("student_max_active_dims", {}).items()
                                for name in HEADLINE},
                             **({f"{data_name}_{name}": per_set["student"][name]
                                 for data_name, per_set in result["datasets"].items() for name in HEADLINE}
                                if len(sets) > 1 else {})}
    return result


def interval_metrics(result: dict) -> dict[str, float]:
    """The student's intervals and its differences from base and BM25 as flat numbers (MLflow's):
    dot_ndcg@10_ci_low, ..., vs_base_dot_ndcg@10_diff, vs_base_dot_ndcg@10_p, ..."""
    flat = {}
    for metric, spread in result["intervals"]["student"].items():
        flat.update({f"{metric}_ci_low": spread["low"], f"{metric}_ci_high": spread["high"],
                     f"{metric}_se": spread["standard_error"]})
    for name, per_metric in result["differences"].items():
        other = name.split(" - ")[1]
        for metric, diff in per_metric.items():
            flat.update({f"vs_{other}_{metric}_diff": diff["difference"], f"vs_{other}_{metric}_ci_low": diff["low"],
                         f"vs_{other}_{metric}_ci_high": diff["high"], f"vs_{other}_{metric}_p": diff["p_greater"]})
    return flat


def write_ndcg_table(datasets: dict, path: Path) -> None:
    """nDCG@10 per set and model as rows (dataset, model, ndcg_at_10): `dvc plots` draws bars from it."""
    rows = [{"dataset": name, "model": model, "ndcg_at_10": metrics["dot_ndcg@10"]}
            for name, models in datasets.items() for model, metrics in models.items()]
    write_atomically(path, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))


def main(argv: list[str] | None = None) -> None:
    """The stage (`python -m pipeline.stages.evaluate [--params FILE]`), or with --model and --beir one
    model scored on one BEIR folder, its metrics written as JSON to --out."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    parser.add_argument("--model", help="a SparseEncoder folder, or a *ForMaskedLM folder (SPLADE head applied)")
    parser.add_argument("--beir", help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-seq-length", type=int)
    parser.add_argument("--batch-size", type=int, default=EvaluateConfig().batch_size)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--max-active-dims", type=int, nargs="*", default=[])
    parser.add_argument("--index", choices=["auto", "exact", "blockmax", "seismic"], default="auto",
                        help="top-100 search: exact, or approximate: blockmax (auto: past 2M documents) or seismic")
    parser.add_argument("--shards", help="keep the corpus vectors in this folder: a rerun resumes from them, "
                        "and processes started with RANK / WORLD_SIZE share the encoding (default: a temporary folder)")
    parser.add_argument("--shard-docs", type=int, default=EvaluateConfig().shard_docs, help="documents per shard")
    parser.add_argument("--ray", action="store_true", help="encode the corpus shards on Ray workers (the cluster at "
                        "RAY_ADDRESS, or one started here), one worker per CPU; needs --shards")
    parser.add_argument("--out", help="JSON file for the metrics (default: print them)")
    args = parser.parse_args(argv)
    if not (args.model or args.beir):
        return run_stage(run, args.params)
    if not (args.model and args.beir):
        parser.error("--model and --beir go together")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        use_local_gpu()
        if args.ray and not args.shards:
            parser.error("--ray needs --shards (the folder the workers' shards are written to)")
        sharding = (Sharding(Path(args.shards), args.shard_docs, *process_rank(), ray=RayConfig() if args.ray else None)
                    if args.shards else None)
        result = evaluate_folder(Path(args.model), Path(args.beir), args.split, args.max_seq_length,
                                 args.batch_size, args.precision, args.max_active_dims,
                                 IndexConfig(kind=args.index), sharding)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    if args.out:
        write_json(Path(args.out), result)
    else:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
