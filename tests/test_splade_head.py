"""The fused SPLADE head against sentence-transformers' own: the same vectors, the same gradients
of every parameter, the same weights after training, the same saved model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from sentence_transformers import SparseEncoder

from pipeline.config import TrainConfig
from pipeline.modelling.encoders import splade_encoder
from pipeline.modelling.splade_head import fused_head, fused_pooling_forward
from pipeline.modelling.training import build_trainer, training_loss
from tests.helpers.splade_cases import (
    loss_and_gradients,
    no_dropout,
    random_student,
    scifact_rows,
)

# softmax is unchanged by a constant added to every key's score, so the attention key biases get no
# gradient: both heads give them rounding noise (norm ~1e-6 against ~1e2 for the other parameters)
ZERO_TRUE_GRADIENT = "attention.self.key.bias"


@pytest.fixture(autouse=True)
def always_fused(monkeypatch):
    """The small models here would take the stock head (small logits): these tests compare the
    fused one against it, so it runs at any size."""
    from pipeline.modelling import splade_head

    monkeypatch.setattr(splade_head, "STOCK_HEAD_UP_TO", 0)


def relative_differences(fused: dict, stock: dict) -> dict[str, float]:
    assert fused.keys() == stock.keys()
    return {name: float((fused[name] - stock[name]).norm() / stock[name].norm()) for name in stock}


def assert_same_gradients(fused: dict, stock: dict, tolerance: float = 1e-5) -> None:
    differences = relative_differences(fused, stock)
    exempt = {name for name in differences if ZERO_TRUE_GRADIENT in name}
    assert exempt and all(stock[name].norm() < 1e-4 for name in exempt)  # really ~zero
    worst = max((d, name) for name, d in differences.items() if name not in exempt)
    assert worst[0] < tolerance, worst


def test_splade_tiny_vectors_and_every_gradient_equal_stock(shared):
    """splade-tiny (the real 30522-word head), length 256, padded batches of real SciFact text,
    MarginMSE with both FLOPS regularisers: vectors within 1e-6, gradients within 1e-5 relative."""
    model = no_dropout(splade_encoder(str(shared / "models/splade-tiny"), 256))
    rows = scifact_rows(shared, 6).drop(columns="scores")
    loss = training_loss(TrainConfig(loss="margin-mse"), model, rows)
    stock_loss, stock_gradients, stock_vectors = loss_and_gradients(model, loss, rows, fused=False)
    fused_loss, fused_gradients, fused_vectors = loss_and_gradients(model, loss, rows, fused=True)

    assert (stock_vectors > 0).sum(1).min() > 20  # real, active vectors
    assert (fused_vectors - stock_vectors).abs().max() <= 1e-6
    assert fused_loss == pytest.approx(stock_loss, rel=1e-6)
    assert_same_gradients(fused_gradients, stock_gradients)
    # the tied decoder: its gradient (the word embeddings') is the sum of both uses
    assert "0.model.bert.embeddings.word_embeddings.weight" in fused_gradients
    assert "0.model.cls.predictions.bias" in fused_gradients


@pytest.mark.parametrize("loss_name", ["margin-mse", "kl-div", "mnrl"])
@pytest.mark.parametrize("activation", ["relu", "log1p_relu"])
def test_every_loss_and_activation_gets_stock_gradients_on_a_random_bert(tmp_path, shared, loss_name, activation):
    model = no_dropout(random_student(tmp_path, shared))
    model[1].activation_function = activation
    rows = scifact_rows(shared, 8)
    rows = rows.drop(columns={"margin-mse": "scores", "kl-div": "label", "mnrl": ["label", "scores"]}[loss_name])
    loss = training_loss(TrainConfig(loss=loss_name), model, rows)
    rows = rows.rename(columns={"scores": "label"})  # as pipeline.data.snapshots.training_rows names it
    stock = loss_and_gradients(model, loss, rows, fused=False)
    fused = loss_and_gradients(model, loss, rows, fused=True)
    assert (fused[2] - stock[2]).abs().max() <= 1e-6
    assert_same_gradients(fused[1], stock[1])


@pytest.mark.e2e
def test_ddp_on_two_processes_gets_one_process_gradients_on_the_whole_batch(tmp_path, shared):
    """torchrun, 2 CPU processes (gloo), DistributedDataParallel, 4 rows each through the fused head,
    FLOPS over the whole batch: DDP's averaged gradients are the stock head's on 8 rows in one process."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(Path(__file__).parent / "helpers/ddp_fused_head.py"), str(shared), str(tmp_path / "ddp.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    model = no_dropout(random_student(tmp_path / "one", shared))
    rows = scifact_rows(shared, 8).drop(columns="scores")
    loss = training_loss(TrainConfig(query_regularizer_weight=0.5, document_regularizer_weight=0.3), model, rows)
    _, stock, _ = loss_and_gradients(model, loss, rows, fused=False)
    assert_same_gradients(torch.load(tmp_path / "ddp.pt"), stock)


