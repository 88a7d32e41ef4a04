import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from pipeline.cli import StageError
from pipeline.config import SyntheticConfig
from pipeline.data import synthetic


def test_same_seed_same_world_other_seed_other_world():
    cfg = SyntheticConfig(topics=10, train_queries_per_topic=5)
    assert synthetic.generate(cfg) == synthetic.generate(cfg)
    assert synthetic.generate(cfg).triplets != synthetic.generate(cfg.model_copy(update={"seed": 1})).triplets


def test_world_is_built_as_described():
    cfg = SyntheticConfig(topics=12, train_queries_per_topic=8, eval_queries_per_topic=3)
    world = synthetic.generate(cfg)
    train_texts = {text for text, _ in world.train_queries}
    assert len(world.corpus) == 12 * cfg.docs_per_topic
    assert len(world.eval_queries) == 12 * 3
    # held-out queries never occur in training
    assert not set(world.eval_queries.values()) & train_texts
    # synonyms are query-only words: no document contains one
    doc_words = {w for text in world.corpus.values() for w in text.split()}
    assert not set(world.lexicon) & doc_words
    doc_terms = set(world.lexicon.values())
    for text in world.corpus.values():
        assert sum(word in doc_terms for word in text.split()) == cfg.terms_per_doc
    # every eval query is judged relevant to exactly its topic's documents
    for docs in world.eval_qrels.values():
        assert len({world.doc_topic[d] for d in docs}) == 1
        assert len(docs) == cfg.docs_per_topic
    # each triplet's positive shares the query's topic, its negative does not
    topic_of_text = {world.corpus[d]: world.doc_topic[d] for d in world.corpus}
    topic_of_query = dict(world.train_queries)
    for query, positive, negative in world.triplets:
        assert topic_of_text[positive] == topic_of_query[query] != topic_of_text[negative]


def test_world_does_not_depend_on_the_interpreter_hash_seed():
    script = ("import hashlib, json; from pipeline.data import synthetic; from pipeline.config import SyntheticConfig; "
              "w = synthetic.generate(SyntheticConfig(topics=6)); "
              "print(hashlib.sha256(json.dumps([w.triplets, w.eval_queries, w.lexicon]).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(digests) == 1


@pytest.mark.parametrize("numbers, keys", [
    ({"topics": 1}, ["topics"]),
    ({"terms_per_doc": 7, "terms_per_topic": 6}, ["terms_per_doc", "terms_per_topic"]),
    ({"terms_per_query": 9}, ["terms_per_query", "terms_per_topic"]),
    ({"filler_per_doc": 20, "filler_words": 10}, ["filler_per_doc", "filler_words"]),
    ({"topics": 2, "docs_per_topic": 1, "negatives_per_query": 2}, ["negatives_per_query", "docs_per_topic"]),
])
def test_params_no_world_satisfies_fail_at_load_naming_the_keys(numbers, keys):
    with pytest.raises(ValidationError) as err:
        SyntheticConfig(**numbers)
    assert all(key in str(err.value) for key in keys), str(err.value)


def test_a_world_too_small_for_its_held_out_queries_stops_naming_what_to_change():
    """Queries of 3 of a topic's 3 terms, no synonyms, no filler: 6 word orders in all, which the
    24 training queries use up; the held-out queries cannot be made and the generator says so in
    bounded time instead of drawing forever."""
    import time

    cfg = SyntheticConfig(topics=2, terms_per_topic=3, terms_per_doc=3, terms_per_query=3, synonym_rate=0,
                          filler_per_query=0)
    started = time.perf_counter()
    with pytest.raises(StageError, match="held-out queries of topic 0.*eval_queries_per_topic"):
        synthetic.generate(cfg)
    assert time.perf_counter() - started < 10
