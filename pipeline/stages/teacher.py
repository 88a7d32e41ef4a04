"""Stage 3: label every training row with the teacher's scores for distillation.

Refuses a snapshot whose validation failed (data/validation/report.json). Writes
data/teacher/train_scored.parquet: the snapshot's rows (query, positive, negative[, negative_N])
plus one `<column>_score` per document column, `scores` ([positive, negatives...], for KL-div) and
`label`, the MarginMSE margin positive - negative (a list, one per negative, with several negatives).
A snapshot of kind `scored` already carries its teacher's margins, and one of kind `pairs` has no
negatives to score (it trains contrastively) unless teacher.hard_negatives mines some: the stage
passes either through unchanged. Id-based rows stay ids (memory grows with the rows, not the
texts) when passed through or scored by a model teacher, which scores the unique (query id,
passage id) pairs, their texts joined a shard at a time; mining and the lexicon teacher join every
row to its texts first.

Teachers:
- cross-encoder: any CrossEncoder (local folder or Hub id at a pinned revision), raw logits.
- bi-encoder: any SentenceTransformer (likewise), its similarity of query and document embeddings.
  With teacher.hard_negatives N it also turns a pairs snapshot into (query, positive, N negatives)
  rows first: the N documents it ranks highest among the snapshot's positives, the query's own
  positives excepted (sentence-transformers' mine_hard_negatives).
- lexicon-bm25: the quickstart's teacher; BM25 over the training documents with each query word
  mapped through the synthetic world's synonym lexicon, so it knows what plain term overlap misses.

The cross-encoder scores each unique (query, document) pair once, in batches cut from pairs sorted
by token length, under bf16 autocast on CUDA. Scores go to shards in data/teacher_shards/ named
after what determines them (pairs, teacher, precision, batching), so a rerun after a crash scores
only the missing shards. Several processes split the shards by rank: under
`torchrun --nproc-per-node N -m pipeline.stages.teacher` (or RANK / WORLD_SIZE set by hand on machines
sharing the folder) rank r scores shards r, r+N, ...; rank 0 waits for the rest and merges. With
teacher.backend ray, Ray workers score the missing shards and the stage writes them
(pipeline.data.ray_shards): the same files, so either way resumes the other's run.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.cli import StageError, stage_main
from pipeline.config import (
    SNAPSHOT_LEXICON,
    TEACHER_SCORED,
    TEACHER_SHARDS_DIR,
    VALIDATION_REPORT,
    Params,
)
from pipeline.data.shards import remove_stale, wait_for_shards
from pipeline.data.snapshots import (
    ID_ROW_CHUNK,
    TrainingSnapshot,
    read_eval_snapshot,
    read_manifest,
)
from pipeline.evaluation.measures import mean_metrics, ranking_metrics
from pipeline.modelling.teachers import (
    MODEL_TEACHERS,
    LexiconBM25,
    ShardPlan,
    labelled,
    labelled_ids,
    margins,
    mine_negatives,
    score_shards,
    score_shards_on_ray,
    training_pairs,
    unique_pairs,
)
from pipeline.runtime import process_rank
from pipeline.tracking.records import stage_record, write_atomically

log = logging.getLogger(__name__)


def distributed_rank() -> tuple[int, int, str | None]:
    """(rank, world size, device) from torchrun's environment; one process by default."""
    import torch

    rank, world_size = process_rank()
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else None
    return rank, world_size, device


def check_validated() -> None:
    """Refuse a snapshot whose validation failed, or was never run on it (the teacher is the first
    stage that spends compute on the rows)."""
    if not VALIDATION_REPORT.exists():
        raise StageError(f"{VALIDATION_REPORT} not found: validate the snapshot first (dvc repro validate)")
    report = json.loads(VALIDATION_REPORT.read_text())
    if report.get("snapshot_sha256") != read_manifest()["train"]["sha256"]:
        raise StageError(f"{VALIDATION_REPORT} is the report of another snapshot: validate this one first "
                         "(dvc repro validate)")
    if not report["success"]:
        failed = sorted({f["check"] for f in report["findings"] if f["severity"] == "error"})
        raise StageError(f"the snapshot failed validation ({report['errors']} error(s): {', '.join(failed)}; "
                         f"see {VALIDATION_REPORT}): not labelling it. Fix the data, or set validate.severity, "
                         "and rerun validate")


