"""Stage 3: label every training triplet with the teacher's margin for MarginMSE distillation.

Writes data/teacher/train_scored.parquet: the snapshot's (query, positive, negative) plus
positive_score, negative_score and label = positive_score - negative_score. Each unique
(query, document) pair is scored once.

Teachers:
- cross-encoder: any CrossEncoder (local folder or Hub id at a pinned revision), raw logits.
- lexicon-bm25: the quickstart's teacher; BM25 over the training documents with each query word
  mapped through the synthetic world's synonym lexicon, so it knows what plain term overlap misses.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import snapshot
from pipeline.cli import StageError, stage_main
from pipeline.config import SNAPSHOT_DIR, TEACHER_DIR, Params, TeacherConfig
from pipeline.metrics import ranking_metrics
from pipeline.sources import read_retrieval_set
from pipeline.tracking import stage_record

SCORED_FILE = "train_scored.parquet"


class LexiconBM25:
    """BM25 (bm25s) whose queries are rewritten word by word through a synonym lexicon."""

    def __init__(self, documents: list[str], lexicon: dict[str, str]):
        import bm25s

        self.lexicon = lexicon
        self.doc_index = {text: i for i, text in enumerate(documents)}
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(documents, stopwords=None, show_progress=False),
                             show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        import bm25s

        words = bm25s.tokenize(query, stopwords=None, return_ids=False, show_progress=False)[0]
        return self.retriever.get_scores([self.lexicon.get(w, w) for w in words])

    def score_pairs(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        out = np.empty(len(pairs), dtype=np.float64)
        cache: dict[str, np.ndarray] = {}
        for i, (query, doc) in enumerate(pairs):
            if query not in cache:
                cache[query] = self.scores(query)
            out[i] = cache[query][self.doc_index[doc]]
        return out


def cross_encoder_scores(cfg: TeacherConfig, pairs: list[tuple[str, str]]) -> np.ndarray:
    import torch
    from sentence_transformers import CrossEncoder

    if not cfg.model:
        raise StageError("teacher.kind is cross-encoder but teacher.model is not set")
    model = CrossEncoder(cfg.model, revision=cfg.revision)
    return np.asarray(model.predict(pairs, batch_size=cfg.batch_size, show_progress_bar=True,
                                    activation_fn=torch.nn.Identity()), dtype=np.float64)


def run(params: Params, snapshot_dir: Path = SNAPSHOT_DIR, out_dir: Path = TEACHER_DIR) -> dict:
    cfg = params.teacher
    with stage_record("teacher", cfg, params.tracking) as record:
        train = pd.read_parquet(snapshot_dir / snapshot.TRAIN_FILE)
        if params.snapshot.train.kind != "triplets":
            raise StageError(f"the teacher scores triplets (query, positive, negative); the snapshot "
                             f"holds {params.snapshot.train.kind!r} rows (set snapshot.train.kind)")
        pairs = list(dict.fromkeys(
            [(q, p) for q, p in zip(train["query"], train["positive"])]
            + [(q, n) for q, n in zip(train["query"], train["negative"])]))
        started = time.perf_counter()
        if cfg.kind == "lexicon-bm25":
            lexicon_path = snapshot_dir / snapshot.LEXICON_FILE
            if not lexicon_path.exists():
                raise StageError(f"{lexicon_path} not found: the lexicon-bm25 teacher needs the "
                                 "synthetic training set; use teacher.kind: cross-encoder")
            lexicon = json.loads(lexicon_path.read_text())
            documents = list(dict.fromkeys(train["positive"].tolist() + train["negative"].tolist()))
            scores = LexiconBM25(documents, lexicon).score_pairs(pairs)
        else:
            scores = cross_encoder_scores(cfg, pairs)
        seconds = time.perf_counter() - started
        score_of = dict(zip(pairs, scores))

        train["positive_score"] = [score_of[(q, p)] for q, p in zip(train["query"], train["positive"])]
        train["negative_score"] = [score_of[(q, n)] for q, n in zip(train["query"], train["negative"])]
        train["label"] = train["positive_score"] - train["negative_score"]
        out_dir.mkdir(parents=True, exist_ok=True)
        train.to_parquet(out_dir / SCORED_FILE, index=False)

        record["metrics"] = {
            "triplets": len(train), "unique_pairs_scored": len(pairs),
            "pairs_per_second": len(pairs) / max(seconds, 1e-9),
            "margin_mean": float(train["label"].mean()),
            "margin_positive_fraction": float((train["label"] > 0).mean()),
        }
        if cfg.kind == "lexicon-bm25":  # cheap enough to rank the whole eval corpus
            evaluation = read_retrieval_set(snapshot_dir / snapshot.EVAL_DIR, params.snapshot.eval.split)
            doc_ids = list(evaluation.corpus)
            ranker = LexiconBM25([evaluation.corpus[d] for d in doc_ids], lexicon)
            ranking = {qid: dict(zip(doc_ids, ranker.scores(text)))
                       for qid, text in evaluation.queries.items()}
            record["metrics"].update(
                {f"eval_{k}": v for k, v in ranking_metrics(evaluation, ranking).items()})
    return record["metrics"]


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
