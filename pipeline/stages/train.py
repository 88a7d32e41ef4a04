"""Stage 4: distil the teacher's scores into a SPLADE sparse encoder.

sentence-transformers' SparseEncoderTrainer with SpladeLoss over SparseMarginMSELoss (the teacher's
margins) or SparseDistillKLDivLoss (its score lists), and FLOPS regularisation whose weights grow
quadratically over the first `regularizer_warmup_ratio` of the steps. The initial model is saved to
models/base (the baseline the evaluation compares against) and the trained one to models/student;
both are ordinary SparseEncoder folders. With train.base_model "synthetic", the student is a
BertForMaskedLM built from config with a WordPiece vocabulary learnt from the snapshot's text
(models are built by pipeline.modelling.encoders). SPLADE trains through pipeline.modelling.splade_head's fused head
(train.fused_head): no (texts, tokens, vocabulary) logits in the forward or the backward pass.
train.architecture inference-free-splade trains a Router (pipeline.modelling.encoders.inference_free_splade):
the query column goes to per-token weights at their own learning rate, the others to the MLM, as
sentence-transformers' inference-free recipes route them. train.mini_batch_size trains with
CachedSpladeLoss (GradCache): the batch is encoded in pieces, the gradients are the whole batch's.

Checkpoints go to models/checkpoints/<resume key>/ every `save_steps`. The key names everything
that changes the training: the train params, the labels, the weights of a local base model, the
world size and global batch, the library versions. A rerun after a crash resumes from the newest
complete checkpoint of the same key, and continues exactly (the same final weights as an
uninterrupted run); checkpoints of another key are removed, saying which of their settings differed.
"""

from __future__ import annotations

import csv
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from pipeline.cli import StageError, stage_main
from pipeline.config import (
    BASE_MODEL_DIR,
    CHECKPOINTS_DIR,
    SNAPSHOT_TRAIN_CORPUS,
    SNAPSHOT_TRAIN_QUERIES,
    STUDENT_DIR,
    TEACHER_SCORED,
    TRAIN_LOSS,
    Params,
    TrainConfig,
    unpinned_hub_id,
)
from pipeline.data.snapshots import (
    ID_COLUMN,
    TrainingTexts,
    read_eval_snapshot,
    text_columns,
    trained_columns,
    training_rows,
)
from pipeline.modelling.encoders import (
    build_synthetic_mlm,
    csr_encoder,
    inference_free_splade,
    splade_encoder,
)
from pipeline.modelling.splade_head import splade_route
from pipeline.modelling.training import (
    KEY_FILE,
    build_trainer,
    checkpoint_folder,
    clear_other_checkpoints,
    latest_checkpoint,
    loss_facts,
    resume_key,
    training_loss,
)
from pipeline.runtime import (
    is_main_process,
    process_rank,
)
from pipeline.tracking.records import (
    replace_folder,
    stage_record,
    write_atomically,
    write_json,
)

log = logging.getLogger(__name__)


def unique_texts(train: pd.DataFrame, columns: list[str]) -> list[str]:
    """The texts of `columns`, each once, in the order first seen."""
    return list(dict.fromkeys(v for c in columns for v in train[c].tolist()))


@dataclass
class TrainingData:
    """What the trainer reads: the dataset (text rows, or id rows joined to their texts per batch),
    the scored file's columns, the texts (each once) and the documents' texts, as the initial model
    needs them, and the files the labels come from."""

    dataset: object
    columns: list[str]
    texts: Callable[[], Iterable[str]]
    documents: Callable[[], Iterable[str]]
    label_files: list[Path]


def training_data(cfg: TrainConfig) -> TrainingData:
    """The teacher's scored rows as a datasets.Dataset: text rows in memory; id-based rows as Arrow
    ids with sentence-transformers' resolve_ids as its transform, so each batch is joined to its texts
    when the trainer reads it from the snapshot's memory-mapped text files."""
    from datasets import Dataset

    names = pq.read_schema(TEACHER_SCORED).names
    if not any(ID_COLUMN.fullmatch(n) for n in names):
        scored = pd.read_parquet(TEACHER_SCORED)
        return TrainingData(Dataset.from_pandas(training_rows(cfg, scored), preserve_index=False), names,
                            lambda: unique_texts(scored, text_columns(scored)),
                            lambda: unique_texts(scored, [c for c in text_columns(scored) if c != "query"]),
                            [TEACHER_SCORED])
    if cfg.batch_sampler == "length-grouped":
        raise StageError("train.batch_sampler length-grouped needs every row's text lengths, and these rows are "
                         "id-based (their texts are read per batch): use random or no-duplicates")
    from datasets.table import InMemoryTable

    columns = trained_columns(cfg, names)
    table = pq.read_table(TEACHER_SCORED, columns=columns).rename_columns(
        ["label" if c == "scores" else c for c in columns])
    # a fingerprint of our own: datasets would hash the whole table for one (10M rows: 1.3 GB at once)
    stat = TEACHER_SCORED.stat()
    dataset = Dataset(InMemoryTable(table), fingerprint=f"scored-{stat.st_size}-{stat.st_mtime_ns}")
    dataset.set_transform(TrainingTexts().resolver(table.column_names))
    # texts read once for the initial model, through mappings of their own that go with the generator
    # (the pages it read would otherwise stay in the stage's RSS beside the trainer's)
    return TrainingData(dataset, names, lambda: TrainingTexts().texts(), lambda: TrainingTexts().corpus_texts(),
                        [TEACHER_SCORED, SNAPSHOT_TRAIN_QUERIES, SNAPSHOT_TRAIN_CORPUS])