def run(params: Params) -> dict:
    cfg = params.teacher
    rank, world_size, device = distributed_rank()
    TEACHER_SHARDS_DIR.mkdir(parents=True, exist_ok=True)  # a DVC out, even for teachers that need no shards
    if cfg.backend == "ray" and world_size > 1:
        raise StageError("teacher.backend ray runs the shards on Ray workers: start the stage as one process, "
                         "not under torchrun or with WORLD_SIZE set")
    if rank > 0:  # a helper rank: score its share of shards; rank 0 merges and records
        if cfg.kind not in MODEL_TEACHERS or params.snapshot.train.kind != "triplets":
            return {}  # nothing worth sharing out (rank 0 mines and scores mined pairs alone)
        check_validated()
        pairs, _ = training_pairs(TrainingSnapshot())
        teacher = MODEL_TEACHERS[cfg.kind](cfg, device)
        return score_shards(teacher, ShardPlan(TEACHER_SHARDS_DIR, pairs, teacher), rank, world_size)

    with stage_record("teacher", params) as record:
        check_validated()
        snapshot = TrainingSnapshot()
        mining = params.snapshot.train.kind == "pairs" and cfg.hard_negatives > 0
        passed_through = params.snapshot.train.kind == "scored" or (params.snapshot.train.kind == "pairs" and not mining)
        # id-based rows stay ids when passed through or scored by a model (their pairs' texts joined
        # a shard at a time); mining and the lexicon teacher read them as texts
        model_scored = cfg.kind in MODEL_TEACHERS and not (passed_through or mining)
        train = snapshot.table if snapshot.id_based and (passed_through or model_scored) else snapshot.rows()
        if params.snapshot.train.kind == "pairs" and not mining:  # mnrl trains on pairs, unlabelled
            record["facts"]["teacher"] = {"skipped": "pairs have no negatives to score"}
            record["metrics"] = {"rows": len(train), "pairs_scored": 0}
        elif params.snapshot.train.kind == "scored":
            if snapshot.id_based:
                train = labelled_ids(train)
            elif isinstance(train["score"].iloc[0], (list, np.ndarray)):  # score lists: KL-div and margins
                train = labelled(train.drop(columns="score"), np.stack(train["score"].to_numpy()).astype(np.float64))
            else:  # margins, MarginMSE's labels
                train["label"] = train["score"]
            record["facts"]["teacher"] = {"skipped": "the snapshot carries teacher scores"}
            record["metrics"] = {"rows": len(train), "pairs_scored": 0}
        else:
            # on Ray the workers hold the teacher; mining needs it here too
            here = cfg.kind in MODEL_TEACHERS and (cfg.backend == "local" or mining)
            teacher = MODEL_TEACHERS[cfg.kind](cfg, device) if here else None
            if mining:
                train = mine_negatives(train, teacher, cfg.hard_negatives)
                record["facts"]["mined_negatives"] = cfg.hard_negatives
            pairs, pair_index = (training_pairs(snapshot) if model_scored and snapshot.id_based
                                 else unique_pairs(train))
            if cfg.kind not in MODEL_TEACHERS:
                lexicon = read_lexicon()
                started = time.perf_counter()
                scores = LexiconBM25(pairs["document"].unique().tolist(), lexicon).score_pairs(pairs)
                record["metrics"] = {"pairs_scored": len(pairs),
                                     "pairs_per_second": len(pairs) / (time.perf_counter() - started)}
                record["metrics"].update(lexicon_eval_metrics(params, lexicon))
                record["facts"]["teacher"] = {"model": "lexicon-bm25 over the snapshot's lexicon"}
            else:
                if cfg.backend == "ray":
                    plan, record["metrics"], teacher = score_shards_on_ray(cfg, TEACHER_SHARDS_DIR, pairs)
                else:
                    plan = ShardPlan(TEACHER_SHARDS_DIR, pairs, teacher)
                    ranks = (0, 1) if mining else (rank, world_size)  # mined pairs: rank 0 alone knows them
                    record["metrics"] = score_shards(teacher, plan, *ranks)
                    wait_for_shards(plan, ranks[1], cfg.wait_seconds, "python -m pipeline.stages.teacher")
                scores = plan.merged()
                remove_stale(plan.folder, {plan.digest})
                record["facts"]["teacher"] = {**teacher.identity, "bf16": teacher.bf16,
                                              "shard_digest": plan.digest}
            doc_scores = scores.astype(np.float64)[pair_index] * cfg.score_scale
            train = labelled(train, doc_scores) if isinstance(train, pd.DataFrame) else labelled_ids(train, doc_scores)
            label = margins(doc_scores)
            record["metrics"].update(rows=len(train), unique_pairs=len(pairs),
                                     pair_occurrences=pair_index.size,
                                     margin_mean=float(label.mean()),
                                     margin_positive_fraction=float((label > 0).mean()))
        if isinstance(train, pd.DataFrame):
            write_atomically(TEACHER_SCORED, lambda tmp: train.to_parquet(tmp, index=False))
        else:
            write_atomically(TEACHER_SCORED, lambda tmp: pq.write_table(train, tmp, row_group_size=ID_ROW_CHUNK))
    return record["metrics"]


def read_lexicon() -> dict[str, str]:
    if not SNAPSHOT_LEXICON.exists():
        raise StageError(f"{SNAPSHOT_LEXICON} not found: the lexicon-bm25 teacher needs the synthetic training "
                         "set; use teacher.kind: cross-encoder")
    return json.loads(SNAPSHOT_LEXICON.read_text())


def lexicon_eval_metrics(params: Params, lexicon: dict[str, str]) -> dict:
    """The lexicon teacher is cheap enough to rank the whole eval corpus: how good is the teacher?"""
    per_set = []
    for evaluation in read_eval_snapshot().values():
        doc_ids = list(evaluation.corpus)
        ranker = LexiconBM25([evaluation.corpus[d] for d in doc_ids], lexicon)
        ranking = {qid: dict(zip(doc_ids, ranker.scores(text))) for qid, text in evaluation.queries.items()}
        per_set.append(ranking_metrics(evaluation, ranking))
    return {f"eval_{k}": v for k, v in mean_metrics(per_set).items()}


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
