"""The snapshot as every stage reads it: the training rows and their text columns, content hashes,
the evaluation sets, and the columns each loss trains on.

An evaluation set is a folder of Parquet files: corpus.parquet and queries.parquet (_id, text) and
qrels.parquet (query-id, corpus-id, score). Its corpus is read lazily (SnapshotTexts): the ids in
memory, the texts a row group at a time, so that a stage holds a shard of MS MARCO's 8.8M passages,
not all of them.

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
from pipeline.data.sources import LazyTexts, RetrievalSet, batches

# rows per Parquet row group of a snapshot's texts, and per chunk of texts hashed: the unit read at a
# time (hashing 200,000 texts at once peaked 0.5 GB higher than 20,000)
TEXT_ROW_GROUP = 10_000

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


def id_text_hashes(texts: Mapping[str, str], chunk_rows: int = TEXT_ROW_GROUP) -> np.ndarray:
    """One 64-bit hash per (id, text) row of `texts`, in their order, a chunk of rows at a time: a
    frame of a whole corpus's texts would be a second copy of them."""
    parts = [row_hashes(pd.DataFrame(chunk, columns=["id", "text"], dtype=str))
             for chunk in batches(texts.items(), chunk_rows)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)


def id_texts_digest(texts: Mapping[str, str], chunk_rows: int = TEXT_ROW_GROUP, by_id: bool = False) -> str:
    """frame_digest of the (id, text) frame of `texts`, equal to it without building it: in their
    order, or with `by_id` sorted by id (as sorting the frame by its columns sorts unique ids)."""
    hashes = id_text_hashes(texts, chunk_rows)
    if by_id:
        hashes = hashes[np.argsort(np.array(list(texts), dtype=object), kind="stable")]
    return hashlib.sha256("\x1f".join(["id", "text"]).encode() + hashes.tobytes()).hexdigest()


def retrieval_sets_digest(sets: dict[str, RetrievalSet]) -> str:
    """sha256 of evaluation sets' names, documents, queries and judgements, independent of their order
    (each part's rows sorted; the texts hashed a chunk at a time, their ids unique)."""
    digest = hashlib.sha256()
    for name in sorted(sets):
        data = sets[name]
        qrels = pd.DataFrame([(q, d, str(grade)) for q, docs in data.qrels.items() for d, grade in docs.items()],
                             columns=["query", "doc", "grade"], dtype=str)
        digest.update(name.encode() + b"\x1e")
        digest.update(id_texts_digest(data.corpus, by_id=True).encode())
        digest.update(id_texts_digest(data.queries, by_id=True).encode())
        digest.update(frame_digest(qrels.sort_values(list(qrels.columns), ignore_index=True)).encode())
    return digest.hexdigest()


def read_training_snapshot() -> pd.DataFrame:
    return pd.read_parquet(SNAPSHOT_TRAIN)


def read_manifest() -> dict:
    return json.loads(SNAPSHOT_MANIFEST.read_text())


class SnapshotTexts(LazyTexts):
    """id -> text of a snapshot's Parquet file (_id, text), in the file's order: the ids held, the
    texts read a row group at a time (the last one kept), so that walking them in order, or a range
    of rows, holds one row group of texts."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.file = pq.ParquetFile(self.path, pre_buffer=False)  # pre-buffering holds a whole column
        self.ids = self.file.read(columns=["_id"]).column("_id").to_pylist()
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.group_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._cached: tuple[int, list[str]] = (-1, [])

    def _group(self, group: int) -> list[str]:
        if self._cached[0] != group:
            self._cached = (group, self.file.read_row_group(group, columns=["text"]).column("text").to_pylist())
        return self._cached[1]

    def between(self, start: int, stop: int) -> list[str]:
        texts = []
        for group in range(int(np.searchsorted(self.group_starts, start, "right")) - 1, len(self.group_starts) - 1):
            first = int(self.group_starts[group])
            if first >= stop:
                break
            texts += self._group(group)[max(start, first) - first:stop - first]
        return texts

    def values(self):
        for batch in self.file.iter_batches(TEXT_ROW_GROUP, columns=["text"]):
            yield from batch.column("text").to_pylist()


def texts_between(corpus: Mapping[str, str], start: int, stop: int) -> list[str]:
    """The texts of a corpus's rows start to stop: a lazily read one's from its file, others by position."""
    if isinstance(corpus, LazyTexts):
        return corpus.between(start, stop)
    return list(itertools.islice(corpus.values(), start, stop))


def write_texts(texts: Mapping[str, str], path: Path) -> None:
    """id -> text as a snapshot's Parquet file (_id, text), a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("_id", pa.string()), ("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for chunk in batches(texts.items(), TEXT_ROW_GROUP):
            ids, values = zip(*chunk)
            writer.write_table(pa.table([pa.array(ids, pa.string()), pa.array(values, pa.string())], schema=schema),
                               row_group_size=TEXT_ROW_GROUP)


def write_eval_set(data: RetrievalSet, folder: Path) -> None:
    """An evaluation set as the snapshot keeps it (the module's docstring says the files)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_texts(data.corpus, folder / "corpus.parquet")
    write_texts(data.queries, folder / "queries.parquet")
    pd.DataFrame([(q, d, grade) for q, docs in data.qrels.items() for d, grade in docs.items()],
                 columns=["query-id", "corpus-id", "score"]).astype({"score": "int64"}).to_parquet(
        folder / "qrels.parquet", index=False)


def read_eval_set(folder: Path) -> RetrievalSet:
    """An evaluation set the snapshot wrote: its corpus lazily, its queries and judgements whole."""
    qrels: dict[str, dict[str, int]] = {}
    for query, doc, grade in pd.read_parquet(folder / "qrels.parquet").itertuples(index=False):
        qrels.setdefault(query, {})[doc] = int(grade)
    queries = dict(SnapshotTexts(folder / "queries.parquet").items())
    return RetrievalSet(SnapshotTexts(folder / "corpus.parquet"), queries, qrels)


def read_eval_snapshot(folder: Path = SNAPSHOT_EVAL) -> dict[str, RetrievalSet]:
    """The snapshot's evaluation sets, by name."""
    return {set_folder.name: read_eval_set(set_folder)
            for set_folder in sorted(folder.iterdir()) if set_folder.is_dir()}


def training_rows(cfg: TrainConfig, scored: pd.DataFrame) -> pd.DataFrame:
    """The columns the trainer sees: the texts, and the loss's teacher column named label."""
    label = LABEL_COLUMN[cfg.loss]
    columns = text_columns(scored) + ([label] if label and label in scored else [])
    return scored[columns].rename(columns={"scores": "label"})
