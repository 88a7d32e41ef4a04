"""Ranking metrics computed by sentence-transformers' own IR evaluator code, so every number here
means exactly what it means on a sentence-transformers model card (relevance read as binary), plus
graded nDCG@10 as trec_eval computes it (ir-measures), for graded qrels like TREC-DL's and DBPedia's,
and the headline metrics per query (ir-measures), whose means they are."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.config import HEADLINE
from pipeline.data.sources import RetrievalSet


def ranking_metrics(data: RetrievalSet, scores: dict[str, dict[str, float]],
                    prefix: str = "dot_") -> dict[str, float]:
    """Metrics of a ranking given as {query id: {doc id: score}}, named like dot_ndcg@10."""
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
    )

    relevant = {qid: set(docs) for qid, docs in data.qrels.items() if qid in data.queries}
    # no corpus: its metrics read only the ranking and the judgements (a corpus would be copied as a list)
    evaluator = InformationRetrievalEvaluator(
        {qid: data.queries[qid] for qid in relevant}, {}, relevant, write_csv=False)
    results = [[{"corpus_id": doc_id, "score": float(score)}
                for doc_id, score in scores.get(qid, {}).items()]
               for qid in evaluator.queries_ids]
    grouped = evaluator.compute_metrics(results)
    return {f"{prefix}{name.replace('@k', '')}@{k}": float(value)
            for name, per_k in grouped.items() for k, value in per_k.items()}


def mean_metrics(per_set: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's unweighted mean over evaluation sets (sentence-transformers' NanoBEIR mean)."""
    return {name: sum(m[name] for m in per_set) / len(per_set) for name in per_set[0]}


def untied(scores: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The ranking with exact score ties broken as the stock evaluator breaks them (by ascending
    document id): each tied document after the first is stepped down to the next float32 below the
    one before it, so that every tool (sentence-transformers, trec_eval, ir-measures, ranx) reads the
    same order, best first. Scores are float32, as the vectors are and as trec_eval reads them (it
    would break ties by descending id; 1e-8 apart is a tie to it)."""
    out = {}
    for query, docs in scores.items():
        ranked, previous = {}, np.float32(np.inf)
        for doc, score in sorted(((d, np.float32(s)) for d, s in docs.items()), key=lambda item: (-item[1], item[0])):
            previous = score if score < previous else np.nextafter(previous, np.float32(-np.inf))
            ranked[doc] = float(previous)
        out[query] = ranked
    return out


def scored_ranking(data: RetrievalSet, scores: dict[str, dict[str, float]]
                   ) -> tuple[dict[str, float], pd.DataFrame, dict[str, dict[str, float]]]:
    """A ranking's metrics (the stock evaluator's, and graded nDCG@10), its per-query values, and the
    ranking they were computed on, its ties broken (untied): what its run file holds."""
    ranking = untied(scores)
    per_query = per_query_values(data, ranking)
    metrics = {**ranking_metrics(data, ranking), "dot_graded_ndcg@10": float(per_query["dot_graded_ndcg@10"].mean())}
    return metrics, per_query, ranking


def judged_queries(data: RetrievalSet) -> list[str]:
    """The queries a set scores: those with judgements and a text, in qrels order."""
    return [q for q in data.qrels if q in data.queries]


def per_query_values(data: RetrievalSet, scores: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Each headline metric of each judged query (rows, by query id; columns HEADLINE), as ir-measures
    (trec_eval's code) computes it on the ranking: relevance read as binary, as the stock evaluator
    reads it, except graded nDCG@10 (each document's grade its gain). Their means are the stock
    evaluator's numbers (tested) on an untied ranking (trec_eval breaks exact ties by descending
    document id, sentence-transformers by ascending). A query with no results scores 0."""
    import ir_measures

    queries = judged_queries(data)
    run = {q: scores.get(q, {}) for q in queries}
    graded = {q: data.qrels[q] for q in queries}
    binary = {q: {doc: 1 for doc in docs} for q, docs in graded.items()}
    values = pd.DataFrame(0.0, index=pd.Index(queries, name="query_id"), columns=list(HEADLINE))
    for name, (measure, qrels) in {**{n: (m, binary) for n, m in _binary_measures().items()},
                                    "dot_graded_ndcg@10": (ir_measures.nDCG @ 10, graded)}.items():
        for result in ir_measures.iter_calc([measure], qrels, run):
            values.at[result.query_id, name] = result.value
    return values


def _binary_measures() -> dict:
    import ir_measures

    return {"dot_ndcg@10": ir_measures.nDCG @ 10, "dot_mrr@10": ir_measures.RR @ 10,
            "dot_map@100": ir_measures.AP @ 100, "dot_recall@10": ir_measures.R @ 10,
            "dot_accuracy@1": ir_measures.Success @ 1}
