"""Every input users have, read into the pipeline's columns (acceptance 1 of the snapshot issue)."""

import json

import pandas as pd
import pytest

from pipeline.config import SNAPSHOT_TRAIN, EvalDataConfig, Params, TrainDataConfig
from pipeline.data.snapshots import (
    TrainingSnapshot,
    TrainingTexts,
    frame_digest,
    read_eval_snapshot,
    write_id_training,
)
from pipeline.data.sources import (
    SourceError,
    load_training,
    read_eval_sets,
    read_retrieval_set,
)
from pipeline.stages import snapshot
from tests.helpers.project import USER_DATA_TEACHER

TRIPLET_COLUMNS = ["query", "positive", "negative"]


def snapshot_of(workdir, tiny_params, **train) -> dict:
    data = tiny_params.model_dump(by_alias=True)
    data["snapshot"]["train"].update(train)
    data["teacher"].update(USER_DATA_TEACHER)
    if train.get("kind") == "pairs":  # pairs train contrastively
        data["train"]["loss"] = "mnrl"
    return snapshot.run(Params.model_validate(data))


def test_msmarco_triplets_tsv_snapshot(workdir, tiny_params, shared):
    manifest = snapshot_of(workdir, tiny_params,
                           source=str(shared / "data/msmarco-toy-triplets/triplets.tsv"),
                           columns=TRIPLET_COLUMNS)
    train = manifest["train"]
    assert train["rows"] == 100 and train["format"] == "auto"
    assert set(train["lengths"]) == set(TRIPLET_COLUMNS)
    assert 1 <= train["lengths"]["query"]["min_words"] < train["lengths"]["query"]["mean_words"] \
        < train["lengths"]["positive"]["mean_words"]
    assert len(train["samples"]) == 3 and len(train["sha256"]) == 64
    frame = pd.read_parquet(SNAPSHOT_TRAIN)
    assert list(frame.columns) == TRIPLET_COLUMNS and len(frame) == 100
    # same source, same hash
    again = snapshot_of(workdir, tiny_params, source=str(shared / "data/msmarco-toy-triplets/triplets.tsv"),
                        columns=TRIPLET_COLUMNS)
    assert again["train"]["sha256"] == train["sha256"]


def test_scifact_train_qrels_become_pairs(workdir, tiny_params, shared):
    manifest = snapshot_of(workdir, tiny_params, source=str(shared / "data/beir/scifact"), kind="pairs",
                           split="train")
    qrels = pd.read_csv(shared / "data/beir/scifact/qrels/train.tsv", sep="\t")
    assert manifest["train"]["rows"] == int((qrels["score"] > 0).sum())
    frame = pd.read_parquet(SNAPSHOT_TRAIN)
    assert list(frame.columns) == ["query", "positive"]


def test_local_parquet_of_pairs_with_renamed_columns(workdir, tiny_params):
    path = workdir / "pairs.parquet"
    pd.DataFrame({"anchor": [f"question {i}" for i in range(20)],
                  "answer": [f"answer number {i}" for i in range(20)]}).to_parquet(path)
    manifest = snapshot_of(workdir, tiny_params, source=str(path), kind="pairs",
                           rename={"anchor": "query", "answer": "positive"})
    assert manifest["train"]["rows"] == 20
    assert manifest["train"]["samples"][0] == {"query": "question 0", "positive": "answer number 0"}


def write_nanobeir(folder, corpus, queries, qrels):
    for part, frame in (("corpus", corpus), ("queries", queries), ("qrels", qrels)):
        (folder / part).mkdir(parents=True)
        pd.DataFrame(frame).to_parquet(folder / part / "train-00000-of-00001.parquet")


