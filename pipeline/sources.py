"""Readers for the data users bring, normalised to the pipeline's columns.

Training rows: files (jsonl, parquet, tsv, csv), BEIR and NanoBEIR folders (a qrels split becomes
(query, positive) pairs) and Hugging Face datasets at a pinned revision; id-based rows
(query_id, positive_id, negative_id...) are joined against a corpus and queries file.
Evaluation sets: BEIR and NanoBEIR folders, and Hugging Face datasets in the NanoBEIR-en layout or
in the BEIR-on-the-Hub layout (mteb/msmarco: MS MARCO dev).

A problem is raised as a SourceError naming the file, the check that failed and an example row,
because a user with a 10-million-row file cannot guess."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.cli import StageError
from pipeline.config import EvalDataConfig, TrainDataConfig

# The columns each kind of training data has once loaded (triplets may carry negative_2, ...).
KIND_COLUMNS = {"pairs": ["query", "positive"], "triplets": ["query", "positive", "negative"],
                "scored": ["query", "positive", "negative", "score"]}
FILE_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".tsv": "tsv",
                ".csv": "csv"}


class SourceError(StageError):
    def __init__(self, path: Path | str, check: str, detail: str, example: object = None):
        self.path, self.check, self.detail, self.example = str(path), check, detail, example
        message = f"{path}: {check} failed: {detail}"
        if example is not None:
            message += f"\n    example: {json.dumps(example, default=str, ensure_ascii=False)[:300]}"
        super().__init__(message)


@dataclass(frozen=True)
class RetrievalSet:
    corpus: dict[str, str]  # doc id -> text
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}


def detect_format(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        if (path / "corpus.jsonl").exists():
            return "beir"
        if (path / "corpus").is_dir():
            return "nanobeir"
        raise SourceError(path, "known_layout", "a folder must be BEIR (corpus.jsonl, queries.jsonl, "
                          "qrels/<split>.tsv) or NanoBEIR (corpus/, queries/, qrels/ of parquet files)")
    if path.exists():
        if path.suffix.lower() not in FILE_FORMATS:
            raise SourceError(path, "known_format", f"unsupported file type {path.suffix!r} "
                              f"(use {', '.join(FILE_FORMATS)})")
        return FILE_FORMATS[path.suffix.lower()]
    if "/" in source and not source.startswith((".", "/")):
        return "hf"
    raise SourceError(path, "source_exists", "no such file or folder (nor a Hugging Face id)")


def _utf8_lines(path: Path):
    """(line number, text) of a text file, failing on the first line that is not UTF-8."""
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SourceError(path, "utf8_encoding", f"line {line_no} is not UTF-8 ({exc.reason} "
                                  f"at byte {exc.start})", raw[:200].decode("utf-8", "replace")) from None


def read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    for line_no, line in _utf8_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(path, "valid_jsonl", f"line {line_no} is not valid JSON ({exc.msg})",
                              line.strip()[:200]) from None
        if not isinstance(row, dict):
            raise SourceError(path, "valid_jsonl", f"line {line_no} is not a JSON object", row)
        rows.append(row)
    return pd.DataFrame(rows)


def read_delimited(path: Path, sep: str, columns: list[str] | None) -> pd.DataFrame:
    for _ in _utf8_lines(path):  # a clear error naming the line beats pandas' codec message
        pass
    if columns:  # header-less, e.g. MS MARCO's triples.tsv
        return pd.read_csv(path, sep=sep, header=None, names=columns, dtype=str,
                           quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL,
                           keep_default_na=False, on_bad_lines="error")
    return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False,
                       quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL)


def joined_text(frame: pd.DataFrame) -> pd.Series:
    """A BEIR row's text: its title (where there is one) and text, as sentence-transformers joins them."""
    text = frame["text"].fillna("").astype(str)
    if "title" in frame:
        text = (frame["title"].fillna("").astype(str) + " " + text).str.strip()
    return text


