"""The evaluation gate: what a trained model must reach to be pushed to the Hub (pipeline.stages.push) and
to become the registry's champion (pipeline.tracking.registry). Both ask it the same question, about the
same champion, and get the same verdict.

It reads one evaluation's numbers: the student's push.gate.metric on the main result (the mean over
the sets when there are several), its untrained start's and BM25's, and each query's values of the
student and its start (metrics/per_query.csv). A model is refused when it is below
push.gate.minimum, or under push.gate.rule

- significance (the default): not significantly better than its untrained start
  (push.gate.beat_base), or significantly worse than the champion of the same evaluation: each a
  one-sided paired randomization test on the per-query values at push.gate.alpha (pipeline.evaluation.stats);
- threshold: not above its untrained start, or more than push.gate.max_drop below the champion.

The champion is compared only when measured on the same evaluation
(pipeline.tracking.records.evaluation_identity): a number from another set is reported, never compared. The
verdict names the test, each difference, its interval and p-value, and the queries that gained and
lost most against the champion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.cli import GateRefused, StageError
from pipeline.config import GateConfig
from pipeline.evaluation import stats

MOVERS = 5  # queries listed that gained most, and lost most, against the champion


@dataclass(frozen=True)
class GateScores:
    metric: str
    dataset: str  # the main result's name (a set, or "<source> mean")
    value: float  # the student's
    base: float | None  # its untrained start's
    bm25: float | None
    # the metric per query: columns student and base, rows (dataset, query_id); None: not recorded
    per_query: pd.DataFrame | None = None


@dataclass(frozen=True)
class Champion:
    """The model a challenger would replace, on the same evaluation."""
    name: str  # "champion version 3", "the pushed model"
    value: float
    per_query: pd.Series | None = None  # its metric per (dataset, query_id); None: not recorded


def read_per_query(path: Path) -> pd.DataFrame:
    """metrics/per_query.csv, ids kept as written (a query id "007" is not the number 7)."""
    return pd.read_csv(path, dtype={"model": str, "dataset": str, "query_id": str})


def query_texts(sets: dict) -> dict[tuple[str, str], str]:
    """Each evaluation query's text by (dataset, query_id): the movers are listed with them."""
    return {(name, query): text for name, data in sets.items() for query, text in data.queries.items()}


def metric_per_query(table: pd.DataFrame, model: str, metric: str) -> pd.Series:
    """One model's `metric` per (dataset, query_id) from a per-query table (metrics/per_query.csv)."""
    rows = table[table["model"] == model]
    return rows.set_index([rows["dataset"].astype(str), rows["query_id"].astype(str)])[metric]


def scores_from_evaluation(evaluation: dict, gate: GateConfig, dataset: str,
                           per_query: pd.DataFrame | None = None) -> GateScores:
    """The gate's numbers from metrics/eval.json and, when given, metrics/per_query.csv."""
    if gate.metric not in evaluation["student"]:
        known = sorted(k for k, v in evaluation["student"].items() if isinstance(v, (int, float)))
        raise StageError(f"push.gate.metric {gate.metric!r} is not among the evaluation's metrics "
                         f"(metrics/eval.json has {known})")
    paired = None
    if per_query is not None:
        paired = pd.DataFrame({model: metric_per_query(per_query, model, gate.metric) for model in ("student", "base")})
    return GateScores(gate.metric, dataset, float(evaluation["student"][gate.metric]),
                      evaluation["base"].get(gate.metric), evaluation["bm25"].get(gate.metric), paired)


def per_set(values: pd.Series) -> list[np.ndarray]:
    """Per-query values indexed (dataset, query_id) as one array per set, sets in first-seen order."""
    return [group.to_numpy(dtype=float) for _, group in values.groupby(level=0, sort=False)]


def compare(challenger: pd.Series, other: pd.Series, resampling: stats.Resampling) -> dict:
    """challenger − other on the same queries: pipeline.evaluation.stats.paired_difference."""
    missing = challenger.index.difference(other.index)
    if len(missing):
        raise StageError(f"the per-query values compared do not cover the same queries: {len(missing)} missing "
                         f"(first: {list(missing[:3])}); were both measured on this evaluation?")
    return stats.paired_difference(per_set(challenger), per_set(other.loc[challenger.index]), resampling)


def movers(challenger: pd.Series, champion: pd.Series, texts: dict[tuple[str, str], str],
           count: int = MOVERS) -> dict[str, list[dict]]:
    """The queries whose value rose most and fell most against the champion, with their texts."""
    difference = (challenger - champion.loc[challenger.index]).sort_values(kind="stable")

    def rows(index) -> list[dict]:
        return [{"dataset": key[0], "query_id": key[1], "query": texts.get(key, ""),
                 "challenger": float(challenger[key]), "champion": float(champion[key]),
                 "difference": float(difference[key])} for key in index]

    return {"gained": rows(difference[difference > 0].index[::-1][:count]),
            "lost": rows(difference[difference < 0].index[:count])}