def test_gradient_checkpointing_keeps_the_gradients(tmp_path, shared):
    model = no_dropout(random_student(tmp_path, shared))
    rows = scifact_rows(shared, 6).drop(columns="scores")
    loss = training_loss(TrainConfig(), model, rows)
    stock = loss_and_gradients(model, loss, rows, fused=False)
    model[0].auto_model.gradient_checkpointing_enable({"use_reentrant": False})
    fused = loss_and_gradients(model, loss, rows, fused=True)
    assert model[0].auto_model.is_gradient_checkpointing
    assert_same_gradients(fused[1], stock[1])


def test_bf16_autocast_is_as_close_to_fp32_as_stocks_bf16(tmp_path, shared):
    """Under bf16 autocast the fused head finds the argmax in bf16 and recomputes its value in fp32:
    its vectors and gradients are no further from the fp32 ones than stock's bf16 are."""
    model = no_dropout(random_student(tmp_path, shared))
    rows = scifact_rows(shared, 6).drop(columns="scores")
    loss = training_loss(TrainConfig(), model, rows)
    _, exact_gradients, exact = loss_and_gradients(model, loss, rows, fused=False)
    _, stock_gradients, stock = loss_and_gradients(model, loss, rows, fused=False, autocast=True)
    _, fused_gradients, fused = loss_and_gradients(model, loss, rows, fused=True, autocast=True)
    stock_error, fused_error = (stock.float() - exact).abs().max(), (fused - exact).abs().max()
    assert 0 < fused_error <= stock_error
    stock_drift = relative_differences(stock_gradients, exact_gradients)
    fused_drift = relative_differences(fused_gradients, exact_gradients)
    shared_names = [n for n in exact_gradients if ZERO_TRUE_GRADIENT not in n]
    assert max(fused_drift[n] for n in shared_names) <= 2 * max(stock_drift[n] for n in shared_names)


def test_unpadded_flash_attention_layout_pools_as_the_padded_batch(tmp_path, shared):
    """sentence-transformers' unpadded layout (flash-attention varlen: one (1, tokens, hidden) row and
    cu_seq_lens_q) gives each text the vector it gets in a padded batch."""
    model = random_student(tmp_path, shared).eval()
    texts = scifact_rows(shared, 5)["positive"].tolist()
    features = model.preprocess(texts)
    with torch.no_grad(), fused_head(model):
        padded = model(dict(features))
        hidden = padded["token_embeddings"]
        mask = features["attention_mask"].bool()
        lengths = mask.sum(1)
        flat = {"token_embeddings": hidden[mask][None],
                "cu_seq_lens_q": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])}
        unpadded = fused_pooling_forward(model[1], flat)["sentence_embedding"]
    assert torch.equal(unpadded, padded["sentence_embedding"])


def test_small_batches_take_the_stock_head_to_the_bit(tmp_path, shared, monkeypatch):
    from pipeline.modelling import splade_head

    monkeypatch.setattr(splade_head, "STOCK_HEAD_UP_TO", splade_head.LOGITS_PER_GROUP)
    model = no_dropout(random_student(tmp_path, shared))
    rows = scifact_rows(shared, 4).drop(columns="scores")
    assert 3 * 4 * 128 * 800 < splade_head.STOCK_HEAD_UP_TO
    loss = training_loss(TrainConfig(), model, rows)
    stock = loss_and_gradients(model, loss, rows, fused=False)
    fused = loss_and_gradients(model, loss, rows, fused=True)
    assert torch.equal(fused[2], stock[2])
    assert all(torch.equal(fused[1][name], stock[1][name]) for name in stock[1])


