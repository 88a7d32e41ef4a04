"""Stage 2: check the snapshot before any compute is spent on it.

Training rows go through a great-expectations suite for their kind (pairs, triplets, scored); the
evaluation set is checked for qrels naming missing documents or queries, and for evaluation queries
that leak into training. Each check is an error (stops the pipeline), a warning or off, as
validate.severity in params.yaml says. Failures name the file, the expectation, the failing count
and up to 5 example rows; the whole report is written to data/validation/report.json.

Also a standalone checker: python -m pipeline.stages.validate SOURCE --kind {pairs,triplets,scored,beir}
exits 0 on valid data and 1 on invalid data.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.cli import StageError, run_stage
from pipeline.config import (
    PARAMS_FILE,
    VALIDATION_REPORT,
    Params,
    TrainDataConfig,
    ValidateConfig,
    load_params,
)
from pipeline.data.snapshots import (
    TEXT_ROW_GROUP,
    TrainingSnapshot,
    read_eval_snapshot,
    write_id_training,
    read_manifest,
    row_hashes,
    text_columns,
)
from pipeline.data.sources import (
    IdRows,
    RetrievalSet,
    SourceError,
    batches,
    load_training,
    read_retrieval_set,
    rows_sharing_a_hash,
)
from pipeline.tracking.records import stage_record, write_json

log = logging.getLogger(__name__)
EXAMPLES = 5
CHUNK_ROWS = 50_000  # rows great-expectations checks at once: 200,000 MS MARCO triplets held 1 GB
# UTF-8 text decoded as Latin-1/cp1252 once too often: "donât", "Ã©", "Â£"
MOJIBAKE = r"[ÃÂâ][\x80-\xbf]|â€|Ã[©¨ª«¢£¤¥§±³¶¼½¾]"


def with_derived_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Row-level facts GX has no built-in expectation for, as columns it can check."""
    derived = frame.copy(deep=False)
    negatives = [c for c in frame.columns if c.startswith("negative")]
    if {"query", "positive"} <= set(frame.columns):
        derived["check_query_equals_positive"] = frame["query"] == frame["positive"]
    if negatives and "positive" in frame:
        derived["check_positive_equals_a_negative"] = np.logical_or.reduce(
            [frame["positive"] == frame[n] for n in negatives])
    if "score" in frame:
        derived["check_score_is_finite"] = frame["score"].map(
            lambda s: s is not None and bool(np.all(np.isfinite(np.asarray(s, dtype=float)))))
    # duplicates are found on one 64-bit hash per row, so the check sees all rows at once cheaply
    derived["check_row_hash"] = row_hashes(frame[text_columns(frame)])
    return derived


def expectations(frame: pd.DataFrame, cfg: ValidateConfig) -> tuple[list, list]:
    """(per-row expectations, whole-table expectations) for this frame; meta names the check."""
    import great_expectations as gx

    ex = gx.expectations
    texts = text_columns(frame)
    per_row = []
    for column in texts + (["score"] if "score" in frame else []):
        per_row.append(("not_null", ex.ExpectColumnValuesToNotBeNull(column=column)))
    for column in texts:
        per_row += [
            ("not_empty", ex.ExpectColumnValuesToMatchRegex(column=column, regex=r"\S")),
            ("length", ex.ExpectColumnValueLengthsToBeBetween(column=column, max_value=cfg.max_chars)),
            ("mojibake", ex.ExpectColumnValuesToNotMatchRegex(column=column, regex=MOJIBAKE)),
        ]
    for check, column, value in [("query_is_positive", "check_query_equals_positive", False),
                                 ("positive_is_negative", "check_positive_equals_a_negative", False),
                                 ("finite_scores", "check_score_is_finite", True)]:
        if column in frame:
            per_row.append((check, ex.ExpectColumnValuesToBeInSet(column=column, value_set=[value])))
    whole_table = [("row_count", ex.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows)),
                   ("duplicates", ex.ExpectColumnValuesToBeUnique(column="check_row_hash"))]

    def enabled(planned: list) -> list:
        chosen = []
        for check, expectation in planned:
            if cfg.severity[check] != "off":
                expectation.meta = {"check": check}
                chosen.append(expectation)
        return chosen

    return enabled(per_row), enabled(whole_table)


