"""Memory of one training step at a large batch: the pipeline's SpladeLoss on the whole batch against
its cached form (train.mini_batch_size: sentence-transformers' CachedSpladeLoss, GradCache), same
model, rows and loss, each in its own process (so that its peak is its own), through the training
path (pipeline.modelling.training.training_loss inside the fused SPLADE head).

Model: the shared splade-tiny at max_seq_length 256. Rows: SciFact train queries, each with its
positive and 4 BM25 hard negatives, labelled with BM25 margins (MarginMSE, FLOPS regularised).

    python bench/cached_loss.py [--batch-size 128] [--mini-batch-size 16]
    python bench/cached_loss.py --smoke   # batch 8 in mini-batches of 4, length 64 (seconds)

Prints one JSON line: for each side the step's peak memory above what was held before it (peak RSS
on a CPU, peak allocated on CUDA), its seconds and loss, and `peak_ratio` (cached / uncached).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from scifact import PROJECT, SHARED, hard_negative_rows  # noqa: E402  (bench/ is on sys.path)

sys.path.insert(0, str(PROJECT))



def worker(batch_size: int, mini_batch_size: int | None, max_seq_length: int) -> dict:
    import torch

    from pipeline.config import TrainConfig
    from pipeline.modelling.encoders import splade_encoder
    from pipeline.modelling.splade_head import fused_head
    from pipeline.modelling.training import training_loss
    from pipeline.runtime import resident_gb

    cuda = torch.cuda.is_available()
    rows = hard_negative_rows(queries=-(-batch_size // 4), negatives=4).head(batch_size)
    rows = rows.assign(label=rows["positive_bm25"] - rows["negative_bm25"])
    model = splade_encoder(str(SHARED / "models/splade-tiny"), max_seq_length).to("cuda" if cuda else "cpu")
    loss = training_loss(TrainConfig(loss="margin-mse", mini_batch_size=mini_batch_size, max_seq_length=max_seq_length),
                         model, rows)
    features = [{k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in model.preprocess(rows[c].tolist()).items()}
                for c in ("query", "positive", "negative")]
    labels = torch.tensor(rows["label"].to_numpy(), dtype=torch.float32, device=model.device)
    before = torch.cuda.memory_allocated() / 2 ** 30 if cuda else resident_gb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with fused_head(model):
        total = sum(loss(features, labels).values())
        total.backward()
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
    return {"step_peak_gb": round(peak - before, 3), "seconds": round(seconds, 2), "loss": float(total.detach()),
            "device": "cuda" if cuda else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--mini-batch-size", type=int, default=16)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="batch 8, mini-batches of 4, length 64")
    parser.add_argument("--worker", choices=["uncached", "cached"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.batch_size, args.mini_batch_size, args.max_seq_length = 8, 4, 64
    if args.worker:
        print(json.dumps(worker(args.batch_size, args.mini_batch_size if args.worker == "cached" else None,
                                args.max_seq_length)))
        return
    result = {"batch_size": args.batch_size, "mini_batch_size": args.mini_batch_size,
              "max_seq_length": args.max_seq_length}
    for side in ("uncached", "cached"):
        done = subprocess.run([sys.executable, __file__, "--worker", side, "--batch-size", str(args.batch_size),
                               "--mini-batch-size", str(args.mini_batch_size), "--max-seq-length",
                               str(args.max_seq_length)], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{side} worker failed:\n{done.stderr[-3000:]}")
        result[side] = json.loads(done.stdout.strip().splitlines()[-1])
    result["peak_ratio"] = round(result["cached"]["step_peak_gb"] / result["uncached"]["step_peak_gb"], 3)
    result["loss_difference"] = abs(result["cached"]["loss"] - result["uncached"]["loss"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