def test_an_inference_free_models_documents_encode_through_the_head_as_stock(shared):
    from pipeline.modelling.encoders import inference_free_splade
    from pipeline.modelling.splade_head import encode

    model = inference_free_splade(str(shared / "models/splade-tiny"), 256).eval()
    model.max_active_dims = 64
    rows = scifact_rows(shared, 6)
    for side, texts in (("document", rows["positive"].tolist()), ("query", rows["query"].tolist())):
        stock = (model.encode_document if side == "document" else model.encode_query)(texts, convert_to_tensor=True)
        ours = encode(model, texts, side, batch_size=4)
        torch.testing.assert_close(ours.to_dense(), stock.to_dense().float(), atol=1e-5, rtol=0)
    assert (ours.to_dense() > 0).sum(1).max() <= 64 and "forward" not in model[0].sub_modules["document"][1].__dict__


def test_rows_gathered_batch_by_batch_are_the_whole_tensor_in_the_texts_order():
    from pipeline.modelling.splade_head import GrowingCoo

    generator = torch.Generator().manual_seed(0)
    dense = torch.rand(300, 500, generator=generator) * (torch.rand(300, 500, generator=generator) < 0.5)
    order = torch.randperm(300, generator=generator).tolist()  # row i of the batches is text order[i]
    rows = GrowingCoo()
    for start in range(0, 300, 70):  # 75,000 entries: past the first buffer, so it grows once
        batch = dense[start:start + 70]
        rows.append(start, batch.to_sparse() if start % 140 else batch)
    expected = torch.empty_like(dense)
    expected[torch.tensor(order)] = dense
    gathered = rows.tensor(order)
    assert gathered.is_coalesced() and torch.equal(gathered.to_dense(), expected)


def test_encoding_with_max_active_dims_and_saving_inside_the_head_stay_stock(tmp_path, shared):
    model = splade_encoder(str(shared / "models/splade-tiny"), 256).eval()
    texts = scifact_rows(shared, 6)["positive"].tolist()
    stock = model.encode_document(texts, max_active_dims=16, convert_to_tensor=True).to_dense()
    with fused_head(model):
        fused = model.encode_document(texts, max_active_dims=16, convert_to_tensor=True).to_dense()
        model.save_pretrained(str(tmp_path / "saved"))
    assert torch.allclose(fused, stock, atol=1e-6, rtol=0) and ((fused > 0).sum(1) == 16).all()
    # after the context the model is stock again, and what it saved is an ordinary SparseEncoder
    assert "forward" not in model[1].__dict__ and "forward" not in model[0].auto_model.get_output_embeddings().__dict__
    reloaded = SparseEncoder(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved/modules.json").read_text())[1]["type"].startswith("sentence_transformers.")
    assert torch.allclose(reloaded.encode_document(texts, convert_to_tensor=True).to_dense(),
                          model.encode_document(texts, convert_to_tensor=True).to_dense(), atol=1e-6, rtol=0)


def test_thirty_training_steps_end_at_stocks_weights(tmp_path, shared):
    """The project's trainer, fused and stock head, dropout 0, fp32, 30 steps of MarginMSE with
    FLOPS: every parameter (but the key biases) within 1e-4 relative at the end."""
    rows = scifact_rows(shared, 120).drop(columns="scores")
    weights = {}
    for fused in (False, True):
        model = random_student(tmp_path / str(fused), shared)
        cfg = TrainConfig(epochs=1, batch_size=4, learning_rate=1e-3,
                          max_seq_length=128, precision="fp32", fused_head=fused, save_steps=1000, seed=3)
        loss = training_loss(cfg, model, rows)
        dataset = Dataset.from_pandas(rows, preserve_index=False)
        trainer = build_trainer(cfg, model, dataset, loss, tmp_path / f"out-{fused}")
        assert trainer.train().global_step == 30
        weights[fused] = {name: p.detach().clone() for name, p in model.named_parameters()}
    start = dict(random_student(tmp_path / "start", shared).named_parameters())
    travelled = relative_differences(weights[False], {n: p.detach() for n, p in start.items()})
    assert min(travelled.values()) > 1e-3  # every parameter moved
    apart = relative_differences(weights[True], weights[False])
    # Adam turns the key biases' rounding-noise gradients into full steps: they wander apart, and
    # change no output (the softmax ignores them)
    assert max(d for n, d in apart.items() if ZERO_TRUE_GRADIENT not in n) < 1e-4, max((d, n) for n, d in apart.items())