def initial_model(cfg: TrainConfig, data: TrainingData, scratch: Path):
    unpinned = unpinned_hub_id("train.base_model", cfg.base_model, cfg.revision)
    if unpinned:
        raise StageError(unpinned)
    if cfg.architecture == "csr":
        return csr_encoder(cfg.base_model, cfg)
    mlm, revision = cfg.base_model, cfg.revision
    if mlm == "synthetic":
        build_synthetic_mlm(data.texts(), cfg.student, cfg.max_seq_length, scratch)
        mlm, revision = str(scratch), None
    if cfg.architecture == "splade":
        return splade_encoder(mlm, cfg.max_seq_length, revision)
    documents = data.documents() if cfg.query_weights == "idf" else None
    return inference_free_splade(mlm, cfg.max_seq_length, revision, documents)


def write_loss_curve(curve: list[dict], path: Path) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["step", "loss"])
            writer.writeheader()
            writer.writerows(curve)

    write_atomically(path, write)




























def held_out_evaluator(params: Params):
    """The evaluate stage's retrieval metrics on the snapshot's held-out set(s), for use mid-training:
    one set's metrics unprefixed (eval_dot_ndcg@10), several sets' prefixed with the set's name and
    with their mean nDCG@10 as the main score."""
    from sentence_transformers.sentence_transformer.evaluation import (
        SequentialEvaluator,
    )
    from sentence_transformers.sparse_encoder.evaluation import (
        SparseInformationRetrievalEvaluator,
    )

    sets = read_eval_snapshot()
    evaluators = [SparseInformationRetrievalEvaluator(
        data.queries, data.corpus, {q: set(d) for q, d in data.qrels.items()},
        batch_size=params.evaluate.batch_size, write_csv=False, name=name if len(sets) > 1 else "")
        for name, data in sets.items()]
    if len(evaluators) == 1:
        return evaluators[0]
    return SequentialEvaluator(evaluators, main_score_function=lambda scores: sum(scores) / len(scores))


def run(params: Params) -> dict:
    cfg = params.train
    with stage_record("train", params) as record, tempfile.TemporaryDirectory() as scratch:
        data = training_data(cfg)
        model = initial_model(cfg, data, Path(scratch) / "mlm")
        model.max_active_dims = cfg.max_active_dims
        main_process = is_main_process()
        if main_process:
            shutil.rmtree(STUDENT_DIR, ignore_errors=True)
            replace_folder(BASE_MODEL_DIR, lambda folder: model.save_pretrained(str(folder)))

        loss = training_loss(cfg, model, data.columns)
        dataset = data.dataset
        key = resume_key(cfg, data.label_files, process_rank()[1])
        checkpoints = checkpoint_folder(key)
        if main_process:
            CHECKPOINTS_DIR.mkdir(parents=True, exist_ok=True)
            record["facts"]["not_resumed"] = clear_other_checkpoints(checkpoints, key)
            write_json(checkpoints / KEY_FILE, key)
        trainer = build_trainer(cfg, model, dataset, loss, checkpoints,
                                evaluator=held_out_evaluator(params) if cfg.eval_steps else None)
        resume = latest_checkpoint(checkpoints) if checkpoints.exists() else None
        if resume:
            log.info("resuming from %s", resume)
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        if main_process:
            replace_folder(STUDENT_DIR, lambda folder: model.save_pretrained(str(folder)))
            shutil.rmtree(checkpoints, ignore_errors=True)  # the student is saved: nothing to resume

        curve = [{"step": e["step"], "loss": float(e["loss"])} for e in trainer.state.log_history
                 if "loss" in e]
        if main_process:
            write_loss_curve(curve, TRAIN_LOSS)
        record["metrics"] = {
            "steps": trainer.state.global_step,
            "train_loss": float(result.training_loss),
            # fewer steps than logging_steps log no loss: the run's mean loss is all there is
            "final_loss": curve[-1]["loss"] if curve else float(result.training_loss),
            "samples_per_second": float(result.metrics["train_samples_per_second"]),
            "runtime_seconds": float(result.metrics["train_runtime"]),
            "resumed_from_step": int(resume.name.split("-")[1]) if resume else 0,
        }
        record["facts"].update({"log_history": trainer.state.log_history, "resume_key": key,
                           "device": str(model.device), "training_rows": len(dataset),
                           "loss": loss_facts(loss), "training_args": trainer.args.to_dict(),
                           # the commit a Hub base model resolved to (a branch revision pins nothing)
                           "base_model_commit": getattr(splade_route(model)[0].auto_model.config, "_commit_hash", None)})
    return record["metrics"]


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
