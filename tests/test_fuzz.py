"""Property-based fuzzing (hypothesis) of the training-data readers, the BEIR reader and
`python -m pipeline.stages.validate`.

The contract, for any file: a result or an error naming the file (exit 0 or 1), never another
exception (a traceback), never longer than CASE_SECONDS; and a valid file, however it is written
(BOM, CRLF line endings, quoted separators and newlines, header-less, any Unicode), is read as
exactly its rows and passes. Invalid files are valid ones broken the ways real files break:
truncated or joined lines, UTF-16 or Latin-1, stray delimiters, wrong types, NaN and infinity,
empty files, huge fields, nested values, repeated keys.

Seeded (derandomized) and drawing its constants from the modules under test only, so a failure
reproduces whatever else the session imported. The default suite runs a bounded number of cases;
`pytest -m slow tests/test_fuzz.py` runs many more.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import providers
from hypothesis.internal.constants_ast import constants_from_module
from hypothesis.internal.floats import float_to_int
from sortedcontainers import SortedSet

from pipeline import cli, config
from pipeline.cli import StageError
from pipeline.config import TrainDataConfig
from pipeline.data import sources
from pipeline.data.sources import KIND_COLUMNS, load_training, read_retrieval_set
from pipeline.stages import validate

CASE_SECONDS = 20  # the most one case may take: a hang fails the test, naming the case


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(autouse=True)
def constants_of_the_modules_under_test(monkeypatch):
    """Hypothesis mixes into its draws constants from every project module imported so far, so the
    cases would depend on which other tests ran first: here they come from the readers' modules."""
    pool = providers.Constants(integers=SortedSet(), floats=SortedSet(key=float_to_int), bytes=SortedSet(),
                               strings=SortedSet())  # sorted: a set's order would change with PYTHONHASHSEED
    for module in (cli, config, sources, validate):
        for constant in constants_from_module(module):
            pool.add(constant)
    monkeypatch.setattr(providers, "_get_local_constants", lambda: pool)
    providers.CONSTANTS_CACHE.cache.clear()
    yield
    providers.CONSTANTS_CACHE.cache.clear()


class Hang(Exception):
    pass