def _said(diff: dict, side: str) -> str:
    return (f"difference {stats.shown(diff)} ({diff['confidence']:.0%} interval, {diff['queries']} queries), "
            f"one-sided {diff['test']} p = {diff[side]:.4g}")


def check_gate(gate: GateConfig, scores: GateScores, champion: Champion | None,
               resampling: stats.Resampling = stats.Resampling(), texts: dict[tuple[str, str], str] | None = None,
               action: str = "pushing") -> dict:
    """The gate's verdict (its numbers, `passed` true and `reason`); raises GateRefused naming the
    numbers that refused the model. `champion`: the model it would replace, measured on the same
    evaluation (None: nothing comparable)."""
    verdict = {"metric": scores.metric, "dataset": scores.dataset, "value": scores.value, "base": scores.base,
               "bm25": scores.bm25, "rule": gate.rule, "alpha": gate.alpha, "minimum": gate.minimum,
               "max_drop": gate.max_drop, "beat_base": gate.beat_base,
               "previous": champion.value if champion else None, "previous_name": champion.name if champion else None}
    if scores.per_query is not None and scores.base is not None:
        verdict["vs_base"] = compare(scores.per_query["student"], scores.per_query["base"], resampling)
    if champion is not None and champion.per_query is not None and scores.per_query is not None:
        verdict["vs_champion"] = compare(scores.per_query["student"], champion.per_query, resampling)
        verdict["movers"] = movers(scores.per_query["student"], champion.per_query, texts or {})
    if gate.rule == "significance" and scores.base is not None and "vs_base" not in verdict:
        raise StageError("push.gate.rule significance needs the per-query values (metrics/per_query.csv) of the "
                         "student and its untrained start")
    where = f"evaluation gate ({gate.rule}): {scores.metric} on {scores.dataset} is {scores.value:.4f}"
    bm25 = f" (BM25: {scores.bm25:.4f})" if scores.bm25 is not None else ""
    alpha = f"push.gate.alpha {gate.alpha}"
    refusal, passes = None, []
    if gate.minimum is not None and scores.value < gate.minimum:
        refusal = f"below push.gate.minimum {gate.minimum:.4f}"
    elif gate.beat_base and scores.base is not None:
        if gate.rule == "significance":
            diff = verdict["vs_base"]
            if diff["p_greater"] >= gate.alpha:
                refusal = (f"not significantly above the untrained model it started from, {scores.base:.4f}: "
                           f"{_said(diff, 'p_greater')} >= {alpha} (push.gate.beat_base)")
            else:
                passes.append(f"significantly above its untrained start ({_said(diff, 'p_greater')} < {alpha})")
        elif scores.value <= scores.base:
            refusal = f"not above the untrained model it started from, {scores.base:.4f} (push.gate.beat_base)"
    if refusal is None and champion is not None:
        if gate.rule == "significance" and "vs_champion" in verdict:
            diff = verdict["vs_champion"]
            if diff["p_less"] < gate.alpha:
                refusal = (f"significantly below {champion.name}'s {champion.value:.4f}: "
                           f"{_said(diff, 'p_less')} < {alpha}")
            else:
                passes.append(f"not significantly below {champion.name}'s {champion.value:.4f} "
                              f"({_said(diff, 'p_less')} >= {alpha})")
        elif gate.max_drop is not None and scores.value < champion.value - gate.max_drop:
            refusal = (f"{champion.value - scores.value:.4f} below {champion.name}'s {champion.value:.4f} "
                       f"(push.gate.max_drop {gate.max_drop})")
        elif gate.rule == "significance":  # a champion logged without per-query values
            passes.append(f"{champion.name} has no per-query values: compared by push.gate.max_drop "
                          f"{gate.max_drop}, within it")
    if refusal is not None:
        raise GateRefused(f"{where}, {refusal}{bm25}; not {action}", verdict)
    return {**verdict, "passed": True, "reason": "passed the gate" + (": " + "; ".join(passes) if passes else "")}


def main_result(card_text: str, metric: str) -> dict | None:
    """The first model-index result for `metric` on a card (its main one): its dataset name, value
    and the id of the evaluation it was measured on (None on cards that do not record it)."""
    from huggingface_hub import ModelCard

    for result in ModelCard(card_text).data.eval_results or []:
        if result.metric_type == metric:
            return {"dataset": result.dataset_name, "value": float(result.metric_value),
                    "eval_id": (result.dataset_args or {}).get("eval_id")}
    return None


def comparable_previous(card_text: str | None, metric: str, eval_id: str) -> dict:
    """What the pushed card says, and whether it is comparable: its main result for `metric` counts
    only when measured on the same evaluation (equal evaluation id)."""
    previous = main_result(card_text, metric) if card_text else None
    if previous is None:
        return {"value": None, "compared": False, "reason": "no pushed card with this metric"}
    if previous["eval_id"] != eval_id:
        return {**previous, "compared": False,
                "reason": f"the pushed model was evaluated on {previous['dataset']} (evaluation "
                          f"{previous['eval_id']}), this one on evaluation {eval_id}: not compared"}
    return {**previous, "compared": True, "reason": "same evaluation"}
