"""The fused head's test cases, shared by tests/test_splade_head.py and the DDP script it runs under
torchrun (tests/helpers/ddp_fused_head.py): real SciFact rows, a small random SPLADE student, and one
forward and backward with the fused head or the stock one."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sentence_transformers import SparseEncoder

from pipeline.config import StudentConfig
from pipeline.data.sources import read_retrieval_set
from pipeline.modelling.encoders import build_synthetic_mlm, splade_encoder
from pipeline.modelling.splade_head import fused_head


def scifact_rows(shared: Path, rows: int) -> pd.DataFrame:
    """Real text of every length: SciFact train queries, a cited abstract and another abstract
    (most over 256 tokens, some short), with made-up teacher margins and score lists."""
    data = read_retrieval_set(shared / "data/beir/scifact", "train")
    docs = list(data.corpus.values())
    query_ids = [q for q in data.qrels if q in data.queries][:rows]
    frame = pd.DataFrame({
        "query": [data.queries[q] for q in query_ids],
        "positive": [data.corpus[next(iter(data.qrels[q]))] for q in query_ids],
        # alternate long abstracts with their first words: the batch is padded both ways
        "negative": [docs[7 * i] if i % 2 else " ".join(docs[7 * i].split()[:12]) for i in range(rows)]})
    generator = np.random.default_rng(0)
    frame["label"] = generator.normal(2.0, 1.0, rows)
    frame["scores"] = [list(s) for s in generator.normal(0.0, 3.0, (rows, 2))]
    return frame


def random_student(tmp_path: Path, shared: Path) -> SparseEncoder:
    """A small random BERT SPLADE (the quickstart's builder), vocabulary learnt from SciFact text."""
    texts = list(read_retrieval_set(shared / "data/beir/scifact", "train").corpus.values())[:300]
    build_synthetic_mlm(texts, StudentConfig(vocab_size=800, hidden_size=32, layers=2, heads=2, dropout=0.0),
                        128, tmp_path / "mlm")
    return splade_encoder(str(tmp_path / "mlm"), 128)


def no_dropout(model: SparseEncoder) -> SparseEncoder:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()


def loss_and_gradients(model, loss, rows: pd.DataFrame, fused: bool, autocast: bool = False):
    """One forward and backward of `loss` on `rows`: (the loss, every parameter's gradient, the
    vectors of each column)."""
    model.zero_grad()
    features = [model.preprocess(rows[column].tolist()) for column in ("query", "positive", "negative")]
    labels = torch.tensor(np.stack(rows["label"]), dtype=torch.float32) if "label" in rows else None
    vectors = []
    with fused_head(model) if fused else nullcontext(), \
            torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
        handle = model[1].register_forward_hook(lambda _, __, out: vectors.append(out["sentence_embedding"].detach()))
        try:
            value = sum(loss(features, labels).values())
        finally:
            handle.remove()
        value.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(value), gradients, torch.cat(vectors)