def test_local_nanobeir_folder_as_eval_and_as_training(workdir, tiny_params, shared):
    beir = read_retrieval_set(shared / "data/beir/dbpedia-subset", "test")
    folder = workdir / "NanoDBPedia"
    write_nanobeir(folder, {"_id": list(beir.corpus), "text": list(beir.corpus.values())},
                   {"_id": list(beir.queries), "text": list(beir.queries.values())},
                   {"query-id": [q for q, d in beir.qrels.items() for _ in d],
                    "corpus-id": [doc for d in beir.qrels.values() for doc in d]})
    nano = read_retrieval_set(folder, "test")
    assert nano.corpus == beir.corpus and set(nano.qrels) == set(beir.qrels)
    assert {q: set(d) for q, d in nano.qrels.items()} == {q: set(d) for q, d in beir.qrels.items()}

    data = tiny_params.model_dump(by_alias=True)
    data["snapshot"]["eval"].update(source=str(folder), split="test")
    data["snapshot"]["train"].update(source=str(folder), kind="pairs")
    data["train"]["loss"] = "mnrl"
    manifest = snapshot.run(Params.model_validate(data))
    assert manifest["eval"]["sets"]["NanoDBPedia"]["judged_queries"] == len(beir.qrels) == 40
    assert manifest["train"]["rows"] == sum(len(d) for d in beir.qrels.values())


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", "-hf"])
def test_id_based_scored_rows_stay_ids_and_the_snapshot_joins_them_to_their_texts(workdir, shared, suffix):
    """Id-based rows in a jsonl or parquet file or a Hugging Face dataset (a local copy) stay ids
    (Arrow), resolved against MS MARCO's collection.tsv and a queries tsv."""
    collection = shared / "data/msmarco-toy-triplets/collection.tsv"
    queries = workdir / "queries.tsv"
    queries.write_text("q1\twhat is the manhattan project\nq2\twho built the bomb\nq3\tunused\n")
    rows = workdir / f"margins{suffix}"

    def write(frame: pd.DataFrame) -> None:
        if suffix == "-hf":  # a dataset folder: its train split
            rows.mkdir(exist_ok=True)
            frame.to_parquet(rows / "train.parquet", index=False)
        elif suffix == ".parquet":
            frame.to_parquet(rows, index=False)
        else:
            rows.write_text("".join(json.dumps(row) + "\n" for row in frame.to_dict(orient="records")))

    def load():
        return load_training(TrainDataConfig(source=str(rows), kind="scored", corpus=str(collection),
                                             queries=str(queries), format="hf" if suffix == "-hf" else "auto"))

    # MS MARCO's sets give passage ids as numbers, and the score as a number or numeric text
    write(pd.DataFrame({"query_id": ["q1", "q2"], "positive_id": [0, 1], "negative_id": [5, 2],
                        "score": [3.5, -1.0]}))
    loaded = load()
    assert loaded.table.column("positive_id").to_pylist() == ["0", "1"] and len(loaded) == 2
    assert loaded.text_rows["negative_id"].tolist() == [5, 2]  # rows of collection.tsv
    write_id_training(loaded, workdir)
    kept = TrainingSnapshot(workdir)
    passages = dict(line.split("\t", 1) for line in collection.read_text().splitlines())
    joined = kept.rows()
    assert joined.columns.tolist() == ["query", "positive", "negative", "score"]
    assert joined.loc[0, "query"] == "what is the manhattan project"
    assert joined.loc[0, "positive"] == passages["0"] and joined.loc[1, "negative"] == passages["2"]
    assert joined["score"].tolist() == [3.5, -1.0]
    assert kept.query_texts() == {"what is the manhattan project", "who built the bomb"}  # q3 is unused
    assert TrainingTexts(workdir).tables["corpus"].num_rows == 4  # the passages the rows name, each once

    write(pd.DataFrame({"query_id": ["q1"], "positive_id": ["0"], "negative_id": ["nope"], "score": [1.0]}))
    with pytest.raises(SourceError, match=r"ids_resolve failed: 1 negative_id value\(s\) not found") as err:
        load()
    assert '"negative_id": "nope"' in str(err.value)
    write(pd.DataFrame({"query_id": ["q1"], "positive_id": ["0"], "score": [1.0]}))
    with pytest.raises(SourceError, match=r"missing column\(s\) \['negative_id'\] for kind 'scored'"):
        load()


def test_hugging_face_path_loads_a_local_dataset_and_refuses_unpinned_hub_ids(tmp_path):
    folder = tmp_path / "my-dataset" / "data"
    folder.mkdir(parents=True)
    pd.DataFrame({"query": ["a b", "c d"], "positive": ["x y", "z w"]}).to_parquet(folder / "train.parquet")
    frame = load_training(TrainDataConfig(source=str(tmp_path / "my-dataset"), format="hf", kind="pairs",
                                          split="train"))
    assert frame.to_dict(orient="list") == {"query": ["a b", "c d"], "positive": ["x y", "z w"]}
    with pytest.raises(SourceError, match="pinned_revision"):
        load_training(TrainDataConfig(source="sentence-transformers/gooaq", kind="pairs"))


