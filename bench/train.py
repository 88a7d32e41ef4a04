"""Training throughput and memory: the project's trainer (pipeline.modelling.training.build_trainer, fused SPLADE
head) against a stock SparseEncoderTrainer at its best settings, same model, rows, loss, batch size
and batch order, each side in its own process (so that its peak memory is its own).

Stock at its best: bf16 where the hardware has it natively (CUDA, or a CPU with AVX512-BF16 / AMX;
on a CPU with transformers' `use_cpu`, without which it refuses bf16), as the reference SPLADE
models trained; fp32 elsewhere (--precision overrides: bf16 on a CPU without native bf16 is
emulated, slower than fp32, and run only to check that path). The project runs with the same precision,
the same random batches and the stock learning rate and warm-ups, so that the losses compare.

Model: the shared splade-tiny (a real SPLADE, 30522-wide MLM head) at max_seq_length 256, or with
`--model bert-base` a BERT-base SPLADE (BertConfig defaults, random init, splade-tiny's vocabulary)
for GPUs. Rows: SciFact train queries with their positive and 4 BM25 hard negatives, labelled with
BM25 margins (SpladeLoss over SparseMarginMSELoss with FLOPS). Both finished models are scored with
the same loss, in fp32, on held-out rows (the stock encoder for both).

Memory: the peak of the training run (peak RSS on a CPU, peak allocated on CUDA), and the largest
batch (doubling from the benchmark's) whose one-step peak stays within a budget: --memory-budget-gb
on a CPU (default 8), the GPU's memory on CUDA.

    python bench/train.py [--queries 120] [--batch-size 16] [--seed 42] [--model splade-tiny|bert-base]
                          [--precision native|bf16|fp32]
    python bench/train.py --smoke   # 2 queries, length 32, batch 4, bf16 forced (seconds): the suite runs it

Prints one JSON line: samples/s of both, `speedup`, peak memory of both and `peak_rss_ratio`
(project / stock), the largest batch of each, the mean training loss over the last third of the
steps and the held-out loss of both, and on a GPU with a known peak the model FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from scifact import PROJECT, SHARED, hard_negative_rows  # noqa: E402  (bench/ is on sys.path)

sys.path.insert(0, str(PROJECT))
from pipeline.runtime import native_bf16  # noqa: E402

# dense bf16 tensor-core peaks from the datasheets, TFLOP/s
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0}


def device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def margin_rows(queries: int):
    from datasets import Dataset

    rows = hard_negative_rows(queries)
    rows["label"] = rows["positive_bm25"] - rows["negative_bm25"]
    return Dataset.from_pandas(rows[["query", "positive", "negative", "label"]], preserve_index=False)


def bert_base_mlm(out: Path) -> str:
    """BERT-base shape (12 x 768, 110M params with the tied MLM head), random init, real vocabulary."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "models/splade-tiny"))
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer))).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return str(out)


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


def training_flops(model, rows, max_seq_length: int) -> float:
    """Model FLOPs of one epoch over `rows`, counting real tokens only: per text of n tokens,
    6 * n * (matmul weights: encoder layers + MLM head) + 12 * layers * hidden * n^2 (attention),
    the usual forward + backward = 3 x forward accounting."""
    mlm = model[0].auto_model
    config = mlm.config
    embeddings = mlm.get_input_embeddings().weight.numel()
    encoder = sum(p.numel() for n, p in mlm.named_parameters()
                  if p.dim() == 2 and "embeddings" not in n)  # layers + head transform (decoder tied)
    weights = encoder + embeddings  # the decoder reuses the word embeddings as a matmul
    total = 0.0
    for column in ("query", "positive", "negative"):
        lengths = np.array([len(ids) for ids in model.tokenizer(list(rows[column]), truncation=True,
                                                                max_length=max_seq_length)["input_ids"]])
        total += 6 * weights * lengths.sum() + 12 * config.num_hidden_layers * config.hidden_size * (lengths ** 2).sum()
    return float(total)