@contextlib.contextmanager
def bounded(seconds: int = CASE_SECONDS):
    def stop(signum, frame):
        raise Hang(f"no result within {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# Text as users have it: any letters, marks, digits, punctuation, symbols and spaces of Unicode
WORDS = st.text(st.characters(categories=("L", "M", "N", "P", "S", "Zs")), min_size=1, max_size=30)
# what only quoting (csv) or escaping (jsonl) can carry inside a field
FIELD_BREAKERS = st.sampled_from(["\t", "\n", "\r\n", '"', ",", ";", "\\", "'"])


@st.composite
def field_text(draw, delimited: bool) -> str:
    parts = draw(st.lists(st.one_of(WORDS, FIELD_BREAKERS) if not delimited else WORDS, min_size=1, max_size=4))
    return "".join(parts)


@st.composite
def valid_rows(draw, kind: str, fmt: str) -> pd.DataFrame:
    """At least 10 rows that pass every check: distinct rows, texts with a visible character, no
    query equal to its positive, no positive equal to a negative, finite scores."""
    count = draw(st.integers(10, 16))
    negatives = draw(st.integers(1, 2)) if kind != "pairs" else 0
    columns = ["query", "positive"] + (["negative"] + [f"negative_{i}" for i in range(2, negatives + 1)]
                                       if negatives else [])
    tsv = fmt == "tsv"
    rows = {column: [f"{draw(field_text(tsv)).strip() or 'x'} {column[0]}{i}" for i in range(count)]
            for column in columns}
    frame = pd.DataFrame(rows)
    if kind == "scored":
        finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
        if draw(st.booleans()) and fmt in ("jsonl", "parquet"):
            frame["score"] = [[draw(finite) for _ in range(1 + negatives)] for _ in range(count)]
        else:
            frame["score"] = [draw(finite) for _ in range(count)]
    return frame


@st.composite
def written(draw, frame: pd.DataFrame, fmt: str) -> bytes:
    """The rows as a file of `fmt`, written one of the ways real files are."""
    if fmt == "parquet":
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return buffer.getvalue()
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    if fmt == "jsonl":
        ascii_only = draw(st.booleans())
        text = "".join(json.dumps(row, ensure_ascii=ascii_only) + newline
                       for row in frame.to_dict(orient="records"))
    else:
        # header-less is read positionally only at the kind's own width
        header = list(frame.columns) not in KIND_COLUMNS.values() or draw(st.booleans())
        rows = ([list(frame.columns)] if header else []) + [
            [repr(v) if isinstance(v, float) else v for v in row] for row in frame.itertuples(index=False)]
        if fmt == "tsv":  # no quoting: a tab or a line break cannot be in a field (MS MARCO's files)
            text = "".join("\t".join(row) + newline for row in rows)
        else:
            out = io.StringIO()
            csv.writer(out, lineterminator=newline, quoting=csv.QUOTE_MINIMAL).writerows(rows)
            text = out.getvalue()
    bom = "\ufeff" if draw(st.booleans()) else ""
    return (bom + text).encode("utf-8")


def wrong_value(draw):
    return draw(st.sampled_from([None, 7, -2.5, math.nan, math.inf, True, ["a", "list"], {"an": "object"},
                                 [[1, 2], [3]], {"nested": {"deep": [1]}}, "", "   ", "x" * 300_000]))


@st.composite
def broken(draw, data: bytes, fmt: str, frame: pd.DataFrame) -> tuple[bytes, str]:
    """`data` broken the way real files break, and how."""
    how = draw(st.sampled_from(BREAKS))
    return draw(broken_as(data, fmt, frame, how)), how


BREAKS = ["truncate", "join_lines", "repeat_line", "utf16", "latin1", "stray_byte", "stray_delimiter", "empty",
          "blank", "header_only", "wrong_value", "repeated_key", "huge_field"]


@st.composite
def broken_as(draw, data: bytes, fmt: str, frame: pd.DataFrame, how: str) -> bytes:
    lines = data.split(b"\n")
    pick = draw(st.integers(0, max(len(lines) - 2, 0)))
    if how == "truncate":
        return data[:draw(st.integers(0, len(data)))]
    if how == "join_lines" and len(lines) > 2:
        return b"\n".join(lines[:pick] + [lines[pick].rstrip(b"\r") + lines[pick + 1]] + lines[pick + 2:])
    if how == "repeat_line":
        return b"\n".join(lines[:pick + 1] + [lines[pick]] + lines[pick + 1:])
    if how == "utf16":
        return data.decode("utf-8", "replace").encode(draw(st.sampled_from(["utf-16", "utf-16-le"])))
    if how == "latin1":
        return data.decode("utf-8", "replace").encode("latin-1", "replace") + "caf\xe9".encode("latin-1")
    if how == "stray_byte":
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1:]
    if how == "stray_delimiter":
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        return data[:at] + draw(st.sampled_from([b"\t", b",", b";", b'"', b"\n", b"\r"])) + data[at:]
    if how == "empty":
        return b""
    if how == "blank":
        return b"\n \n\t\n"
    if how == "header_only":
        return lines[0] + b"\n"
    row = frame.iloc[pick % len(frame)].to_dict()
    column = draw(st.sampled_from(list(row)))
    if how == "wrong_value":
        row[column] = wrong_value(draw)
    elif how == "huge_field":
        row[column] = "word " * 250_000
    if fmt == "jsonl":
        line = json.dumps(row, default=lambda v: v.tolist())
        if how == "repeated_key":
            line = line[:-1] + f', "{column}": {json.dumps(wrong_value(draw), default=str)}}}'
        return b"\n".join(lines[:pick] + [line.encode()] + lines[pick + 1:])
    if fmt == "parquet":
        broken_frame = frame.astype(object).copy()
        broken_frame.at[pick % len(frame), column] = row[column]
        buffer = io.BytesIO()
        try:
            broken_frame.to_parquet(buffer, index=False)
        except Exception:  # pyarrow cannot store this mix at all: a truncated file instead
            return data[:len(data) // 2]
        return buffer.getvalue()
    separator = "\t" if fmt == "tsv" else ","
    line = separator.join(str(v) for v in row.values())
    return b"\n".join(lines[:pick] + [line.encode("utf-8", "replace")] + lines[pick + 1:])


def read_as_stage(path: Path, kind: str):
    """What the snapshot stage does with the file: rows, or a StageError."""
    return load_training(TrainDataConfig(source=str(path), kind=kind))


def expected_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(score=frame["score"].map(lambda s: list(s) if isinstance(s, list) else float(s))) \
        if "score" in frame else frame


def assert_same_rows(got: pd.DataFrame, frame: pd.DataFrame) -> None:
    got = got.assign(score=got["score"].map(lambda s: [float(v) for v in s]
                                            if isinstance(s, (list, np.ndarray)) else float(s))) \
        if "score" in got else got
    assert sorted(got.columns) == sorted(frame.columns)
    assert got[list(frame.columns)].to_dict(orient="list") == expected_rows(frame).to_dict(orient="list")


FORMATS = ["jsonl", "tsv", "csv", "parquet"]


@st.composite
def cases(draw):
    """(kind, format, rows, file bytes, how it was broken: None for the valid rows as written)."""
    kind = draw(st.sampled_from(list(KIND_COLUMNS)))
    fmt = draw(st.sampled_from(FORMATS))
    frame = draw(valid_rows(kind, fmt))
    data = draw(written(frame, fmt))
    if draw(st.integers(0, 3)) == 0:
        return kind, fmt, frame, data, None
    return kind, fmt, frame, *draw(broken(data, fmt, frame))


class Tally:
    def __init__(self):
        self.counts = {"cases": 0, "read": 0, "refused": 0, "valid": 0, "broken_read": 0}

    def __str__(self):
        return ", ".join(f"{k} {v}" for k, v in self.counts.items())


def read_or_refuse(read, name: str, valid: bool, tally: Tally, what: str):
    """What `read()` returns, or None when it refuses (a StageError naming `name`); a valid input
    refused, any other exception or a hang fails the test."""
    tally.counts["cases"] += 1
    try:
        with bounded():
            got = read()
    except StageError as exc:
        assert not valid, f"a valid {what} was refused: {exc}"
        assert name in str(exc), f"the error does not name the file: {exc}"
        tally.counts["refused"] += 1
        return None
    tally.counts["read"] += 1
    tally.counts["valid"] += valid
    return got


def row_key(row: dict) -> int | None:
    """The original row a read row claims to be: every valid text ends with its row's marker (' q3')."""
    last = str(row.get("query", "")).rsplit(" q", 1)
    return int(last[1]) if len(last) == 2 and last[1].isdigit() else None


def assert_recoverable_rows(got: pd.DataFrame, frame: pd.DataFrame, how: str) -> None:
    """A broken file that was read holds exactly its recoverable rows: every row the break did not
    touch, unchanged and in order, none lost, none invented; a row it touched only as the file
    still says it (cut short by a truncation, or one character off by a stray byte or delimiter)."""
    original = expected_rows(frame).to_dict(orient="records")
    if "score" in got:
        got = got.assign(score=got["score"].map(lambda s: [float(v) for v in s] if isinstance(s, (list, np.ndarray))
                                                else float(s)))
    rows = got[[c for c in frame.columns if c in got]].to_dict(orient="records")
    assert list(got.columns) == [c for c in got.columns if c in frame.columns] and set(got.columns) == set(frame.columns), \
        f"{how}: columns {list(got.columns)}"
    untouched = [r for r in rows if r in original]
    # a row of blank texts is what a blank line between separators says (validate refuses it: not_empty)
    touched = [r for r in rows if r not in original and not all(str(v).strip() == "" for v in r.values())]
    seen = [original.index(r) for r in untouched]
    # a line repeated, or one rewritten from the row after it (the header shifts lines by one), or
    # with another row's values: the second time a row is read may stand anywhere
    twice = how in ("repeat_line", "repeated_key", "wrong_value", "huge_field")
    first_times = [s for i, s in enumerate(seen) if s not in seen[:i]] if twice else seen
    assert first_times == sorted(first_times), f"{how}: rows out of order {seen}"
    assert len(seen) - len(set(seen)) <= twice, f"{how}: rows read twice {seen}"
    for row in touched:
        index = row_key(row)
        if how == "repeat_line" and {k: v.removeprefix("\ufeff") if isinstance(v, str) else v
                                     for k, v in row.items()} in original:
            continue  # the first line repeated with the file's byte-order mark, which mid-file is text
        assert how in ("truncate", "stray_byte", "stray_delimiter", "wrong_value", "huge_field", "join_lines",
                       "repeated_key"), \
            f"{how}: a row that is in no valid row and that this break cannot make: {row}"
        if how in ("wrong_value", "huge_field", "join_lines", "repeated_key"):
            # the one rewritten (or joined) row, as its file now says (a type check refuses the rest); in a
            # CSV a quote in the new value opens a field that runs into the next line
            continue
        if how in ("stray_byte", "stray_delimiter"):  # one field of one row holds the stray character
            assert any(sum(row[c] != want[c] for c in row) <= 1 for want in original), \
                f"{how}: a row more than one field away from every valid row: {row}"
            continue
        assert index is not None and index < len(original), f"{how}: a row with no row of its own kept: {row}"
        for column, value in row.items():  # truncate: the last row, cut short
            want = original[index][column]
            assert value == want or column == "score" or isinstance(value, str) and str(want).startswith(value), \
                f"truncate: {column} {value!r} is not a prefix of {want!r}"
    lost = [i for i in range(len(original)) if i not in seen and i not in {row_key(r) for r in touched}]
    allowed = {"truncate": len(original), "join_lines": 2, "stray_delimiter": 2, "stray_byte": 2,
               "wrong_value": 2, "huge_field": 1, "repeated_key": 2, "header_only": len(original),
               "empty": len(original), "blank": len(original)}.get(how, 0)
    if how == "truncate":
        assert lost == list(range(len(original) - len(lost), len(original))), f"truncate: lost rows {lost} mid-file"
    assert len(lost) <= allowed, f"{how}: rows lost {lost}"


def check_reader_case(tmp: Path, case, tally: Tally) -> None:
    kind, fmt, frame, data, how = case
    path = tmp / f"rows-{tally.counts['cases']}.{fmt}"
    path.write_bytes(data)
    got = read_or_refuse(lambda: read_as_stage(path, kind), path.name, how is None, tally,
                         f"{kind} {fmt} file {data[:300]!r}")
    if how is None:
        assert_same_rows(got, frame)
    elif got is not None:
        assert_recoverable_rows(got, frame, how)
        tally.counts["broken_read"] += 1
    path.unlink()


def run_validate_cli(args: list[str]) -> tuple[int, str]:
    """`python -m pipeline.stages.validate ARGS` in this process: (exit status, stdout + stderr). Any
    exception but SystemExit propagates: it would have been a traceback."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), bounded():
        try:
            validate.main(args)
        except SystemExit as exit_:
            return int(exit_.code or 0), out.getvalue() + err.getvalue()
    return 0, out.getvalue() + err.getvalue()


def check_cli_case(tmp: Path, case, tally: Tally) -> None:
    kind, fmt, frame, data, how = case
    valid = how is None
    path = tmp / f"cli-{tally.counts['cases']}.{fmt}"
    path.write_bytes(data)
    tally.counts["cases"] += 1
    status, output = run_validate_cli([str(path), "--kind", kind, "--params", str(tmp / "absent.yaml")])
    assert status in (0, 1), output
    if valid:
        assert status == 0, f"a valid {kind} {fmt} file was refused:\n{output}\n{data[:500]!r}"
        tally.counts["valid"] += 1
    if status == 1:
        assert path.name in output, f"the message does not name the file:\n{output}"
    tally.counts["refused" if status else "read"] += 1
    path.unlink()


@st.composite
def beir_cases(draw):
    """A BEIR folder's three files (corpus, queries, qrels), one of them perhaps broken."""
    docs = draw(st.integers(2, 8))
    corpus = pd.DataFrame({"_id": [f"d{i}" for i in range(docs)],
                           "title": [draw(field_text(False)) for _ in range(docs)],
                           "text": [f"{draw(field_text(False)).strip() or 'x'} {i}" for i in range(docs)]})
    queries = pd.DataFrame({"_id": [f"q{i}" for i in range(docs)],
                            "text": [f"{draw(field_text(False)).strip() or 'x'} {i}" for i in range(docs)]})
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(docs))
    files = {"corpus.jsonl": draw(written(corpus, "jsonl")), "queries.jsonl": draw(written(queries, "jsonl")),
             "qrels/test.tsv": qrels.encode()}
    if draw(st.booleans()):
        return files, corpus, queries, True
    target = draw(st.sampled_from(list(files)))
    frame = corpus if target == "corpus.jsonl" else queries if target == "queries.jsonl" else \
        pd.DataFrame({"query-id": [f"q{i}" for i in range(docs)], "corpus-id": [f"d{i}" for i in range(docs)],
                      "score": [1] * docs})
    files[target] = draw(broken(files[target], "jsonl" if target.endswith("jsonl") else "tsv", frame))[0]
    return files, corpus, queries, False


