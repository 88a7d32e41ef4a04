"""A run's numbers with their uncertainty, as Markdown: the headline metrics with their intervals,
the differences from the untrained start and BM25, and the gate's verdict against the champion with
the queries that gained and lost most. The CI pull request's text, and report.md in the MLflow run.

    python -m pipeline.evaluation.report    # from metrics/eval.json and build/push_plan.json, to stdout
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.config import EVAL_METRICS, HEADLINE, PUSH_PLAN
from pipeline.evaluation.stats import shown

TEXT_CHARS = 120  # a query's text in the tables is cut to this length


def cell(text: str) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + "…"
    return text.replace("|", "\\|")


def metrics_table(evaluation: dict) -> list[str]:
    spreads, differences = evaluation["intervals"], evaluation["differences"]
    confidence = spreads["student"][HEADLINE[0]]["confidence"]
    lines = [f"{evaluation['queries']} queries; {confidence:.0%} intervals (paired bootstrap over queries); "
             "p: one-sided paired randomization test that the student is better.", "",
             "| Metric | Student | Untrained start | BM25 | Student − start (p) | Student − BM25 (p) |",
             "|:--|--:|--:|--:|--:|--:|"]
    for metric in HEADLINE:
        row = [metric, *(shown(spreads[model][metric]) for model in ("student", "base", "bm25"))]
        row += [f"{shown(differences[name][metric])} ({differences[name][metric]['p_greater']:.3g})"
                for name in ("student - base", "student - bm25")]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def verdict_lines(verdict: dict) -> list[str]:
    lines = ["", f"**Gate ({verdict['rule']}): {'passed' if verdict['passed'] else 'refused'}.** {verdict['reason']}"]
    if "vs_champion" not in verdict:
        lines += ["", "No champion of this evaluation to compare with." if verdict.get("previous") is None
                  else f"{verdict['previous_name']}: {verdict['previous']:.4f} (no per-query values to compare)."]
        return lines
    diff = verdict["vs_champion"]
    lines += ["", f"Against {verdict['previous_name']} ({verdict['previous']:.4f}) on {verdict['metric']}: "
              f"{shown(diff)}, {diff['queries']} queries, one-sided p (worse) = {diff['p_less']:.4g}."]
    for side, title in (("gained", "Gained most"), ("lost", "Lost most")):
        rows = verdict["movers"][side]
        lines += ["", f"{title} against the champion:", ""]
        if not rows:
            lines.append("(none)")
            continue
        lines += ["| Set | Query | Text | Challenger | Champion | Δ |", "|:--|:--|:--|--:|--:|--:|"]
        lines += [f"| {cell(r['dataset'])} | {cell(r['query_id'])} | {cell(r['query'])} | {r['challenger']:.4f} | "
                  f"{r['champion']:.4f} | {r['difference']:+.4f} |" for r in rows]
    return lines


def markdown(evaluation: dict, verdict: dict | None) -> str:
    """The report of one run: eval.json's intervals and, when given, the gate's verdict."""
    lines = ["## Metrics with their intervals", "", *metrics_table(evaluation)]
    if verdict is not None:
        lines += verdict_lines(verdict)
    return "\n".join(lines) + "\n"


def summary(evaluation: dict, verdict: dict) -> str:
    """The headline metrics' table and the gate's verdict, without the movers: a run's description
    in the MLflow UI, the first thing its page shows."""
    return "\n".join([*metrics_table(evaluation), *verdict_lines(verdict)[:2]]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", default=str(EVAL_METRICS), help="metrics/eval.json")
    parser.add_argument("--plan", default=str(PUSH_PLAN), help="build/push_plan.json (its gate verdict)")
    args = parser.parse_args(argv)
    plan = Path(args.plan)
    verdict = json.loads(plan.read_text()).get("gate") if plan.exists() else None
    print(markdown(json.loads(Path(args.eval).read_text()), verdict), end="")


if __name__ == "__main__":
    main()