def peak_memory_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def bf16_for(precision: str) -> bool:
    """--precision native: bf16 where the device has it natively."""
    return native_bf16(device_type()) if precision == "native" else precision == "bf16"


def trainer_for(side: str, mlm_path: str, rows, batch_size: int, seed: int, output_dir: str, bf16: bool,
                max_seq_length: int):
    """The stock SparseEncoderTrainer at its best settings, or the project's, on a fresh model."""
    from sentence_transformers import (
        SparseEncoderTrainer,
        SparseEncoderTrainingArguments,
    )
    from sentence_transformers.sparse_encoder.losses import (
        SparseMarginMSELoss,
        SpladeLoss,
    )

    from pipeline.config import TrainConfig
    from pipeline.modelling.encoders import splade_encoder
    from pipeline.modelling.training import build_trainer

    model = splade_encoder(mlm_path, max_seq_length)
    # the SPLADE-v3 regulariser weights of the reference recipes' order of magnitude
    loss = SpladeLoss(model, loss=SparseMarginMSELoss(model), query_regularizer_weight=5e-5,
                      document_regularizer_weight=3e-5)
    if side == "stock":
        args = SparseEncoderTrainingArguments(output_dir=output_dir, num_train_epochs=1,
                                              per_device_train_batch_size=batch_size, bf16=bf16,
                                              use_cpu=device_type() == "cpu", seed=seed, logging_steps=1,
                                              save_strategy="no", report_to=[])
        return model, SparseEncoderTrainer(model=model, loss=loss, train_dataset=rows, args=args)
    defaults = SparseEncoderTrainingArguments(output_dir=output_dir)
    cfg = TrainConfig(base_model=mlm_path, epochs=1, batch_size=batch_size, learning_rate=defaults.learning_rate,
                      warmup_ratio=0, max_seq_length=max_seq_length, batch_sampler="random",
                      precision="bf16" if bf16 else "fp32", save_steps=10_000, seed=seed)
    return model, build_trainer(cfg, model, rows, loss, Path(output_dir))


