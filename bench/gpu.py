"""The GPU proof kit: one command for the minutes a GPU is at hand. On one CUDA GPU it measures, in
about 8 minutes, what the project claims there, and writes it all as one JSON file:
- training (bench/train.py --model bert-base): a BERT-base SPLADE at length 256 in bf16, the fused
  head against stock: samples/s, MFU against the device's bf16 peak, peak memory, and the largest
  batch of each in the GPU's memory;
- teacher scoring (bench/teacher.py): the teacher stage in bf16 against `CrossEncoder.predict` with
  the model in bf16, pairs/s;
- evaluation (bench/evaluate.py): the evaluate stage against sentence-transformers' evaluator on
  SciFact, documents/s of the whole evaluation;
- parity on the device: splade-tiny's vectors and gradients with the fused head and with stock's,
  both under bf16 autocast, against fp32 stock.
Each step runs in its own process under its own time limit; one that fails or overruns is recorded
with its error and the others still run. Without a GPU it refuses (exit status 2).

    python bench/gpu.py [--out gpu-proof.json]
    python bench/gpu.py --smoke   # every step tiny, on the CPU (the suite runs it)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from scifact import PROJECT, SHARED, hard_negative_rows  # noqa: E402  (bench/ is on sys.path)

sys.path.insert(0, str(PROJECT))
BENCH = Path(__file__).resolve().parent

# each step's command (after `python bench/NAME.py`) and time limit in seconds, on a GPU and in --smoke
STEPS = {
    "train": (["--model", "bert-base", "--queries", "256", "--held-out-queries", "32", "--batch-size", "64",
               "--max-fit-batch", "1024"], 270),
    "teacher": (["--queries", "200", "--batch-size", "128"], 60),
    "evaluate": (["--batch-size", "128"], 60),
}
PARITY_SECONDS = 45


def run_step(name: str, arguments: list[str], limit: float) -> dict:
    """bench/NAME.py's JSON line, or what stopped it."""
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *arguments], capture_output=True,
                              text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after its limit of {limit:g} s"}
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-5:], "seconds": round(time.perf_counter() - started, 1)}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "step_seconds": round(time.perf_counter() - started, 1)}


def parity(device: str, texts: list[str], max_seq_length: int) -> dict:
    """splade-tiny's vectors and parameter gradients (of a fixed linear function of the vectors) under
    bf16 autocast, fused head and stock head, each against fp32 stock: the largest vector error and
    the largest relative gradient error (over parameters; the attention key biases, whose true
    gradient is zero, left out)."""
    import torch

    from pipeline.modelling.encoders import splade_encoder
    from pipeline.modelling.splade_head import fused_head

    model = splade_encoder(str(SHARED / "models/splade-tiny"), max_seq_length).to(device)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model.preprocess(texts).items()}
    weights = torch.randn(len(texts), model[0].auto_model.config.vocab_size, generator=torch.Generator().manual_seed(0))

    def forward_backward(fused: bool, bf16: bool):
        model.zero_grad()
        with fused_head(model) if fused else nullcontext(), torch.autocast(device, torch.bfloat16, enabled=bf16):
            vectors = model(dict(features))["sentence_embedding"].float()
        (vectors * weights.to(device)).sum().backward()
        return vectors.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    exact_vectors, exact_gradients = forward_backward(False, False)
    result = {"texts": len(texts), "max_seq_length": max_seq_length, "device": device}
    for name, fused in (("stock_bf16", False), ("fused_bf16", True)):
        vectors, gradients = forward_backward(fused, True)
        drift = {n: float((gradients[n] - g).norm() / g.norm()) for n, g in exact_gradients.items()
                 if "attention.self.key.bias" not in n and g.norm() > 0}
        result[name] = {"max_vector_error": float((vectors - exact_vectors).abs().max()),
                        "max_relative_gradient_error": max(drift.values())}
    result["fused_no_further_than_stock"] = (
        result["fused_bf16"]["max_vector_error"] <= result["stock_bf16"]["max_vector_error"]
        and result["fused_bf16"]["max_relative_gradient_error"]
        <= 2 * result["stock_bf16"]["max_relative_gradient_error"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-proof.json"))
    parser.add_argument("--smoke", action="store_true", help="every step tiny, on the CPU")
    parser.add_argument("--parity-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.parity_worker:  # the parity step's own process: device, text count, max length
        device, count, length = args.parity_worker.split(",")
        rows = hard_negative_rows(-(-int(count) // 2), negatives=1)
        texts = (rows["query"].tolist() + rows["positive"].tolist())[:int(count)]
        print(json.dumps(parity(device, texts, int(length))))
        return

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        parser.exit(2, "bench/gpu.py measures a CUDA GPU and this machine has none (torch.cuda.is_available() is "
                       "False). `python bench/gpu.py --smoke` runs its steps tiny on the CPU.\n")
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    result = {"smoke": args.smoke, "torch": torch.__version__, "device": device}
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        result.update(gpu=properties.name, gpu_memory_gb=round(properties.total_memory / 2 ** 30, 1),
                      cuda=torch.version.cuda)
    for name, (arguments, limit) in STEPS.items():
        result[name] = run_step(name, ["--smoke"] if args.smoke else arguments, limit * (4 if args.smoke else 1))
        print(f"{name}: {result[name].get('step_seconds', 'failed')}", file=sys.stderr, flush=True)
    texts, length = (4, 64) if args.smoke else (32, 256)
    result["parity"] = run_step("gpu", ["--parity-worker", f"{device},{texts},{length}"], PARITY_SECONDS * 4)
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
