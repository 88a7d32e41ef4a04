import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from pipeline.config import (
    EVAL_METRICS,
    SNAPSHOT_MANIFEST,
    STUDENT_DIR,
    TEACHER_SCORED,
    Params,
    ParamsError,
    load_params,
)
from pipeline.data.sources import read_retrieval_set
from pipeline.stages import (
    card,
    evaluate,
    export,
    push,
    snapshot,
    teacher,
    track,
    train,
    validate,
)

PROJECT = Path(__file__).resolve().parents[1]
RECIPES = sorted((PROJECT / "recipes").glob("*.yaml"))
UNPINNED = {"splade-cocondenser-gooaq": "train.base_model"}  # recipe -> the key it must pin


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_validates_and_names_every_param_dvc_tracks(recipe):
    """`cp recipes/X.yaml params.yaml && dvc repro` needs each key dvc.yaml lists to be in the file;
    every recipe loads but the one whose base model's commit could not be looked up offline, which
    fails until it is pinned."""
    if recipe.stem in UNPINNED:
        with pytest.raises(ParamsError, match=rf"{UNPINNED[recipe.stem]} .* is a Hub id .* pin it"):
            load_params(recipe)
        assert "NOT PINNED" in recipe.read_text()
    else:
        load_params(recipe)
    raw = yaml.safe_load(recipe.read_text())
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    for stage in stages.values():
        for key in stage.get("params", []):
            value = raw
            for part in key.split("."):
                assert isinstance(value, dict) and part in value, f"{recipe.name} lacks {key}"
                value = value[part]


def recipe_data(name: str) -> dict:
    """A recipe's params, checked by the schema as a whole, for a test that swaps its models for
    local stand-ins (from a test's folder, the recipe's ../shared paths would read as Hub ids)."""
    raw = yaml.safe_load((PROJECT / "recipes" / f"{name}.yaml").read_text())
    return Params.model_validate(raw).model_dump(by_alias=True)


def surrogate(data: dict) -> dict:
    """A recipe's params for a run with stand-ins (tiny models, a few steps, cut data): they hardly
    learn, so the gate's beat-the-untrained-start check (which would rightly refuse them) is off."""
    data["push"].setdefault("gate", {})["beat_base"] = False
    return data


def test_each_recipe_registers_its_models_under_its_own_name():
    """Champions are compared within one registered model: recipes never share one by default."""
    names = [Params.model_validate(yaml.safe_load(path.read_text())).tracking.registered_model
             for path in [*RECIPES, PROJECT / "params.yaml"]]
    assert len(set(names)) == len(names), names


def test_csr_recipe_runs_end_to_end_with_a_tiny_surrogate(workdir, shared, tiny_dense_model, cut_beir):
    """The recipe as written, with the MiniLM backbone and teacher swapped for a tiny model built
    from config, a smaller autoencoder, and cut-down SciFact train and test sets."""
    data = recipe_data("csr-minilm-scifact")
    data["snapshot"]["train"]["source"] = str(cut_beir("scifact", queries=200, extra_docs=0, split="train"))
    scifact_test = cut_beir("scifact")
    data["snapshot"]["eval"]["source"] = str(scifact_test)
    data["teacher"]["model"] = str(tiny_dense_model)  # mines the hard negatives
    data["train"].update(base_model=str(tiny_dense_model), max_seq_length=64, save_steps=1000, epochs=1)
    data["train"]["csr"].update(hidden_dim=256, k=64, k_aux=128)
    params = Params.model_validate(surrogate(data))
    for stage in (snapshot, validate, teacher, train, export, evaluate, card, push):
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
    from sentence_transformers.sparse_encoder.evaluation import (
        SparseInformationRetrievalEvaluator,
    )

    data = read_retrieval_set(scifact_test, "test")
    stock = SparseInformationRetrievalEvaluator(
        data.queries, data.corpus, {q: set(d) for q, d in data.qrels.items()}, max_active_dims=16,
        write_csv=False)(SparseEncoder(str(STUDENT_DIR)))
    assert set(stock) <= set(sweep["16"])
    for name, value in stock.items():
        assert sweep["16"][name] == pytest.approx(value, rel=1e-4, abs=1e-4), name
    assert sorted(map(int, metrics["base_max_active_dims"])) == [16, 32, 64, 128, 256]