def _read_id_texts(path: Path) -> dict[str, str]:
    """id -> text from a jsonl (_id, title, text) or a header-less tsv (id \\t text)."""
    if path.suffix.lower() in {".jsonl", ".json"}:
        frame = read_jsonl(path)
        if "_id" not in frame or "text" not in frame:
            raise SourceError(path, "required_columns", "expected '_id' and 'text' fields",
                              frame.iloc[0].to_dict() if len(frame) else None)
        return dict(zip(frame["_id"].astype(str), joined_text(frame)))
    frame = read_delimited(path, "\t", ["_id", "text"])
    return dict(zip(frame["_id"].astype(str), frame["text"]))


def join_ids(frame: pd.DataFrame, cfg: TrainDataConfig, path: Path) -> pd.DataFrame:
    """Replace query_id / positive_id / negative_id... columns by the texts they name."""
    if not (cfg.corpus and cfg.queries):
        raise SourceError(path, "id_columns_resolvable", "rows hold ids (query_id, ...) but "
                          "snapshot.train.corpus and snapshot.train.queries are not set",
                          frame.iloc[0].to_dict())
    corpus, queries = _read_id_texts(Path(cfg.corpus)), _read_id_texts(Path(cfg.queries))
    for column in [c for c in frame.columns if c.endswith("_id")]:
        lookup = queries if column == "query_id" else corpus
        ids = frame[column].astype(str)
        texts = ids.map(lookup)
        missing = texts.isna()
        if missing.any():
            row = int(missing.idxmax())
            raise SourceError(path, "ids_resolve", f"{int(missing.sum())} {column} value(s) not found in "
                              f"{cfg.queries if column == 'query_id' else cfg.corpus}",
                              {"row": row, column: ids[row]})
        frame[column.removesuffix("_id")] = texts
        frame = frame.drop(columns=column)
    return frame


def retrieval_pairs(data: RetrievalSet) -> pd.DataFrame:
    """A BEIR-style split as training pairs: (query text, relevant document text)."""
    rows = [(data.queries[q], data.corpus[d]) for q, docs in data.qrels.items()
            if q in data.queries for d in docs if d in data.corpus]
    return pd.DataFrame(rows, columns=["query", "positive"])


def load_training(cfg: TrainDataConfig) -> pd.DataFrame:
    """Read `cfg.source` and return the columns of `cfg.kind` (plus extra negatives)."""
    fmt = detect_format(cfg.source) if cfg.format == "auto" else cfg.format
    path = Path(cfg.source)
    if fmt in {"beir", "nanobeir"}:
        frame = retrieval_pairs(read_retrieval_set(path, cfg.split))
    elif fmt == "hf":
        frame = read_hf(cfg)
    elif fmt == "jsonl":
        frame = read_jsonl(path)
    elif fmt == "parquet":
        frame = pd.read_parquet(path)
    else:
        frame = read_delimited(path, "\t" if fmt == "tsv" else ",", cfg.columns)
    if frame.empty:
        raise SourceError(path, "not_empty", "no rows")
    frame = frame.rename(columns=cfg.rename)
    if any(c.endswith("_id") for c in frame.columns) and "query" not in frame.columns:
        frame = join_ids(frame, cfg, path)
    if cfg.kind == "scored" and "scores" in frame.columns and "score" not in frame.columns:
        frame = frame.rename(columns={"scores": "score"})
    required = KIND_COLUMNS[cfg.kind]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        hint = " (a header-less file needs snapshot.train.columns)" if fmt in {"tsv", "csv"} else ""
        raise SourceError(path, "required_columns", f"missing column(s) {missing} for kind "
                          f"{cfg.kind!r}; found {list(frame.columns)}{hint}", frame.iloc[0].to_dict())
    extra_negatives = sorted((c for c in frame.columns if re.fullmatch(r"negative_\d+", c)),
                             key=lambda c: int(c.split("_")[1])) if cfg.kind != "pairs" else []
    return frame[required + extra_negatives].reset_index(drop=True)


