"""Training pieces over sentence-transformers' SparseEncoderTrainer: the loss each train.loss names (with FLOPS
regularisation over the global batch, weights growing quadratically over the warm-up), the trainer with the
pipeline's batch samplers and arguments, and the resume key that names a run's checkpoints (what changes the
training), so a rerun resumes only from checkpoints of the same training. The train stage and the benches
call it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SparseEncoderTrainer
from sentence_transformers.base.sampler import BatchSamplers, DefaultBatchSampler
from sentence_transformers.sparse_encoder.losses import FlopsLoss, SpladeLoss

from pipeline.cli import StageError
from pipeline.config import (
    CHECKPOINTS_DIR,
    TrainConfig,
)
from pipeline.data.snapshots import (
    LABEL_COLUMN,
)
from pipeline.modelling.splade_head import fused_head
from pipeline.runtime import (
    update_with_file,
    use_bf16,
    weights_digest,
)

log = logging.getLogger(__name__)


# train params that change what is saved or logged, not what is learnt: a resume may change them
NOT_TRAINING = {"save_steps", "logging_steps", "eval_steps"}


KEY_FILE = "resume_key.json"


def resume_key(cfg: TrainConfig, label_files: list[Path], world_size: int) -> dict:
    """Everything the trained weights depend on. train.batch_size is per process, so the world size
    changes the global batch (and the data each process sees)."""
    from importlib import metadata

    labels = hashlib.sha256()
    for path in label_files:  # the scored rows, and the texts id-based rows name
        update_with_file(labels, path)
    return {"train": cfg.model_dump(mode="json", exclude=NOT_TRAINING),
            "labels_sha256": labels.hexdigest(),
            "base_model_weights_sha256": weights_digest(Path(cfg.base_model)) if Path(cfg.base_model).is_dir() else None,
            "world_size": world_size, "global_batch": cfg.batch_size * world_size,
            "versions": {name: metadata.version(name) for name in ("torch", "transformers", "sentence-transformers")}}


def checkpoint_folder(key: dict) -> Path:
    return CHECKPOINTS_DIR / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def key_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """What differs between two resume keys, as "name old -> new" (nested keys dotted)."""
    changes = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name), new.get(name)
        if isinstance(before, dict) and isinstance(after, dict):
            changes += key_differences(before, after, f"{prefix}{name}.")
        elif before != after:
            changes.append(f"{prefix}{name} {before} -> {after}")
    return changes


def clear_other_checkpoints(current: Path, key: dict) -> list[str]:
    """Remove checkpoints of other trainings, logging why each cannot be resumed; returns the reasons."""
    reasons = []
    for stale in sorted(p for p in CHECKPOINTS_DIR.glob("*") if p != current and p.is_dir()):
        newest = latest_checkpoint(stale)
        if newest is not None and (stale / KEY_FILE).exists():
            reason = (f"not resuming {newest} (another training: "
                      + "; ".join(key_differences(json.loads((stale / KEY_FILE).read_text()), key)) + "): starting fresh")
            log.warning(reason)
            reasons.append(reason)
        shutil.rmtree(stale)
    return reasons


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint: the trainer writes trainer_state.json last."""
    complete = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


class GlobalBatchFlopsLoss(FlopsLoss):
    """FLOPS over the whole batch across processes: under DDP each process sees only its share of
    the batch, and FLOPS (the squared mean activation per dimension) is not linear in the batch, so
    per-process FLOPS would change what a regulariser weight means. The mean is all-reduced (with
    gradient), which gives DDP exactly the single-process loss and gradient; on one process it is
    sentence-transformers' FlopsLoss. (No active-dims threshold: the pipeline sets none.)

    Also keeps each batch's mean active dimensions (this process's rows) until the trainer logs."""

    def compute_loss_from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not hasattr(self, "active_dims"):
            self.active_dims: list[torch.Tensor] = []
        self.active_dims.append((embeddings.detach() != 0).sum(dim=1).float().mean())  # no sync

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().compute_loss_from_embeddings(embeddings)
        from torch.distributed.nn.functional import all_reduce

        count = torch.tensor([len(embeddings)], dtype=embeddings.dtype, device=embeddings.device)
        dist.all_reduce(count)
        return torch.sum((all_reduce(embeddings.sum(dim=0)) / count) ** 2)