def test_scored_rows_with_a_list_of_scores(tmp_path):
    from pipeline.config import ValidateConfig
    from pipeline.stages import validate

    path = tmp_path / "kl.parquet"
    pd.DataFrame({"query": ["q one", "q two"], "positive": ["p one", "p two"], "negative": ["n one", "n two"],
                  "scores": [[3.0, 1.0], [2.0, float("inf")]]}).to_parquet(path)
    frame = load_training(TrainDataConfig(source=str(path), kind="scored"))
    assert list(frame.columns) == ["query", "positive", "negative", "score"]
    assert frame_digest(frame) == frame_digest(frame.copy())
    findings = validate.check_rows(frame, str(path), ValidateConfig(min_rows=1))
    (finite,) = [f for f in findings if f["check"] == "finite_scores"]
    assert finite["failing_count"] == 1 and list(finite["example_rows"]) == [1]


def test_beir_layout_on_the_hub_gives_ms_marco_dev_style_sets(workdir, tiny_params, cut_beir):
    """A local copy of a Hugging Face dataset in mteb's BEIR layout (as mteb/msmarco: configs corpus,
    queries and default, the qrels split dev): one set, named after the dataset, titles joined to
    texts, graded qrels kept, a blank text dropped, read a slice at a time, frozen by the snapshot as a
    BEIR folder that reads back the same."""
    beir = read_retrieval_set(cut_beir("trec-dl19-subset", queries=5, extra_docs=30), "test")
    root = workdir / "hub" / "msmarco"
    (root / "qrels").mkdir(parents=True)
    corpus = [{"_id": d, "title": f"title {d}", "text": t} for d, t in beir.corpus.items()]
    rows = {"corpus": corpus[:10] + [{"_id": "blank", "title": "", "text": " "}] + corpus[10:],  # dropped
            "queries": [{"_id": q, "text": t} for q, t in beir.queries.items()],
            "qrels/dev": [{"query-id": q, "corpus-id": d, "score": float(s)}
                          for q, docs in beir.qrels.items() for d, s in docs.items()],
            "qrels/train": [{"query-id": "nope", "corpus-id": "nope", "score": 1.0}]}
    for name, part in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part))
    (root / "README.md").write_text("\n".join([
        "---", "configs:", "- config_name: default", "  data_files:", "  - split: dev", "    path: qrels/dev.jsonl",
        "  - split: train", "    path: qrels/train.jsonl", "- config_name: corpus", "  data_files:",
        "  - split: corpus", "    path: corpus.jsonl", "- config_name: queries", "  data_files:",
        "  - split: queries", "    path: queries.jsonl", "---", ""]))

    (data,) = read_eval_sets(EvalDataConfig(source=str(root), format="hf", split="dev")).values()
    assert data.qrels == beir.qrels and max(g for docs in data.qrels.values() for g in docs.values()) > 1
    assert data.queries == beir.queries
    assert data.corpus == {d: f"title {d} {t}" for d, t in beir.corpus.items()}
    assert data.corpus.between(9, 11) == [f"title {d} {beir.corpus[d]}" for d in list(beir.corpus)[9:11]]
    params = tiny_params.model_dump(by_alias=True)
    params["snapshot"]["eval"].update(source=str(root), format="hf", split="dev")
    manifest = snapshot.run(Params.model_validate(params))
    assert manifest["eval"]["sets"]["msmarco"]["judged_queries"] == 5
    assert read_eval_snapshot() == {"msmarco": data}