def worker(args) -> dict:
    """One side's training run (`--fit` unset) or one step at batch `--fit` (its peak memory)."""
    import torch

    with tempfile.TemporaryDirectory() as scratch:
        mlm_path = (str(SHARED / "models/splade-tiny") if args.model == "splade-tiny"
                    else bert_base_mlm(Path(scratch) / "bert-base"))
        rows = margin_rows(args.queries + args.held_out_queries)
        if args.fit:
            batch = rows.select([i % len(rows) for i in range(args.fit)])  # one step
            try:
                _, trainer = trainer_for(args.worker, mlm_path, batch, args.fit, args.seed, scratch,
                                         bf16_for(args.precision), args.max_seq_length)
                trainer.train()
            except torch.cuda.OutOfMemoryError:
                return {"fits": False, "peak_gb": None}
            return {"fits": True, "peak_gb": peak_memory_gb()}
        train_rows = rows.select(range(4 * args.queries))
        held_out = rows.select(range(4 * args.queries, len(rows)))
        model, trainer = trainer_for(args.worker, mlm_path, train_rows, args.batch_size, args.seed, scratch,
                                     bf16_for(args.precision), args.max_seq_length)
        result = trainer.train()
        peak = peak_memory_gb()  # of the training, before the held-out scoring
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        return {"samples_per_s": round(result.metrics["train_samples_per_second"], 3),
                "seconds": round(result.metrics["train_runtime"], 2),
                "peak_gb": round(peak, 3),
                "last_third_loss": float(np.mean(losses[-max(1, len(losses) // 3):])),
                "held_out_loss": held_out_loss(model.float(), held_out),
                "epoch_tflop": training_flops(model, train_rows, args.max_seq_length) / 1e12}


def run_worker(args, side: str, fit: int | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", side, "--model", args.model, "--queries", str(args.queries),
               "--held-out-queries", str(args.held_out_queries), "--batch-size", str(args.batch_size),
               "--seed", str(args.seed), "--precision", args.precision, "--max-seq-length",
               str(args.max_seq_length)] + (["--fit", str(fit)] if fit else [])
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        if fit:  # killed for memory, or out of it
            return {"fits": False, "peak_gb": None, "error": done.stderr.strip().splitlines()[-1:]}
        raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def largest_batch(args, side: str, budget_gb: float) -> dict:
    """Doubling from the benchmark's batch: the largest whose one training step peaks within the
    budget (null when even the first does not), and the peaks seen."""
    largest, peaks, batch = None, {}, args.batch_size
    while batch <= args.max_fit_batch:
        probe = run_worker(args, side, fit=batch)
        peaks[batch] = None if probe["peak_gb"] is None else round(probe["peak_gb"], 2)
        if not probe["fits"] or probe["peak_gb"] > budget_gb:
            break
        largest, batch = batch, batch * 2
    return {"largest_batch": largest, "capped": largest == args.max_fit_batch, "peaks_gb": peaks}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=120)
    parser.add_argument("--held-out-queries", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42, help="data order of both (stock's default)")
    parser.add_argument("--model", choices=["splade-tiny", "bert-base"], default="splade-tiny")
    parser.add_argument("--memory-budget-gb", type=float, default=8.0, help="CPU only (CUDA: the GPU's memory)")
    parser.add_argument("--max-fit-batch", type=int, default=512, help="stop the largest-batch search here")
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--precision", choices=["native", "bf16", "fp32"], default="native",
                        help="of both sides; native: bf16 where the device has it natively, else fp32")
    parser.add_argument("--smoke", action="store_true", help="2 queries, length 32, batch 4, one fit probe, bf16 forced")
    parser.add_argument("--worker", choices=["stock", "project"], help=argparse.SUPPRESS)
    parser.add_argument("--fit", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.queries, args.held_out_queries, args.batch_size, args.max_fit_batch = 2, 1, 4, 4
        args.max_seq_length = 32
        args.precision = "bf16"
    if args.worker:
        print(json.dumps(worker(args)))
        return

    cuda = torch.cuda.is_available()
    budget = torch.cuda.get_device_properties(0).total_memory / 2 ** 30 if cuda else args.memory_budget_gb
    results = {side: run_worker(args, side) for side in ("stock", "project")}
    for side in results:
        results[side].update(largest_batch(args, side, budget))
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((tflops for name, tflops in PEAK_BF16_TFLOPS.items() if name in device), None)
    for side in results.values():
        side["tflops"] = round(side["epoch_tflop"] / side["seconds"], 2)
        if peak:
            side["mfu"] = round(side["tflops"] / peak, 4)
    stock, project = results["stock"], results["project"]
    print(json.dumps({
        "model": args.model, "rows": 4 * args.queries, "held_out_rows": 4 * args.held_out_queries,
        "seed": args.seed, "batch_size": args.batch_size, "max_seq_length": args.max_seq_length,
        "precision": {side: "bf16" if bf16_for(args.precision) else "fp32" for side in ("stock", "project")},
        "native_bf16": native_bf16(device_type()), "device": device, "threads": torch.get_num_threads(),
        "stock_samples_per_s": stock["samples_per_s"], "project_samples_per_s": project["samples_per_s"],
        "speedup": round(project["samples_per_s"] / stock["samples_per_s"], 3),
        "peak_rss_ratio": round(project["peak_gb"] / stock["peak_gb"], 3),
        "memory_budget_gb": round(budget, 1),
        "largest_batch": {"stock": stock["largest_batch"], "project": project["largest_batch"]},
        "held_out_loss": {"stock": round(stock["held_out_loss"], 4), "project": round(project["held_out_loss"], 4)},
        "stock": stock, "project": project, "peak_bf16_tflops": peak,
    }))


if __name__ == "__main__":
    main()
