"""The snapshot as every stage reads it: the training rows and their text columns, content hashes,
the evaluation sets, and the columns each loss trains on.

An evaluation set is a folder of Parquet files: corpus.parquet and queries.parquet (_id, text) and
qrels.parquet (query-id, corpus-id, score). Its corpus is read lazily (SnapshotTexts): the ids in
memory, the texts a row group at a time, so that a stage holds a shard of MS MARCO's 8.8M passages,
not all of them.

A neutral module: the snapshot stage writes these files, the later stages read them through here,
and no stage imports another."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import (
    SNAPSHOT_DIR,
    SNAPSHOT_EVAL,
    SNAPSHOT_MANIFEST,
    SNAPSHOT_TRAIN,
    SNAPSHOT_TRAIN_CORPUS,
    SNAPSHOT_TRAIN_QUERIES,
    TrainConfig,
)
from pipeline.data.sources import ID_COLUMN, IdRows, LazyTexts, RetrievalSet, batches

# rows per Parquet row group of a snapshot's texts, and per chunk of texts hashed: the unit read at a
# time (hashing 200,000 texts at once peaked 0.5 GB higher than 20,000)
TEXT_ROW_GROUP = 10_000

TEXT_COLUMN = re.compile(r"query|positive|negative(_\d+)?")
# rows per chunk of id-based training rows read at a time (ids only: a few MB)
ID_ROW_CHUNK = 100_000
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


def id_text_hashes(texts: Mapping[str, str] | Iterable[tuple[str, str]], chunk_rows: int = TEXT_ROW_GROUP) -> np.ndarray:
    """One 64-bit hash per (id, text) row of `texts` (a mapping, or its items), in their order, a
    chunk of rows at a time: a frame of a whole corpus's texts would be a second copy of them."""
    items = texts.items() if isinstance(texts, Mapping) else texts
    parts = [row_hashes(pd.DataFrame(chunk, columns=["id", "text"], dtype=str))
             for chunk in batches(items, chunk_rows)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)


def id_texts_digest(texts: Mapping[str, str] | Iterable[tuple[str, str]], chunk_rows: int = TEXT_ROW_GROUP,
                    by_id: bool = False) -> str:
    """frame_digest of the (id, text) frame of `texts` (a mapping, or its items), equal to it without
    building it: in their order, or with `by_id` (a mapping's) sorted by id (as sorting the frame by
    its columns sorts unique ids)."""
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
    """The columns the trainer sees: the texts (or their ids), and the loss's teacher column named label."""
    return scored[trained_columns(cfg, list(scored.columns))].rename(columns={"scores": "label"})


def trained_columns(cfg: TrainConfig, names: list[str]) -> list[str]:
    """Of a scored file's columns, those the trainer reads: the texts (or their ids) and the loss's label."""
    label = LABEL_COLUMN[cfg.loss]
    texts = [n for n in names if TEXT_COLUMN.fullmatch(n) or ID_COLUMN.fullmatch(n)]
    return texts + ([label] if label and label in names else [])


def write_id_training(rows: IdRows, folder: Path) -> str:
    """Id-based training rows as the snapshot keeps them: train.parquet (the ids and scores) and the
    texts they name, each once, in train_queries.arrow and train_corpus.arrow (_id, text; Arrow IPC
    streams, which datasets memory-maps), the texts read from their files in one pass. Returns the
    rows' content hash: frame_digest of the ids and scores, then of each texts file, hashed as written."""
    import pyarrow.parquet as pq

    digest = hashlib.sha256("\x1f".join(rows.table.column_names).encode())
    for batch in rows.table.to_batches(ID_ROW_CHUNK):
        digest.update(row_hashes(batch.to_pandas()).tobytes())
    pq.write_table(rows.table, folder / SNAPSHOT_TRAIN.name, row_group_size=ID_ROW_CHUNK)
    for texts, path, columns in ((rows.queries, SNAPSHOT_TRAIN_QUERIES, ["query_id"]),
                                 (rows.corpus, SNAPSHOT_TRAIN_CORPUS, [c for c in rows.text_rows if c != "query_id"])):
        named = np.zeros(len(texts), dtype=bool)
        for column in columns:
            named[rows.text_rows[column]] = True
        digest.update(id_texts_digest(written_texts(texts, named, folder / path.name)).encode())
    return digest.hexdigest()