def test_trec_qrels_as_nist_ships_them_give_the_tab_separated_files_metrics(shared, cut_beir, tmp_path):
    """TREC-DL19's judgements written as NIST distributes them (`qid 0 docid rel`, space-separated,
    no header, grade-0 rows kept, in qrels/test.txt) read as the BEIR tab-separated file with the same
    judgements, and splade-tiny's metrics on both are equal; a line of another width names its line."""
    import shutil

    from sentence_transformers import SparseEncoder

    from pipeline.evaluation import scoring

    beir = cut_beir("trec-dl19-subset", queries=2, extra_docs=20)
    tab = read_retrieval_set(beir, "test")
    nist = tmp_path / "nist"
    shutil.copytree(beir, nist)
    (nist / "qrels/test.tsv").unlink()
    lines = [f"{q} 0 {d} {grade}" for q, docs in tab.qrels.items() for d, grade in docs.items()]
    lines += [f"{q}  0  {next(iter(tab.corpus))}   0" for q in tab.qrels]  # judged not relevant, wider gaps
    (nist / "qrels/test.txt").write_text("\n".join(lines) + "\n")
    trec = read_retrieval_set(nist, "test")
    assert trec == tab and {1, 2} <= {grade for docs in trec.qrels.values() for grade in docs.values()}

    model = SparseEncoder(str(shared / "models/splade-tiny"))
    model.max_seq_length = 128
    vectors = scoring.encode(model, "splade-tiny", tab, 32, scoring.Sharding(tmp_path / "shards", 100_000, 0, 1), False)
    metrics = {name: scoring.retrieval_scores(vectors, data).metrics for name, data in (("tab", tab), ("trec", trec))}
    assert metrics["trec"] == metrics["tab"] and 0 < metrics["tab"]["dot_graded_ndcg@10"] < 1

    (nist / "qrels/test.txt").write_text("\n".join(lines[:3] + [lines[3].rsplit(" ", 1)[0]] + lines[4:]) + "\n")
    with pytest.raises(SourceError, match=r"qrels/test.txt: delimited_rows failed: line 4 has 3 fields, not 4"):
        read_retrieval_set(nist, "test")


def test_a_corpus_digest_built_a_chunk_at_a_time_equals_the_whole_frames():
    """The evaluate stage names a corpus's vector shards by this digest without a frame of all its
    texts: chunks of 3 rows give the digest of the whole (id, text) frame, and one changed text,
    or the same texts under swapped ids, another."""
    from pipeline.data.snapshots import id_texts_digest

    texts = {f"d{i}": f"text number {i}" for i in range(10)}
    whole = frame_digest(pd.DataFrame({"id": list(texts), "text": list(texts.values())}, dtype=str))
    assert id_texts_digest(texts, chunk_rows=3) == id_texts_digest(texts) == whole
    assert id_texts_digest({**texts, "d7": "text number 8"}, chunk_rows=3) != whole
    assert id_texts_digest({**texts, "d0": texts["d1"], "d1": texts["d0"]}, chunk_rows=3) != whole


def test_an_evaluation_snapshot_reads_its_texts_back_a_row_group_at_a_time(tmp_path, monkeypatch):
    """The snapshot's Parquet evaluation set reads back equal to what was written (ids in order,
    texts, grades); its corpus holds only the ids: a range of rows reads only the row groups that
    hold it (here of 4 rows), and walking the texts in order reads each row group once."""
    from pipeline.data import snapshots
    from pipeline.data.sources import RetrievalSet

    monkeypatch.setattr(snapshots, "TEXT_ROW_GROUP", 4)
    corpus = {f"d{i}": f"text é {i}" for i in (7, 3, 11, 0, 5, 9, 2, 8, 1, 10, 4)}  # not in id order
    written = RetrievalSet(corpus, {"q1": "a question", "q2": "another"}, {"q1": {"d3": 2, "d9": 1}, "q2": {"d0": 1}})
    snapshots.write_eval_set(written, tmp_path / "set")
    data = snapshots.read_eval_set(tmp_path / "set")
    assert data == written and list(data.corpus) == list(corpus) and list(data.corpus.values()) == list(corpus.values())
    assert data.qrels == {"q1": {"d3": 2, "d9": 1}, "q2": {"d0": 1}}
    reads = []
    read_row_group = data.corpus.file.read_row_group
    monkeypatch.setattr(data.corpus.file, "read_row_group", lambda group, **kw: reads.append(group) or read_row_group(group, **kw))
    assert snapshots.texts_between(data.corpus, 5, 9) == list(corpus.values())[5:9] and reads == [1, 2]
    reads.clear()
    assert "d3" in data.corpus and "d99" not in data.corpus and reads == []  # the ids answer, no text read
    assert [data.corpus[d] for d in corpus] == list(corpus.values()) and reads == [0, 1, 2]
    assert snapshots.texts_between(corpus, 3, 9) == list(corpus.values())[3:9]  # a dict, by position


