"""The evaluation gate: what a trained model must reach to be pushed to the Hub (pipeline.push) or
to become the registry's champion (pipeline.registry).

It reads one evaluation's numbers: the student's value of push.gate.metric on the main result (the
mean over the sets when there are several), its untrained start's and BM25's. A model is refused
when it is below push.gate.minimum, not above its untrained start (push.gate.beat_base), or more than
push.gate.max_drop below the model it would replace; that last comparison is made only when both
were measured on the same evaluation (pipeline.dataset.evaluation_identity): a number from another
set is reported, never compared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.cli import StageError
from pipeline.config import GateConfig


class GateRefused(StageError):
    """The gate said no: nothing is pushed or promoted, and the run is on record as refused."""


@dataclass(frozen=True)
class GateScores:
    metric: str
    dataset: str  # the main result's name (a set, or "<source> mean")
    value: float  # the student's
    base: float | None  # its untrained start's
    bm25: float | None


def scores_from_evaluation(evaluation: dict, gate: GateConfig, dataset: str) -> GateScores:
    """The gate's numbers from metrics/eval.json."""
    if gate.metric not in evaluation["student"]:
        known = sorted(k for k, v in evaluation["student"].items() if isinstance(v, (int, float)))
        raise StageError(f"push.gate.metric {gate.metric!r} is not among the evaluation's metrics "
                         f"(metrics/eval.json has {known})")
    return GateScores(gate.metric, dataset, float(evaluation["student"][gate.metric]),
                      evaluation["base"].get(gate.metric), evaluation["bm25"].get(gate.metric))


def check_gate(gate: GateConfig, scores: GateScores, previous: float | None,
               previous_name: str = "the pushed model", action: str = "pushing") -> dict:
    """The gate's verdict (its numbers, `passed` true); raises GateRefused naming the numbers that
    refused the model. `previous` is the value of the model it would replace on the same evaluation
    (None: nothing comparable)."""
    verdict = {**asdict(scores), "minimum": gate.minimum, "max_drop": gate.max_drop,
               "beat_base": gate.beat_base, "previous": previous, "passed": True}
    where = f"evaluation gate: {scores.metric} on {scores.dataset} is {scores.value:.4f}"
    bm25 = f" (BM25: {scores.bm25:.4f})" if scores.bm25 is not None else ""
    if gate.minimum is not None and scores.value < gate.minimum:
        refusal = f"below push.gate.minimum {gate.minimum:.4f}"
    elif gate.beat_base and scores.base is not None and scores.value <= scores.base:
        refusal = f"not above the untrained model it started from, {scores.base:.4f} (push.gate.beat_base)"
    elif previous is not None and gate.max_drop is not None and scores.value < previous - gate.max_drop:
        refusal = (f"{previous - scores.value:.4f} below {previous_name}'s {previous:.4f} "
                   f"(push.gate.max_drop {gate.max_drop})")
    else:
        return verdict
    raise GateRefused(f"{where}, {refusal}{bm25}; not {action}")


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
