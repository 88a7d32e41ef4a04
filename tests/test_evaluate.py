"""The evaluate stage's metrics against sentence-transformers' own evaluator on a real SPLADE."""

import pytest

from pipeline.config import EvalDataConfig, IndexConfig
from pipeline.data.sources import SourceError, read_eval_sets, read_retrieval_set
from pipeline.evaluation import scoring
from pipeline.retrieval.search import exact_search, index_kind
from pipeline.stages import evaluate


def encode(model, data, folder, batch_size=32, shard_docs=100_000, bf16=False, rank=0, world_size=1):
    """The stage's encoding of a set, its corpus shards in `folder`."""
    sharding = scoring.Sharding(folder, shard_docs, rank, world_size)
    return scoring.encode(model, "test-model", data, batch_size, sharding, bf16)


def test_every_metric_equals_the_stock_evaluator_on_splade_tiny(shared, cut_beir):
    """splade-tiny on DBPedia (graded qrels, read as binary by both), max length 256: one encoding
    gives every number SparseInformationRetrievalEvaluator gives, and the max_active_dims sweep
    gives what the evaluator gives when encoding with max_active_dims=k."""
    import pandas as pd
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.evaluation import (
        SparseInformationRetrievalEvaluator,
    )

    data = read_retrieval_set(cut_beir("dbpedia-subset", queries=12, extra_docs=100), "test")
    model_dir = shared / "models/splade-tiny"
    ours = scoring.evaluate_model(model_dir, {"dbpedia": data}, pd.DataFrame({"query": [], "positive": []}),
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


def test_nanobeir_layout_sets_and_mean_equal_the_stock_nanobeir_evaluator(shared, cut_beir, nanobeir_en,
                                                                          monkeypatch, tmp_path):
    """A local copy of a Hugging Face dataset in the NanoBEIR-en layout, read by short name and by
    split name: each set's metrics and their mean equal sentence-transformers' SparseNanoBEIREvaluator
    reading the same folder."""
    import datasets
    import pandas as pd

    # the stock evaluator reads through datasets' shared cache, which can hand it another test's
    # NanoBEIR folder of the same layout (the project's reader gives local folders a cache of their own)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
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
    ours = scoring.evaluate_model(model_dir, sets, pd.DataFrame({"query": [], "positive": []}),
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


def test_ranking_metrics_agree_with_trec_eval_and_graded_ndcg_uses_the_grades(tmp_path, shared, cut_beir):
    """The ranking metrics (sentence-transformers' code) against trec_eval's (ir-measures) on the
    same ranking of a graded set; graded nDCG@10 is trec_eval's with the grades as gains."""
    import ir_measures
    from ir_measures import AP, RR, P, R, Success, nDCG
    from sentence_transformers import SparseEncoder

    from pipeline.evaluation.measures import ranking_metrics

    data = read_retrieval_set(cut_beir("dbpedia-subset", queries=12, extra_docs=100), "test")
    assert {2, 1} <= {grade for docs in data.qrels.values() for grade in docs.values()}
    model = SparseEncoder(str(shared / "models/splade-tiny"))
    model.max_seq_length = 128
    vectors = encode(model, data, tmp_path)
    ranking = {q: {vectors.doc_ids[j]: float(s) for j, s in zip(indices, scores)}
               for q, (indices, scores) in zip(vectors.query_ids, exact_search(vectors.corpus, vectors.queries))}
    ours = ranking_metrics(data, ranking)
    binary = {q: {d: 1 for d in docs} for q, docs in data.qrels.items()}
    trec = ir_measures.calc_aggregate([nDCG@10, RR@10, AP@100, R@10, P@10, Success@1], binary, ranking)
    for name, measure in {"dot_ndcg@10": nDCG@10, "dot_mrr@10": RR@10, "dot_map@100": AP@100,
                          "dot_recall@10": R@10, "dot_precision@10": P@10, "dot_accuracy@1": Success@1}.items():
        assert ours[name] == pytest.approx(trec[measure], abs=1e-6), name
    graded = scoring.retrieval_scores(vectors, data).metrics["dot_graded_ndcg@10"]
    assert graded == pytest.approx(ir_measures.calc_aggregate([nDCG@10], data.qrels, ranking)[nDCG@10], abs=1e-9)
    assert graded != pytest.approx(ours["dot_ndcg@10"], abs=1e-3)  # the grades count


def test_command_line_scores_a_plain_masked_lm_folder(tmp_path, shared, cut_beir):
    """The outside contract: `python -m pipeline.stages.evaluate --model --beir --split --max-seq-length
    --out` on a *ForMaskedLM folder (the shared splade-tiny has no sentence-transformers files)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    assert not (shared / "models/splade-tiny/modules.json").exists()
    out = tmp_path / "metrics.json"
    subprocess.run([sys.executable, "-m", "pipeline.stages.evaluate", "--model", str(shared / "models/splade-tiny"),
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
def test_seismic_index_ranks_by_the_true_dot_products_and_finds_what_exact_finds(tmp_path, shared, cut_beir):
    """splade-tiny vectors of 1,000+ DBPedia documents: seismic's hits carry their dot products,
    most of exact's top 10 is found, and the metrics move little; auto picks by corpus size."""
    import numpy as np
    from scipy.sparse import vstack
    from sentence_transformers import SparseEncoder

    from pipeline.cli import StageError
    from pipeline.retrieval.search import (
        SWEEP_HEAP_FACTORS,
        SWEEP_QUERY_CUTS,
        SeismicIndex,
        sweep,
    )

    data = read_retrieval_set(cut_beir("dbpedia-subset", queries=40, extra_docs=1000), "test")
    model = SparseEncoder(str(shared / "models/splade-tiny"))
    model.max_seq_length = 128
    vectors = encode(model, data, tmp_path, shard_docs=300)  # 4 shards, streamed
    exact = exact_search(vectors.corpus, vectors.queries, 100)
    index = SeismicIndex(vectors.corpus)
    approximate = index.search(vectors.queries, 100)
    corpus = vstack(list(vectors.corpus))
    dense = (vectors.queries @ corpus.T).toarray()
    for q, (rows, scores) in enumerate(approximate):
        assert len(rows) == 100 and np.all(np.diff(scores) <= 0)
        np.testing.assert_allclose(scores, dense[q, rows], rtol=1e-3)  # seismic stores rounded weights
    for q, (rows, scores) in enumerate(exact):  # the streamed top-k is the whole corpus's
        assert np.array_equal(np.sort(dense[q])[::-1][:100], scores)
        np.testing.assert_allclose(dense[q, rows], scores)
    overlap = np.mean([len(np.intersect1d(a[0][:10], e[0][:10])) / 10 for a, e in zip(approximate, exact)])
    assert overlap >= 0.9
    chosen = sweep(index, vectors.corpus, vectors.queries, target=0.9, sample=20)
    assert chosen["target_met"] and chosen["recall_at_100"] >= 0.9
    assert len(chosen["tried"]) == len(SWEEP_QUERY_CUTS) * len(SWEEP_HEAP_FACTORS)
    assert chosen["ms_per_query"] == min(t["ms_per_query"] for t in chosen["tried"] if t["recall_at_100"] >= 0.9)
    assert (index.query_cut, index.heap_factor) == (chosen["query_cut"], chosen["heap_factor"])
    stricter = sweep(index, vectors.corpus, vectors.queries, target=0.99, sample=20, tried=chosen["tried"])
    assert stricter["tried"] is chosen["tried"]  # the grid's recalls and times reused, not searched again
    meeting = [t for t in chosen["tried"] if t["recall_at_100"] >= 0.99]
    assert stricter["ms_per_query"] == (min(t["ms_per_query"] for t in meeting) if meeting
                                        else max(chosen["tried"], key=lambda t: (t["recall_at_100"], -t["ms_per_query"]))["ms_per_query"])
    assert (index.query_cut, index.heap_factor) == (stricter["query_cut"], stricter["heap_factor"])
    exact_metrics = scoring.retrieval_scores(vectors, data, index=IndexConfig(kind="exact")).metrics
    seismic = scoring.retrieval_scores(vectors, data, index=IndexConfig(kind="seismic", sweep_queries=20,
                                                                          recall_target=0.95))
    assert seismic.metrics["dot_ndcg@10"] == pytest.approx(exact_metrics["dot_ndcg@10"], abs=0.03)
    assert seismic.index["kind"] == "seismic" and seismic.index["recall_target"] == 0.95
    assert seismic.index["against_exact"]["sample_queries"] == 20 and not seismic.index["rank_safe"]
    auto = IndexConfig(exact_max_docs=1000)
    assert index_kind(auto, 1000) == "exact" and index_kind(auto, 1001) == "blockmax"
    with pytest.raises(StageError, match=r"needs about 0\.\d GB to build .* over evaluate.index.memory_gb \(0.01 GB\)"):
        SeismicIndex(vectors.corpus, memory_gb=0.01)  # refused before building


def random_corpus(folder, docs: int = 230, dims: int = 500, shard_docs: int = 100, density: float = 0.05):
    """(corpus shards, the same rows as one matrix, queries): random sparse vectors."""
    import numpy as np
    from scipy.sparse import random as sparse_random

    from pipeline.retrieval.search import CorpusShards

    rng = np.random.default_rng(0)
    matrix = sparse_random(docs, dims, density=density, format="csr", dtype=np.float32, random_state=rng)
    corpus = CorpusShards(folder, {"test": "random"}, docs, dims, shard_docs)
    for index in range(corpus.count):
        rows = corpus.rows(index)
        corpus.write(index, matrix[rows.start:rows.stop])
    return corpus, matrix, sparse_random(7, dims, density=0.1, format="csr", dtype=np.float32, random_state=rng)


def test_bm25_shard_by_shard_gives_bm25s_own_rankings_and_metrics(shared):
    """BM25 weights written a shard at a time (here 1,000 documents) and searched as the models'
    vectors are: on SciFact's 300 test queries over its 5,183 documents, and on the quickstart's
    generated set, every query's top 100 and its scores are bm25s.BM25's over the whole corpus
    (what the stage ran before; only documents tied with the 100th may differ, and those matching no
    query term are not retrieved), and so are every metric and per-query value."""
    import numpy as np

    from pipeline.config import load_params
    from pipeline.data import synthetic
    from pipeline.data.sources import RetrievalSet
    from pipeline.evaluation.measures import judged_queries, scored_ranking
    from pipeline.runtime import import_bm25s
    from tests.helpers.project import PROJECT

    bm25s = import_bm25s()
    world = synthetic.generate(load_params(PROJECT / "params.yaml").snapshot.synthetic)  # the quickstart's
    for name, data in {"scifact": read_retrieval_set(shared / "data/beir/scifact", "test"),
                       "synthetic": RetrievalSet(world.corpus, world.eval_queries, world.eval_qrels)}.items():
        ours = scoring.bm25_model({name: data}, shard_docs=1000)
        doc_ids, query_ids = list(data.corpus), judged_queries(data)
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize([data.corpus[d] for d in doc_ids], stopwords="en", show_progress=False),
                        show_progress=False)
        found, scores = retriever.retrieve(bm25s.tokenize([data.queries[q] for q in query_ids], stopwords="en",
                                                          return_ids=False, show_progress=False),
                                           k=min(100, len(doc_ids)), show_progress=False)
        stock = {q: {doc_ids[j]: float(v) for j, v in zip(rows, values) if v > 0}  # bm25s adds arbitrary zeros
                 for q, rows, values in zip(query_ids, found, scores)}
        metrics, per_query, ranking = scored_ranking(data, stock)
        assert len(query_ids) >= 100 and 0.2 < metrics["dot_ndcg@10"] < 1, name
        assert ours["datasets"][name] == metrics and ours["per_query"][name].equals(per_query), name
        for query in query_ids:  # the same documents in the same order, but those tied with the 100th
            mine, theirs = ours["rankings"][name][query], ranking[query]
            np.testing.assert_allclose(list(mine.values()), list(theirs.values()), rtol=1e-6)
            last = min(theirs.values(), default=0) + 1e-5
            assert [d for d, v in mine.items() if v > last] == [d for d, v in theirs.items() if v > last], (name, query)


def test_exact_search_on_several_threads_returns_what_one_thread_does(tmp_path):
    import numpy as np

    corpus, matrix, queries = random_corpus(tmp_path, docs=950)  # 10 shards
    one = exact_search(corpus, queries, 20, threads=1)
    dense = (queries @ matrix.T).toarray()
    for q, (rows, scores) in enumerate(one):
        np.testing.assert_allclose(scores, np.sort(dense[q])[::-1][:20], rtol=1e-6)
        np.testing.assert_allclose(dense[q, rows], scores, rtol=1e-6)
    for threads in (3, 0):  # 0: one per core
        many = exact_search(corpus, queries, 20, threads=threads)
        assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(one, many))