def training_loss(cfg: TrainConfig, model, scored_columns: list[str]):
    """The main loss inside SpladeLoss (with FLOPS regularisation; CachedSpladeLoss with
    train.mini_batch_size) or CSRLoss (with the autoencoder's reconstruction losses)."""
    from sentence_transformers.sparse_encoder.losses import (
        CachedSpladeLoss,
        CSRLoss,
        SparseDistillKLDivLoss,
        SparseMarginMSELoss,
        SparseMultipleNegativesRankingLoss,
    )

    label = LABEL_COLUMN[cfg.loss]
    if label and label not in scored_columns:
        raise StageError(f"train.loss {cfg.loss} needs the teacher's "
                         f"{'margins' if label == 'label' else 'score lists'} ({label!r}), which "
                         f"these rows lack (pairs have no teacher scores; kind scored carries margins "
                         "only): use loss mnrl, or margin-mse")
    inner = (SparseMultipleNegativesRankingLoss(model, scale=cfg.mnrl_scale) if cfg.loss == "mnrl" else
             {"margin-mse": SparseMarginMSELoss, "kl-div": SparseDistillKLDivLoss}[cfg.loss](model))
    if cfg.architecture == "csr":
        return CSRLoss(model, loss=inner, beta=cfg.csr.beta, gamma=cfg.csr.gamma)
    splade = dict(loss=inner, query_regularizer_weight=cfg.query_regularizer_weight,
                  document_regularizer_weight=cfg.document_regularizer_weight,
                  query_regularizer=GlobalBatchFlopsLoss(model), document_regularizer=GlobalBatchFlopsLoss(model))
    if cfg.mini_batch_size:
        return CachedSpladeLoss(model, mini_batch_size=cfg.mini_batch_size, **splade)
    return SpladeLoss(model, **splade)


def loss_facts(loss) -> dict:
    """What the model card says of the loss: its class, the inner loss's, their parameters, and the
    BibTeX of every method in it (the losses' and regularisers' own citations)."""
    parts = [loss, loss.loss] + [getattr(loss, f"{side}_regularizer", None) for side in ("query", "document")]
    config = {k: type(v).__name__ if isinstance(v, torch.nn.Module) else v
              for k, v in loss.get_config_dict().items()}
    inner = loss.loss
    if hasattr(inner, "get_config_dict"):
        config["loss_config"] = {k: v for k, v in inner.get_config_dict().items()
                                 if not isinstance(v, torch.nn.Module)}
    citations = [part.citation.strip() for part in parts if getattr(part, "citation", None)]
    return {"name": type(loss).__name__, "inner": type(inner).__name__, "config": config,
            "citations": list(dict.fromkeys(citations))}


