"""What every stage asks of the process it runs in: its rank under torchrun, whether to use bf16
(and whether the hardware has it), the memory it holds, the machine's fingerprint, and content hashes of large files
(model weights)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path


def process_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment (or set by hand); one process by default."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def use_local_gpu() -> None:
    """Under torchrun on a machine with several GPUs, make this rank's (cuda:$LOCAL_RANK) the one
    that models loaded without an explicit device go to."""
    import torch

    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def is_main_process() -> bool:
    """Under torchrun only rank 0 writes models and records."""
    return process_rank()[0] == 0


def use_bf16(precision: str, device_type: str) -> bool:
    """precision auto means bf16 autocast on CUDA and fp32 elsewhere; bf16 and fp32 mean themselves."""
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def native_bf16(device_type: str) -> bool:
    """Whether bf16 runs natively: CUDA (Ampere on), or a CPU with AVX512-BF16 or AMX. (mkldnn's
    "bf16 supported" is also true on plain AVX-512 CPUs, which emulate it, slower than fp32.)"""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resident_gb() -> float:
    """The memory this process holds now (its resident set; Linux's /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def update_with_file(digest: "hashlib._Hash", path: Path) -> None:
    """Feed a file into a hash 16 MiB at a time (model weights and label files can be large)."""
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)


def folder_digest(folder: Path, wanted: Callable[[Path], bool], extra: Path | None = None) -> str:
    """sha256 of the folder's files that `wanted` accepts, each by its path in the folder (the same in
    any clone), in path order, then the `extra` file by its name."""
    digest = hashlib.sha256()
    files = [(path.relative_to(folder).as_posix(), path) for path in sorted(Path(folder).rglob("*"))
             if path.is_file() and wanted(path)]
    for name, path in files + ([(extra.name, extra)] if extra else []):
        digest.update(name.encode() + b"\0")
        update_with_file(digest, path)
    return digest.hexdigest()


def weights_digest(folder: Path) -> str:
    """sha256 of a local model folder's weight files (safetensors, bin): what its outputs depend on,
    without its README or other metadata."""
    return folder_digest(folder, lambda path: path.suffix in {".safetensors", ".bin"})


def import_bm25s():
    """bm25s, kept off the GPU: importing it runs a JAX top-k when JAX is installed, and JAX then
    takes 75% of the GPU's memory for the rest of the process (seen: training beside it ran out of
    memory on an 80 GB H100)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import bm25s

    return bm25s


# CPU features that change which kernels torch, oneDNN and MKL run (and so the last digits of results)
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                "amx_int8")
# environment variables that choose those kernels, or their order of summation, on any CPU
KERNEL_SETTINGS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                   "MKL_CBWR", "CUBLAS_WORKSPACE_CONFIG")


def cpu_facts() -> tuple[str | None, list[str]]:
    """The CPU's model name and which of KERNEL_FLAGS it has (Linux /proc/cpuinfo; elsewhere none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, []
    first = {}  # the first processor's fields
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        first[key.strip()] = value.strip()
    flags = set(first.get("flags", "").split())
    model = first.get("model name")
    return model, [flag for flag in KERNEL_FLAGS if flag in flags]


def machine_fingerprint() -> dict:
    """What a run's numbers depend on besides code, data and params: the CPU and the features its
    kernels use (and the variables that override that choice), native bf16, the GPU, torch / CUDA /
    MKL / oneDNN versions, the thread count and the deterministic settings; "id" is a short hash of all of it. Two runs with the same id, commit and
    params give the same numbers; another id explains a difference that no commit made."""
    import re

    import torch

    model, flags = cpu_facts()
    built = torch.__config__.show()
    version = lambda pattern: (re.search(pattern, built) or [None, None])[1]  # noqa: E731
    cuda = torch.cuda.is_available()
    facts = {
        "cpu_model": model, "cpu_flags": flags, "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16("cuda" if cuda else "cpu"),
        "gpu_model": torch.cuda.get_device_name(0) if cuda else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
        "mkl": version(r"Math Kernel Library Version ([\d.]+)"), "onednn": version(r"MKL-DNN v([\d.]+)"),
        "threads": torch.get_num_threads(),
        "kernel_settings": {name: os.environ[name] for name in KERNEL_SETTINGS if name in os.environ},
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic, "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    facts["id"] = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]
    return facts
