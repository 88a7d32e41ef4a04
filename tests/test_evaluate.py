"""The evaluate stage's metrics against sentence-transformers' own evaluator on a real SPLADE."""

import pytest

from pipeline import evaluate
from pipeline.config import EvalDataConfig, IndexConfig
from pipeline.retrieval import ExactIndex, index_kind
from pipeline.sources import SourceError, read_eval_sets, read_retrieval_set


def test_every_metric_equals_the_stock_evaluator_on_splade_tiny(shared, cut_beir):
    """splade-tiny on DBPedia (graded qrels, read as binary by both), max length 256: one encoding
    gives every number SparseInformationRetrievalEvaluator gives, and the max_active_dims sweep
    gives what the evaluator gives when encoding with max_active_dims=k."""
    import pandas as pd
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.evaluation import SparseInformationRetrievalEvaluator

    data = read_retrieval_set(cut_beir("dbpedia-subset", queries=12, extra_docs=100), "test")
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


def test_ranking_metrics_agree_with_trec_eval_and_graded_ndcg_uses_the_grades(shared, cut_beir):
    """The ranking metrics (sentence-transformers' code) against trec_eval's (ir-measures) on the
    same ranking of a graded set; graded nDCG@10 is trec_eval's with the grades as gains."""
    import ir_measures
    from ir_measures import AP, P, R, RR, Success, nDCG
    from sentence_transformers import SparseEncoder

    from pipeline.metrics import ranking_metrics

    data = read_retrieval_set(cut_beir("dbpedia-subset", queries=12, extra_docs=100), "test")
    assert {2, 1} <= {grade for docs in data.qrels.values() for grade in docs.values()}
    model = SparseEncoder(str(shared / "models/splade-tiny"))
    model.max_seq_length = 128
    vectors = evaluate.encode(model, data, batch_size=32)
    ranking = {q: {vectors.doc_ids[j]: float(s) for j, s in zip(indices, scores)}
               for q, (indices, scores) in zip(vectors.query_ids, ExactIndex(vectors.corpus).search(vectors.queries))}
    ours = ranking_metrics(data, ranking)
    binary = {q: {d: 1 for d in docs} for q, docs in data.qrels.items()}
    trec = ir_measures.calc_aggregate([nDCG@10, RR@10, AP@100, R@10, P@10, Success@1], binary, ranking)
    for name, measure in {"dot_ndcg@10": nDCG@10, "dot_mrr@10": RR@10, "dot_map@100": AP@100,
                          "dot_recall@10": R@10, "dot_precision@10": P@10, "dot_accuracy@1": Success@1}.items():
        assert ours[name] == pytest.approx(trec[measure], abs=1e-6), name
    graded = evaluate.retrieval_scores(vectors, data).metrics["dot_graded_ndcg@10"]
    assert graded == pytest.approx(ir_measures.calc_aggregate([nDCG@10], data.qrels, ranking)[nDCG@10], abs=1e-9)
    assert graded != pytest.approx(ours["dot_ndcg@10"], abs=1e-3)  # the grades count


def test_command_line_scores_a_plain_masked_lm_folder(tmp_path, shared, cut_beir):
    """The outside contract: `python -m pipeline.evaluate --model --beir --split --max-seq-length
    --out` on a *ForMaskedLM folder (the shared splade-tiny has no sentence-transformers files)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    assert not (shared / "models/splade-tiny/modules.json").exists()
    out = tmp_path / "metrics.json"
    subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--model", str(shared / "models/splade-tiny"),
                    "--beir", str(cut_beir("trec-dl19-subset", queries=5, extra_docs=60)), "--split", "test",
                    "--max-seq-length", "128", "--out", str(out)], check=True,
                   cwd=Path(evaluate.__file__).parents[1], capture_output=True)
    result = json.loads(out.read_text())
    required = {"dot_ndcg@10", "dot_mrr@10", "dot_map@100", "dot_recall@10", "dot_accuracy@1",
                "query_active_dims", "corpus_active_dims", "seconds"}
    assert required <= set(result) and result["seconds"] > 0
    assert 0 < result["dot_graded_ndcg@10"] < result["dot_ndcg@10"] == 1.0  # binary saturates on DL19
    assert 0 < result["query_active_dims"] < result["corpus_active_dims"] < 30522


@pytest.mark.slow  # 21 s: the approximate index only serves corpora past evaluate.index.exact_max_docs
def test_seismic_index_ranks_by_the_true_dot_products_and_finds_what_exact_finds(shared, cut_beir):
    """splade-tiny vectors of 1,000+ DBPedia documents: seismic's hits carry their dot products,
    most of exact's top 10 is found, and the metrics move little; auto picks by corpus size."""
    import numpy as np
    from sentence_transformers import SparseEncoder

    from pipeline.retrieval import SeismicIndex

    data = read_retrieval_set(cut_beir("dbpedia-subset", queries=40, extra_docs=1000), "test")
    model = SparseEncoder(str(shared / "models/splade-tiny"))
    model.max_seq_length = 128
    vectors = evaluate.encode(model, data, batch_size=32)
    exact = list(ExactIndex(vectors.corpus).search(vectors.queries, 100))
    approximate = list(SeismicIndex(vectors.corpus).search(vectors.queries, 100))
    dense = (vectors.queries @ vectors.corpus.T).toarray()
    for q, (rows, scores) in enumerate(approximate):
        assert len(rows) == 100 and np.all(np.diff(scores) <= 0)
        np.testing.assert_allclose(scores, dense[q, rows], rtol=1e-3)  # seismic stores rounded weights
    overlap = np.mean([len(np.intersect1d(a[0][:10], e[0][:10])) / 10 for a, e in zip(approximate, exact)])
    assert overlap >= 0.9
    exact_metrics = evaluate.retrieval_scores(vectors, data, index=IndexConfig(kind="exact")).metrics
    seismic_metrics = evaluate.retrieval_scores(vectors, data, index=IndexConfig(kind="seismic")).metrics
    assert seismic_metrics["dot_ndcg@10"] == pytest.approx(exact_metrics["dot_ndcg@10"], abs=0.03)
    auto = IndexConfig(exact_max_docs=1000)
    assert index_kind(auto, 1000) == "exact" and index_kind(auto, 1001) == "seismic"


