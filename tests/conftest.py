"""Shared fixtures: an offline, quiet environment; the real assets in ../shared; shrunken params."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                    "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(name, value)

from pipeline.config import Params, load_params
from tests.helpers.project import PROJECT, SHARED, shrink


def pytest_sessionstart(session):
    """Under CI a run without the shared assets would be green having checked nothing that needs a
    real model or BEIR set (dozens of tests, the parity tests among them): it fails instead."""
    if os.environ.get("CI", "").lower() in ("1", "true") and not SHARED.exists():
        pytest.exit(f"CI: the shared assets are missing at {SHARED} (set SPLADE_SHARED); "
                    "the tests that need them would all skip", returncode=1)


SESSION_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


@pytest.fixture(autouse=True)
def no_leaked_tracking_uri():
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI, which a stage started later reads as
    the user's choice of server: every test starts and ends with the session's value (not the one it
    found: a module's fixture set up just before it may have exported its own)."""
    def restore():
        if SESSION_TRACKING_URI is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = SESSION_TRACKING_URI
    restore()
    yield
    restore()


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium for the tests that look at a web UI: CI installs it (.ci/run), so there a
    missing one fails; elsewhere it skips, saying what to install."""
    from tests.helpers.browser import chromium_binary

    found = chromium_binary()
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail("CI: no Chromium (apt-get install chromium)")
        pytest.skip("no Chromium for the web UI tests (apt-get install chromium)")
    return found


@pytest.fixture(scope="session")
def ray_session():
    from tests.helpers.ray_cluster import RayCluster

    cluster = RayCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def ray_cluster(ray_session):
    """A local Ray cluster of two nodes of one CPU each (`ray start --head` on 127.0.0.1, and one
    more node process), started once per session; a test that kills a node gets it back for the next."""
    while len(ray_session.alive()) < 2:
        ray_session.start_node()
    return ray_session


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.exists():
        pytest.skip(f"shared assets not found at {SHARED} (set SPLADE_SHARED)")
    return SHARED


@pytest.fixture
def tiny_params() -> Params:
    return shrink(load_params(PROJECT / "params.yaml"))


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Stages write relative to the working directory: give each test its own."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_dense_model(tmp_path_factory, shared):
    """A dense sentence-transformers model built from config: BERT (1 layer, hidden 32) + mean pooling."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("dense")
    tokenizer = BertTokenizerFast.from_pretrained(str(shared / "models/splade-tiny"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(folder / "bert")
    tokenizer.save_pretrained(folder / "bert")
    transformer = Transformer(str(folder / "bert"), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(32, pooling_mode="mean")])
    model.save_pretrained(str(folder / "dense"))
    return folder / "dense"


@pytest.fixture(scope="session")
def cross_encoder(tmp_path_factory, shared):
    """A cross-encoder built from config: BERT-tiny's shape with random weights, one logit."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertTokenizerFast,
    )

    tokenizer = BertTokenizerFast.from_pretrained(str(shared / "models/splade-tiny"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=512, num_labels=1,
                        initializer_range=0.2)  # wide weights: scores that differ from pair to pair
    path = tmp_path_factory.mktemp("models") / "cross-encoder"
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def cut_beir(shared, tmp_path_factory):
    """cut_beir(name, queries, extra_docs, split): a shared BEIR split cut down to its first judged
    queries, their judged documents and the first `extra_docs` others, written as a BEIR folder."""
    from pipeline.data.sources import cut_retrieval_set, read_retrieval_set, write_beir

    def cut(name: str, queries: int = 20, extra_docs: int = 300, split: str = "test") -> Path:
        folder = tmp_path_factory.mktemp(f"{name}-cut")
        write_beir(cut_retrieval_set(read_retrieval_set(shared / "data/beir" / name, split), queries, extra_docs),
                   folder, split)
        return folder

    return cut


@pytest.fixture(scope="session")
def nanobeir_en(tmp_path_factory):
    """nanobeir_en({"NanoSciFact": beir_folder, ...}): BEIR test sets written as a local copy of a
    Hugging Face dataset in the NanoBEIR-en layout (configs corpus / queries / qrels, a split per set,
    declared in README.md), which `datasets.load_dataset` reads as it reads the Hub's."""
    import pandas as pd

    from pipeline.data.sources import read_retrieval_set

    def build(sets: dict[str, Path]) -> Path:
        root = tmp_path_factory.mktemp("NanoBEIR-en")
        card = ["---", "configs:"]
        for part in ("corpus", "queries", "qrels"):
            (root / part).mkdir()
            card += [f"- config_name: {part}", "  data_files:"]
            for name in sets:
                card += [f"  - split: {name}", f"    path: {part}/{name}-*"]
        for name, folder in sets.items():
            data = read_retrieval_set(folder, "test")
            frames = {"corpus": {"_id": list(data.corpus), "text": list(data.corpus.values())},
                      "queries": {"_id": list(data.queries), "text": list(data.queries.values())},
                      "qrels": {"query-id": [q for q, docs in data.qrels.items() for _ in docs],
                                "corpus-id": [d for docs in data.qrels.values() for d in docs]}}
            for part, frame in frames.items():
                pd.DataFrame(frame).to_parquet(root / part / f"{name}-00000-of-00001.parquet")
        (root / "README.md").write_text("\n".join(card + ["---", ""]))
        return root

    return build
