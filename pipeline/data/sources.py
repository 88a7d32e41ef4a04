"""Readers for the data users bring, normalised to the pipeline's columns.

Training rows: files (jsonl, parquet, tsv, csv), BEIR and NanoBEIR folders (a qrels split becomes
(query, positive) pairs) and Hugging Face datasets at a pinned revision; id-based rows
(query_id, positive_id, negative_id...) are resolved against a corpus and queries file, and stay
ids (Arrow columns). Corpora and queries are read lazily (their ids held, their texts read again
when asked), Hub sets memory-mapped from the datasets cache.
Evaluation sets: BEIR and NanoBEIR folders, and Hugging Face datasets in the NanoBEIR-en layout or
in the BEIR-on-the-Hub layout (mteb/msmarco: MS MARCO dev).

A problem is raised as a SourceError naming the file, the check that failed and an example row,
because a user with a 10-million-row file cannot guess."""

from __future__ import annotations

import csv
import functools
import itertools
import json
import logging
import re
import tempfile
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.cli import StageError
from pipeline.config import EvalDataConfig, TrainDataConfig

log = logging.getLogger(__name__)

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
    corpus: Mapping[str, str]  # doc id -> text (a dict, or a snapshot's lazily read file)
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


def _utf8_offset_lines(path: Path, start: int = 0):
    """(line number, byte offset, text) of a text file from byte `start` (a line's start; its lines
    then counted from 1), failing on the first line that is not UTF-8 (a UTF-8 byte order mark is
    dropped; a UTF-16 one is named)."""
    with path.open("rb") as handle:
        handle.seek(start)
        offset = start
        for line_no, raw in enumerate(handle, start=1):
            if offset == 0 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                raise SourceError(path, "utf8_encoding", "the file is UTF-16 (its byte order mark says so): "
                                  "save it as UTF-8")
            try:
                yield line_no, offset, raw.decode("utf-8-sig" if offset == 0 else "utf-8")
            except UnicodeDecodeError as exc:
                raise SourceError(path, "utf8_encoding", f"line {line_no} is not UTF-8 ({exc.reason} "
                                  f"at byte {exc.start})", raw[:200].decode("utf-8", "replace")) from None
            offset += len(raw)


def _utf8_lines(path: Path):
    """(line number, text) of a text file (see _utf8_offset_lines)."""
    return ((line_no, line) for line_no, _, line in _utf8_offset_lines(path))


LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # what JSON can escape (\udc07) but no UTF-8 text holds


def _holds_lone_surrogate(value) -> bool:
    if isinstance(value, str):
        return LONE_SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(map(_holds_lone_surrogate, [*value, *value.values()]))
    return isinstance(value, list) and any(map(_holds_lone_surrogate, value))


def jsonl_rows(path: Path, start: int = 0):
    """(line number, byte offset, object) of each non-blank line of a jsonl file (from byte `start`),
    failing on the first line that is not a JSON object of Unicode text."""
    for line_no, offset, line in _utf8_offset_lines(path, start):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(path, "valid_jsonl", f"line {line_no} is not valid JSON ({exc.msg})",
                              line.strip()[:200]) from None
        if not isinstance(row, dict):
            raise SourceError(path, "valid_jsonl", f"line {line_no} is not a JSON object", row)
        if "\\u" in line and _holds_lone_surrogate(row):  # valid JSON, but no Unicode text (nor parquet)
            raise SourceError(path, "utf8_encoding", f"line {line_no} escapes half of a UTF-16 surrogate pair "
                              "(\\ud800-\\udfff alone): not a character", line.strip()[:200])
        yield line_no, offset, row


def read_jsonl(path: Path) -> pd.DataFrame:
    rows, lines = [], []
    for line_no, _, row in jsonl_rows(path):
        rows.append(row)
        lines.append(line_no)
    frame = pd.DataFrame(rows)
    frame.attrs["lines"] = lines  # where each row stands in the file, for error messages
    return frame


def read_table(path: Path, sep: str, **options) -> pd.DataFrame:
    """pd.read_csv of a UTF-8 file (a byte order mark allowed), every field as text; what pandas
    cannot parse (no columns at all, a row of another width) is an error naming the file and line."""
    for _ in _utf8_lines(path):  # a clear error naming the line beats pandas' codec message
        pass
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                           quoting=_quoting(sep), **options)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise unparsed(path, exc) from None


def unparsed(path: Path, exc: Exception) -> SourceError:
    """What pandas could not parse in a delimited file (no columns at all, a row of another width)."""
    if isinstance(exc, pd.errors.EmptyDataError):
        return SourceError(path, "not_empty", "no rows (the file is empty)")
    return SourceError(path, "delimited_rows", f"{str(exc).removeprefix('Error tokenizing data. C error: ')}"
                       " (a stray separator, or a quote left open?)")


def _quoting(sep: str) -> int:
    return csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL  # MS MARCO's tsv files quote nothing


def row_lines(path: Path, sep: str, width: int, header: bool) -> array:
    """The line each row of a delimited file starts on (8 bytes a row), checking that every row has
    `width` fields: pandas pads a short row with empty fields, which would quietly keep a cut or broken line."""
    lines, start, names = array("q"), 1, None
    csv.field_size_limit(2**31 - 1)  # a huge field is the length check's to name, not a parse error
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=sep, quoting=_quoting(sep))
        for number, record in enumerate(reader):
            if header and number == 0:
                names = record
            elif record:  # pandas skips blank lines, and so do we
                if len(record) != width:
                    raise SourceError(path, "delimited_rows", f"line {start} has {len(record)} fields, not "
                                      f"{width} (a line cut short, or a separator lost or added?)", record)
                if record == names:  # files concatenated with their headers, or a line repeated
                    raise SourceError(path, "delimited_rows", f"line {start} repeats the header", record)
                lines.append(start)
            start = reader.line_num + 1
    return lines