def check_beir_case(tmp: Path, case, tally: Tally) -> None:
    files, corpus, queries, valid = case
    folder = tmp / f"beir-{tally.counts['cases']}"
    (folder / "qrels").mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    got = read_or_refuse(lambda: read_retrieval_set(folder, "test"), folder.name, valid, tally, "BEIR folder")
    if valid:  # the same documents (title and text joined as sentence-transformers joins them) and queries
        assert got.corpus == {d: f"{title} {text}".strip() for d, title, text in corpus.itertuples(index=False)}
        assert got.queries == dict(queries.itertuples(index=False))
        assert got.qrels == {q: {d: 1} for q, d in zip(queries["_id"], corpus["_id"])}


def fuzz(tmp_path, readers: int, beir: int, cli: int) -> dict[str, Tally]:
    tallies = {"readers": Tally(), "beir": Tally(), "cli": Tally()}

    @fuzz_settings(readers)
    @given(cases())
    def readers_hold(case):
        check_reader_case(tmp_path, case, tallies["readers"])

    @fuzz_settings(beir)
    @given(beir_cases())
    def beir_holds(case):
        check_beir_case(tmp_path, case, tallies["beir"])

    @fuzz_settings(cli)
    @given(cases())
    def cli_holds(case):
        check_cli_case(tmp_path, case, tallies["cli"])

    started = time.perf_counter()
    readers_hold()
    beir_holds()
    cli_holds()
    seconds = time.perf_counter() - started
    print(f"\nfuzzed in {seconds:.1f} s: " + "; ".join(f"{name}: {tally}" for name, tally in tallies.items()))
    return tallies


def test_fuzzed_files_read_or_fail_naming_the_file(tmp_path):
    tallies = fuzz(tmp_path, readers=450, beir=100, cli=30)
    assert sum(t.counts["cases"] for t in tallies.values()) >= 500
    for tally in tallies.values():  # both sides of the contract were exercised
        assert tally.counts["valid"] > 0 and tally.counts["refused"] > 0


@pytest.mark.slow
def test_fuzzed_files_long_run(tmp_path):
    tallies = fuzz(tmp_path, readers=5000, beir=1000, cli=400)
    assert sum(t.counts["cases"] for t in tallies.values()) >= 6000