def written_texts(texts: Mapping[str, str], keep: np.ndarray, path: Path):
    """Writes the (id, text) rows of `texts` where `keep` is set to an Arrow IPC stream (_id, text),
    yielding each as it is written (so that they are hashed without being read back)."""
    import pyarrow as pa

    schema = pa.schema([("_id", pa.string()), ("text", pa.string())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        start = 0
        for chunk in batches(texts.items(), TEXT_ROW_GROUP):
            kept = [row for row, wanted in zip(chunk, keep[start:start + len(chunk)]) if wanted]
            start += len(chunk)
            if kept:
                ids, values = zip(*kept)
                writer.write_table(pa.table([pa.array(ids, pa.string()), pa.array(values, pa.string())], schema=schema))
                yield from kept


class TrainingSnapshot:
    """The snapshot's training rows: text columns, or id columns naming the texts in
    train_queries.arrow and train_corpus.arrow (memory-mapped), joined a range of rows at a time."""

    def __init__(self, folder: Path = SNAPSHOT_DIR):
        import pyarrow.parquet as pq

        self.table = pq.read_table(folder / SNAPSHOT_TRAIN.name)  # ids, scores (or texts): Arrow, no Python objects
        self.id_based = (folder / SNAPSHOT_TRAIN_CORPUS.name).exists()
        self.texts = TrainingTexts(folder) if self.id_based else None
        self._positions: dict[str, object] | None = None

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, start: int = 0, stop: int | None = None) -> pd.DataFrame:
        """Rows start to stop with their texts, indexed by row number."""
        stop = len(self) if stop is None else stop
        part = self.table.slice(start, stop - start)
        if self.id_based:
            if self._positions is None:  # every row's text positions, found once (4 bytes a row and column)
                self._positions = self.texts.positions(self.table)
            frame = self.texts.joined(part, {c: rows.slice(start, stop - start) for c, rows in self._positions.items()})
        else:
            frame = part.to_pandas()
        return frame.set_axis(range(start, start + len(frame)))

    def chunks(self, size: int):
        """The rows with their texts, `size` at a time (at least one chunk, perhaps empty)."""
        for start in range(0, max(len(self), 1), size):
            yield self.rows(start, min(start + size, len(self)))

    def query_texts(self) -> set[str]:
        """Every training query's text."""
        column = self.texts.query_texts() if self.id_based else self.table.column("query").to_pylist()
        return {t for t in column if t is not None}


class TrainingTexts:
    """The texts id-based training rows name (_id, text), memory-mapped, and the join of rows to them:
    as sentence-transformers' resolve_ids joins the trainer's batches (query_id -> query, ...)."""

    def __init__(self, folder: Path = SNAPSHOT_DIR):
        self.paths = {"queries": folder / SNAPSHOT_TRAIN_QUERIES.name, "corpus": folder / SNAPSHOT_TRAIN_CORPUS.name}

    @functools.cached_property
    def tables(self) -> dict:
        """The texts, memory-mapped when first read (the pages read count in the process's RSS until
        the object is gone)."""
        import pyarrow as pa

        return {name: pa.ipc.open_stream(pa.memory_map(str(path))).read_all() for name, path in self.paths.items()}

    @staticmethod
    def lookup(column: str) -> str:
        return "queries" if column == "query_id" else "corpus"

    def positions(self, table) -> dict:
        """For each id column of `table` (Arrow), the row of each id's text."""
        import pyarrow.compute as pc

        return {c: pc.index_in(table.column(c), value_set=self.tables[self.lookup(c)].column("_id"))
                for c in table.column_names if ID_COLUMN.fullmatch(c)}

    def joined(self, table, positions: dict | None = None) -> pd.DataFrame:
        """Id-based rows (an Arrow table) with the texts their ids name in place of the ids (given
        `positions`, the rows of those texts)."""
        positions = self.positions(table) if positions is None else positions
        columns = {}
        for name in table.column_names:
            if name in positions:
                texts = self.tables[self.lookup(name)].column("text")
                columns[name.removesuffix("_id")] = taken(texts, positions[name].to_numpy(zero_copy_only=False))
            else:
                columns[name] = table.column(name).to_pylist()
        return pd.DataFrame(columns)

    def resolver(self, id_columns: list[str]):
        """sentence-transformers' resolve_ids transform for the trainer: a batch of id columns ->
        their texts (query, positive, negative...), the labels kept."""
        from datasets import Dataset
        from sentence_transformers.util import resolve_ids

        texts = {name: Dataset.from_file(str(path)) for name, path in self.paths.items()}
        return resolve_ids({c: (texts[self.lookup(c)], "_id", "text") for c in id_columns if ID_COLUMN.fullmatch(c)},
                           keep_columns=["score", "scores", "label"])

    def texts(self):
        """Every text (the queries', then the documents'), read a batch at a time."""
        yield from self.query_texts()
        yield from self.corpus_texts()

    def query_texts(self):
        return self._column("queries")

    def corpus_texts(self):
        return self._column("corpus")

    def _column(self, name: str):
        for batch in self.tables[name].column("text").chunks:
            yield from batch.to_pylist()


def taken(column, rows: np.ndarray) -> list:
    """column[rows] of a chunked Arrow column, taken chunk by chunk (Arrow's take on a chunked
    column concatenates it first: a whole memory-mapped corpus copied into memory at every call)."""
    import pyarrow as pa

    starts = np.cumsum([0] + [len(chunk) for chunk in column.chunks])
    which = np.searchsorted(starts, rows, "right") - 1
    values = np.empty(len(rows), dtype=object)
    for chunk in np.unique(which):
        at = np.flatnonzero(which == chunk)
        values[at] = column.chunks[chunk].take(pa.array(rows[at] - starts[chunk])).to_pylist()
    return values.tolist()


def rows_head(path: Path, limit: int) -> tuple[pd.DataFrame, int]:
    """The first `limit` rows of a training rows file (the snapshot's or the teacher's) with their
    texts, and how many rows it has."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    head = pa.Table.from_batches(list(itertools.islice(file.iter_batches(limit), 1)), schema=file.schema_arrow)
    id_based = any(ID_COLUMN.fullmatch(n) for n in head.column_names)
    return (TrainingTexts().joined(head) if id_based else head.to_pandas()), file.metadata.num_rows


def read_training_snapshot(limit: int | None = None) -> pd.DataFrame:
    """The snapshot's training rows with their texts (the first `limit` of them): for what reads
    a few rows, or a small set whole."""
    return TrainingSnapshot().rows() if limit is None else rows_head(SNAPSHOT_TRAIN, limit)[0]