def read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # text that is not UTF-8 would fail only when a cell is read; check it all now
        pq.read_table(path).validate(full=True)
        return pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as exc:  # a damaged file fails in any of these
        raise SourceError(path, "valid_parquet", f"not a readable parquet file ({exc})") from None


def read_delimited(path: Path, sep: str, columns: list[str] | None) -> pd.DataFrame:
    if columns:  # header-less, e.g. MS MARCO's triples.tsv
        frame = read_table(path, sep, header=None, names=columns)
    else:
        frame = read_table(path, sep)
    frame.attrs["lines"] = row_lines(path, sep, len(frame.columns), header=not columns)
    return frame


def place(frame: pd.DataFrame, row: int) -> str:
    """Where row `row` (by position) of a file's frame stands: its line, or its row number."""
    lines = frame.attrs.get("lines")
    return f"line {lines[row]}" if lines else f"row {row + 1}"


def not_text(value) -> str | None:
    """What a field that should hold text holds instead (a list, an object, a number), or None when
    it is text or empty (a missing text is the validator's not_null check)."""
    if value is None or isinstance(value, str) or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (bool, np.bool_)):
        return "a boolean"
    return "a number" if isinstance(value, (int, float, np.number)) else type(value).__name__


def as_score(value) -> float | list[float] | None:
    """A score as a number (or a list of them, a teacher's score list), from a number or numeric
    text; None where it is neither."""
    if isinstance(value, (list, tuple, np.ndarray)):
        scores = [as_score(v) for v in value]
        return None if any(v is None or isinstance(v, list) for v in scores) else scores
    if isinstance(value, (bool, np.bool_)) or value is None:
        return None
    if isinstance(value, (int, float, np.number)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def checked_fields(frame: pd.DataFrame, path: Path, text_columns: list[str], source: pd.DataFrame,
                   id_columns: list[str] = ()) -> pd.DataFrame:
    """`frame` with every text field text, every id an id (text or a whole number) and every score a
    number (numeric text converted); else a SourceError naming the file, the line or row and the
    column. `source` is the frame as read (its rows line up with `frame`'s), which knows the lines."""
    for column, kind_of, wanted in ([(c, not_text, "text") for c in text_columns]
                                    + [(c, _id_field, "an id") for c in id_columns]):
        kinds = frame[column].map(kind_of)
        bad = kinds.notna().to_numpy()
        if bad.any():
            row = int(bad.argmax())
            raise SourceError(path, "text_fields", f"{place(source, row)}: {column} is {kinds.iloc[row]}, not "
                              f"{wanted} ({int(bad.sum())} row(s) like it)", frame.iloc[row].to_dict())
    if "score" in frame:
        scores = frame["score"].map(as_score)
        given = frame["score"].map(lambda v: not (v is None or (isinstance(v, float) and np.isnan(v))))
        bad = (scores.isna() & given).to_numpy()  # a missing score is the validator's not_null check
        if bad.any():
            row = int(bad.argmax())
            raise SourceError(path, "score_fields", f"{place(source, row)}: score {frame['score'].iloc[row]!r} is "
                              f"not a number (nor a list of numbers) ({int(bad.sum())} row(s) like it)",
                              frame.iloc[row].to_dict())
        frame = frame.assign(score=scores.where(scores.notna(), np.nan))
        score_list_shapes(frame, path, source)
    return frame


def score_list_shapes(frame: pd.DataFrame, path: Path, source: pd.DataFrame) -> None:
    """Score lists (a teacher's [positive, negative, ...] scores, for KL-div) hold one score per
    document column in every row; a file gives lists in every row or in none."""
    is_list = frame["score"].map(lambda v: isinstance(v, list)).to_numpy()
    if not is_list.any():
        return
    documents = [c for c in frame.columns if c == "positive" or re.fullmatch(r"negative(_\d+)?", c)]
    if not is_list.all():
        row = int((~is_list).argmax() if is_list[0] else is_list.argmax())
        raise SourceError(path, "score_fields", f"{place(source, row)}: score {frame['score'].iloc[row]!r} mixes "
                          "single scores (margins) and score lists in one file", frame.iloc[row].to_dict())
    wrong = frame["score"].map(len).to_numpy() != len(documents)
    if wrong.any():
        row = int(wrong.argmax())
        raise SourceError(path, "score_fields", f"{place(source, row)}: a score list holds one score per document "
                          f"({', '.join(documents)}): {len(documents)}, not {len(frame['score'].iloc[row])} "
                          f"({int(wrong.sum())} row(s) like it)", frame.iloc[row].to_dict())


def joined_text(frame: pd.DataFrame) -> pd.Series:
    """A BEIR row's text: its title (where there is one) and text, as sentence-transformers joins them."""
    text = frame["text"].fillna("").astype(str)
    if "title" in frame:
        text = (frame["title"].fillna("").astype(str) + " " + text).str.strip()
    return text


def id_texts(frame: pd.DataFrame, path: Path | str) -> dict[str, str]:
    """id -> text of a corpus or queries frame (_id, text[, title]): every id present and used once,
    every text and title text; else a SourceError naming the file and the line or row (one text
    silently replacing another would skew every metric)."""
    if "_id" not in frame or "text" not in frame:
        raise SourceError(path, "required_columns", "expected '_id' and 'text' fields",
                          frame.iloc[0].to_dict() if len(frame) else None)
    for column in ["_id", "text", "title"] if "title" in frame else ["_id", "text"]:
        kinds = frame[column].map(not_text)
        if column == "_id":  # numbers are ids too (BEIR ids are often JSON numbers); absent ones are not
            kinds = kinds.where(kinds != "a number", None).where(frame[column].notna(), "missing")
        bad = kinds.notna().to_numpy()
        if bad.any():
            row = int(bad.argmax())
            raise SourceError(path, "id_text_fields", f"{place(frame, row)}: {column} is {kinds.iloc[row]}"
                              f"{'' if column == '_id' else ', not text'} ({int(bad.sum())} row(s) like it)",
                              frame.iloc[row].to_dict())
    ids = frame["_id"].map(_id_string)
    repeated = ids.duplicated(keep="first").to_numpy()
    if repeated.any():
        row = int(repeated.argmax())
        first = int((ids == ids.iloc[row]).to_numpy().argmax())
        raise SourceError(path, "unique_ids", f"{place(frame, row)}: id {ids.iloc[row]!r} is used again (first at "
                          f"{place(frame, first)}; {int(repeated.sum())} repeated id(s))", frame.iloc[row].to_dict())
    return dict(zip(ids, joined_text(frame)))


class LazyTexts(Mapping):
    """id -> text kept in a file rather than in memory: the ids held, the texts read when asked,
    `between(start, stop)` the texts of a range of rows (in the file's order) without the others."""

    ids: list[str]

    def between(self, start: int, stop: int) -> list[str]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self):
        return iter(self.ids)

    def row_of(self, key: str) -> int:
        """The row that holds `key` (an id -> row table, built at the first look-up: ids only)."""
        if getattr(self, "_rows", None) is None:
            self._rows = {doc: row for row, doc in enumerate(self.ids)}
        return self._rows[key]

    def __contains__(self, key) -> bool:
        try:
            self.row_of(key)
        except (KeyError, TypeError):
            return False
        return True

    def __getitem__(self, key: str) -> str:
        row = self.row_of(key)
        return self.between(row, row + 1)[0]

    def items(self):
        return zip(self.ids, self.values())

    def refuse_repeated_ids(self, source: Path | str, place: Callable[[int], str],
                            example: Callable[[int], object]) -> None:
        """A SourceError when an id is used twice, naming where (`place` of a row) and an example row."""
        repeated = repeated_ids(self.ids)
        if len(repeated):
            row = int(repeated[0])
            first = self.ids.index(self.ids[row])
            raise SourceError(source, "unique_ids", f"{place(row)}: id {self.ids[row]!r} is used again (first at "
                              f"{place(first)}; {len(repeated)} repeated id(s))", example(row))