def check_rows(frame: pd.DataFrame, source: str, cfg: ValidateConfig) -> list[dict]:
    """Run the great-expectations suites over a frame; one finding per failed expectation."""
    chunks = (frame.iloc[start:start + CHUNK_ROWS] for start in range(0, max(len(frame), 1), CHUNK_ROWS))
    return check_row_chunks(chunks, source, cfg, lambda row: frame.loc[row].to_dict())


def check_training(train: TrainingSnapshot, source: str, cfg: ValidateConfig) -> list[dict]:
    """check_row_chunks over a snapshot's training rows, with their texts."""
    return check_row_chunks(train.chunks(CHUNK_ROWS), source, cfg, lambda row: train.rows(row, row + 1).loc[row].to_dict())


def check_row_chunks(chunks, source: str, cfg: ValidateConfig, example_row=None) -> list[dict]:
    """Run the great-expectations suites over rows that come in chunks (frames indexed by their row
    numbers, the first one's columns in every chunk); one finding per failed expectation.

    Per-row expectations run a chunk at a time (GX holds a Python copy of what it checks), whole-table
    ones over the row hashes alone; counts and examples are merged. A whole-table failure's example
    rows come from `example_row(row number)` (without one, none: the chunks are gone by then)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)

    def suite_of(name: str, planned: list):
        batch = context.data_sources.add_pandas(name).add_dataframe_asset(name) \
            .add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in planned:
            suite.add_expectation(expectation)
        return context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))

    failed: dict[str, dict] = {}

    def collect(part: pd.DataFrame, definition, example) -> None:
        for outcome in definition.run(batch_parameters={"dataframe": part}, result_format="SUMMARY").results:
            if outcome.success:
                continue
            config = outcome.expectation_config
            kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
            entry = failed.setdefault(f"{config.type}{sorted(kwargs.items())}", {
                "check": config.meta["check"], "expectation": config.type, "kwargs": kwargs,
                "count": None, "observed": None, "examples": {}})
            if outcome.result.get("unexpected_count") is not None:
                entry["count"] = (entry["count"] or 0) + outcome.result["unexpected_count"]
            entry["observed"] = outcome.result.get("observed_value")
            for row in (outcome.result.get("partial_unexpected_index_list") or [])[:EXAMPLES - len(entry["examples"])]:
                entry["examples"][int(row)] = example(row)

    definition, whole_table, hashes = None, [], []
    for chunk in chunks:
        derived = with_derived_columns(chunk)
        if definition is None:
            per_row, whole_table = expectations(derived, cfg)
            definition = suite_of("rows", per_row) if per_row else False
        if definition:
            collect(derived, definition, lambda row: chunk.loc[row].to_dict())
        hashes.append(derived["check_row_hash"].to_numpy())
    if whole_table:  # the chunks are consecutive rows: the hashes' positions are the row numbers
        collect(pd.DataFrame({"check_row_hash": np.concatenate(hashes)}), suite_of("table", whole_table),
                example_row or (lambda row: None))
    return [finding(e["check"], cfg, source, e["expectation"], e["kwargs"], e["count"], e["observed"],
                    {row: example for row, example in e["examples"].items() if example is not None})
            for e in failed.values()]


def finding(check: str, cfg: ValidateConfig, source: str, expectation: str, kwargs: dict,
            count: int | None, observed: object, examples: dict) -> dict:
    return {"check": check, "severity": cfg.severity[check], "file": str(source),
            "expectation": expectation, "kwargs": kwargs, "failing_count": count,
            "observed_value": observed, "example_rows": examples}


def repeated_texts(corpus: Mapping[str, str]) -> list[dict]:
    """The documents whose text an earlier one already has, in corpus order, each with the first
    one's id: found through one 64-bit hash per text (the texts read TEXT_ROW_GROUP at a time), then
    only the texts whose hash repeats compared, in a second pass. Memory: the hashes and those texts."""
    parts = [pd.util.hash_array(np.array(chunk, dtype=object)) for chunk in batches(corpus.values(), TEXT_ROW_GROUP)]
    hashes = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
    candidate = np.zeros(len(hashes), dtype=bool)
    candidate[rows_sharing_a_hash(hashes)] = True
    first_with: dict[str, str] = {}
    offenders = []
    for doc_id, text, maybe in zip(corpus, corpus.values(), candidate):
        if not maybe:
            continue
        if text in first_with:
            offenders.append({"corpus-id": doc_id, "same_text_as": first_with[text], "text": text[:200]})
        else:
            first_with[text] = doc_id
    return offenders


def check_eval_set(data: RetrievalSet, source: str, cfg: ValidateConfig,
                   train_queries: set[str]) -> list[dict]:
    findings = []

    def check(name: str, expectation: str, offenders: list, what: str) -> None:
        if offenders and cfg.severity[name] != "off":
            findings.append(finding(name, cfg, source, expectation, {}, len(offenders), what,
                                    dict(enumerate(offenders[:EXAMPLES]))))

    judged_docs = {d for docs in data.qrels.values() for d in docs}
    present = {d for d in data.corpus if d in judged_docs}  # a walk over the ids: no id -> row table of the corpus
    check("qrels_missing_ids", "qrels_reference_existing_docs",
          [{"query-id": q, "corpus-id": d} for q, docs in data.qrels.items() for d in docs
           if d not in present], "qrels naming a document missing from the corpus")
    check("qrels_missing_ids", "qrels_reference_existing_queries",
          [{"query-id": q} for q in data.qrels if q not in data.queries],
          "qrels naming a query missing from the queries")
    check("corpus_duplicate_texts", "corpus_texts_unique", repeated_texts(data.corpus),
          "documents whose text an earlier document (another id) already has")
    judged = {q: data.queries[q] for q in data.qrels if q in data.queries}
    check("eval_leak", "eval_queries_not_in_training",
          [{"query-id": q, "text": t} for q, t in judged.items() if t in train_queries],
          "evaluation queries that also occur as training queries")
    return findings


def describe(findings: list[dict]) -> str:
    lines = []
    for f in findings:
        lines.append(f"- [{f['severity']}] {f['file']}: {f['expectation']} {f['kwargs'] or ''} failed "
                     f"for {f['failing_count']} row(s) (observed: {f['observed_value']})")
        for row, example in f["example_rows"].items():
            lines.append(f"    row {row}: {json.dumps(example, default=str, ensure_ascii=False)[:300]}")
    return "\n".join(lines)


def report(findings: list[dict], rows: int, snapshot_sha256: str | None = None) -> dict:
    """The validation report; `snapshot_sha256` names the snapshot it checked (the teacher refuses
    to label a snapshot without a passing report of its own)."""
    errors = [f for f in findings if f["severity"] == "error"]
    return {"success": not errors, "rows_checked": rows, "errors": len(errors),
            "warnings": len(findings) - len(errors), "findings": findings, "snapshot_sha256": snapshot_sha256}


def failing_rows(findings: list[dict]) -> dict[str, int]:
    """<check>_rows: the failing rows of each check, summed over the columns and files it ran on."""
    counts: dict[str, int] = {}
    for f in findings:
        counts[f"{f['check']}_rows"] = counts.get(f"{f['check']}_rows", 0) + (f["failing_count"] or 0)
    return counts


def raise_on_errors(result: dict, report_path: Path | None = None) -> None:
    errors = [f for f in result["findings"] if f["severity"] == "error"]
    warnings = [f for f in result["findings"] if f["severity"] == "warning"]
    if warnings:
        log.warning("%d validation warning(s):\n%s", len(warnings), describe(warnings))
    if errors:
        where = f"\nfull report: {report_path}" if report_path else ""
        raise StageError(f"{len(errors)} validation check(s) failed:\n{describe(errors)}{where}")


def check_loss_has_its_labels(frame: pd.DataFrame, params: Params) -> None:
    """KL-div trains on score lists; a scored file of single scores (margins) cannot give them. The
    params alone cannot tell (the file decides), so this is checked here, before any compute."""
    if (params.train.loss == "kl-div" and "score" in frame and len(frame)
            and not isinstance(frame["score"].iloc[0], (list, np.ndarray))):
        raise StageError(f"train.loss kl-div needs a score list per row ([positive, negative, ...]), but "
                         f"snapshot.train.source {params.snapshot.train.source} (kind scored) gives one score "
                         f"per row (a margin, e.g. {frame['score'].iloc[0]!r} in row 1): use train.loss "
                         "margin-mse, or give score lists")


def run(params: Params) -> dict:
    cfg = params.validate_
    with stage_record("validate", params) as record:
        train = TrainingSnapshot()  # id-based rows are joined to their texts a chunk at a time
        check_loss_has_its_labels(train.rows(0, min(len(train), 1)), params)
        evaluation = read_eval_snapshot()
        # name the user's files in the findings, not the snapshot's copies
        findings = check_training(train, params.snapshot.train.source, cfg)
        source = params.snapshot.eval.source
        train_queries = train.query_texts()
        for name, data in evaluation.items():
            findings += check_eval_set(data, source if len(evaluation) == 1 else f"{source} [{name}]", cfg,
                                       train_queries)
        result = report(findings, len(train), read_manifest()["train"]["sha256"])
        write_json(VALIDATION_REPORT, result)
        record["metrics"] = {"rows_checked": len(train), "warnings": result["warnings"], **failing_rows(findings)}
        raise_on_errors(result, VALIDATION_REPORT)
    return result


def text_chunks(texts, column: str):
    """`texts` as frames of CHUNK_ROWS rows (at least one, perhaps empty) of one column, indexed by
    row number."""
    start = 0
    for chunk in batches(texts, CHUNK_ROWS):
        yield pd.DataFrame({column: chunk}, index=range(start, start + len(chunk)))
        start += len(chunk)
    if not start:
        yield pd.DataFrame({column: []})


def validate_source(source: str, kind: str, cfg: ValidateConfig, split: str, columns: list[str] | None,
                    corpus: str | None = None, queries: str | None = None) -> dict:
    """Check a file or folder as it is, without snapshotting it (the standalone contract)."""
    if kind == "beir":
        data = read_retrieval_set(Path(source), split)
        # repeated texts are check_eval_set's to report, by document id
        rows_cfg = cfg.model_copy(update={"min_rows": 1, "severity": {**cfg.severity, "duplicates": "off"}})
        findings = check_row_chunks(text_chunks(data.corpus.values(), "positive"), f"{source}/corpus", rows_cfg)
        return report(findings + check_eval_set(data, source, cfg, set()), len(data.corpus))
    rows = load_training(TrainDataConfig(source=source, kind=kind, columns=columns, split=split,
                                         corpus=corpus, queries=queries))
    if isinstance(rows, IdRows):  # checked with their texts, as the snapshot will keep them
        with tempfile.TemporaryDirectory() as folder:
            write_id_training(rows, Path(folder))
            return report(check_training(TrainingSnapshot(Path(folder)), source, cfg), len(rows))
    return report(check_rows(rows, source, cfg), len(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?",
                        help="a file, or a folder for --kind beir; omitted: validate the snapshot")
    parser.add_argument("--kind", choices=["pairs", "triplets", "scored", "beir"], default="triplets")
    parser.add_argument("--split", help="qrels split (default: test for beir, train otherwise)")
    parser.add_argument("--columns", nargs="+", help="column names of a header-less tsv/csv")
    parser.add_argument("--corpus", help="id-based rows: the corpus file their document ids name")
    parser.add_argument("--queries", help="id-based rows: the queries file their query ids name")
    parser.add_argument("--params", default=str(PARAMS_FILE),
                        help="params file: its validate section sets severities and bounds")
    args = parser.parse_args(argv)
    if args.source is None:
        return run_stage(run, args.params)
    cfg = load_params(args.params).validate_ if Path(args.params).exists() else ValidateConfig()
    split = args.split or ("test" if args.kind == "beir" else "train")
    try:
        result = validate_source(args.source, args.kind, cfg, split, args.columns, args.corpus, args.queries)
    except SourceError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({k: v for k, v in result.items() if k != "findings"}))
    if result["findings"]:
        print(describe(result["findings"]), file=sys.stderr)
    sys.exit(0 if result["success"] else 1)


if __name__ == "__main__":
    main()