def test_splade_tiny_recipe_runs_end_to_end_with_tiny_surrogates(workdir, shared, tiny_dense_model,
                                                                         cut_beir):
    """The recipe as written, with a tiny bi-encoder teacher and a student built from config in
    place of MiniLM and splade-tiny, and cut-down SciFact train and test sets."""
    import numpy as np
    import pandas as pd


    data = recipe_data("splade-tiny-scifact")
    data["snapshot"]["train"]["source"] = str(cut_beir("scifact", queries=150, extra_docs=0, split="train"))
    data["snapshot"]["eval"]["source"] = str(cut_beir("scifact"))
    data["teacher"]["model"] = str(tiny_dense_model)
    data["train"].update(base_model="synthetic", max_seq_length=64, epochs=1, save_steps=1000,
                         precision="fp32")  # bf16 is the recipe's choice for its real run
    params = Params.model_validate(surrogate(data))
    for stage in (snapshot, validate, teacher, train, export, evaluate, card, push):
        stage.run(params)
    track.run(params)

    scored = pd.read_parquet(TEACHER_SCORED)
    assert {"negative", "negative_2"} <= set(scored)
    assert np.stack(scored["label"]).shape == (len(scored), 2)  # mined, then scored
    metrics = json.loads(EVAL_METRICS.read_text())
    # trained: the student's vectors differ from the model it started from
    assert metrics["student"]["corpus_active_dims"] != metrics["base"]["corpus_active_dims"]


def test_card_of_a_real_run_on_the_shared_splade_tiny(workdir, shared, cut_beir):
    """The splade-tiny recipe with its real models (splade-tiny, MiniLM mining negatives) on cut-down
    SciFact: its card has every section, filled, and the model-index every metric of every result."""
    from huggingface_hub import ModelCard

    data = recipe_data("splade-tiny-scifact")
    data["snapshot"]["train"]["source"] = str(cut_beir("scifact", queries=40, extra_docs=60, split="train"))
    data["snapshot"]["eval"]["source"] = str(cut_beir("scifact", queries=20, extra_docs=200))
    data["teacher"]["model"] = str(shared / "models/all-MiniLM-L6-v2")
    data["train"].update(base_model=str(shared / "models/splade-tiny"), max_seq_length=64, epochs=1,
                         save_steps=1000, precision="fp32")
    data["evaluate"]["max_active_dims"] = [16, 64]
    params = Params.model_validate(surrogate(data))
    for stage in (snapshot, validate, teacher, train, export, evaluate, card, push):
        stage.run(params)

    text = (Path("build/card") / "README.md").read_text()
    assert card.missing_sections(text) == []
    parsed = ModelCard(text).data
    evaluation = json.loads(EVAL_METRICS.read_text())
    (name,) = evaluation["datasets"]
    expected = {name: card.card_metrics(evaluation["student"]),
                **{f"{name} max_active_dims {k}": card.card_metrics(v)
                   for k, v in evaluation["student_max_active_dims"].items()}}
    listed = {}
    for result in parsed.eval_results:
        listed.setdefault(result.dataset_name, {})[result.metric_type] = result.metric_value
    assert listed.keys() == expected.keys()
    for dataset, metrics in expected.items():
        assert listed[dataset] == pytest.approx(metrics, abs=1e-6), dataset
    assert parsed.base_model is None and str(shared / "models/splade-tiny") in text  # a local path is no Hub id
    assert {"loss:SpladeLoss", "loss:SparseMultipleNegativesRankingLoss"} <= set(parsed.tags)
    assert "| type    | string | string | string | string |" in text  # query, positive, 2 mined negatives
    assert "oord2019representationlearningcontrastivepredictive" in text and "paria2020minimizing" in text
    assert "| 16 |" in text and "| 64 |" in text  # the max_active_dims table



