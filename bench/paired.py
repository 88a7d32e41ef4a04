"""How far apart two retrieval models are on a real set, and whether a second library agrees: the
shared splade-tiny against BM25 on the shared BEIR SciFact test queries (300), from the run files
the evaluate stage writes.

Ours (pipeline.evaluation.stats, scipy): each model's nDCG@10 with its 95% interval, the paired difference
with its standard error, interval and the one-sided paired randomization p-values. Checked on the
same run files with ranx (per-query and mean nDCG@10, its Fisher randomization test, two-sided) and
arch (an IID bootstrap percentile interval of the mean difference), and the textbook paired standard
error sd(d) / sqrt(n). Prints one JSON line.

    python bench/paired.py              # the whole test split (a few minutes on 2 cores)
    python bench/paired.py --smoke      # 40 queries over 600 documents (seconds)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scifact import PROJECT, SHARED  # noqa: E402  (bench/ is on sys.path)

sys.path.insert(0, str(PROJECT))
from pipeline.config import HEADLINE  # noqa: E402
from pipeline.data.sources import RetrievalSet, read_retrieval_set  # noqa: E402
from pipeline.evaluation import (
    scoring,  # noqa: E402
    stats,
)
from pipeline.evaluation.gate import compare, metric_per_query, per_set  # noqa: E402

METRIC = "dot_ndcg@10"


def cut(data: RetrievalSet, queries: int, docs: int) -> RetrievalSet:
    """The first `queries` judged queries, their judged documents and others up to `docs` in all."""
    kept = [q for q in data.qrels if q in data.queries][:queries]
    judged = {d for q in kept for d in data.qrels[q]}
    corpus = [d for d in data.corpus if d in judged] + [d for d in data.corpus if d not in judged]
    corpus = corpus[:max(docs, len(judged))]
    return RetrievalSet({d: data.corpus[d] for d in corpus}, {q: data.queries[q] for q in kept},
                        {q: data.qrels[q] for q in kept})


def library_checks(folder: Path, data: RetrievalSet, ours: dict, resampling: stats.Resampling) -> dict:
    """ranx and arch on the run files, beside ours."""
    from arch.bootstrap import IIDBootstrap
    from ranx import Qrels, Run, compare
    from ranx import evaluate as ranx_evaluate

    qrels = Qrels.from_dict({q: {d: 1 for d in docs} for q, docs in data.qrels.items()})
    runs = {model: Run.from_file(str(folder / f"{model}.trec"), kind="trec", name=model) for model in ("student", "bm25")}
    per_query = {model: ranx_evaluate(qrels, run, "ndcg@10", return_mean=False, make_comparable=True)
                 for model, run in runs.items()}
    order = sorted(qrels.keys())
    ranx_values = {model: dict(zip(sorted(runs[model].keys()), values)) for model, values in per_query.items()}
    differences = np.array([ranx_values["student"].get(q, 0.0) - ranx_values["bm25"].get(q, 0.0) for q in order])
    report = compare(qrels, list(runs.values()), ["ndcg@10"], stat_test="fisher", n_permutations=10_000,
                     random_seed=resampling.seed, make_comparable=True)
    low, high = IIDBootstrap(differences, seed=resampling.seed).conf_int(
        np.mean, reps=resampling.resamples, method="percentile", size=resampling.confidence)[:, 0]
    return {"ranx_student": float(np.mean([ranx_values["student"].get(q, 0.0) for q in order])),
            "ranx_bm25": float(np.mean([ranx_values["bm25"].get(q, 0.0) for q in order])),
            "ranx_difference": float(differences.mean()),
            "ranx_fisher_p_two_sided": float(report.to_dict()["student"]["comparisons"]["bm25"]["ndcg@10"]),
            "arch_interval": [float(low), float(high)],
            "textbook_standard_error": float(differences.std(ddof=1) / np.sqrt(len(differences))),
            "ours_two_sided_p": float(min(1.0, 2 * min(ours["p_greater"], ours["p_less"])))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="40 queries over 600 documents")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    data = read_retrieval_set(SHARED / "data/beir/scifact", "test")
    if args.smoke:
        data = cut(data, 40, 600)
    sets = {"scifact": data}
    resampling = stats.Resampling()
    with tempfile.TemporaryDirectory() as folder:
        student = scoring.evaluate_model(SHARED / "models/splade-tiny", sets, pd.DataFrame(), 32, [], 256)
        bm25 = scoring.bm25_model(sets)
        runs = Path(folder) / "runs"
        scoring.write_runs(runs, {"student": student["rankings"], "bm25": bm25["rankings"]})
        table = scoring.per_query_table({"student": student["per_query"], "bm25": bm25["per_query"]})
        values = {m: metric_per_query(table, m, METRIC) for m in ("student", "bm25")}
        ours = compare(values["student"], values["bm25"], resampling)
        result = {"queries": ours["queries"], "docs": len(data.corpus), "metric": METRIC,
                  "student": stats.interval(per_set(values["student"]), resampling),
                  "bm25": stats.interval(per_set(values["bm25"]), resampling),
                  "eval_student": student["metrics"][METRIC], "eval_bm25": bm25["metrics"][METRIC],
                  "student_minus_bm25": ours,
                  **library_checks(runs / "scifact", data, ours, resampling)}
        result["run_file_metrics"] = run_file_metrics(runs / "scifact", data)
        result["eval_metrics"] = {m: {k: s["metrics"][k] for k in HEADLINE} for m, s in (("student", student),
                                                                                         ("bm25", bm25))}
    result["seconds"] = round(time.perf_counter() - started, 1)
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return result


def run_file_metrics(folder: Path, data: RetrievalSet) -> dict:
    """The headline metrics recomputed from the run files by ir-measures (trec_eval's code)."""
    import ir_measures
    from ir_measures import AP, RR, R, Success, nDCG

    binary = {q: {d: 1 for d in docs} for q, docs in data.qrels.items()}
    measures = {"dot_ndcg@10": nDCG @ 10, "dot_mrr@10": RR @ 10, "dot_map@100": AP @ 100, "dot_recall@10": R @ 10,
                "dot_accuracy@1": Success @ 1}
    out = {}
    for model in ("student", "bm25"):
        run = list(ir_measures.read_trec_run(str(folder / f"{model}.trec")))
        found = ir_measures.calc_aggregate(list(measures.values()), binary, run)
        out[model] = {name: float(found[measure]) for name, measure in measures.items()}
        out[model]["dot_graded_ndcg@10"] = float(ir_measures.calc_aggregate([nDCG @ 10], data.qrels, run)[nDCG @ 10])
    return out


if __name__ == "__main__":
    main()
