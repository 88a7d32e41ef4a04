"""Readers for the data users bring: triplet files (jsonl / parquet / tsv) and BEIR folders.

Errors name the file and the row, because a user with a 10-million-row file cannot guess."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.cli import StageError

TRIPLET_COLUMNS = ["query", "positive", "negative"]


class SourceError(StageError):
    pass


@dataclass(frozen=True)
class RetrievalSet:
    corpus: dict[str, str]  # doc id -> text
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}


def read_triplets(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: training file not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif suffix in {".jsonl", ".json"}:
        rows = []
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
        frame = pd.DataFrame(rows)
    elif suffix == ".tsv":
        # MS MARCO style: no header, query \t positive \t negative
        frame = pd.read_csv(path, sep="\t", header=None, names=TRIPLET_COLUMNS, dtype=str,
                            quoting=csv.QUOTE_NONE, keep_default_na=False)
    else:
        raise SourceError(f"{path}: unsupported training file type {suffix!r} "
                          "(use .jsonl, .parquet or .tsv)")
    missing = [c for c in TRIPLET_COLUMNS if c not in frame.columns]
    if missing:
        raise SourceError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    return frame[TRIPLET_COLUMNS].reset_index(drop=True)


def _read_jsonl_texts(path: Path, with_title: bool) -> dict[str, str]:
    texts: dict[str, str] = {}
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = str(row["_id"])
            except (json.JSONDecodeError, KeyError) as exc:
                raise SourceError(f"{path}:{line_no}: expected a JSON object with '_id' ({exc})") from None
            text = row.get("text", "")
            if with_title and row.get("title"):
                text = f"{row['title']} {text}"
            texts[key] = text.strip()
    return texts


def read_beir(folder: Path, split: str) -> RetrievalSet:
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for needed in (folder / "corpus.jsonl", folder / "queries.jsonl", qrels_path):
        if not needed.exists():
            raise SourceError(f"{folder}: not a BEIR folder, {needed.relative_to(folder)} is missing")
    corpus = _read_jsonl_texts(folder / "corpus.jsonl", with_title=True)
    all_queries = _read_jsonl_texts(folder / "queries.jsonl", with_title=False)
    qrels: dict[str, dict[str, int]] = {}
    with qrels_path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        next(reader, None)  # header row
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                query_id, doc_id, score = row[0], row[1], int(row[2].strip())
            except (IndexError, ValueError):
                raise SourceError(f"{qrels_path}:{line_no}: expected query-id, corpus-id, score; "
                                  f"got {row!r}") from None
            if score > 0:
                qrels.setdefault(query_id, {})[doc_id] = score
    queries = {qid: all_queries[qid] for qid in qrels if qid in all_queries}
    return RetrievalSet(corpus, queries, qrels)


def write_beir(data: RetrievalSet, folder: Path, split: str) -> None:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with (folder / "corpus.jsonl").open("w", encoding="utf-8") as handle:
        for doc_id, text in data.corpus.items():
            handle.write(json.dumps({"_id": doc_id, "title": "", "text": text}) + "\n")
    with (folder / "queries.jsonl").open("w", encoding="utf-8") as handle:
        for query_id, text in data.queries.items():
            handle.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    with (folder / "qrels" / f"{split}.tsv").open("w", encoding="utf-8") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for query_id, docs in data.qrels.items():
            for doc_id, score in docs.items():
                handle.write(f"{query_id}\t{doc_id}\t{score}\n")
