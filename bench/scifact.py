"""A realistic distillation set from the shared SciFact, for the benchmarks: each train query with
its first positive and its top BM25 non-positives (hard negatives), one triplet row per negative, the
way MS MARCO hard-negative sets repeat each (query, positive). Carries the BM25 scores too."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

PROJECT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPLADE_SHARED", PROJECT.parent / "shared"))


def hard_negative_rows(queries: int, negatives: int = 4) -> pd.DataFrame:
    """(query, positive, negative, positive_bm25, negative_bm25) rows for the first `queries` queries."""
    from pipeline.runtime import import_bm25s

    bm25s = import_bm25s()
    folder = SHARED / "data/beir/scifact"
    corpus = [json.loads(line) for line in (folder / "corpus.jsonl").open()]
    texts = [f"{d['title']} {d['text']}" for d in corpus]
    position = {d["_id"]: i for i, d in enumerate(corpus)}
    query_text = {q["_id"]: q["text"] for q in map(json.loads, (folder / "queries.jsonl").open())}
    qrels = pd.read_csv(folder / "qrels/train.tsv", sep="\t", dtype=str)
    relevant = qrels.groupby("query-id")["corpus-id"].apply(set)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    rows = []
    for query_id in list(relevant.index)[:queries]:
        query = query_text[query_id]
        positive = position[sorted(relevant[query_id])[0]]
        tokens = bm25s.tokenize(query, stopwords="en", return_ids=False, show_progress=False)[0]
        scores = retriever.get_scores(tokens)
        ranked = [i for i in scores.argsort()[::-1] if corpus[i]["_id"] not in relevant[query_id]]
        rows += [(query, texts[positive], texts[i], scores[positive], scores[i])
                 for i in ranked[:negatives]]
    return pd.DataFrame(rows, columns=["query", "positive", "negative", "positive_bm25", "negative_bm25"])