def test_inference_free_recipe_runs_end_to_end_with_tiny_surrogates(workdir, shared, tiny_dense_model, cut_beir):
    """The inference-free recipe as written (IDF-initialised query weights, FLOPS on documents only),
    with a tiny bi-encoder teacher and a student built from config in place of MiniLM and
    splade-tiny, on cut-down SciFact: every stage to the registry, and an asymmetric model out."""
    import mlflow
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import Router

    from pipeline.config import EXPORT_DIR, PUSH_DIR, RECORDS_DIR, SNAPSHOT_TRAIN
    from pipeline.modelling.encoders import idf_weights

    data = recipe_data("inference-free-splade-tiny-scifact")
    data["snapshot"]["train"]["source"] = str(cut_beir("scifact", queries=150, extra_docs=0, split="train"))
    data["snapshot"]["eval"]["source"] = str(cut_beir("scifact"))
    data["teacher"]["model"] = str(tiny_dense_model)
    data["train"].update(base_model="synthetic", max_seq_length=64, epochs=1, save_steps=1000)
    params = Params.model_validate(surrogate(data))
    for stage in (snapshot, validate, teacher, train, export, evaluate, card, push):
        stage.run(params)
    track.run(params)

    student, base = SparseEncoder(str(STUDENT_DIR)), SparseEncoder("models/base")
    assert isinstance(student[0], Router)
    query_weights = student[0].sub_modules["query"][0].weight.detach()
    documents = list(dict.fromkeys(pd.read_parquet(TEACHER_SCORED)[["positive", "negative", "negative_2"]].stack()))
    initial = base[0].sub_modules["query"][0].weight.detach()
    torch.testing.assert_close(initial, idf_weights(student.tokenizer, documents))  # started at the IDF
    # learnt at the token weights' own rate (1e-3; the MLM's is 5e-5): they moved by more than the MLM's
    assert (query_weights - initial).abs().max() > 1e-3
    # a query is its own tokens, each with its weight: no expansion, no transformer
    query = pd.read_parquet(SNAPSHOT_TRAIN)["query"].iloc[0]
    vector = student.encode_query([query], convert_to_tensor=True).to_dense()[0]
    tokens = sorted(set(student.tokenizer(query, add_special_tokens=False)["input_ids"]))
    assert vector.nonzero().flatten().tolist() == [t for t in tokens if query_weights[t] != 0]
    torch.testing.assert_close(vector[tokens], query_weights[tokens])
    # documents are SPLADE vectors: expanded beyond their own tokens
    document = student.encode_document([documents[0]], convert_to_tensor=True).to_dense()[0]
    assert (document != 0).sum() > len(set(student.tokenizer(documents[0])["input_ids"]))

    metrics = json.loads(EVAL_METRICS.read_text())
    assert metrics["student"]["query_active_dims"] < metrics["student"]["corpus_active_dims"]
    assert abs(metrics["onnx_int8_ndcg_drop"]) < 0.1  # the int8 document encoder scored, on this tiny model
    assert (EXPORT_DIR / "document_0_Transformer/onnx/model_qint8.onnx").exists()
    assert (PUSH_DIR / "document_0_Transformer/onnx/model.onnx").exists()
    exported = json.loads((RECORDS_DIR / "export.json").read_text())["metrics"]
    assert exported["fp32_document_max_abs_diff"] < 1e-4 and exported["fp32_query_max_abs_diff"] == 0
    text = (Path("build/card") / "README.md").read_text()
    assert "Inference-free SPLADE Sparse Encoder" in text and "no transformer runs at query time" in text
    assert "document_0_Transformer/onnx/model_qint8.onnx" in text

    mlflow.set_tracking_uri(params.tracking.tracking_uri)
    registered = mlflow.pyfunc.load_model(f"models:/{params.tracking.registered_model}@challenger")
    (predicted,) = registered.predict([query], params={"side": "query"})
    assert sorted(predicted["indices"]) == vector.nonzero().flatten().tolist()


HUB_RECIPES = [recipe for recipe in RECIPES
               if Params.model_validate(yaml.safe_load(recipe.read_text())).snapshot.train.format == "hf"]


def test_the_reference_recipes_are_all_here():
    assert {r.stem for r in HUB_RECIPES} == {"splade-small-msmarco", "splade-cocondenser-gooaq", "csr-mxbai-nq",
                                             "inference-free-splade-distilbert-nq"}


def local_hub_dataset(folder: Path, config: str | None, frame) -> Path:
    """`frame` as a local copy of a Hugging Face dataset with a train split, under `config` if named."""
    if config:
        (folder / config).mkdir(parents=True)
        frame.to_parquet(folder / config / "train-00000-of-00001.parquet")
        (folder / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n"
                                          f"  - split: train\n    path: {config}/train-*\n---\n")
    else:
        (folder / "data").mkdir(parents=True)
        frame.to_parquet(folder / "data" / "train-00000-of-00001.parquet")
    return folder


# the default suite runs the headline recipe (about a minute each); the local recipes' tests above
# cover the other architectures, and `pytest -m slow` runs every Hub recipe
@pytest.mark.parametrize("recipe", [recipe if recipe.stem == "splade-small-msmarco"
                                    else pytest.param(recipe, marks=pytest.mark.slow) for recipe in HUB_RECIPES],
                         ids=lambda path: path.stem)
