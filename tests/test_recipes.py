import json
from pathlib import Path

import pytest
import yaml

from pipeline import card, evaluate, push, snapshot, teacher, track, train, validate
from pipeline.config import EVAL_METRICS, STUDENT_DIR, Params, load_params
from pipeline.sources import RetrievalSet, read_retrieval_set, write_beir

PROJECT = Path(__file__).resolve().parents[1]
RECIPES = sorted((PROJECT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_validates_and_names_every_param_dvc_tracks(recipe):
    """`cp recipes/X.yaml params.yaml && dvc repro` needs each key dvc.yaml lists to be in the file."""
    load_params(recipe)
    raw = yaml.safe_load(recipe.read_text())
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    for stage in stages.values():
        for key in stage.get("params", []):
            value = raw
            for part in key.split("."):
                assert isinstance(value, dict) and part in value, f"{recipe.name} lacks {key}"
                value = value[part]


def small_scifact_test(shared, folder, queries: int = 20, extra_docs: int = 300):
    """SciFact test cut down: its first judged queries, their documents and some others."""
    full = read_retrieval_set(shared / "data/beir/scifact", "test")
    qrels = dict(list(full.qrels.items())[:queries])
    keep = {d for judged in qrels.values() for d in judged} | set(list(full.corpus)[:extra_docs])
    write_beir(RetrievalSet({d: full.corpus[d] for d in keep}, {q: full.queries[q] for q in qrels},
                            qrels), folder, "test")
    return folder


def test_csr_recipe_runs_end_to_end_with_a_tiny_surrogate(workdir, shared, tiny_dense_model):
    """The recipe as written, with the MiniLM backbone swapped for a tiny one built from config,
    a smaller autoencoder, and a cut-down SciFact test set."""
    data = load_params(PROJECT / "recipes/csr-minilm-scifact.yaml").model_dump(by_alias=True)
    data["snapshot"]["train"]["source"] = str(shared / "data/beir/scifact")
    data["snapshot"]["eval"]["source"] = str(small_scifact_test(shared, workdir / "scifact-small"))
    data["train"].update(base_model=str(tiny_dense_model), max_seq_length=64, save_steps=1000)
    data["train"]["csr"].update(hidden_dim=256, k=64, k_aux=128)
    params = Params.model_validate(data)
    for stage in (snapshot, validate, teacher, train, evaluate, card, push):
        stage.run(params)
    track.run(params)

    metrics = json.loads(EVAL_METRICS.read_text())
    sweep = metrics["student_max_active_dims"]
    assert sorted(map(int, sweep)) == [16, 32, 64, 128, 256]
    for k, values in sweep.items():
        assert values["query_active_dims"] <= int(k) and values["corpus_active_dims"] <= int(k)
        assert 0 <= values["dot_ndcg@10"] <= 1
    assert metrics["student"]["corpus_active_dims"] <= 64  # the autoencoder's k

    # the sweep encodes once and truncates; sentence-transformers' evaluator re-encodes at each k
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.evaluation import SparseInformationRetrievalEvaluator

    data = read_retrieval_set(workdir / "scifact-small", "test")
    stock = SparseInformationRetrievalEvaluator(
        data.queries, data.corpus, {q: set(d) for q, d in data.qrels.items()}, max_active_dims=16,
        write_csv=False)(SparseEncoder(str(STUDENT_DIR)))
    for name in ("dot_ndcg@10", "dot_mrr@10", "dot_map@100", "dot_recall@10", "query_active_dims",
                 "corpus_active_dims"):
        assert abs(sweep["16"][name] - stock[name]) < 1e-4, name