def test_the_evaluation_sets_digest_is_the_sorted_frames_without_building_them(shared):
    """The manifest's evaluation sha256 (the evaluation's identity in the registry) keeps its value:
    each part's rows sorted and hashed as frames, as before, here from the texts a chunk at a time;
    any order of the same rows gives it, and one changed text another."""
    import hashlib

    from pipeline.data.snapshots import retrieval_sets_digest
    from pipeline.data.sources import RetrievalSet

    data = read_retrieval_set(shared / "data/beir/scifact", "test")
    expected = hashlib.sha256(b"scifact\x1e")
    frames = [pd.DataFrame({"id": list(texts), "text": list(texts.values())}, dtype=str)
              for texts in (data.corpus, data.queries)]
    frames.append(pd.DataFrame([(q, d, str(g)) for q, docs in data.qrels.items() for d, g in docs.items()],
                               columns=["query", "doc", "grade"], dtype=str))
    for frame in frames:
        expected.update(frame_digest(frame.sort_values(list(frame.columns), ignore_index=True)).encode())
    assert retrieval_sets_digest({"scifact": data}) == expected.hexdigest()
    shuffled = RetrievalSet(dict(reversed(list(data.corpus.items()))), data.queries, data.qrels)
    assert retrieval_sets_digest({"scifact": shuffled}) == expected.hexdigest()
    first = next(iter(data.corpus))
    assert retrieval_sets_digest({"scifact": RetrievalSet({**data.corpus, first: "changed"}, data.queries,
                                                          data.qrels)}) != expected.hexdigest()


JSONL_CORPORA = {
    "valid": ['{"_id": "d1", "title": "T", "text": "one"}', '{"_id": 2, "text": " two "}', '{"_id": 3.0, "text": "x"}'],
    "no titles": ['{"_id": "d1", "text": " one "}', '{"_id": "d2", "text": null}'],
    "missing id": ['{"_id": "d1", "text": "a"}', '{"text": "b"}', '{"_id": null, "text": "c"}'],
    "id a list": ['{"_id": ["d1"], "text": "a"}', '{"_id": "d2", "text": 5}'],
    "text a number": ['{"_id": "d1", "text": "a"}', '{"_id": "d2", "text": 5}', '{"_id": "d3", "text": true}'],
    "title an object": ['{"_id": "d1", "text": "a", "title": {"x": 1}}'],
    "no text field": ['{"_id": "d1", "body": "a"}', '{"_id": "d2", "content": "b"}'],
    "repeated ids": ['{"_id": "d1", "text": "a"}', '{"_id": "d2", "text": "b"}', '', '{"_id": "d1", "text": "c"}',
                     '{"_id": "d2", "text": "d"}', '{"_id": 7, "text": "e"}', '{"_id": "7", "text": "f"}'],
    "not json": ['{"_id": "d1", "text": "a"}', '{"_id": "d2", "text": '],
    "empty": [],
}


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_id_based_rows_in_a_text_file_are_read_a_chunk_at_a_time_as_the_whole_file_would_be(
        workdir, shared, fmt, monkeypatch):
    """An id-based rows file (tsv with a header, or jsonl) read two rows at a time: the ids of every
    chunk text (numbers or not), the scores numbers, the table the parquet reader gives; a bad
    score or a missing id in a later chunk named by its line."""
    from pipeline.data import sources

    monkeypatch.setattr(sources, "SOURCE_CHUNK_ROWS", 2)
    collection = shared / "data/msmarco-toy-triplets/collection.tsv"
    queries = workdir / "queries.tsv"
    queries.write_text("q1\twhat is the manhattan project\n7\twho built the bomb\n")
    rows = [{"query_id": "q1", "positive_id": "0", "negative_id": "5", "score": "3.5"},
            {"query_id": "7", "positive_id": "1", "negative_id": "2", "score": "-1"},
            {"query_id": 7, "positive_id": 3, "negative_id": 4, "score": 0.25},
            {"query_id": "q1", "positive_id": 2, "negative_id": "0", "score": 2}]
    path = workdir / f"margins.{fmt}"

    def write(rows: list[dict]) -> None:
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            path.write_text("query_id\tpositive_id\tnegative_id\tscore\n"
                            + "".join("\t".join(str(v) for v in row.values()) + "\n" for row in rows))

    def load(source):
        return load_training(TrainDataConfig(source=str(source), kind="scored", corpus=str(collection),
                                             queries=str(queries)))

    write(rows)
    expected = workdir / "margins.parquet"
    pd.DataFrame([{k: str(v) for k, v in row.items()} for row in rows]).astype({"score": float}).to_parquet(expected)
    assert load(path).table.equals(load(expected).table)
    assert load(path).table.column("query_id").to_pylist() == ["q1", "7", "7", "q1"]
    write(rows[:3] + [{**rows[3], "score": "high"}])
    with pytest.raises(SourceError, match=rf"line {5 if fmt == 'tsv' else 4}: score 'high' is not a number"):
        load(path)
    if fmt == "jsonl":
        write(rows[:3] + [{k: v for k, v in rows[3].items() if k != "negative_id"}])
        with pytest.raises(SourceError, match=r"line 4: negative_id is missing, not an id"):
            load(path)