def test_hub_recipe_runs_end_to_end_with_tiny_surrogates(recipe, workdir, shared, tiny_dense_model,
                                                         cross_encoder, cut_beir, nanobeir_en):
    """The recipe as written, with every Hub id swapped for a local stand-in of the same layout:
    its training dataset (same config and column names, real MS MARCO or SciFact rows), NanoBEIR-en
    (two real sets, cut down), tiny models built from config for the student and teacher."""
    import pandas as pd
    from huggingface_hub import ModelCard
    from sentence_transformers import SentenceTransformer, SparseEncoder

    from pipeline.data.sources import retrieval_pairs

    data = recipe_data(recipe.stem)
    source = data["snapshot"]["train"]
    if source["kind"] == "triplets":  # real MS MARCO triplets
        rows = pd.read_csv(shared / "data/msmarco-toy-triplets/triplets.tsv", sep="\t", header=None,
                           names=["query", "positive", "negative"], dtype=str, quoting=3)
    else:
        rows = retrieval_pairs(read_retrieval_set(cut_beir("scifact", queries=60, extra_docs=0,
                                                           split="train"), "train"))
    rows = rows.rename(columns={new: old for old, new in source["rename"].items()})
    source.update(source=str(local_hub_dataset(workdir / "train-data", source["config"], rows)),
                  revision=None)
    data["snapshot"]["eval"].update(revision=None, source=str(nanobeir_en({
        "NanoSciFact": cut_beir("scifact", queries=8, extra_docs=60),
        "NanoDBPedia": cut_beir("dbpedia-subset", queries=8, extra_docs=60)})))
    data["teacher"].update(model=str(cross_encoder), revision=None)
    train_cfg = data["train"]
    train_cfg.update(revision=None, max_seq_length=64, eval_steps=1, save_steps=1000, precision="fp32")
    if train_cfg["architecture"] == "csr":  # a dense surrogate with a query prompt, as mxbai has
        dense = SentenceTransformer(str(tiny_dense_model))
        dense.prompts = {"query": "Represent this sentence for searching relevant passages: "}
        dense.save_pretrained(str(workdir / "dense"))
        train_cfg.update(base_model=str(workdir / "dense"))
        train_cfg["csr"].update(hidden_dim=256, k=64, k_aux=128)
    else:
        train_cfg.update(base_model="synthetic")
    params = Params.model_validate(surrogate(data))
    for stage in (snapshot, validate, teacher, train, export, evaluate, card, push):
        stage.run(params)
    track.run(params)

    manifest = json.loads(SNAPSHOT_MANIFEST.read_text())
    assert manifest["train"]["rows"] == len(rows)  # the recipe's config and columns read the layout
    metrics = json.loads(EVAL_METRICS.read_text())
    per_set = metrics["datasets"]
    assert set(per_set) == {"NanoSciFact", "NanoDBPedia"}  # datasets: [] is every set
    assert metrics["student"]["dot_ndcg@10"] == pytest.approx(
        (per_set["NanoSciFact"]["student"]["dot_ndcg@10"] + per_set["NanoDBPedia"]["student"]["dot_ndcg@10"]) / 2)
    if params.evaluate.max_active_dims:
        assert sorted(map(int, metrics["student_max_active_dims"])) == [4, 8, 16, 32, 64, 128, 256]
    train_record = json.loads((Path("records") / "train.json").read_text())
    evaluated = [e for e in train_record["facts"]["log_history"] if "eval_sequential_score" in e]
    assert evaluated and "eval_NanoSciFact_dot_ndcg@10" in evaluated[0]  # both sets, mid-training
    if params.train.loss == "margin-mse":
        scored = pd.read_parquet(TEACHER_SCORED)
        assert scored["label"].abs().gt(0).all()  # the cross-encoder's margins
    card_text = (Path("build/card") / "README.md").read_text()
    assert card.missing_sections(card_text) == []
    model_index = {r.dataset_name for r in ModelCard(card_text).data.eval_results}
    mean = f"{Path(params.snapshot.eval.source).name} mean"
    assert model_index == {"NanoSciFact", "NanoDBPedia", mean,
                           *(f"{mean} max_active_dims {k}" for k in params.evaluate.max_active_dims)}
    student = SparseEncoder(str(STUDENT_DIR))
    if params.train.architecture == "csr":
        assert student.prompts["query"].startswith("Represent this sentence")