def test_exact_search_memory_does_not_grow_with_the_queries_beyond_their_results(tmp_path):
    """Thousands of queries against one 20k-document shard, a block of dense scores at a time: the
    peak of what numpy allocates grows with the queries' results only (1,000 against 4,000 queries),
    not with each block's whole (queries x documents) argpartition; MS MARCO dev has 6,980 queries."""
    import tracemalloc

    import numpy as np
    from scipy.sparse import random as sparse_random

    corpus, matrix, _ = random_corpus(tmp_path, docs=20_000, dims=1000, shard_docs=20_000, density=0.03)
    queries = sparse_random(4000, 1000, density=0.02, format="csr", dtype=np.float32,
                            random_state=np.random.default_rng(1))
    peaks = {}
    for count in (1000, 4000):
        tracemalloc.start()
        found = exact_search(corpus, queries[:count], 100, threads=1)
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(found) == count
    results = 3000 * 100 * 12 * 3  # the extra queries' rows and scores, merged and sorted: a few copies
    assert peaks[4000] - peaks[1000] < results + 20 * 2 ** 20, peaks
    for q in (0, 3999):  # still exact search's answer
        dense = (queries[q] @ matrix.T).toarray().ravel()
        np.testing.assert_allclose(found[q][1], np.sort(dense)[::-1][:100], rtol=1e-6)