TSV_CORPORA = {  # MS MARCO's collection.tsv / queries.tsv layout: id, tab, text, no header, no quoting
    "valid": b'\xef\xbb\xbf0\tone "quoted" text\n1\tNA\r\n\n2\t  spaced  \n',
    "repeated ids": b"0\ta\n1\tb\n0\tc\n",
    "a field short": b"0\ta\n1\n",
    "a field more": b"0\ta\n1\tb\tc\n",
    "not utf-8": b"0\ta\n1\tcaf\xe9\n",
    "empty": b"",
}


@pytest.mark.parametrize("case", list(TSV_CORPORA))
def test_a_tsv_corpus_read_lazily_gives_the_table_readers_texts_and_errors(case, tmp_path):
    """MS MARCO's collection.tsv read lazily (its ids held, its lines read again when asked) gives the
    texts pandas' reader gives, or refuses it naming the file and the same line (the same message,
    but for a line with a field too many, which pandas words its own way), and an empty file too."""
    from pipeline.data.sources import TsvTexts, id_texts, read_delimited

    path = tmp_path / "collection.tsv"
    path.write_bytes(TSV_CORPORA[case])
    outcomes = []
    for read in (lambda: id_texts(read_delimited(path, "\t", ["_id", "text"]), path), lambda: TsvTexts(path)):
        try:
            outcomes.append(dict(read().items()))
        except SourceError as exc:
            outcomes.append(str(exc))
    if case == "valid":
        texts = TsvTexts(path)
        assert outcomes[0] == outcomes[1] == {"0": 'one "quoted" text', "1": "NA", "2": "  spaced  "}
        assert texts.between(1, 5) == ["NA", "  spaced  "] and texts["2"] == "  spaced  " and "3" not in texts
    elif case == "a field more":
        assert all(str(path) in outcome and "line 2" in outcome for outcome in outcomes), outcomes
    elif case == "empty":  # the table reader read no texts, and said nothing
        assert outcomes == [{}, f"{path}: not_empty failed: no rows (the file is empty)"]
    else:
        assert outcomes[0] == outcomes[1] and str(path) in outcomes[0]


@pytest.mark.parametrize("case", list(JSONL_CORPORA))
def test_a_corpus_read_lazily_gives_the_whole_frame_readers_texts_and_errors(case, tmp_path):
    """A BEIR corpus file read lazily (its ids held, its texts read again when asked) gives the texts
    the frame reader gives (title and text joined), or refuses it with the same message."""
    from pipeline.data.sources import JsonlTexts, id_texts, read_jsonl

    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(JSONL_CORPORA[case]) + "\n")
    outcomes = []
    for read in (lambda: id_texts(read_jsonl(path), path), lambda: JsonlTexts(path)):
        try:
            outcomes.append(dict(read().items()))
        except SourceError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]
    if case in ("valid", "no titles"):
        texts = JsonlTexts(path)
        assert outcomes[0] == dict(texts.items()) == {d: texts[d] for d in texts} and "d9" not in texts
        assert texts.between(1, 5) == list(outcomes[0].values())[1:]
    else:
        assert isinstance(outcomes[0], str) and str(path) in outcomes[0]