MISSING = object()


def _id_field(value) -> str | None:
    """What a row's _id holds instead of an id (id_texts' check, one row at a time), or None."""
    if value is MISSING or value is None or (isinstance(value, float) and np.isnan(value)):
        return "missing"
    kind = not_text(value)
    return None if kind == "a number" else kind


def _id_string(value) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


class JsonlTexts(LazyTexts):
    """id -> text of a BEIR corpus or queries file (jsonl: _id, text[, title]), with id_texts' checks
    and messages, without holding the texts: a first pass checks every row and keeps the ids and
    where each row starts; texts are read again from there when asked (title and text joined as
    sentence-transformers joins them). Memory: the ids, and 8 bytes a row."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.ids, offsets, lines = [], array("q"), array("q")  # arrays: 8 bytes a row, not a Python int
        columns: dict[str, None] = {}  # every field any row has, in order of first appearance
        first_bad: dict[str, tuple[int, str, dict]] = {}  # field -> (row, what it holds, the row)
        bad_rows = dict.fromkeys(("_id", "text", "title"), 0)
        first_row = None
        for row_number, (line_no, offset, row) in enumerate(jsonl_rows(self.path)):
            first_row = row if first_row is None else first_row
            columns.update(dict.fromkeys(row))
            for field in ("_id", "text", "title"):
                kind = _id_field(row.get("_id", MISSING)) if field == "_id" else not_text(row.get(field))
                if kind is not None:
                    bad_rows[field] += 1
                    first_bad.setdefault(field, (row_number, kind, row))
            self.ids.append(_id_string(row.get("_id")))
            offsets.append(offset)
            lines.append(line_no)
        self.offsets, self.has_title = np.frombuffer(offsets, dtype=np.int64), "title" in columns

        def example(row: dict | None) -> dict | None:  # the row as id_texts shows it: every field, NaN where absent
            return None if row is None else {c: row.get(c, float("nan")) for c in columns}

        if "_id" not in columns or "text" not in columns:
            raise SourceError(self.path, "required_columns", "expected '_id' and 'text' fields", example(first_row))
        for field in ("_id", "text", "title"):
            if field in first_bad:
                row, kind, values = first_bad[field]
                raise SourceError(self.path, "id_text_fields", f"line {lines[row]}: {field} is {kind}"
                                  f"{'' if field == '_id' else ', not text'} ({bad_rows[field]} row(s) like it)",
                                  example(values))
        self.refuse_repeated_ids(self.path, lambda row: f"line {lines[row]}",
                                 lambda row: example(next(jsonl_rows(self.path, int(self.offsets[row])))[2]))

    def _text(self, row: dict) -> str:
        def field(name: str) -> str:  # absent, null or NaN: empty, as the frame reader's fillna("")
            value = row.get(name)
            return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)

        return (field("title") + " " + field("text")).strip() if self.has_title else field("text")

    def between(self, start: int, stop: int) -> list[str]:
        if start >= min(stop, len(self.ids)):
            return []
        rows = jsonl_rows(self.path, int(self.offsets[start]))
        return [self._text(row) for _, _, row in itertools.islice(rows, min(stop, len(self.ids)) - start)]

    def values(self):
        return (self._text(row) for _, _, row in jsonl_rows(self.path))


def _tsv_fields(line: str) -> list[str]:
    """A header-less tsv line's fields (MS MARCO's files quote nothing); a blank line has none."""
    line = line.removesuffix("\n").removesuffix("\r")
    return line.split("\t") if line else []


class TsvTexts(LazyTexts):
    """id -> text of a header-less tsv (id, tab, text: MS MARCO's collection.tsv and queries.tsv),
    checked as the table readers and id_texts check it, without holding the texts: a first pass
    checks every line's fields and keeps the ids and where each line starts. Memory: the ids, and
    8 bytes a row."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.ids, offsets, lines = [], array("q"), array("q")
        for line_no, offset, line in _utf8_offset_lines(self.path):
            fields = _tsv_fields(line)
            if not fields:  # skipped, as pandas skips blank lines
                continue
            if len(fields) != 2:
                raise SourceError(self.path, "delimited_rows", f"line {line_no} has {len(fields)} fields, not 2 "
                                  "(a line cut short, or a separator lost or added?)", fields)
            self.ids.append(fields[0])
            offsets.append(offset)
            lines.append(line_no)
        if not self.ids:
            raise SourceError(self.path, "not_empty", "no rows (the file is empty)")
        self.offsets = np.frombuffer(offsets, dtype=np.int64)
        self.refuse_repeated_ids(self.path, lambda row: f"line {lines[row]}",
                                 lambda row: dict(zip(["_id", "text"], self.between(row, row + 1, with_ids=True)[0])))

    def _lines(self, start: int = 0):
        for _, _, line in _utf8_offset_lines(self.path, int(self.offsets[start]) if start else 0):
            if fields := _tsv_fields(line):
                yield fields

    def between(self, start: int, stop: int, with_ids: bool = False) -> list:
        if start >= min(stop, len(self.ids)):
            return []
        rows = itertools.islice(self._lines(start), min(stop, len(self.ids)) - start)
        return [fields if with_ids else fields[1] for fields in rows]

    def values(self):
        return (fields[1] for fields in self._lines())


def batches(items, size: int):
    """Lists of `size` items (the last one shorter) from any iterable, read as they are needed."""
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch


def rows_sharing_a_hash(hashes: np.ndarray) -> np.ndarray:
    """The rows, in order, whose hash another row also has: the only ones whose values can repeat."""
    order = np.argsort(hashes, kind="stable")
    same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    return np.union1d(order[same], order[same + 1])


def repeated_ids(ids: list[str]) -> np.ndarray:
    """The rows whose id an earlier row has, in order: found through one 64-bit hash per id, then
    only the ids whose hashes repeat compared."""
    seen: set[str] = set()
    repeated = []
    for row in rows_sharing_a_hash(np.fromiter((hash(i) for i in ids), dtype=np.int64, count=len(ids))):
        if ids[row] in seen:
            repeated.append(row)
        seen.add(ids[row])
    return np.array(repeated, dtype=np.int64)


def _read_id_texts(path: Path) -> LazyTexts:
    """id -> text from a jsonl (_id, title, text) or a header-less tsv (id, tab, text), read lazily."""
    stat = path.stat()
    return _lazy_texts(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _lazy_texts(path: Path, mtime_ns: int, size: int) -> LazyTexts:
    """A file's texts, read once per process while the file is unchanged: MS MARCO's corpus is
    both the evaluation corpus and the one the training rows name (2M ids: 20 s, 0.2 GB each time)."""
    return JsonlTexts(path) if path.suffix.lower() in {".jsonl", ".json"} else TsvTexts(path)


ID_COLUMN = re.compile(r"(query|positive|negative(_\d+)?)_id")


@dataclass
class IdRows:
    """Training rows that name their texts by id, as MS MARCO's distillation sets ship them (query_id,
    positive_id, negative_id[, negative_N_id][, score]): the rows as Arrow columns (ids as text,
    scores as numbers), the texts in the corpus and queries files, read lazily, and for each id
    column the row of its text there. Memory grows with the ids, not the texts."""

    table: "pa.Table"
    queries: Mapping[str, str]
    corpus: Mapping[str, str]
    text_rows: dict[str, np.ndarray]  # id column -> row of each id's text in `queries` or `corpus`

    def __len__(self) -> int:
        return self.table.num_rows

    def head(self, count: int) -> pd.DataFrame:
        """The first `count` rows with the texts their ids name (query, positive, ...), read from the files."""
        by_row = {name: texts if isinstance(texts, LazyTexts) else list(texts.values())  # a dict's texts by row
                  for name, texts in (("queries", self.queries), ("corpus", self.corpus))}

        def text_at(texts, row: int) -> str:
            return texts.between(row, row + 1)[0] if isinstance(texts, LazyTexts) else texts[row]

        columns = {}
        for column, values in self.table.slice(0, count).to_pydict().items():
            if column in self.text_rows:
                texts = by_row["queries" if column == "query_id" else "corpus"]
                columns[column.removesuffix("_id")] = [text_at(texts, int(row)) for row in self.text_rows[column][:count]]
            else:
                columns[column] = values
        return pd.DataFrame(columns)


def _id_rows_columns(names: list[str], kind: str) -> list[str]:
    """The id columns (and score) kind `kind` needs, extra negatives in order; [] when `names` hold texts."""
    if "query" in names or not any(ID_COLUMN.fullmatch(n) for n in names):
        return []
    extra = sorted((n for n in names if re.fullmatch(r"negative_\d+_id", n)), key=lambda n: int(n.split("_")[1]))
    needed = [f"{c}_id" for c in KIND_COLUMNS[kind] if c != "score"] + (extra if kind != "pairs" else [])
    return needed + (["score"] if kind == "scored" else [])


def id_rows(table, cfg: TrainDataConfig, path: Path) -> IdRows:
    """Id-based rows (an Arrow table, renamed) resolved against snapshot.train.corpus and .queries:
    every id found, the score a number (or a list of them); else a SourceError naming the file and
    the row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def example(row: int) -> dict:
        return {k: v[0] for k, v in table.slice(row, 1).to_pydict().items()}

    if not (cfg.corpus and cfg.queries):
        raise SourceError(path, "id_columns_resolvable", "rows hold ids (query_id, ...) but "
                          "snapshot.train.corpus and snapshot.train.queries are not set", example(0))
    columns = _id_rows_columns(table.column_names, cfg.kind)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise SourceError(path, "required_columns", f"missing column(s) {missing} for kind {cfg.kind!r} "
                          f"(id-based rows); found {table.column_names}", example(0))
    table = table.select(columns)
    for column in [c for c in columns if c != "score"]:
        kind = pa.types
        if not (kind.is_string(table[column].type) or kind.is_large_string(table[column].type)
                or kind.is_integer(table[column].type)):
            raise SourceError(path, "text_fields", f"{column} holds {table[column].type}, not ids (text or "
                              "whole numbers)", example(0))
        table = table.set_column(table.schema.get_field_index(column), column, pc.cast(table[column], pa.string()))
    if "score" in columns and not (pa.types.is_floating(table["score"].type) or pa.types.is_integer(table["score"].type)
                                   or pa.types.is_list(table["score"].type)):
        frame = pd.DataFrame({"score": table["score"].to_pandas()})  # numeric text: checked as text rows' scores
        scores = checked_fields(frame, path, [], frame)["score"]
        table = table.set_column(table.schema.get_field_index("score"), "score",
                                 pa.array(scores.tolist(), pa.list_(pa.float64()) if isinstance(scores.iloc[0], list)
                                          else pa.float64()))
    elif "score" in columns:
        table = table.set_column(table.schema.get_field_index("score"), "score", pc.cast(
            table["score"], pa.list_(pa.float64()) if pa.types.is_list(table["score"].type) else pa.float64()))
    texts = {"query_id": _read_id_texts(Path(cfg.queries))}
    texts["corpus"] = _read_id_texts(Path(cfg.corpus))
    text_rows = {}
    for column in [c for c in columns if c != "score"]:
        lookup = texts["query_id" if column == "query_id" else "corpus"]
        ids = lookup.ids if isinstance(lookup, LazyTexts) else list(lookup)
        rows = pc.index_in(table[column], value_set=pa.array(ids, pa.string()))
        unresolved = rows.is_null()
        if pc.any(unresolved).as_py():
            row = int(np.flatnonzero(unresolved.to_numpy(zero_copy_only=False))[0])
            raise SourceError(path, "ids_resolve", f"{pc.sum(unresolved).as_py()} {column} value(s) not found in "
                              f"{cfg.queries if column == 'query_id' else cfg.corpus}",
                              {"row": row, column: table[column][row].as_py()})
        text_rows[column] = rows.to_numpy().astype(np.int64)
    return IdRows(table, texts["query_id"], texts["corpus"], text_rows)


def read_parquet_id_rows(path: Path, cfg: TrainDataConfig) -> IdRows | None:
    """A parquet file of id-based rows, read as Arrow (no Python object per id: MS MARCO's margin
    sets have tens of millions of rows); None when the file holds texts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if not _id_rows_columns(pipeline_names(pq.read_schema(path).names, cfg), cfg.kind):
            return None
        table = pq.read_table(path)
        table.validate(full=True)
    except (OSError, ValueError, pa.ArrowException) as exc:  # a damaged file fails in any of these
        raise SourceError(path, "valid_parquet", f"not a readable parquet file ({exc})") from None
    return arrow_id_rows(table, cfg, path)


def pipeline_names(names: list[str], cfg: TrainDataConfig) -> list[str]:
    """A rows file's column names as the pipeline's (snapshot.train.rename; a scored file's scores: score)."""
    names = [cfg.rename.get(n, n) for n in names]
    if cfg.kind == "scored" and "scores" in names and "score" not in names:
        names = [("score" if n == "scores" else n) for n in names]
    return names


def arrow_id_rows(table, cfg: TrainDataConfig, path: Path | str) -> IdRows | None:
    """Rows read as an Arrow table (parquet, a Hugging Face dataset) as IdRows; None when they hold texts."""
    names = pipeline_names(table.column_names, cfg)
    if not _id_rows_columns(names, cfg.kind):
        return None
    if not table.num_rows:
        raise SourceError(path, "not_empty", "no rows")
    return id_rows(table.rename_columns(names), cfg, path)


SOURCE_CHUNK_ROWS = 100_000  # rows of an id-based jsonl / tsv / csv file checked and made Arrow at once


def first_names(path: Path, fmt: str, cfg: TrainDataConfig) -> list[str]:
    """The column names a jsonl, tsv or csv file starts with: its first row's keys, its header row's
    fields, or snapshot.train.columns."""
    if fmt == "jsonl":
        return list(next((row for *_, row in jsonl_rows(path)), {}))
    if cfg.columns:
        return cfg.columns
    first, sep = next((line for _, line in _utf8_lines(path)), ""), "\t" if fmt == "tsv" else ","
    try:
        return next(csv.reader([first], delimiter=sep, quoting=_quoting(sep)), [])
    except csv.Error:  # not a header: the whole-file reader names what is wrong
        return []


def source_chunks(path: Path, fmt: str, cfg: TrainDataConfig, size: int):
    """A jsonl, tsv or csv file's rows `size` at a time, as frames read as load_training reads the
    whole file (every field of a delimited file as text), each knowing its rows' lines."""
    if fmt == "jsonl":
        for chunk in batches(jsonl_rows(path), size):
            frame = pd.DataFrame([row for *_, row in chunk])
            frame.attrs["lines"] = [line for line, *_ in chunk]
            yield frame
        return
    sep = "\t" if fmt == "tsv" else ","
    for _ in _utf8_lines(path):  # a clear error naming the line beats pandas' codec message
        pass
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            names = cfg.columns or next(csv.reader(handle, delimiter=sep, quoting=_quoting(sep)), [])
        lines = row_lines(path, sep, len(names), header=not cfg.columns)
    except csv.Error as exc:  # what pandas, which reads the whole file first, names its own way
        raise SourceError(path, "delimited_rows", f"not {'tab' if sep == chr(9) else 'comma'}-separated rows "
                          f"({exc})") from None
    start = 0
    try:
        for frame in pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                                 quoting=_quoting(sep), chunksize=size,
                                 **({"header": None, "names": cfg.columns} if cfg.columns else {})):
            frame.attrs["lines"] = lines[start:start + len(frame)]
            start += len(frame)
            yield frame
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise unparsed(path, exc) from None


def id_table(frame: pd.DataFrame, columns: list[str], path: Path, read: pd.DataFrame) -> "pa.Table":
    """The id columns (and score) of a renamed rows frame, checked (ids text or whole numbers, made
    text; a score a number or a list of them), as Arrow; `read` is the frame as read (its lines)."""
    import pyarrow as pa

    ids = [c for c in columns if c != "score"]
    frame = checked_fields(frame.reindex(columns=columns).reset_index(drop=True), path, [], read, ids)
    for column in ids:
        frame[column] = frame[column].map(_id_string)
    frame.attrs = {}  # the lines are for messages: Arrow would keep them in the table's metadata
    return pa.Table.from_pandas(frame, preserve_index=False)


def read_text_id_rows(path: Path, fmt: str, cfg: TrainDataConfig) -> IdRows | None:
    """A jsonl, tsv or csv file of id-based rows, checked and made Arrow a chunk at a time (no Python
    object per row: MS MARCO's margin sets have tens of millions); None when the file holds texts."""
    import pyarrow as pa

    if not _id_rows_columns(pipeline_names(first_names(path, fmt, cfg), cfg), cfg.kind):
        return None
    tables, columns = [], None
    for frame in source_chunks(path, fmt, cfg, SOURCE_CHUNK_ROWS):
        names = frame.set_axis(pipeline_names(list(frame.columns), cfg), axis=1)
        columns = columns or [c for c in _id_rows_columns(list(names.columns), cfg.kind) if c in names]
        tables.append(id_table(names, columns, path, frame))
    if not tables:
        raise SourceError(path, "not_empty", "no rows")
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise SourceError(path, "score_fields", "the file mixes single scores (margins) and score lists") from None
    return id_rows(table, cfg, path)


def retrieval_pairs(data: RetrievalSet) -> pd.DataFrame:
    """A BEIR-style split as training pairs: (query text, relevant document text)."""
    rows = [(data.queries[q], data.corpus[d]) for q, docs in data.qrels.items()
            if q in data.queries for d in docs if d in data.corpus]
    return pd.DataFrame(rows, columns=["query", "positive"])


def load_training(cfg: TrainDataConfig) -> pd.DataFrame | IdRows:
    """Read `cfg.source` and return the columns of `cfg.kind` (plus extra negatives): texts, or
    id-based rows as IdRows."""
    fmt = detect_format(cfg.source) if cfg.format == "auto" else cfg.format
    path = Path(cfg.source)
    if fmt == "parquet" and (ids := read_parquet_id_rows(path, cfg)) is not None:
        return ids
    if fmt in {"jsonl", "tsv", "csv"} and (ids := read_text_id_rows(path, fmt, cfg)) is not None:
        return ids
    if fmt in {"beir", "nanobeir"}:
        frame = retrieval_pairs(read_retrieval_set(path, cfg.split))
    elif fmt == "hf":
        dataset = read_hf(cfg)
        if (ids := arrow_id_rows(dataset.data.table, cfg, cfg.source)) is not None:
            return ids
        frame = dataset.to_pandas()
    elif fmt == "jsonl":
        frame = read_jsonl(path)
    elif fmt == "parquet":
        frame = read_parquet(path)
    else:
        frame = read_delimited(path, "\t" if fmt == "tsv" else ",", cfg.columns)
        if not cfg.columns:
            frame = without_header_if_none(frame, path, "\t" if fmt == "tsv" else ",", cfg)
    if frame.empty:
        raise SourceError(path, "not_empty", "no rows")
    read = frame  # as read: it knows each row's line
    frame = frame.set_axis(pipeline_names(list(frame.columns), cfg), axis=1)
    required = KIND_COLUMNS[cfg.kind]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        hint = " (a header-less file needs snapshot.train.columns)" if fmt in {"tsv", "csv"} else ""
        raise SourceError(path, "required_columns", f"missing column(s) {missing} for kind "
                          f"{cfg.kind!r}; found {list(frame.columns)}{hint}", frame.iloc[0].to_dict())
    extra_negatives = sorted((c for c in frame.columns if re.fullmatch(r"negative_\d+", c)),
                             key=lambda c: int(c.split("_")[1])) if cfg.kind != "pairs" else []
    rows = frame[required + extra_negatives].reset_index(drop=True)
    rows = checked_fields(rows, path, [c for c in rows.columns if c != "score"], read)
    rows.attrs = {}  # the lines are for messages: pandas would write them into a parquet file's metadata
    return rows


def is_column_name(name: str, cfg: TrainDataConfig) -> bool:
    return (name in cfg.rename or name in ("query", "positive", "score", "scores")
            or re.fullmatch(r"(query|positive|negative(_\d+)?)_id|negative(_\d+)?", name) is not None)


def without_header_if_none(frame: pd.DataFrame, path: Path, sep: str, cfg: TrainDataConfig) -> pd.DataFrame:
    """A delimited file whose first row names no column this pipeline knows is header-less (MS
    MARCO's triples.tsv): with exactly the kind's number of fields it is read positionally, saying
    which columns were assumed; with another number it is ambiguous, and an error says how to
    resolve it."""
    first_row = list(frame.columns)
    if any(is_column_name(str(name), cfg) for name in first_row):
        return frame
    columns = KIND_COLUMNS[cfg.kind]
    if len(first_row) != len(columns):
        raise SourceError(path, "header_row", f"line 1 names none of the pipeline's columns, and its "
                          f"{len(first_row)} fields are not the {len(columns)} of kind {cfg.kind!r} "
                          f"({', '.join(columns)}): add a header row, or set snapshot.train.columns "
                          "(--columns) to name them", first_row)
    log.warning("%s: line 1 is not a header row; reading the file as header-less columns %s (set "
                "snapshot.train.columns to name them otherwise)", path, ", ".join(columns))
    return read_delimited(path, sep, columns)


def hf_dataset(source: str, config: str | None, split: str, revision: str | None):
    """One split of a Hugging Face dataset (memory-mapped from the datasets cache). A local folder's
    is read into memory through a cache of its own: the shared cache can hand back another local
    folder's data of the same layout (seen in the tests)."""
    from datasets import load_dataset

    if Path(source).exists():
        with tempfile.TemporaryDirectory() as cache:
            return load_dataset(source, config, split=split, cache_dir=cache, keep_in_memory=True)
    return load_dataset(source, config, split=split, revision=revision)


def hf_split(source: str, config: str | None, split: str, revision: str | None) -> pd.DataFrame:
    return hf_dataset(source, config, split, revision).to_pandas()


TEXT_BATCH = 100_000  # rows of a Hub split read at once


class HubTexts(LazyTexts):
    """id -> text of a Hugging Face dataset's corpus or queries split (_id, text[, title]), memory-mapped
    from the datasets cache (a local folder's from a cache of its own, removed with this object):
    the ids of the rows with text held, the texts read a slice of rows at a time, title and text
    joined as sentence-transformers joins them. Empty texts are dropped, as sentence-transformers'
    NanoBEIREvaluator drops them; a repeated id is refused. Memory: the ids, and 8 bytes a row."""

    def __init__(self, source: str, config: str, split: str, revision: str | None):
        from datasets import load_dataset

        self.name = f"{source} {config}/{split}"
        self._cache = tempfile.TemporaryDirectory(prefix="hf-local-") if Path(source).exists() else None
        self.dataset = load_dataset(source, config, split=split, revision=None if self._cache else revision,
                                    cache_dir=self._cache.name if self._cache else None)
        if "_id" not in self.dataset.column_names or "text" not in self.dataset.column_names:
            raise SourceError(self.name, "required_columns", "expected '_id' and 'text' fields",
                              self.dataset[0] if len(self.dataset) else None)
        self.ids, rows = [], []
        for start in range(0, len(self.dataset), TEXT_BATCH):
            texts = self._texts(start, start + TEXT_BATCH)
            kept = np.flatnonzero(texts.str.len().to_numpy() > 0)
            self.ids += texts.index[kept].tolist()
            rows.append(kept + start)
        self.rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self.refuse_repeated_ids(self.name, lambda row: f"row {int(self.rows[row]) + 1}",
                                 lambda row: self.dataset[int(self.rows[row])])

    def _texts(self, start: int, stop: int) -> pd.Series:
        """The joined texts of the dataset's rows start to stop, by id."""
        frame = pd.DataFrame(self.dataset[start:stop])
        return pd.Series(joined_text(frame).to_numpy(), index=frame["_id"].astype(str))

    def between(self, start: int, stop: int) -> list[str]:
        wanted = self.rows[start:stop]
        if not len(wanted):
            return []
        first = int(wanted[0])
        return self._texts(first, int(wanted[-1]) + 1).iloc[wanted - first].tolist()

    def values(self):
        for start in range(0, len(self.ids), TEXT_BATCH):
            yield from self.between(start, start + TEXT_BATCH)


def read_hf(cfg: TrainDataConfig):
    """A Hugging Face dataset split; a Hub id must be pinned to a revision (a local folder need not)."""
    if cfg.revision is None and not Path(cfg.source).exists():
        raise SourceError(cfg.source, "pinned_revision", "set snapshot.train.revision to a commit "
                          "or tag: an unpinned Hub dataset can change under the same name")
    return hf_dataset(cfg.source, cfg.config, cfg.split, cfg.revision)


def _read_beir(folder: Path, split: str) -> tuple[dict, dict, pd.DataFrame, Path]:
    # NIST's qrels come as .txt; the contents decide how they are read, not the name
    qrels_path = next((path for path in (folder / "qrels" / f"{split}.{ext}" for ext in ("tsv", "txt"))
                       if path.exists()), folder / "qrels" / f"{split}.tsv")
    for needed in (folder / "corpus.jsonl", folder / "queries.jsonl", qrels_path):
        if not needed.exists():
            raise SourceError(folder, "beir_layout", f"{needed.relative_to(folder)} is missing")
    corpus = _read_id_texts(folder / "corpus.jsonl")
    queries = _read_id_texts(folder / "queries.jsonl")
    return corpus, queries, read_qrels_tsv(qrels_path), qrels_path


def read_qrels_tsv(path: Path) -> pd.DataFrame:
    """BEIR qrels (query-id, corpus-id, score, tab-separated, with a header row), or header-less
    qrels: three columns in that order, or TREC's four (query, iteration, document, relevance),
    tab-separated or, as NIST ships them, separated by spaces."""
    first = next((line for _, line in _utf8_lines(path) if line.strip()), "")
    rows = read_table(path, "\t", header=None) if "\t" in first else whitespace_rows(path)
    if len(rows) and rows.iloc[0, 0].strip() == "query-id":
        return rows.iloc[1:].set_axis([c.strip() for c in rows.iloc[0]], axis=1).reset_index(drop=True)
    names = {3: ["query-id", "corpus-id", "score"], 4: ["query-id", "iteration", "corpus-id", "score"]}
    if rows.shape[1] not in names:
        raise SourceError(path, "qrels_columns", f"{rows.shape[1]} columns without a header row; expected "
                          "query-id, corpus-id, score (BEIR) or query, iteration, document, relevance (TREC)",
                          rows.iloc[0].tolist() if len(rows) else None)
    return rows.set_axis(names[rows.shape[1]], axis=1)


def whitespace_rows(path: Path) -> pd.DataFrame:
    """The fields of a file separated by runs of spaces (TREC's qrels and run files), every line as
    wide as the first; a line of another width is an error naming it."""
    rows, width = [], None
    for number, line in _utf8_lines(path):
        fields = line.split()
        if not fields:
            continue
        width = width or len(fields)
        if len(fields) != width:
            raise SourceError(path, "delimited_rows", f"line {number} has {len(fields)} fields, not {width} "
                              "(a line cut short, or a field holding a space?)", fields)
        rows.append(fields)
    if not rows:
        raise SourceError(path, "not_empty", "no rows (the file is empty)")
    return pd.DataFrame(rows)


def _read_nanobeir(folder: Path) -> tuple[dict, dict, pd.DataFrame, Path]:
    parts = {}
    for part in ("corpus", "queries", "qrels"):
        files = sorted((folder / part).glob("*.parquet"))
        if not files:
            raise SourceError(folder, "nanobeir_layout", f"no parquet file in {part}/")
        parts[part] = pd.concat([read_parquet(f) for f in files], ignore_index=True)
    texts = {part: id_texts(parts[part], folder / part) for part in ("corpus", "queries")}
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
    from datasets import get_dataset_split_names

    if revision is None and not Path(source).exists():
        raise SourceError(source, "pinned_revision", "set snapshot.eval.revision to a commit or tag: "
                          "an unpinned Hub dataset can change under the same name")

    def texts(part: str, part_split: str) -> HubTexts:
        return HubTexts(source, part, part_split, revision)

    available = get_dataset_split_names(source, "corpus", revision=revision)
    if available == ["corpus"]:
        qrels = hf_split(source, "default", split, revision)
        name = Path(source.rstrip("/")).name
        return {name: RetrievalSet(texts("corpus", "corpus"), texts("queries", "queries"),
                                   judged_qrels(qrels, f"{source} default/{split}"))}
    sets = {}
    for set_split in hub_set_names(source, names, available):
        qrels = hf_split(source, "qrels", set_split, revision)
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


def cut_retrieval_set(full: RetrievalSet, queries: int, extra_docs: int) -> RetrievalSet:
    """`full` cut down to its first `queries` judged queries, their judged documents and the first
    `extra_docs` others (tiny evaluations for tests and benchmarks' smoke runs)."""
    qrels = dict(list(full.qrels.items())[:queries])
    keep = {d for judged in qrels.values() for d in judged if d in full.corpus} | set(list(full.corpus)[:extra_docs])
    return RetrievalSet({d: full.corpus[d] for d in keep}, {q: full.queries[q] for q in qrels}, qrels)


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