def read_hf(cfg: TrainDataConfig) -> pd.DataFrame:
    """A Hugging Face dataset split; a Hub id must be pinned to a revision (a local folder need not)."""
    from datasets import load_dataset

    if cfg.revision is None and not Path(cfg.source).exists():
        raise SourceError(cfg.source, "pinned_revision", "set snapshot.train.revision to a commit "
                          "or tag: an unpinned Hub dataset can change under the same name")
    dataset = load_dataset(cfg.source, name=cfg.config, split=cfg.split, revision=cfg.revision)
    return dataset.to_pandas()


def _read_beir(folder: Path, split: str) -> tuple[dict, dict, pd.DataFrame, Path]:
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for needed in (folder / "corpus.jsonl", folder / "queries.jsonl", qrels_path):
        if not needed.exists():
            raise SourceError(folder, "beir_layout", f"{needed.relative_to(folder)} is missing")
    corpus = _read_id_texts(folder / "corpus.jsonl")
    queries = _read_id_texts(folder / "queries.jsonl")
    return corpus, queries, read_qrels_tsv(qrels_path), qrels_path


def read_qrels_tsv(path: Path) -> pd.DataFrame:
    """BEIR qrels (query-id, corpus-id, score, with a header row), or header-less qrels: three
    columns in that order, or TREC's four (query, iteration, document, relevance)."""
    rows = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, header=None)
    if len(rows) and rows.iloc[0, 0].strip() == "query-id":
        return rows.iloc[1:].set_axis([c.strip() for c in rows.iloc[0]], axis=1).reset_index(drop=True)
    names = {3: ["query-id", "corpus-id", "score"], 4: ["query-id", "iteration", "corpus-id", "score"]}
    if rows.shape[1] not in names:
        raise SourceError(path, "qrels_columns", f"{rows.shape[1]} columns without a header row; expected "
                          "query-id, corpus-id, score (BEIR) or query, iteration, document, relevance (TREC)",
                          rows.iloc[0].tolist() if len(rows) else None)
    return rows.set_axis(names[rows.shape[1]], axis=1)


def _read_nanobeir(folder: Path) -> tuple[dict, dict, pd.DataFrame, Path]:
    parts = {}
    for part in ("corpus", "queries", "qrels"):
        files = sorted((folder / part).glob("*.parquet"))
        if not files:
            raise SourceError(folder, "nanobeir_layout", f"no parquet file in {part}/")
        parts[part] = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    texts = {}
    for part in ("corpus", "queries"):
        frame = parts[part]
        texts[part] = dict(zip(frame["_id"].astype(str), frame["text"]))
    return texts["corpus"], texts["queries"], parts["qrels"].astype(str), folder / "qrels"


def judged_qrels(qrels: pd.DataFrame, qrels_path: Path | str) -> dict[str, dict[str, int]]:
    """{query id: {doc id: relevance}} from query-id / corpus-id[ / score] rows; a score > 0 counts as
    relevant (score 1 if absent); a corpus-id cell may hold a list of ids."""
    if not {"query-id", "corpus-id"} <= set(qrels.columns):
        raise SourceError(qrels_path, "qrels_columns", "expected columns query-id, corpus-id[, score]",
                          qrels.iloc[0].to_dict() if len(qrels) else None)
    scores = qrels["score"].astype(str).str.strip() if "score" in qrels else pd.Series("1", index=qrels.index)
    judged: dict[str, dict[str, int]] = {}
    for row, (query_id, doc_ids, score) in enumerate(zip(qrels["query-id"], qrels["corpus-id"], scores)):
        try:
            value = int(float(score))
        except ValueError:
            raise SourceError(qrels_path, "qrels_scores", f"row {row + 2}: score {score!r} is not a number",
                              {"query-id": query_id, "corpus-id": doc_ids, "score": score}) from None
        if value > 0:
            for doc_id in doc_ids if isinstance(doc_ids, (list, tuple, np.ndarray)) else [doc_ids]:
                judged.setdefault(str(query_id).strip(), {})[str(doc_id).strip()] = value
    return judged


