"""Training throughput: the project's training (pipeline.train.build_trainer) against a stock
SparseEncoderTrainer with default arguments, same model, rows, loss and batch size, in one run.

Model: the shared splade-tiny (a real SPLADE, 30522-wide MLM head) at max_seq_length 256, or with
`--model bert-base` a BERT-base SPLADE (BertConfig defaults, random init, splade-tiny's vocabulary) for
GPU throughput. Rows: real
variable-length text, SciFact train queries with their positive and 4 BM25 hard negatives, labelled
with BM25 margins (SpladeLoss over SparseMarginMSELoss). The project's side turns on length-grouped
batches and, where the CPU has native bf16 (or on CUDA), bf16 autocast; learning rate and warm-ups are
the stock defaults on both sides, so the losses compare. Both finished models are then scored with the
same loss, in fp32, on held-out rows.

    python bench/train.py [--queries 120] [--batch-size 16] [--model splade-tiny|bert-base]

Prints one JSON line: samples/s of both, `speedup`, the mean training loss over the last third of
the steps and the held-out loss of both, and on a GPU with a known peak the model FLOPs utilisation
(training FLOPs of the real, unpadded tokens over time, against the datasheet's dense bf16 peak).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from scifact import PROJECT, SHARED, hard_negative_rows  # noqa: E402  (bench/ is on sys.path)

sys.path.insert(0, str(PROJECT))
MAX_SEQ_LENGTH = 256


def margin_rows(queries: int):
    from datasets import Dataset

    rows = hard_negative_rows(queries)
    rows["label"] = rows["positive_bm25"] - rows["negative_bm25"]
    return Dataset.from_pandas(rows[["query", "positive", "negative", "label"]], preserve_index=False)


# dense bf16 tensor-core peaks from the datasheets, TFLOP/s
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0}


def bert_base_mlm(out: Path) -> str:
    """BERT-base shape (12 x 768, 110M params with the tied MLM head), random init, real vocabulary."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "models/splade-tiny"))
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer))).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return str(out)


def fresh_model_and_loss(mlm_path: str):
    from sentence_transformers.sparse_encoder.losses import SparseMarginMSELoss, SpladeLoss

    from pipeline.train import splade_encoder

    model = splade_encoder(mlm_path, MAX_SEQ_LENGTH)
    # the SPLADE-v3 regulariser weights of the reference recipes' order of magnitude
    loss = SpladeLoss(model, loss=SparseMarginMSELoss(model), query_regularizer_weight=5e-5,
                      document_regularizer_weight=3e-5)
    return model, loss


def held_out_loss(model, rows) -> float:
    """MarginMSE of the model's dot-product margins against the labels, in fp32, no regulariser."""
    import torch

    def encode(texts, query):
        method = model.encode_query if query else model.encode_document
        return method(texts, batch_size=16, convert_to_tensor=True).to_dense().float()

    queries = encode(rows["query"], True)
    margins = ((queries * encode(rows["positive"], False)).sum(1)
               - (queries * encode(rows["negative"], False)).sum(1))
    labels = torch.tensor(rows["label"], dtype=torch.float32, device=margins.device)
    return float(((margins - labels) ** 2).mean())


def training_flops(model, rows) -> float:
    """Model FLOPs of one epoch over `rows`, counting real tokens only: per text of n tokens,
    6 * n * (matmul weights: encoder layers + MLM head) + 12 * layers * hidden * n^2 (attention),
    the usual forward + backward = 3 x forward accounting."""
    mlm = model[0].auto_model
    config = mlm.config
    embeddings = mlm.get_input_embeddings().weight.numel()
    encoder = sum(p.numel() for n, p in mlm.named_parameters()
                  if p.dim() == 2 and "embeddings" not in n)  # layers + head transform (decoder tied)
    weights = encoder + embeddings  # the decoder reuses the word embeddings as a matmul
    tokenizer = model.tokenizer
    total = 0.0
    for column in ("query", "positive", "negative"):
        lengths = np.array([len(ids) for ids in tokenizer(list(rows[column]), truncation=True,
                                                          max_length=MAX_SEQ_LENGTH)["input_ids"]])
        total += 6 * weights * lengths.sum() + 12 * config.num_hidden_layers * config.hidden_size * (lengths ** 2).sum()
    return float(total)


def summary(trainer, result) -> dict:
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"samples_per_s": round(result.metrics["train_samples_per_second"], 3),
            "seconds": round(result.metrics["train_runtime"], 2),
            "last_third_loss": float(np.mean(losses[-max(1, len(losses) // 3):]))}


def main() -> None:
    import torch
    from sentence_transformers import SparseEncoderTrainer, SparseEncoderTrainingArguments

    from pipeline.config import TrainConfig
    from pipeline.train import build_trainer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=120)
    parser.add_argument("--held-out-queries", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42, help="data order of both (stock's default)")
    parser.add_argument("--model", choices=["splade-tiny", "bert-base"], default="splade-tiny")
    args = parser.parse_args()

    rows = margin_rows(args.queries + args.held_out_queries)
    train_rows = rows.select(range(4 * args.queries))
    held_out = rows.select(range(4 * args.queries, len(rows)))
    native_bf16 = torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        mlm_path = (str(SHARED / "models/splade-tiny") if args.model == "splade-tiny"
                    else bert_base_mlm(Path(scratch) / "bert-base"))
        model, loss = fresh_model_and_loss(mlm_path)
        flops = training_flops(model, train_rows)
        stock = SparseEncoderTrainer(
            model=model, loss=loss, train_dataset=train_rows,
            args=SparseEncoderTrainingArguments(output_dir=f"{scratch}/stock", num_train_epochs=1,
                                                per_device_train_batch_size=args.batch_size,
                                                seed=args.seed, logging_steps=1, save_strategy="no", report_to=[]))
        results["stock"] = summary(stock, stock.train())
        results["stock"]["held_out_loss"] = held_out_loss(model, held_out)

        model, loss = fresh_model_and_loss(mlm_path)
        defaults = SparseEncoderTrainingArguments(output_dir=scratch)
        cfg = TrainConfig(base_model=mlm_path, epochs=1,
                          batch_size=args.batch_size, learning_rate=defaults.learning_rate,
                          warmup_ratio=0, max_seq_length=MAX_SEQ_LENGTH, batch_sampler="length-grouped",
                          precision="bf16" if native_bf16 else "fp32", save_steps=10_000,
                          seed=args.seed)
        project = build_trainer(cfg, model, train_rows, loss, Path(scratch) / "project")
        results["project"] = summary(project, project.train())
        results["project"]["held_out_loss"] = held_out_loss(model.float(), held_out)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((tflops for name, tflops in PEAK_BF16_TFLOPS.items() if name in device), None)
    for side in results.values():
        side["tflops"] = round(flops / side["seconds"] / 1e12, 2)
        if peak:
            side["mfu"] = round(flops / side["seconds"] / 1e12 / peak, 4)
    print(json.dumps({
        "model": args.model, "rows": len(train_rows), "seed": args.seed, "held_out_rows": len(held_out),
        "batch_size": args.batch_size,
        "max_seq_length": MAX_SEQ_LENGTH, "project_bf16": cfg.precision == "bf16",
        "stock_samples_per_s": results["stock"]["samples_per_s"],
        "project_samples_per_s": results["project"]["samples_per_s"],
        "speedup": round(results["project"]["samples_per_s"] / results["stock"]["samples_per_s"], 3),
        "stock": results["stock"], "project": results["project"],
        "device": device, "peak_bf16_tflops": peak, "epoch_tflop": round(flops / 1e12, 2),
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
