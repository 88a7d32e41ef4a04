"""Stage 2: check the snapshot before any compute is spent on it.

Training triplets go through a great-expectations suite; the evaluation set is checked for qrels that
point at missing documents or queries and for evaluation queries that leak into training. Any failure
stops the pipeline with the file, the check, the failing count and example rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline import snapshot
from pipeline.cli import StageError, stage_main
from pipeline.config import SNAPSHOT_DIR, VALIDATION_REPORT, Params, ValidateConfig
from pipeline.sources import TRIPLET_COLUMNS, read_beir
from pipeline.tracking import stage_record, write_json

EXAMPLES = 5


def triplet_expectations(cfg: ValidateConfig) -> list:
    import great_expectations as gx

    expectations = [gx.expectations.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows)]
    for column in TRIPLET_COLUMNS:
        expectations += [
            gx.expectations.ExpectColumnValuesToNotBeNull(column=column),
            gx.expectations.ExpectColumnValuesToMatchRegex(column=column, regex=r"\S"),
            gx.expectations.ExpectColumnValueLengthsToBeBetween(column=column, max_value=cfg.max_chars),
        ]
    return expectations


def check_triplets(frame: pd.DataFrame, source: Path, cfg: ValidateConfig) -> list[dict]:
    """Run the suite; return one failure dict per failed expectation."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = context.data_sources.add_pandas("snapshot").add_dataframe_asset("triplets") \
        .add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(gx.ExpectationSuite(name="triplets"))
    for expectation in triplet_expectations(cfg):
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="triplets", data=batch, suite=suite))
    result = definition.run(batch_parameters={"dataframe": frame}, result_format="SUMMARY")
    failures = []
    for outcome in result.results:
        if outcome.success:
            continue
        kwargs = {k: v for k, v in outcome.expectation_config.kwargs.items() if k != "batch_id"}
        rows = (outcome.result.get("partial_unexpected_index_list") or [])[:EXAMPLES]
        failures.append({
            "file": str(source),
            "expectation": outcome.expectation_config.type,
            "kwargs": kwargs,
            "failing_count": outcome.result.get("unexpected_count"),
            "observed_value": outcome.result.get("observed_value"),
            "example_rows": {int(i): frame.loc[i].to_dict() for i in rows},
        })
    return failures


def check_eval_set(folder: Path, split: str, train_queries: set[str]) -> list[dict]:
    data = read_beir(folder, split)
    failures = []

    def fail(check: str, offenders: list, what: str) -> None:
        if offenders:
            failures.append({"file": str(folder), "expectation": check, "kwargs": {},
                             "failing_count": len(offenders), "observed_value": what,
                             "example_rows": offenders[:EXAMPLES]})

    fail("qrels_reference_existing_docs",
         [(q, d) for q, docs in data.qrels.items() for d in docs if d not in data.corpus],
         "qrels naming a document missing from corpus.jsonl")
    fail("qrels_reference_existing_queries", [q for q in data.qrels if q not in data.queries],
         "qrels naming a query missing from queries.jsonl")
    fail("eval_queries_not_in_training",
         [{"query_id": q, "text": text} for q, text in data.queries.items() if text in train_queries],
         "evaluation queries that also occur as training queries (leak)")
    return failures


def describe(failures: list[dict]) -> str:
    lines = [f"{len(failures)} validation check(s) failed:"]
    for f in failures:
        lines.append(f"- {f['file']}: {f['expectation']} {f['kwargs'] or ''} failed for "
                     f"{f['failing_count']} row(s) (observed: {f['observed_value']})")
        examples = f["example_rows"]
        for example in (examples.items() if isinstance(examples, dict) else enumerate(examples)):
            lines.append(f"    row {example[0]}: {json.dumps(example[1], default=str)[:300]}")
    return "\n".join(lines)


def run(params: Params, snapshot_dir: Path = SNAPSHOT_DIR) -> dict:
    cfg = params.validate_
    with stage_record("validate", cfg, params.tracking) as record:
        train_path = snapshot_dir / snapshot.TRAIN_FILE
        frame = pd.read_parquet(train_path)
        failures = check_triplets(frame, train_path, cfg)
        failures += check_eval_set(snapshot_dir / snapshot.EVAL_DIR, params.snapshot.eval_split,
                                   set(frame["query"].dropna()))
        report = {"success": not failures, "rows_checked": len(frame), "failures": failures}
        write_json(VALIDATION_REPORT, report)
        if failures:
            raise StageError(describe(failures) + f"\nfull report: {VALIDATION_REPORT}")
        record["metrics"] = {"rows_checked": len(frame), "failed_checks": 0}
    return report


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