def test_corpus_encoded_in_chunks_equals_one_pass_and_bf16_stays_close(shared, cut_beir):
    """The corpus encoded a few documents at a time gives the same rows as one pass, and the same as
    sentence-transformers' encode_document (fp32, also with the model's max_active_dims); bf16 mode
    keeps values within 0.05 of them."""
    import numpy as np
    from sentence_transformers import SparseEncoder

    data = read_retrieval_set(cut_beir("scifact", queries=4, extra_docs=40), "test")
    model = SparseEncoder(str(shared / "models/splade-tiny"))
    model.max_seq_length = 128
    whole, chunked = (evaluate.encode(model, data, batch_size=8, chunk_docs=n) for n in (10_000, 7))
    assert (whole.corpus != chunked.corpus).nnz == 0 and whole.corpus.shape == chunked.corpus.shape
    stock = evaluate.to_csr(model.encode_document([data.corpus[d] for d in whole.doc_ids], convert_to_tensor=True).cpu())
    assert abs(whole.corpus - stock).max() == 0.0
    bf16 = evaluate.encode(model, data, batch_size=8, bf16=True)
    assert 0 < abs(bf16.corpus - whole.corpus).max() < 0.05
    model.max_active_dims = 16
    capped = evaluate.encode(model, data, batch_size=8)
    assert np.diff(capped.corpus.indptr).max() == 16
    stock = evaluate.to_csr(model.encode_document([data.corpus[d] for d in capped.doc_ids], convert_to_tensor=True).cpu())
    assert abs(capped.corpus - stock).max() == 0.0


@pytest.mark.slow
def test_full_size_parity_on_the_dbpedia_subset(shared):
    """Issue-size check (minutes on 2 CPU cores): the whole DBPedia subset at max length 256, every
    metric against the stock evaluator."""
    import pandas as pd
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.evaluation import SparseInformationRetrievalEvaluator

    model_dir = shared / "models/splade-tiny"
    data = read_retrieval_set(shared / "data/beir/dbpedia-subset", "test")
    ours = evaluate.evaluate_model(model_dir, {"dbpedia": data}, pd.DataFrame(), batch_size=32,
                                   max_active_dims=[], max_seq_length=256, precision="fp32")["metrics"]
    model = SparseEncoder(str(model_dir))
    model.max_seq_length = 256
    stock = SparseInformationRetrievalEvaluator(data.queries, data.corpus, {q: set(d) for q, d in data.qrels.items()},
                                                batch_size=32, write_csv=False)(model)
    for name, value in stock.items():
        assert ours[name] == pytest.approx(value, rel=1e-4, abs=1e-4), name


@pytest.mark.slow
def test_graded_ndcg_on_the_whole_trec_dl19_subset(shared):
    """The whole TREC-DL19 subset, where binary metrics saturate: graded nDCG@10 is trec_eval's
    (linear gains); with exponential gains (2^grade - 1) the same ranking gives the figure an
    independent script measured (../shared/REFERENCE.md: 0.7153)."""
    import ir_measures
    from ir_measures import nDCG
    from sentence_transformers import SparseEncoder

    data = read_retrieval_set(shared / "data/beir/trec-dl19-subset", "test")
    model = SparseEncoder(str(shared / "models/splade-tiny"))
    model.max_seq_length = 256
    vectors = evaluate.encode(model, data, batch_size=32)
    metrics = evaluate.retrieval_scores(vectors, data).metrics
    ranking = {q: {vectors.doc_ids[j]: float(s) for j, s in zip(indices, scores)}
               for q, (indices, scores) in zip(vectors.query_ids, ExactIndex(vectors.corpus).search(vectors.queries))}
    exponential = nDCG(gains={1: 1, 2: 3, 3: 7}) @ 10
    assert metrics["dot_ndcg@10"] == 1.0 and metrics["dot_graded_ndcg@10"] < 0.9
    assert ir_measures.calc_aggregate([exponential], data.qrels, ranking)[exponential] == pytest.approx(0.7153, abs=1e-4)
