"""The snapshot as every stage reads it: the training rows and their text columns, content hashes,
the evaluation sets, and the columns each loss trains on.

A neutral module: the snapshot stage writes these files, the later stages read them through here,
and no stage imports another."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import (
    SNAPSHOT_EVAL,
    SNAPSHOT_MANIFEST,
    SNAPSHOT_TRAIN,
    TrainConfig,
)
from pipeline.data.sources import RetrievalSet, read_retrieval_set

TEXT_COLUMN = re.compile(r"query|positive|negative(_\d+)?")
# the teacher's column each loss trains on: margins, score lists, or none (in-batch negatives)
LABEL_COLUMN = {"margin-mse": "label", "kl-div": "scores", "mnrl": None}


def text_columns(frame: pd.DataFrame) -> list[str]:
    """The text columns of a snapshot: query, positive, negative and any negative_N."""
    return [c for c in frame.columns if TEXT_COLUMN.fullmatch(c)]


def row_hashes(frame: pd.DataFrame, chunk_rows: int = 100_000) -> np.ndarray:
    """One 64-bit hash per row (pandas' hash_pandas_object), computed a chunk at a time: hashing
    converts strings to Python objects, which for a million rows would double the memory."""
    hashable = frame.copy(deep=False)
    for column in frame.columns:  # list cells (several negatives' scores) hash by their repr
        if len(frame) and isinstance(frame[column].iloc[0], (list, tuple, np.ndarray)):
            hashable[column] = frame[column].map(lambda cell: repr(list(cell)))
    parts = [pd.util.hash_pandas_object(hashable.iloc[start:start + chunk_rows], index=False).to_numpy()
             for start in range(0, len(frame), chunk_rows)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)


def frame_digest(frame: pd.DataFrame) -> str:
    """sha256 of the rows' values (and column names), independent of how they were stored."""
    digest = hashlib.sha256("\x1f".join(frame.columns).encode())
    digest.update(row_hashes(frame).tobytes())
    return digest.hexdigest()


def id_texts_digest(texts: Mapping[str, str], chunk_rows: int = 100_000) -> str:
    """frame_digest of the (id, text) frame of `texts` in their order, equal to it, built a chunk of
    rows at a time: a frame of a whole corpus's texts would be a second copy of them."""
    digest = hashlib.sha256("\x1f".join(["id", "text"]).encode())
    items = iter(texts.items())
    while chunk := list(itertools.islice(items, chunk_rows)):
        digest.update(row_hashes(pd.DataFrame(chunk, columns=["id", "text"], dtype=str)).tobytes())
    return digest.hexdigest()


def retrieval_sets_digest(sets: dict[str, RetrievalSet]) -> str:
    """sha256 of evaluation sets' names, documents, queries and judgements, independent of their order."""
    digest = hashlib.sha256()
    for name in sorted(sets):
        data = sets[name]
        frames = [pd.DataFrame({"id": list(texts), "text": list(texts.values())}, dtype=str)
                  for texts in (data.corpus, data.queries)]
        frames.append(pd.DataFrame([(q, d, str(grade)) for q, docs in data.qrels.items()
                                    for d, grade in docs.items()], columns=["query", "doc", "grade"], dtype=str))
        digest.update(name.encode() + b"\x1e")
        for frame in frames:
            digest.update(frame_digest(frame.sort_values(list(frame.columns), ignore_index=True)).encode())
    return digest.hexdigest()


def read_training_snapshot() -> pd.DataFrame:
    return pd.read_parquet(SNAPSHOT_TRAIN)


def read_manifest() -> dict:
    return json.loads(SNAPSHOT_MANIFEST.read_text())


def read_eval_snapshot(split: str, folder: Path = SNAPSHOT_EVAL) -> dict[str, RetrievalSet]:
    """The snapshot's evaluation sets, by name."""
    return {set_folder.name: read_retrieval_set(set_folder, split)
            for set_folder in sorted(folder.iterdir()) if set_folder.is_dir()}


def training_rows(cfg: TrainConfig, scored: pd.DataFrame) -> pd.DataFrame:
    """The columns the trainer sees: the texts, and the loss's teacher column named label."""
    label = LABEL_COLUMN[cfg.loss]
    columns = text_columns(scored) + ([label] if label and label in scored else [])
    return scored[columns].rename(columns={"scores": "label"})