class PipelineTrainer(SparseEncoderTrainer):
    """SparseEncoderTrainer that trains SPLADE through the fused head (pipeline.modelling.splade_head) when
    `fused` is set, and adds query_active_dims and document_active_dims (the mean since the last
    log) to every training log, read off the FLOPS regularisers that see the embeddings anyway."""

    def __init__(self, *args, fused: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused = fused

    def train(self, *args, **kwargs):
        with fused_head(self.model) if self.fused else nullcontext():
            return super().train(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and isinstance(self.loss, SpladeLoss):
            for side in ("query", "document"):
                seen = getattr(getattr(self.loss, f"{side}_regularizer"), "active_dims", None)
                if seen:
                    logs[f"{side}_active_dims"] = round(float(torch.stack(seen).mean()), 2)
                    seen.clear()
        super().log(logs, start_time)


class LengthGroupedBatchSampler(DefaultBatchSampler):
    """Batches of rows of similar text length (less padding), built as transformers'
    LengthGroupedSampler does: shuffle, sort by length within windows of 50 batches, cut, shuffle
    the batches. Deterministic per (seed, epoch), so a resumed run sees the same batches."""

    window_batches = 50

    def __init__(self, dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
        super().__init__(dataset, batch_size, drop_last, valid_label_columns, generator, seed)
        texts = [c for c in dataset.column_names if c not in (valid_label_columns or [])]
        self.lengths = sum(np.fromiter(map(len, dataset[c]), dtype=np.int64, count=len(dataset))
                           for c in texts)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).numpy()
        window = self.batch_size * self.window_batches
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i].tolist()

    def __len__(self):
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + (0 if self.drop_last or not rest else 1)


def inference_free_arguments(cfg: TrainConfig, model, columns: list[str]) -> dict:
    r"""An inference-free model's routes (the query column to the token weights, the documents to the
    MLM) and the token weights' own learning rate, as sentence-transformers' recipes set them (their
    pattern, SparseStaticEmbedding\.weight, predates the Router's parameter names)."""
    import re

    from sentence_transformers.sparse_encoder.modules import SparseStaticEmbedding

    static = [name for name, module in model.named_modules() if isinstance(module, SparseStaticEmbedding)]
    return {"router_mapping": {c: "query" if c == "query" else "document" for c in columns if c != "label"},
            "learning_rate_mapping": {rf"{re.escape(name)}\.weight$": cfg.query_learning_rate for name in static}}


def build_trainer(cfg: TrainConfig, model, dataset, loss, output_dir: Path, evaluator=None):
    """The SparseEncoderTrainer this project trains with (the benchmark uses it too); with an
    evaluator, it scores every train.eval_steps steps."""
    from sentence_transformers import SparseEncoderTrainingArguments
    from sentence_transformers.sparse_encoder.callbacks.splade_callbacks import (
        SpladeRegularizerWeightSchedulerCallback,
    )

    cuda = torch.cuda.is_available()
    bf16 = use_bf16(cfg.precision, "cuda" if cuda else "cpu")
    if cuda:
        # cuDNN attention builds a kernel plan per new batch shape (2-7 s each for BERT-base on an
        # H100), and every length-grouped batch has a new shape; flash/efficient SDPA are as fast
        # in steady state and need no plans
        torch.backends.cuda.enable_cudnn_sdp(False)
    args = SparseEncoderTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio in transformers 5
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        use_cpu=not cuda,  # transformers allows bf16 on CPU only when told
        # tokenising a batch of 64 triplets takes ~130 ms: on a GPU, workers overlap it with the step
        dataloader_num_workers=min(4, (os.cpu_count() or 1) - 1) if cuda else 0,
        activation_checkpointing=cfg.gradient_checkpointing,
        batch_sampler={"random": BatchSamplers.BATCH_SAMPLER, "no-duplicates": BatchSamplers.NO_DUPLICATES,
                       "length-grouped": LengthGroupedBatchSampler}[cfg.batch_sampler],
        report_to=[],  # the track stage writes MLflow; no online codecarbon probes
        eval_strategy="steps" if evaluator else "no",
        eval_steps=cfg.eval_steps,
        **(inference_free_arguments(cfg, model, dataset.column_names) if cfg.architecture == "inference-free-splade" else {}),
    )
    callbacks = [SpladeRegularizerWeightSchedulerCallback(loss, "quadratic", cfg.regularizer_warmup_ratio)
                 ] if cfg.architecture != "csr" else []
    return PipelineTrainer(model=model, args=args, train_dataset=dataset, loss=loss,
                           evaluator=evaluator, callbacks=callbacks, fused=cfg.fused_head)