def test_auto_index_searches_exactly_when_the_approximate_index_would_not_fit_the_memory_budget(tmp_path,
                                                                                               monkeypatch):
    """auto past exact_max_docs falls back to exact search, saying why, when blockmax's estimated
    build exceeds evaluate.index.memory_gb (null: three quarters of the machine's memory); an
    explicit approximate kind is refused instead."""
    import numpy as np

    from pipeline.cli import StageError
    from pipeline.retrieval import search as search_module
    from pipeline.retrieval.search import search

    corpus, matrix, queries = random_corpus(tmp_path)
    too_small = IndexConfig(exact_max_docs=100, memory_gb=0.4)  # under the build's fixed 0.5 GB
    found, facts = search(corpus, queries, too_small, depth=10)
    assert facts["kind"] == "exact"
    assert f"the blockmax index of 230 documents ({matrix.nnz:,} postings) needs about 0.5 GB" in facts["blockmax_skipped"]
    assert "over evaluate.index.memory_gb (0.4 GB)" in facts["blockmax_skipped"]
    dense = (queries @ matrix.T).toarray()
    for q, (rows, scores) in enumerate(found):
        np.testing.assert_allclose(scores, np.sort(dense[q])[::-1][:10], rtol=1e-6)
        np.testing.assert_allclose(dense[q, rows], scores, rtol=1e-6)
    assert search(corpus, queries, IndexConfig(exact_max_docs=230, memory_gb=0.4), depth=10)[1] == {
        "kind": "exact", "rank_safe": True}
    for kind in ("blockmax", "seismic"):
        with pytest.raises(StageError, match=rf"the {kind} index .* over evaluate.index.memory_gb \(0.4 GB\). Raise"):
            search(corpus, queries, IndexConfig(kind=kind, memory_gb=0.4), depth=10)
    assert search(corpus, queries, IndexConfig(exact_max_docs=100), depth=10)[1]["kind"] == "blockmax"
    monkeypatch.setattr(search_module, "machine_memory_gb", lambda: 0.6)  # 0.45 GB for the build
    facts = search(corpus, queries, IndexConfig(exact_max_docs=100), depth=10)[1]
    assert facts["kind"] == "exact"
    assert "over evaluate.index.memory_gb (null: 0.75 of this machine's 0.6 GB)" in facts["blockmax_skipped"]


