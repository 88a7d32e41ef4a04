import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import snapshot, teacher, validate
from pipeline.config import TeacherConfig, TrainDataConfig
from pipeline.sources import load_training


def test_lexicon_teacher_knows_synonyms_that_bm25_misses():
    documents = ["kalo mife zeru", "pato nise gura", "zeru gura lemo"]
    plain = teacher.LexiconBM25(documents, {})
    knowing = teacher.LexiconBM25(documents, {"bodu": "kalo", "firu": "mife"})
    assert plain.scores("bodu firu")[0] == 0
    scores = knowing.scores("bodu firu")
    assert scores[0] > 0 and scores[1] == scores[2] == 0


def test_quickstart_labels_are_margins(workdir, tiny_params):
    snapshot.run(tiny_params)
    validate.run(tiny_params)
    metrics = teacher.run(tiny_params)
    scored = pd.read_parquet(teacher.TEACHER_DIR / teacher.SCORED_FILE)
    assert np.allclose(scored["label"], scored["positive_score"] - scored["negative_score"])
    # the teacher knows relevance: positives outrank negatives, and it ranks the held-out set well
    assert metrics["margin_positive_fraction"] > 0.95
    assert metrics["eval_dot_ndcg@10"] > 0.9
    assert metrics["unique_pairs_scored"] < 2 * metrics["triplets"] + 1


@pytest.fixture
def tiny_cross_encoder(tmp_path, shared):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(str(shared / "models/splade-tiny"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, num_labels=1)
    path = tmp_path / "cross-encoder"
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cross_encoder_scores_are_raw_logits_of_the_library(tiny_cross_encoder, shared):
    from sentence_transformers import CrossEncoder

    frame = load_training(TrainDataConfig(source=str(shared / "data/msmarco-toy-triplets/triplets.tsv"),
                                          columns=["query", "positive", "negative"])).head(20)
    pairs = list(zip(frame["query"], frame["positive"])) + list(zip(frame["query"], frame["negative"]))
    ours = teacher.cross_encoder_scores(TeacherConfig(kind="cross-encoder", model=str(tiny_cross_encoder)),
                                        pairs)
    model = CrossEncoder(str(tiny_cross_encoder))
    assert np.allclose(ours, model.predict(pairs, activation_fn=torch.nn.Identity()), atol=1e-5)
    # raw logits: the library's default output is their sigmoid
    assert np.allclose(1 / (1 + np.exp(-ours)), model.predict(pairs), atol=1e-5)
    assert not np.allclose(ours, model.predict(pairs), atol=1e-3)
