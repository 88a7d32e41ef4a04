"""The evaluate stage's metrics against sentence-transformers' own evaluator on a real SPLADE."""

import pytest

from pipeline import evaluate
from pipeline.sources import read_retrieval_set


def test_every_metric_equals_the_stock_evaluator_on_splade_tiny(shared, cut_beir):
    """splade-tiny on DBPedia (graded qrels, read as binary by both), max length 256: one encoding
    gives every number SparseInformationRetrievalEvaluator gives, and the max_active_dims sweep
    gives what the evaluator gives when encoding with max_active_dims=k."""
    import pandas as pd
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.evaluation import SparseInformationRetrievalEvaluator

    data = read_retrieval_set(cut_beir("dbpedia-subset", queries=12, extra_docs=200), "test")
    model_dir = shared / "models/splade-tiny"
    ours = evaluate.evaluate_model(model_dir, data, pd.DataFrame({"query": [], "positive": []}),
                                   batch_size=32, max_active_dims=[32], max_seq_length=256)
    model = SparseEncoder(str(model_dir))
    model.max_seq_length = 256
    for k, metrics in ((None, ours["metrics"]), (32, ours["max_active_dims"]["32"])):
        stock = SparseInformationRetrievalEvaluator(
            data.queries, data.corpus, {q: set(d) for q, d in data.qrels.items()},
            max_active_dims=k, batch_size=32, write_csv=False)(model)
        assert len(stock) >= 20 and set(stock) <= set(metrics)
        for name, value in stock.items():
            assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-4), (k, name)
    assert 0.1 < ours["metrics"]["dot_ndcg@10"] < 1  # a real model retrieving, not a constant
    assert ours["max_active_dims"]["32"]["corpus_active_dims"] <= 32 < ours["metrics"]["corpus_active_dims"]
