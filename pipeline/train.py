"""Stage 4: distil the teacher's scores into a SPLADE sparse encoder.

sentence-transformers' SparseEncoderTrainer with SpladeLoss over SparseMarginMSELoss (the teacher's
margins) or SparseDistillKLDivLoss (its score lists), and FLOPS regularisation whose weights grow
quadratically over the first `regularizer_warmup_ratio` of the steps. The initial model is saved to
models/base (the baseline the evaluation compares against) and the trained one to models/student;
both are ordinary SparseEncoder folders. With train.base_model "synthetic", the student is a
BertForMaskedLM built from config with a WordPiece vocabulary learnt from the snapshot's text.

Checkpoints go to models/checkpoints/<digest of the train params and labels>/ every `save_steps`;
a rerun after a crash resumes from the newest complete one (the step count continues).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from pipeline import snapshot, teacher
from pipeline.cli import StageError, stage_main
from pipeline.config import (BASE_MODEL_DIR, CHECKPOINTS_DIR, STUDENT_DIR, TEACHER_DIR, TRAIN_LOSS,
                             Params, StudentConfig, TrainConfig)
from pipeline.tracking import stage_record

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_vocabulary(texts: list[str], size: int) -> list[str]:
    """A WordPiece vocabulary learnt from `texts`: every character (as a word start and as a ##
    continuation) so that any word can be spelt, then the most frequent whole words.

    Deterministic by construction (ties go alphabetically); the `tokenizers` WordPiece trainer
    breaks ties in hash-map order, which gave a different vocabulary on every run."""
    from collections import Counter

    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer, pre_tokenizer = BertNormalizer(lowercase=True), BertPreTokenizer()
    counts = Counter(word for text in texts
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    characters = sorted({c for word in counts for c in word})
    vocabulary = SPECIAL_TOKENS + characters + [f"##{c}" for c in characters]
    known = set(vocabulary)
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(vocabulary) >= size:
            break
        if word not in known:
            vocabulary.append(word)
    return vocabulary


def build_synthetic_mlm(texts: list[str], cfg: StudentConfig, max_seq_length: int, out: Path) -> None:
    """A randomly initialised BertForMaskedLM with a WordPiece vocabulary learnt from `texts`."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(wordpiece_vocabulary(texts, cfg.vocab_size)) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(out / "vocab.txt"), model_max_length=max_seq_length)
    torch.manual_seed(cfg.seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                        intermediate_size=4 * cfg.hidden_size,
                        max_position_embeddings=max(64, max_seq_length))
    BertForMaskedLM(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def splade_encoder(mlm_path: str, max_seq_length: int):
    """SPLADE = MLM logits, log1p(relu), max over tokens."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import SpladePooling, Transformer

    transformer = Transformer(mlm_path, transformer_task="fill-mask", max_seq_length=max_seq_length)
    vocab_size = transformer.auto_model.config.vocab_size
    # without the dimension SpladePooling reports the hidden size until saved and reloaded
    return SparseEncoder(modules=[transformer, SpladePooling("max", embedding_dimension=vocab_size)])


def initial_model(cfg: TrainConfig, train: pd.DataFrame, scratch: Path):
    if cfg.base_model != "synthetic":
        return splade_encoder(cfg.base_model, cfg.max_seq_length)
    texts = list(dict.fromkeys(train["query"].tolist() + train["positive"].tolist()
                               + train["negative"].tolist()))
    build_synthetic_mlm(texts, cfg.student, cfg.max_seq_length, scratch)
    return splade_encoder(str(scratch), cfg.max_seq_length)


def write_loss_curve(log_history: list[dict], path: Path) -> list[dict]:
    curve = [{"step": e["step"], "loss": float(e["loss"])} for e in log_history if "loss" in e]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "loss"])
        writer.writeheader()
        writer.writerows(curve)
    return curve


def checkpoint_folder(cfg: TrainConfig, scored_file: Path) -> Path:
    """Checkpoints of this exact training (params and labels), so a rerun never resumes a different one."""
    digest = hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())
    with scored_file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return CHECKPOINTS_DIR / digest.hexdigest()[:16]


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint: the trainer writes trainer_state.json last."""
    complete = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


def distillation_loss(cfg: TrainConfig, model, scored: pd.DataFrame):
    from sentence_transformers.sparse_encoder.losses import (SparseDistillKLDivLoss,
                                                             SparseMarginMSELoss, SpladeLoss)

    if cfg.loss == "kl-div":
        if "scores" not in scored:
            raise StageError("train.loss kl-div needs the teacher's score lists; this snapshot "
                             "carries margins only (kind scored): use margin-mse")
        inner, label = SparseDistillKLDivLoss(model), "scores"
    else:
        inner, label = SparseMarginMSELoss(model), "label"
    loss = SpladeLoss(model, loss=inner, query_regularizer_weight=cfg.query_regularizer_weight,
                      document_regularizer_weight=cfg.document_regularizer_weight)
    return loss, label


def run(params: Params, teacher_dir: Path = TEACHER_DIR) -> dict:
    import torch
    from datasets import Dataset
    from sentence_transformers import SparseEncoderTrainer, SparseEncoderTrainingArguments
    from sentence_transformers.sparse_encoder.callbacks.splade_callbacks import \
        SpladeRegularizerWeightSchedulerCallback

    cfg = params.train
    with stage_record("train", cfg, params.tracking) as record, \
            tempfile.TemporaryDirectory() as scratch:
        scored_file = teacher_dir / teacher.SCORED_FILE
        scored = pd.read_parquet(scored_file)
        model = initial_model(cfg, scored, Path(scratch) / "mlm")
        model.max_active_dims = cfg.max_active_dims
        for folder in (BASE_MODEL_DIR, STUDENT_DIR):
            shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(str(BASE_MODEL_DIR))

        loss, label = distillation_loss(cfg, model, scored)
        dataset = Dataset.from_pandas(scored[snapshot.text_columns(scored) + [label]]
                                      .rename(columns={label: "label"}), preserve_index=False)
        checkpoints = checkpoint_folder(cfg, scored_file)
        CHECKPOINTS_DIR.mkdir(parents=True, exist_ok=True)
        for stale in CHECKPOINTS_DIR.glob("*"):  # other trainings' checkpoints
            if stale != checkpoints:
                shutil.rmtree(stale)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())
        args = SparseEncoderTrainingArguments(
            output_dir=str(checkpoints),
            num_train_epochs=cfg.epochs,
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
            gradient_checkpointing=cfg.gradient_checkpointing,
            report_to=[],  # the track stage writes MLflow; no online codecarbon probes
        )
        warmup = SpladeRegularizerWeightSchedulerCallback(loss, "quadratic", cfg.regularizer_warmup_ratio)
        trainer = SparseEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=loss,
                                       callbacks=[warmup])
        resume = latest_checkpoint(checkpoints) if checkpoints.exists() else None
        if resume:
            log.info("resuming from %s", resume)
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        model.save_pretrained(str(STUDENT_DIR))
        shutil.rmtree(checkpoints, ignore_errors=True)  # the student is saved: nothing to resume

        curve = write_loss_curve(trainer.state.log_history, TRAIN_LOSS)
        record["metrics"] = {
            "steps": trainer.state.global_step,
            "train_loss": float(result.training_loss),
            "final_loss": curve[-1]["loss"] if curve else float("nan"),
            "samples_per_second": float(result.metrics["train_samples_per_second"]),
            "runtime_seconds": float(result.metrics["train_runtime"]),
            "resumed_from_step": int(resume.name.split("-")[1]) if resume else 0,
        }
        record["facts"] = {"log_history": trainer.state.log_history,
                           "device": str(model.device), "training_rows": len(dataset)}
    return record["metrics"]


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