def read_retrieval_set(folder: Path, split: str) -> RetrievalSet:
    """A BEIR or NanoBEIR folder."""
    folder = Path(folder)
    if (folder / "corpus").is_dir():
        corpus, queries, qrels, qrels_path = _read_nanobeir(folder)
    else:
        corpus, queries, qrels, qrels_path = _read_beir(folder, split)
    return RetrievalSet(corpus, queries, judged_qrels(qrels, qrels_path))


def hub_set_names(source: str, names: list[str], available: list[str]) -> list[str]:
    """The split of each requested set: its split name (NanoSciFact) or sentence-transformers' short
    name for it (scifact: the split name without "Nano", any case); none requested: every split."""
    if not names:
        return available
    by_short_name = {split.lower().removeprefix("nano"): split for split in available}
    splits = [by_short_name.get(name.lower().removeprefix("nano")) for name in names]
    unknown = [name for name, split in zip(names, splits) if split is None]
    if unknown:
        raise SourceError(source, "known_sets", f"no set {unknown} (available: {available})")
    return splits


def read_hub_retrieval_sets(source: str, revision: str | None, names: list[str],
                            split: str) -> dict[str, RetrievalSet]:
    """Retrieval sets of a Hugging Face dataset, by Hub id at a pinned revision or from a local copy:
    - NanoBEIR-en layout: configs corpus, queries and qrels, one split per set (`names` picks them);
    - BEIR on the Hub (mteb/msmarco, mteb/scifact, ...): configs corpus and queries (one split each)
      and the qrels as config default, split `split` (MS MARCO dev: mteb/msmarco, split dev); one set,
      named after the dataset.
    Empty texts are dropped, as sentence-transformers' NanoBEIREvaluator drops them."""
    from datasets import get_dataset_split_names, load_dataset

    if revision is None and not Path(source).exists():
        raise SourceError(source, "pinned_revision", "set snapshot.eval.revision to a commit or tag: "
                          "an unpinned Hub dataset can change under the same name")

    def texts(part: str, part_split: str) -> dict[str, str]:
        frame = load_dataset(source, part, split=part_split, revision=revision).to_pandas()
        return {doc_id: t for doc_id, t in zip(frame["_id"].astype(str), joined_text(frame)) if t}

    available = get_dataset_split_names(source, "corpus", revision=revision)
    if available == ["corpus"]:
        qrels = load_dataset(source, "default", split=split, revision=revision).to_pandas()
        name = Path(source.rstrip("/")).name
        return {name: RetrievalSet(texts("corpus", "corpus"), texts("queries", "queries"),
                                   judged_qrels(qrels, f"{source} default/{split}"))}
    sets = {}
    for set_split in hub_set_names(source, names, available):
        qrels = load_dataset(source, "qrels", split=set_split, revision=revision).to_pandas()
        sets[set_split] = RetrievalSet(texts("corpus", set_split), texts("queries", set_split),
                                       judged_qrels(qrels, f"{source} qrels/{set_split}"))
    return sets


def read_eval_sets(cfg: EvalDataConfig) -> dict[str, RetrievalSet]:
    """The evaluation sets `cfg` names, by set name (a folder's name, or the dataset's split names)."""
    fmt = detect_format(cfg.source) if cfg.format == "auto" else cfg.format
    if fmt == "hf":
        return read_hub_retrieval_sets(cfg.source, cfg.revision, cfg.datasets, cfg.split)
    if fmt not in {"beir", "nanobeir"}:
        raise SourceError(cfg.source, "eval_layout", "an evaluation set is a BEIR or NanoBEIR folder, or a "
                          "Hugging Face dataset in the NanoBEIR-en or mteb (BEIR) layout")
    return {Path(cfg.source).resolve().name: read_retrieval_set(Path(cfg.source), cfg.split)}


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
