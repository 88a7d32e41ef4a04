"""The evaluate stage's metrics against sentence-transformers' own evaluator on a real SPLADE."""

import pytest

from pipeline import evaluate
from pipeline.config import EvalDataConfig
from pipeline.sources import SourceError, read_eval_sets, read_retrieval_set


def test_every_metric_equals_the_stock_evaluator_on_splade_tiny(shared, cut_beir):
    """splade-tiny on DBPedia (graded qrels, read as binary by both), max length 256: one encoding
    gives every number SparseInformationRetrievalEvaluator gives, and the max_active_dims sweep
    gives what the evaluator gives when encoding with max_active_dims=k."""
    import pandas as pd
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.evaluation import SparseInformationRetrievalEvaluator

    data = read_retrieval_set(cut_beir("dbpedia-subset", queries=12, extra_docs=200), "test")
    model_dir = shared / "models/splade-tiny"
    ours = evaluate.evaluate_model(model_dir, {"dbpedia": data}, pd.DataFrame({"query": [], "positive": []}),
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


def test_nanobeir_layout_sets_and_mean_equal_the_stock_nanobeir_evaluator(shared, cut_beir, nanobeir_en):
    """A local copy of a Hugging Face dataset in the NanoBEIR-en layout, read by short name and by
    split name: each set's metrics and their mean equal sentence-transformers' SparseNanoBEIREvaluator
    reading the same folder."""
    import pandas as pd
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.evaluation import SparseNanoBEIREvaluator

    folder = nanobeir_en({"NanoSciFact": cut_beir("scifact", queries=10, extra_docs=80),
                          "NanoDBPedia": cut_beir("dbpedia-subset", queries=10, extra_docs=80)})
    sets = read_eval_sets(EvalDataConfig(source=str(folder), format="hf", datasets=["scifact", "NanoDBPedia"]))
    assert list(sets) == ["NanoSciFact", "NanoDBPedia"] and len(sets["NanoSciFact"].qrels) == 10
    everything = read_eval_sets(EvalDataConfig(source=str(folder), format="hf"))  # no names: every set
    assert sorted(everything) == ["NanoDBPedia", "NanoSciFact"]
    with pytest.raises(SourceError, match="no set \\['fiqa2018'\\]"):
        read_eval_sets(EvalDataConfig(source=str(folder), format="hf", datasets=["fiqa2018"]))
    with pytest.raises(SourceError, match="pinned_revision"):
        read_eval_sets(EvalDataConfig(source="sentence-transformers/NanoBEIR-en"))

    model_dir = shared / "models/splade-tiny"
    ours = evaluate.evaluate_model(model_dir, sets, pd.DataFrame({"query": [], "positive": []}),
                                   batch_size=32, max_active_dims=[], max_seq_length=128)
    model = SparseEncoder(str(model_dir))
    model.max_seq_length = 128
    stock = SparseNanoBEIREvaluator(["scifact", "dbpedia"], dataset_id=str(folder), batch_size=32,
                                    write_csv=False)(model)
    compared = 0
    for name, value in stock.items():
        prefix, metric = name.split("_", 1)
        metrics = ours["metrics"] if prefix == "NanoBEIR" else ours["datasets"][prefix]
        metric = metric.removeprefix("mean_")
        assert metrics[metric] == pytest.approx(value, rel=1e-4, abs=1e-4), name
        compared += 1
    assert compared >= 3 * 20
    ndcg = [ours["datasets"][s]["dot_ndcg@10"] for s in sets]
    assert ours["metrics"]["dot_ndcg@10"] == pytest.approx(sum(ndcg) / 2) and ndcg[0] != ndcg[1]
