"""The quickstart's generated retrieval world: made-up topics whose documents and queries use
different words for the same things, so that a model must learn more than term overlap.

Each topic owns a few *document terms*; every term has a *query synonym* that never appears in a
document. Documents are bags of their topic's terms plus shared filler words; queries mostly say the
synonyms. The lexicon (synonym -> term) is the world knowledge the quickstart teacher is given.
Everything is a pure function of the params and the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipeline.cli import StageError

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
TRIES_PER_ITEM = 1000  # random draws allowed per item still to make: then the params cannot make it


class Attempts:
    """A bound on a drawing loop: each call to `spend` counts one draw, and the last one raises a
    StageError saying what could not be made and which params to change."""

    def __init__(self, items: int, what: str, hint: str):
        self.left, self.what, self.hint = TRIES_PER_ITEM * max(items, 1), what, hint

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise StageError(f"snapshot.synthetic: could not make {self.what} in {TRIES_PER_ITEM} random draws "
                             f"per item: {self.hint}")


@dataclass(frozen=True)
class SyntheticWorld:
    corpus: dict[str, str]  # doc id -> text
    doc_topic: dict[str, int]
    train_queries: list[tuple[str, int]]  # (text, topic)
    eval_queries: dict[str, str]  # query id -> text
    eval_qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}
    triplets: list[tuple[str, str, str]]  # (query, positive, negative)
    lexicon: dict[str, str]  # query synonym -> document term


def _made_up_words(rng: random.Random, count: int) -> list[str]:
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    words: dict[str, None] = {}  # insertion-ordered: a set's order would change with PYTHONHASHSEED
    attempts = Attempts(count, f"{count} distinct made-up words",
                        "lower topics, terms_per_topic or filler_words")
    while len(words) < count:
        attempts.spend()
        words["".join(rng.choice(syllables) for _ in range(rng.choice((2, 3))))] = None
    return list(words)


def _render_query(rng: random.Random, terms: list[str], lexicon_back: dict[str, str],
                  filler: list[str], cfg) -> str:
    picked = rng.sample(terms, cfg.terms_per_query)
    words = [lexicon_back[t] if rng.random() < cfg.synonym_rate else t for t in picked]
    words += rng.sample(filler, cfg.filler_per_query)
    rng.shuffle(words)
    return " ".join(words)


def generate(cfg) -> SyntheticWorld:
    """Build the world described by a `SyntheticConfig` (see pipeline.config)."""
    rng = random.Random(cfg.seed)
    n_terms = cfg.topics * cfg.terms_per_topic
    vocabulary = _made_up_words(rng, 2 * n_terms + cfg.filler_words)
    doc_terms = vocabulary[:n_terms]
    synonyms = vocabulary[n_terms: 2 * n_terms]
    filler = vocabulary[2 * n_terms:]
    lexicon = dict(zip(synonyms, doc_terms))
    term_to_synonym = dict(zip(doc_terms, synonyms))
    topic_terms = [doc_terms[t * cfg.terms_per_topic:(t + 1) * cfg.terms_per_topic]
                   for t in range(cfg.topics)]

    corpus: dict[str, str] = {}
    doc_topic: dict[str, int] = {}
    docs_by_topic: list[list[str]] = []
    for topic, terms in enumerate(topic_terms):
        ids = []
        for k in range(cfg.docs_per_topic):
            words = rng.sample(terms, cfg.terms_per_doc) + rng.sample(filler, cfg.filler_per_doc)
            rng.shuffle(words)
            doc_id = f"d{topic:04d}-{k}"
            corpus[doc_id] = " ".join(words)
            doc_topic[doc_id] = topic
            ids.append(doc_id)
        docs_by_topic.append(ids)

    seen: set[str] = set()
    train_queries: list[tuple[str, int]] = []
    for topic, terms in enumerate(topic_terms):
        for _ in range(cfg.train_queries_per_topic):
            text = _render_query(rng, terms, term_to_synonym, filler, cfg)
            if text not in seen:
                seen.add(text)
                train_queries.append((text, topic))

    eval_queries: dict[str, str] = {}
    eval_qrels: dict[str, dict[str, int]] = {}
    for topic, terms in enumerate(topic_terms):
        made = 0
        attempts = Attempts(cfg.eval_queries_per_topic, f"{cfg.eval_queries_per_topic} held-out queries of "
                            f"topic {topic} unlike every training query", "lower eval_queries_per_topic or "
                            "train_queries_per_topic, or raise terms_per_topic, filler_words or filler_per_query")
        while made < cfg.eval_queries_per_topic:
            attempts.spend()
            text = _render_query(rng, terms, term_to_synonym, filler, cfg)
            if text in seen:  # held-out queries never occur in training
                continue
            seen.add(text)
            qid = f"q{topic:04d}-{made}"
            eval_queries[qid] = text
            eval_qrels[qid] = {doc_id: 1 for doc_id in docs_by_topic[topic]}
            made += 1

    all_doc_ids = list(corpus)
    triplets = []
    for text, topic in train_queries:
        chosen: set[tuple[str, str]] = set()  # no duplicate triplet for a query
        attempts = Attempts(cfg.negatives_per_query, f"{cfg.negatives_per_query} distinct triplets for a query",
                            "lower negatives_per_query, or raise topics or docs_per_topic")
        while len(chosen) < cfg.negatives_per_query:
            attempts.spend()
            positive = rng.choice(docs_by_topic[topic])
            negative = rng.choice(all_doc_ids)
            if doc_topic[negative] != topic and (positive, negative) not in chosen:
                chosen.add((positive, negative))
                triplets.append((text, corpus[positive], corpus[negative]))

    return SyntheticWorld(corpus, doc_topic, train_queries, eval_queries, eval_qrels, triplets,
                          lexicon)