def test_the_memory_check_refuses_a_build_that_fits_alone_but_not_beside_what_the_stage_holds(tmp_path):
    """The budget is for the whole stage: the build's estimate (0.5 GB here) plus what the process
    holds when the build would start (its models, texts and vectors). 0.4 GB more held than the budget
    leaves room for is refused before the build, naming both; once freed, the same build goes ahead."""
    import numpy as np

    from pipeline.cli import StageError
    from pipeline.retrieval.search import search
    from pipeline.runtime import resident_gb

    corpus, _, queries = random_corpus(tmp_path)
    budget = IndexConfig(kind="blockmax", memory_gb=round(resident_gb() + 0.65, 2))
    held = np.ones(2 ** 30 // 20)  # 0.4 GB, touched: resident
    with pytest.raises(StageError, match=r"needs about 0\.5 GB to build .* beside the (\d+\.\d) GB this process "
                                         r"holds, (\d+\.\d) GB in all, over evaluate.index.memory_gb"):
        search(corpus, queries, budget, depth=10)
    del held
    assert search(corpus, queries, budget, depth=10)[1]["kind"] == "blockmax"


def test_blockmax_index_finds_exact_top_k_unpruned_and_scores_fewer_blocks_pruned(tmp_path):
    """blockmax over shards of 100 documents in blocks of 8 (each shard's last block short): with every
    query term and heap_factor 1 its bounds are upper bounds, so it returns exact search's top k with
    the true dot products (weights stored as uint16); pruning scores fewer blocks; the sweep and
    search(auto) choose and report its settings. Half the terms are rare (in under a tenth of the
    blocks: their block maxima are lists), half common (a byte per block)."""
    import numpy as np
    from scipy.sparse import random as sparse_random
    from scipy.sparse import vstack

    from pipeline.retrieval.blockmax import BlockMaxIndex
    from pipeline.retrieval.search import (
        SWEEP_HEAP_FACTORS,
        SWEEP_QUERY_CUTS,
        recall,
        search,
    )

    corpus, matrix, queries = random_corpus(tmp_path, docs=950, dims=300)
    rare = np.isin(matrix.indices, np.arange(150, 300)) & (np.random.default_rng(2).random(matrix.nnz) < 0.9)
    matrix.data[rare] = 0  # terms 150+ keep a tenth of their postings
    matrix.eliminate_zeros()
    for i in range(corpus.count):
        corpus.write(i, matrix[corpus.rows(i).start:corpus.rows(i).stop])
    long = sparse_random(1, 300, density=0.95, format="csr", dtype=np.float32, random_state=1)
    queries = vstack([queries, long]).tocsr()  # 285 terms: its lookup table takes two bytes per term
    dense = (queries @ matrix.T).toarray()
    exact = exact_search(corpus, queries, 20)
    index = BlockMaxIndex(corpus, block_size=8, query_cut=1000, heap_factor=1.0, progress=False)
    assert sorted(index.rows) == list(range(950))  # reordered within shards, every row once
    assert 100 <= index.dense.shape[0] <= 160 and np.count_nonzero(np.diff(index.term_ptr)) >= 140
    found = index.search(queries, 20)
    for q, (rows, scores) in enumerate(found):
        assert len(rows) == 20 and np.all(np.diff(scores) <= 0)
        np.testing.assert_allclose(scores, dense[q, rows], rtol=1e-3)
        np.testing.assert_allclose(scores, exact[q][1], rtol=1e-3)
    assert recall(found, exact) >= 0.95  # only near-ties at the 20th may swap
    unpruned = index.blocks_scored.copy()
    assert len(index.block_docs) - 1 == 9 * 13 + 7 and np.all(unpruned <= 9 * 13 + 7)
    index.query_cut, index.heap_factor = 3, 0.5
    index.search(queries, 20)
    assert np.all(index.blocks_scored <= unpruned) and index.blocks_scored.sum() < unpruned.sum()
    # search(auto) past exact_max_docs: rank-safe by default, its candidates rescored exactly, so
    # exact search's top k with exact search's scores
    found, facts = search(corpus, queries, IndexConfig(exact_max_docs=900), depth=20)
    assert facts["kind"] == "blockmax" and facts["rank_safe"] and facts["query_cut"] is None
    for (rows, scores), (exact_rows, exact_scores) in zip(found, exact):
        np.testing.assert_allclose(scores, exact_scores, rtol=1e-6)
        assert len(np.intersect1d(rows, exact_rows)) >= 19  # a near-tie at the 20th at most
    short = queries[:7]  # (the long one needs far more than the sweep's 30 largest terms)
    found, facts = search(corpus, short, IndexConfig(exact_max_docs=900, sweep_queries=7, recall_target=0.95),
                          depth=20)
    assert not facts["rank_safe"]
    assert facts["kind"] == "blockmax" and facts["block_size"] == 4 and facts["sample_queries"] == 7
    assert facts["target_met"] and facts["recall_at_20"] >= 0.95
    assert len(facts["tried"]) == len(SWEEP_QUERY_CUTS) * len(SWEEP_HEAP_FACTORS)
    assert recall(found, exact[:7]) == pytest.approx(facts["recall_at_20"])  # the sample was every query


def test_blockmax_rank_safe_walk_goes_through_its_tiers_and_still_finds_exact_top_k(tmp_path):
    """400,000 documents in 100,000 blocks (1,563 chunks): a deep top k (10,000) takes the walk past
    its first two tiers (the FIRST_CHUNKS highest chunks, then twice as many), and every block that can
    beat the k-th score is still scored: exact search's top k, with every query term and heap_factor 1."""
    import numpy as np

    from pipeline.retrieval import blockmax
    from pipeline.retrieval.blockmax import BlockMaxIndex

    corpus, matrix, queries = random_corpus(tmp_path, docs=400_000, dims=2000, shard_docs=100_000, density=0.005)
    index = BlockMaxIndex(corpus, block_size=4, query_cut=10_000, heap_factor=1.0, progress=False)
    exact = exact_search(corpus, queries, 10_000)
    found = index.search(queries, 10_000)
    for (rows, scores), (exact_rows, exact_scores) in zip(found, exact):
        np.testing.assert_allclose(scores, exact_scores, rtol=1e-3)
        assert len(np.intersect1d(rows, exact_rows)) >= 9990  # near-ties at the 10,000th at most
    assert index.blocks_scored.max() > 2 * blockmax.FIRST_CHUNKS * blockmax.CHUNK  # into the third tier


def test_an_approximate_search_reports_how_far_its_metrics_are_from_exact_and_a_rank_safe_one_is_exact(tmp_path):
    """The evaluate stage on random vectors past exact_max_docs: by default (rank-safe blockmax) the
    same metrics as exact search, no check needed; asked for an approximate setting, eval.json's
    "index" says on a sample of queries searched both ways how much recall and each headline metric
    differ from exact."""
    import numpy as np

    from pipeline.data.sources import RetrievalSet
    from pipeline.evaluation.measures import HEADLINE

    corpus, matrix, queries = random_corpus(tmp_path, docs=950, dims=300)
    many = random_corpus(tmp_path / "q", docs=40, dims=300, shard_docs=40)[1]  # 40 queries
    doc_ids = [f"d{i}" for i in range(950)]
    dense = (many @ matrix.T).toarray()
    rng = np.random.default_rng(3)
    qrels = {f"q{q}": {doc_ids[j]: 1 for j in np.argsort(-dense[q])[rng.integers(0, 30, 2)]} for q in range(40)}
    data = RetrievalSet(dict.fromkeys(doc_ids, "text"), {q: "text" for q in qrels}, qrels)
    vectors = scoring.Encoded(list(qrels), many, doc_ids, corpus)
    exact = scoring.retrieval_scores(vectors, data, index=IndexConfig(kind="exact"))
    safe = scoring.retrieval_scores(vectors, data, index=IndexConfig(exact_max_docs=900))
    assert safe.index["kind"] == "blockmax" and safe.index["rank_safe"] and "against_exact" not in safe.index
    for name in HEADLINE:
        assert safe.metrics[name] == pytest.approx(exact.metrics[name], abs=1e-9), name
    pruned = scoring.retrieval_scores(vectors, data, index=IndexConfig(exact_max_docs=900, query_cut=2,
                                                                         heap_factor=0.5, sweep_queries=25))
    check = pruned.index["against_exact"]
    print(f"\nquery_cut 2, heap_factor 0.5: recall@100 {check['recall_at_100']:.3f}, "
          f"nDCG@10 {check['difference']['dot_ndcg@10']:+.4f} from exact on {check['sample_queries']} queries")
    assert not pruned.index["rank_safe"] and check["sample_queries"] == 25 and check["recall_at_100"] < 0.95
    assert set(check["difference"]) == set(HEADLINE) and check["largest_query_difference"]["dot_ndcg@10"] > 0


def test_bisection_puts_documents_that_share_terms_in_the_same_blocks():
    """Documents drawn from two disjoint vocabularies, interleaved: after the bisection every block
    of 4 holds documents of one vocabulary only, and the order is a permutation."""
    import numpy as np
    from scipy.sparse import csr_matrix

    from pipeline.retrieval.blockmax import _bisection_order

    rng = np.random.default_rng(0)
    group = np.arange(64) % 2  # even rows: terms 0-49, odd rows: terms 50-99
    dense = np.zeros((64, 100), np.float32)
    for row, g in enumerate(group):
        terms = rng.choice(50, 15, replace=False) + 50 * g
        dense[row, terms] = rng.random(15) + 0.1
    matrix = csr_matrix(dense)
    order = _bisection_order(matrix.indptr, matrix.indices, 100, 4, 10)
    assert sorted(order) == list(range(64))
    assert all(len(set(group[order[b:b + 4]])) == 1 for b in range(0, 64, 4))


def test_corpus_encoded_in_shards_equals_one_pass_and_bf16_stays_close(tmp_path, shared, cut_beir):
    """The corpus encoded a few documents per shard gives the same rows as one pass, and the same as
    sentence-transformers' encode_document (fp32, also with the model's max_active_dims); bf16 mode
    keeps values within 0.05 of them."""
    import numpy as np
    from scipy.sparse import vstack
    from sentence_transformers import SparseEncoder

    data = read_retrieval_set(cut_beir("scifact", queries=4, extra_docs=40), "test")
    model = SparseEncoder(str(shared / "models/splade-tiny"))
    model.max_seq_length = 128
    whole, sharded = (vstack(list(encode(model, data, tmp_path / str(n), 8, shard_docs=n).corpus)).tocsr()
                      for n in (10_000, 7))
    assert (whole != sharded).nnz == 0 and whole.shape == sharded.shape
    doc_ids = list(data.corpus)
    stock = scoring.to_csr(model.encode_document([data.corpus[d] for d in doc_ids], convert_to_tensor=True).cpu())
    assert abs(whole - stock).max() == 0.0
    bf16 = vstack(list(encode(model, data, tmp_path / "bf16", 8, bf16=True).corpus))
    assert 0 < abs(bf16 - whole).max() < 0.05
    model.max_active_dims = 16
    capped = vstack(list(encode(model, data, tmp_path / "capped", 8).corpus)).tocsr()
    assert np.diff(capped.indptr).max() == 16
    stock = scoring.to_csr(model.encode_document([data.corpus[d] for d in doc_ids], convert_to_tensor=True).cpu())
    assert abs(capped - stock).max() == 0.0


@pytest.mark.slow
def test_full_size_parity_on_the_dbpedia_subset(shared):
    """Issue-size check (minutes on 2 CPU cores): the whole DBPedia subset at max length 256, every
    metric against the stock evaluator."""
    import pandas as pd
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.evaluation import (
        SparseInformationRetrievalEvaluator,
    )

    model_dir = shared / "models/splade-tiny"
    data = read_retrieval_set(shared / "data/beir/dbpedia-subset", "test")
    ours = scoring.evaluate_model(model_dir, {"dbpedia": data}, pd.DataFrame(), batch_size=32,
                                   max_active_dims=[], max_seq_length=256, precision="fp32")["metrics"]
    model = SparseEncoder(str(model_dir))
    model.max_seq_length = 256
    stock = SparseInformationRetrievalEvaluator(data.queries, data.corpus, {q: set(d) for q, d in data.qrels.items()},
                                                batch_size=32, write_csv=False)(model)
    for name, value in stock.items():
        assert ours[name] == pytest.approx(value, rel=1e-4, abs=1e-4), name


@pytest.mark.slow
def test_graded_ndcg_on_the_whole_trec_dl19_subset(tmp_path, shared):
    """The whole TREC-DL19 subset, where binary metrics saturate: graded nDCG@10 is trec_eval's
    (linear gains); with exponential gains (2^grade - 1) the same ranking gives the figure an
    independent script measured (../shared/REFERENCE.md: 0.7153)."""
    import ir_measures
    from ir_measures import nDCG
    from sentence_transformers import SparseEncoder

    data = read_retrieval_set(shared / "data/beir/trec-dl19-subset", "test")
    model = SparseEncoder(str(shared / "models/splade-tiny"))
    model.max_seq_length = 256
    vectors = encode(model, data, tmp_path)
    metrics = scoring.retrieval_scores(vectors, data).metrics
    ranking = {q: {vectors.doc_ids[j]: float(s) for j, s in zip(indices, scores)}
               for q, (indices, scores) in zip(vectors.query_ids, exact_search(vectors.corpus, vectors.queries))}
    exponential = nDCG(gains={1: 1, 2: 3, 3: 7}) @ 10
    assert metrics["dot_ndcg@10"] == 1.0 and metrics["dot_graded_ndcg@10"] < 0.9
    assert ir_measures.calc_aggregate([exponential], data.qrels, ranking)[exponential] == pytest.approx(0.7153, abs=1e-4)


def evaluate_process(model, beir, shards, out=None, rank=0, world_size=1, ray_address=None):
    """`python -m pipeline.stages.evaluate --model --beir --shards` as a rank of `world_size`, or with
    --ray on the cluster at `ray_address`."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.stages.evaluate", "--model", str(model), "--beir", str(beir), "--max-seq-length",
         "128", "--batch-size", "8", "--shards", str(shards), "--shard-docs", "25"] + (["--out", str(out)] if out else [])
        + (["--ray"] if ray_address else []),
        cwd=Path(evaluate.__file__).parents[1],
        env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size),
             **({"RAY_ADDRESS": ray_address} if ray_address else {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def shard_matrices(folder) -> dict:
    from scipy.sparse import load_npz

    return {path.name: load_npz(path) for path in sorted(folder.glob("*-of-*.npz"))}


def one_process_run(tmp_path, shared, cut_beir):
    """splade-tiny on a cut SciFact by one process: (model, BEIR folder, its corpus shards); its
    metrics in tmp_path/one.json."""
    model, beir = shared / "models/splade-tiny", cut_beir("scifact", queries=6, extra_docs=220)
    single = evaluate_process(model, beir, tmp_path / "one", tmp_path / "one.json")
    assert single.wait(timeout=600) == 0, single.communicate()[0]
    one = shard_matrices(tmp_path / "one")
    assert len(one) >= 8
    return model, beir, one


@pytest.mark.e2e
def test_two_ranks_encode_what_one_process_does_and_a_killed_run_resumes(tmp_path, shared, cut_beir):
    """Corpus shards written by 2 ranks (RANK / WORLD_SIZE, sharing a folder) are those one process
    writes, bit for bit, and rank 0's metrics are the same; a run killed with SIGKILL half way keeps
    its finished shards, and the rerun encodes only the missing ones."""
    import json
    import signal
    import time

    model, beir, one = one_process_run(tmp_path, shared, cut_beir)
    finished = lambda process: process.communicate(timeout=600)[0]

    ranks = [evaluate_process(model, beir, tmp_path / "two", tmp_path / f"rank{r}.json", r, 2) for r in (0, 1)]
    outputs = [finished(process) for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0], outputs
    assert "rank 1/2: corpus shard 2 of" in outputs[1] and "rank 0/2: corpus shard 1 of" in outputs[0]
    two = shard_matrices(tmp_path / "two")
    assert two.keys() == one.keys()
    assert all((two[name] != one[name]).nnz == 0 and two[name].shape == one[name].shape for name in one)
    metrics = json.loads((tmp_path / "rank0.json").read_text())
    expected = json.loads((tmp_path / "one.json").read_text())
    assert {k: metrics[k] for k in expected if k != "seconds"} == {k: expected[k] for k in expected if k != "seconds"}
    helper = json.loads((tmp_path / "rank1.json").read_text())  # rank 1 only encodes: its share
    assert helper == {"shards": len(one), "shards_reused": 0, "shards_encoded": len(one) // 2}

    killed = evaluate_process(model, beir, tmp_path / "resumed")
    while len(list((tmp_path / "resumed").glob("*-of-*.npz"))) < len(one) // 2:
        assert killed.poll() is None, finished(killed)
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)  # kill -9
    killed.wait()
    survivors = {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed").glob("*-of-*.npz")}
    assert len(one) // 2 <= len(survivors) < len(one)
    rerun = evaluate_process(model, beir, tmp_path / "resumed", tmp_path / "resumed.json")
    output = finished(rerun)
    assert rerun.returncode == 0, output
    assert output.count("corpus shard") == len(one) - len(survivors)  # only the missing ones
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in survivors.items())  # not redone
    resumed = shard_matrices(tmp_path / "resumed")
    assert resumed.keys() == one.keys() and all((resumed[n] != one[n]).nnz == 0 for n in one)
    assert not list((tmp_path / "resumed").glob(".*tmp"))  # no half-written shard left behind


@pytest.mark.e2e
def test_ray_workers_encode_the_corpus_shards_one_process_encodes(tmp_path, shared, cut_beir, ray_cluster):
    """--ray (evaluate.backend ray) on a local two-node cluster: the corpus shards one process writes,
    bit for bit, and the same metrics; a rerun finds every shard and encodes none."""
    import json

    model, beir, one = one_process_run(tmp_path, shared, cut_beir)
    finished = lambda process: process.communicate(timeout=600)[0]

    on_ray = evaluate_process(model, beir, tmp_path / "ray", tmp_path / "ray.json", ray_address=ray_cluster.address)
    output = finished(on_ray)
    assert on_ray.returncode == 0, output
    assert "evaluate on 2 Ray worker(s)" in output
    two = shard_matrices(tmp_path / "ray")
    assert two.keys() == one.keys()
    assert all((two[name] != one[name]).nnz == 0 and two[name].shape == one[name].shape for name in one)
    metrics, expected = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("ray", "one"))
    assert {k: metrics[k] for k in expected if k != "seconds"} == {k: expected[k] for k in expected if k != "seconds"}

    again = evaluate_process(model, beir, tmp_path / "ray", tmp_path / "again.json", ray_address=ray_cluster.address)
    output = finished(again)
    assert again.returncode == 0 and "evaluate on 2 Ray worker(s)" not in output, output  # nothing to encode
    assert shard_matrices(tmp_path / "ray").keys() == one.keys()
