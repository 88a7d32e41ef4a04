"""Ranking metrics computed by sentence-transformers' own IR evaluator code, so every number here
means exactly what it means on a sentence-transformers model card (relevance read as binary), plus
graded nDCG@10 as trec_eval computes it (ir-measures), for graded qrels like TREC-DL's and DBPedia's."""

from __future__ import annotations

from pipeline.sources import RetrievalSet

# the metrics reported side by side (student, untrained start, BM25, gain) in records and cards
HEADLINE = ["dot_ndcg@10", "dot_mrr@10", "dot_map@100", "dot_recall@10", "dot_accuracy@1",
            "dot_graded_ndcg@10"]


def ranking_metrics(data: RetrievalSet, scores: dict[str, dict[str, float]],
                    prefix: str = "dot_") -> dict[str, float]:
    """Metrics of a ranking given as {query id: {doc id: score}}, named like dot_ndcg@10."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    relevant = {qid: set(docs) for qid, docs in data.qrels.items() if qid in data.queries}
    evaluator = InformationRetrievalEvaluator(
        {qid: data.queries[qid] for qid in relevant}, data.corpus, relevant, write_csv=False)
    results = [[{"corpus_id": doc_id, "score": float(score)}
                for doc_id, score in scores.get(qid, {}).items()]
               for qid in evaluator.queries_ids]
    grouped = evaluator.compute_metrics(results)
    return {f"{prefix}{name.replace('@k', '')}@{k}": float(value)
            for name, per_k in grouped.items() for k, value in per_k.items()}


def mean_metrics(per_set: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's unweighted mean over evaluation sets (sentence-transformers' NanoBEIR mean)."""
    return {name: sum(m[name] for m in per_set) / len(per_set) for name in per_set[0]}


def graded_ndcg(data: RetrievalSet, scores: dict[str, dict[str, float]], k: int = 10) -> float:
    """trec_eval's nDCG@k, with each document's graded relevance as its gain, over the judged queries."""
    import ir_measures

    qrels = {q: docs for q, docs in data.qrels.items() if q in data.queries}
    return float(ir_measures.calc_aggregate([ir_measures.nDCG @ k], qrels,
                                            {q: scores.get(q, {}) for q in qrels})[ir_measures.nDCG @ k])
