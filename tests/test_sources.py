import pytest

from pipeline.sources import SourceError, read_beir, read_triplets


def test_msmarco_toy_triplets_tsv(shared):
    frame = read_triplets(shared / "data/msmarco-toy-triplets/triplets.tsv")
    assert list(frame.columns) == ["query", "positive", "negative"]
    assert len(frame) == 100
    assert frame["query"].str.strip().str.len().min() > 0


def test_beir_scifact_with_crlf_qrels(shared):
    data = read_beir(shared / "data/beir/scifact", "test")
    assert len(data.corpus) == 5183
    assert len(data.queries) == 300
    assert all(doc in data.corpus for docs in data.qrels.values() for doc in docs)
    assert all(not qid.endswith("\r") for qid in data.qrels)


def test_bad_jsonl_row_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"query": "a", "positive": "b", "negative": "c"}\n{"query": "a", broken\n')
    with pytest.raises(SourceError, match=r"train\.jsonl:2: not valid JSON"):
        read_triplets(path)


def test_missing_column_and_missing_beir_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"query": "a", "positive": "b"}\n')
    with pytest.raises(SourceError, match=r"missing column\(s\) \['negative'\]"):
        read_triplets(path)
    (tmp_path / "beir").mkdir()
    with pytest.raises(SourceError, match="corpus.jsonl is missing"):
        read_beir(tmp_path / "beir", "test")
