import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.cli import StageError
from pipeline.config import (
    RECORDS_DIR,
    TEACHER_SCORED,
    TEACHER_SHARDS_DIR,
    Params,
    TeacherConfig,
    TrainDataConfig,
)
from pipeline.data.shards import wait_for_shards
from pipeline.data.snapshots import read_training_snapshot
from pipeline.data.sources import load_training
from pipeline.modelling import teachers
from pipeline.stages import snapshot, teacher, validate
from tests.helpers.project import with_changes

TOY_TRIPLETS = "data/msmarco-toy-triplets/triplets.tsv"


def test_lexicon_teacher_knows_synonyms_that_bm25_misses():
    documents = ["kalo mife zeru", "pato nise gura", "zeru gura lemo"]
    plain = teachers.LexiconBM25(documents, {})
    knowing = teachers.LexiconBM25(documents, {"bodu": "kalo", "firu": "mife"})
    assert plain.scores("bodu firu")[0] == 0
    scores = knowing.scores("bodu firu")
    assert scores[0] > 0 and scores[1] == scores[2] == 0


def test_quickstart_labels_are_margins(workdir, tiny_params):
    snapshot.run(tiny_params)
    validate.run(tiny_params)
    metrics = teacher.run(tiny_params)
    scored = pd.read_parquet(TEACHER_SCORED)
    assert np.allclose(scored["label"], scored["positive_score"] - scored["negative_score"])
    # the teacher knows relevance: positives outrank negatives, and it ranks the held-out set well
    assert metrics["margin_positive_fraction"] > 0.95
    assert metrics["eval_dot_ndcg@10"] > 0.9
    assert metrics["unique_pairs"] < metrics["pair_occurrences"]


def test_unique_pairs_index_every_row_and_column():
    frame = pd.DataFrame({"query": ["q1", "q1", "q2"], "positive": ["a", "a", "a"],
                          "negative": ["b", "c", "b"]})
    pairs, index = teachers.unique_pairs(frame)
    assert list(zip(pairs["query"], pairs["document"])) == [("q1", "a"), ("q2", "a"), ("q1", "b"),
                                                             ("q1", "c"), ("q2", "b")]
    for row, column in [(r, c) for r in range(3) for c in range(2)]:
        pair = pairs.iloc[index[row, column]]
        assert (pair["query"], pair["document"]) == (frame.iloc[row]["query"],
                                                     frame.iloc[row][["positive", "negative"][column]])


def toy_pairs(shared) -> pd.DataFrame:
    frame = load_training(TrainDataConfig(source=str(shared / TOY_TRIPLETS),
                                          columns=["query", "positive", "negative"]))
    pairs, _ = teachers.unique_pairs(frame)
    return pairs


def test_cross_encoder_scores_are_raw_logits_of_the_library(cross_encoder, shared):
    from sentence_transformers import CrossEncoder

    pairs = toy_pairs(shared)
    ours = teachers.CrossEncoderTeacher(TeacherConfig(kind="cross-encoder", model=str(cross_encoder),
                                                     precision="fp32")).score(pairs, batch_size=16)
    model = CrossEncoder(str(cross_encoder))
    as_list = list(zip(pairs["query"], pairs["document"]))
    reference = model.predict(as_list, activation_fn=torch.nn.Identity())
    assert len(pairs) == 200 and ours.std() > 0.1  # every pair of the file, and scores that differ
    assert np.abs(ours - reference).max() < 1e-4
    assert np.abs(np.roll(ours, 1) - reference).max() > 1e-2  # order matters at this tolerance
    # raw logits: the library's default output is their sigmoid
    assert np.abs(1 / (1 + np.exp(-ours)) - model.predict(as_list)).max() < 1e-4


def test_bf16_mode_stays_close_to_fp32(cross_encoder, shared):
    pairs = toy_pairs(shared).head(64)
    scores = {precision: teachers.CrossEncoderTeacher(TeacherConfig(
        kind="cross-encoder", model=str(cross_encoder), precision=precision)).score(pairs, 16)
        for precision in ("fp32", "bf16")}
    deviation = np.abs(scores["bf16"] - scores["fp32"])
    assert 0 < deviation.max() < 0.1 * scores["fp32"].std()


def test_hub_teacher_must_be_pinned():
    with pytest.raises(StageError, match="pin it with teacher.revision"):
        teachers.CrossEncoderTeacher(TeacherConfig(kind="cross-encoder",
                                                  model="cross-encoder/ms-marco-MiniLM-L6-v2"))


def stage_params(tiny_params: Params, source, model, shard_size: int, kind: str = "triplets",
                 teacher_kind: str = "cross-encoder", **teacher_overrides) -> Params:
    data = tiny_params.model_dump(by_alias=True)
    data["snapshot"]["train"].update(source=str(source), kind=kind)
    data["teacher"].update(kind=teacher_kind, model=str(model), shard_size=shard_size,
                           precision="fp32", **teacher_overrides)
    return Params.model_validate(data)


def write_rows(path, rows: pd.DataFrame):
    rows.to_json(path, orient="records", lines=True, force_ascii=False)
    return path


def test_stage_scores_many_negatives_once_and_resumes_from_shards(workdir, tiny_params, shared,
                                                                 cross_encoder):
    from sentence_transformers import CrossEncoder

    toy = load_training(TrainDataConfig(source=str(shared / TOY_TRIPLETS),
                                        columns=["query", "positive", "negative"]))
    # two negatives per row, and each (query, positive) in two rows, as hard-negative sets have it
    rows = pd.concat([toy.assign(negative_2=np.roll(toy["negative"], 1)),
                      toy.assign(negative=np.roll(toy["negative"], 2),
                                 negative_2=np.roll(toy["negative"], 3))], ignore_index=True)
    params = stage_params(tiny_params, write_rows(workdir / "rows.jsonl", rows), cross_encoder, 64)
    snapshot.run(params)
    validate.run(params)
    metrics = teacher.run(params)
    scored = pd.read_parquet(TEACHER_SCORED)

    distinct = {(r["query"], r[c]) for _, r in rows.iterrows() for c in ("positive", "negative", "negative_2")}
    assert metrics["pair_occurrences"] == 3 * len(rows) and metrics["unique_pairs"] == len(distinct)
    assert len(distinct) < 0.8 * 3 * len(rows)
    assert metrics["pairs_scored"] == metrics["unique_pairs"]
    model = CrossEncoder(str(cross_encoder))
    for column in ("positive", "negative", "negative_2"):
        reference = model.predict(list(zip(scored["query"], scored[column])),
                                  activation_fn=torch.nn.Identity())
        assert np.abs(scored[f"{column}_score"] - reference).max() < 1e-4
    labels = np.stack(scored["label"].to_numpy())
    assert labels.shape == (len(rows), 2)
    assert np.allclose(labels[:, 1], scored["positive_score"] - scored["negative_2_score"])
    assert np.allclose(np.stack(scored["scores"].to_numpy())[:, 2], scored["negative_2_score"])
    facts = json.loads((RECORDS_DIR / "teacher.json").read_text())["facts"]["teacher"]
    weights = hashlib.sha256(b"model.safetensors\x00" + (cross_encoder / "model.safetensors").read_bytes()).hexdigest()
    assert facts["model"] == str(cross_encoder) and facts["weights_sha256"] == weights
    shards = sorted(TEACHER_SHARDS_DIR.glob("*-of-*.parquet"))
    assert len(shards) == metrics["shards"] == -(-metrics["unique_pairs"] // 64)

    again = teacher.run(params)  # nothing left to score: every shard is reused
    assert again["pairs_scored"] == 0 and again["shards_reused"] == metrics["shards"]
    pd.testing.assert_frame_equal(pd.read_parquet(TEACHER_SCORED), scored)

    other = stage_params(tiny_params, workdir / "rows.jsonl", cross_encoder, 50)
    assert teacher.run(other)["shards_reused"] == 0  # another shard plan is not mixed in
    assert not set(shards) & set(TEACHER_SHARDS_DIR.iterdir())  # the stale plan's shards are gone


def test_id_based_triplets_are_scored_as_the_same_rows_given_as_texts(workdir, tiny_params, shared, cross_encoder,
                                                                     monkeypatch):
    """Id-based triplets scored by a model teacher: each unique (query id, passage id) pair scored
    once, its texts joined a shard at a time, the rows kept as ids, with the scores, score lists and
    margins the same rows given as texts get; a rerun reuses every shard."""
    toy = load_training(TrainDataConfig(source=str(shared / TOY_TRIPLETS),
                                        columns=["query", "positive", "negative"]))
    rows = pd.concat([toy.assign(negative_2=np.roll(toy["negative"], 1)),
                      toy.assign(negative=np.roll(toy["negative"], 2), negative_2=np.roll(toy["negative"], 3))],
                     ignore_index=True)
    queries = {text: f"q{i}" for i, text in enumerate(rows["query"].unique())}
    documents = {text: str(i) for i, text in
                 enumerate(pd.concat([rows[c] for c in ("positive", "negative", "negative_2")]).unique())}
    ids = pd.DataFrame({"query_id": rows["query"].map(queries),
                        **{f"{c}_id": rows[c].map(documents) for c in ("positive", "negative", "negative_2")}})
    for name, texts in (("queries", queries), ("corpus", documents)):  # in another order than the rows
        (workdir / f"{name}.tsv").write_text("".join(f"{i}\t{t}\n" for t, i in reversed(texts.items())))
    scored = {}
    for given, frame in (("texts", rows), ("ids", ids)):
        params = with_changes(stage_params(tiny_params, write_rows(workdir / f"{given}.jsonl", frame), cross_encoder, 64),
                              snapshot={"train": {"corpus": str(workdir / "corpus.tsv"),
                                                  "queries": str(workdir / "queries.tsv")}})
        (workdir / given).mkdir()
        monkeypatch.chdir(workdir / given)
        snapshot.run(params)
        validate.run(params)
        metrics = teacher.run(params)
        scored[given] = (pd.read_parquet(TEACHER_SCORED), metrics)
        assert teacher.run(params)["shards_reused"] == metrics["shards"] > 1
    (texts, text_metrics), (by_id, id_metrics) = scored["texts"], scored["ids"]
    assert by_id.columns.tolist() == ["query_id", "positive_id", "negative_id", "negative_2_id", "positive_score",
                                      "negative_score", "negative_2_score", "scores", "label"]
    assert id_metrics["unique_pairs"] == text_metrics["unique_pairs"] < 0.8 * 3 * len(rows)
    for column in ("positive_score", "negative_score", "negative_2_score", "scores", "label"):
        assert np.array_equal(np.stack(by_id[column].to_numpy()), np.stack(texts[column].to_numpy())), column


def test_scored_snapshot_passes_its_labels_through(workdir, tiny_params, shared):
    toy = load_training(TrainDataConfig(source=str(shared / TOY_TRIPLETS),
                                        columns=["query", "positive", "negative"]))
    rows = toy.assign(score=np.arange(len(toy)) / 8 - 6)  # exact in JSON
    params = stage_params(tiny_params, write_rows(workdir / "scored.jsonl", rows), "no-such-model",
                          64, kind="scored")
    snapshot.run(params)
    validate.run(params)
    assert teacher.run(params)["pairs_scored"] == 0
    scored = pd.read_parquet(TEACHER_SCORED)
    assert scored["label"].tolist() == rows["score"].tolist()


def test_bi_encoder_mines_hard_negatives_for_pairs_and_scores_them(workdir, tiny_params, shared,
                                                                   tiny_dense_model):
    """Pairs in, (query, positive, 2 negatives) out: the negatives are the teacher's nearest other
    positives (never one of the query's own), and every score is the model's own similarity times
    teacher.score_scale."""
    from sentence_transformers import SentenceTransformer

    rows = scifact_rows(shared, 60)[["query", "positive"]]
    rows = pd.concat([rows, rows.iloc[:5].assign(positive=rows["positive"].iloc[5:10].to_numpy())],
                     ignore_index=True)  # 5 queries with two positives each
    params = stage_params(tiny_params, write_rows(workdir / "pairs.jsonl", rows), tiny_dense_model,
                          50, kind="pairs", teacher_kind="bi-encoder", hard_negatives=2, score_scale=2.5)
    snapshot.run(params)
    validate.run(params)
    metrics = teacher.run(params)
    scored = pd.read_parquet(TEACHER_SCORED)

    pairs = read_training_snapshot()
    assert len(scored) == len(pairs) and metrics["pairs_scored"] == metrics["unique_pairs"]
    own = rows.groupby("query")["positive"].apply(set)
    pool = set(rows["positive"])
    model = SentenceTransformer(str(tiny_dense_model))
    for column in ("negative", "negative_2"):
        assert all(n in pool and n not in own[q] for q, n in zip(scored["query"], scored[column]))
    for column in ("positive", "negative", "negative_2"):
        expected = model.similarity_pairwise(
            model.encode_query(scored["query"].tolist(), convert_to_tensor=True),
            model.encode_document(scored[column].tolist(), convert_to_tensor=True)).numpy()
        assert np.abs(scored[f"{column}_score"].to_numpy() - 2.5 * expected).max() < 1e-5
    # hard: the first mined negative is the teacher's nearest non-positive, so it outscores the second
    assert (scored["negative_score"] >= scored["negative_2_score"]).all()
    assert np.allclose(np.stack(scored["label"]),
                       scored[["positive_score"]].to_numpy() - scored[["negative_score", "negative_2_score"]].to_numpy())

    data = params.model_dump(by_alias=True)
    data["teacher"].update(kind="cross-encoder")
    with pytest.raises(ValueError, match="bi-encoder"):
        Params.model_validate(data)


def scifact_rows(shared, queries: int) -> pd.DataFrame:
    """SciFact-length documents: (query, positive, negative) with a neighbouring doc as negative."""
    corpus = [json.loads(line) for line in (shared / "data/beir/scifact/corpus.jsonl").open()]
    texts = [f"{d['title']} {d['text']}" for d in corpus]
    position = {d["_id"]: i for i, d in enumerate(corpus)}
    query_text = {q["_id"]: q["text"] for q in map(json.loads, (shared / "data/beir/scifact/queries.jsonl").open())}
    qrels = pd.read_csv(shared / "data/beir/scifact/qrels/train.tsv", sep="\t", dtype=str)
    qrels = qrels.drop_duplicates("query-id").head(queries)
    rows = pd.DataFrame({"query": [query_text[q] for q in qrels["query-id"]],
                         "positive": [texts[position[d]] for d in qrels["corpus-id"]],
                         "negative": [texts[(position[d] + 7) % len(texts)] for d in qrels["corpus-id"]]})
    return rows.drop_duplicates().reset_index(drop=True)  # SciFact repeats a claim under two ids


def run_stage_process(workdir, params: Params, env: dict | None = None, torchrun: int = 0):
    (workdir / "params.yaml").write_text(yaml.safe_dump(params.model_dump(by_alias=True, mode="json")))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc-per-node={torchrun}"] if torchrun else [sys.executable])
    return subprocess.Popen(launcher + ["-m", "pipeline.stages.teacher", "--params", "params.yaml"],
                            cwd=workdir, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(process) -> str:
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    return output


@pytest.fixture
def scifact_stage(workdir, tiny_params, shared, cross_encoder):
    rows = scifact_rows(shared, 120)
    params = stage_params(tiny_params, write_rows(workdir / "rows.jsonl", rows), cross_encoder, 20)
    snapshot.run(params)
    validate.run(params)
    return params


def scores_file(workdir) -> pd.DataFrame:
    return pd.read_parquet(workdir / TEACHER_SCORED)


@pytest.mark.e2e
def test_kill_half_way_then_rerun_loses_at_most_one_shard_and_two_processes_match_one(workdir, scifact_stage):
    teacher.run(scifact_stage)  # uninterrupted, in this process
    uninterrupted = scores_file(workdir)
    shard_files = sorted((workdir / TEACHER_SHARDS_DIR).glob("*-of-*.parquet"))
    total = len(shard_files)
    for path in shard_files:
        path.unlink()

    process = run_stage_process(workdir, scifact_stage)
    while len(list((workdir / TEACHER_SHARDS_DIR).glob("*-of-*.parquet"))) < total // 2:
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # kill -9
    process.wait()
    survivors = {p: p.stat().st_mtime_ns for p in (workdir / TEACHER_SHARDS_DIR).glob("*-of-*.parquet")}
    assert total // 2 <= len(survivors) < total

    teacher.run(scifact_stage)  # the rerun
    record = json.loads((workdir / "records/teacher.json").read_text())
    assert record["metrics"]["shards_reused"] == len(survivors)
    assert record["metrics"]["shards_scored"] == total - len(survivors)
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in survivors.items())  # not redone
    pd.testing.assert_frame_equal(scores_file(workdir), uninterrupted)  # bit for bit

    # the same shards split between two processes (torchrun): the same scores
    for path in (workdir / TEACHER_SHARDS_DIR).iterdir():
        path.unlink()
    (workdir / TEACHER_SCORED).unlink()
    output = finished(run_stage_process(workdir, scifact_stage, torchrun=2))
    record = json.loads((workdir / "records/teacher.json").read_text())
    assert record["metrics"]["shards"] == total and record["metrics"]["shards_scored"] == (total + 1) // 2
    assert "rank 1/2" in output  # rank 1 scored the other half
    pd.testing.assert_frame_equal(scores_file(workdir), uninterrupted)

    # bf16 forced on this CPU under torchrun: shards of their own (bf16 names them), every rank
    # autocasts, and the scores stay close to fp32's
    finished(run_stage_process(workdir, with_changes(scifact_stage, teacher={"precision": "bf16"}), torchrun=2))
    record = json.loads((workdir / "records/teacher.json").read_text())
    assert record["metrics"]["shards_reused"] == 0 and record["metrics"]["shards_scored"] == (total + 1) // 2
    scores, exact = (frame.select_dtypes("floating").to_numpy() for frame in (scores_file(workdir), uninterrupted))
    # the labels are margins: the difference of two scores, each rounded to bf16 (8 bits of mantissa)
    assert 0 < np.abs(scores - exact).max() < 0.25 * exact.std()


def shard_times(workdir) -> dict:
    return {p: p.stat().st_mtime_ns for p in (workdir / TEACHER_SHARDS_DIR).glob("*-of-*.parquet")}


def wait_for_shard_files(workdir, process, count: int) -> None:
    while len(shard_times(workdir)) < count:
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.01)


@pytest.mark.e2e
def test_ray_workers_score_what_one_process_does_a_lost_node_is_survived_and_a_killed_run_resumes(
        workdir, scifact_stage, ray_cluster):
    """teacher.backend ray on a local two-node cluster: the same scores as one process, bit for bit;
    a node killed mid-run hands its shard to the other; the stage killed mid-run keeps its shards,
    and the rerun scores only the missing ones."""
    teacher.run(scifact_stage)
    uninterrupted = scores_file(workdir)
    total = len(shard_times(workdir))
    assert total >= 8
    for path in (workdir / TEACHER_SHARDS_DIR).iterdir():
        path.unlink()
    on_ray = scifact_stage.model_copy(update={"teacher": scifact_stage.teacher.model_copy(update={"backend": "ray"})})
    env = {"RAY_ADDRESS": ray_cluster.address}

    process = run_stage_process(workdir, on_ray, env)
    wait_for_shard_files(workdir, process, 1)
    ray_cluster.kill(ray_cluster.nodes[-1])  # a lost machine, its worker with it
    output = finished(process)
    ray_cluster.wait_for_nodes(1)  # the next run's workers: where the cluster knows there is room
    record = json.loads((workdir / "records/teacher.json").read_text())["metrics"]
    assert record["ray_workers"] == 2 and record["shards_scored"] == total
    assert record["shards_redone"] == 1 and "a Ray worker died on shard" in output
    pd.testing.assert_frame_equal(scores_file(workdir), uninterrupted)

    for path in (workdir / TEACHER_SHARDS_DIR).iterdir():
        path.unlink()
    killed = run_stage_process(workdir, on_ray, env)
    wait_for_shard_files(workdir, killed, total // 2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    survivors = shard_times(workdir)
    assert total // 2 <= len(survivors) < total
    finished(run_stage_process(workdir, on_ray, env))
    record = json.loads((workdir / "records/teacher.json").read_text())["metrics"]
    assert record["shards_reused"] == len(survivors) and record["shards_scored"] == total - len(survivors)
    assert all(shard_times(workdir)[path] == mtime for path, mtime in survivors.items())  # not redone
    pd.testing.assert_frame_equal(scores_file(workdir), uninterrupted)


def test_teacher_refuses_a_snapshot_whose_validation_failed_or_is_missing(workdir, tiny_params, shared):
    """`dvc repro --single-item teacher` after a failed validation (or none) labels nothing."""
    toy = load_training(TrainDataConfig(source=str(shared / TOY_TRIPLETS), columns=["query", "positive", "negative"]))
    bad = toy.assign(positive=toy["query"])  # every positive equals its query: an error
    params = stage_params(tiny_params, write_rows(workdir / "bad.jsonl", bad), "no-such-model", 64)
    snapshot.run(params)
    with pytest.raises(StageError, match="validate the snapshot first"):
        teacher.run(params)  # no report yet
    with pytest.raises(StageError, match="check_query_equals_positive"):
        validate.run(params)
    with pytest.raises(StageError, match=r"failed validation \(1 error\(s\): query_is_positive; see "
                                         r"data/validation/report.json\)"):
        teacher.run(params)
    assert not TEACHER_SCORED.exists()

    good = stage_params(tiny_params, write_rows(workdir / "good.jsonl", toy), "no-such-model", 64)
    snapshot.run(good)  # a new snapshot: the failed report is another snapshot's
    with pytest.raises(StageError, match="the report of another snapshot"):
        teacher.run(good)


def test_waits_are_bounded_and_name_the_missing_shards_and_ranks(workdir, cross_encoder, shared):
    """Rank 0 stops waiting for a dead rank's shards, naming them; a helper rank stops waiting for
    rank 0's batch-size plan; the plan has one writer, rank 0."""
    cfg = TeacherConfig(kind="cross-encoder", model=str(cross_encoder), precision="fp32", shard_size=40,
                        wait_seconds=0.5)
    scorer = teachers.CrossEncoderTeacher(cfg)
    plan = teachers.ShardPlan(TEACHER_SHARDS_DIR, toy_pairs(shared), scorer)  # 200 pairs: 5 shards
    teachers.score_shards(scorer, plan, rank=0, world_size=2)  # shards 0, 2, 4; rank 1 never comes
    started = time.monotonic()
    with pytest.raises(StageError, match=r"shard\(s\) \[1, 3\] of 5 .* owed by rank\(s\) \[1\] of 2"):
        wait_for_shards(plan, world_size=2, wait_seconds=0.5, command="python -m pipeline.stages.teacher",
                        poll_seconds=0.1)
    assert time.monotonic() - started < 5

    other = teachers.ShardPlan(workdir / "other-shards", toy_pairs(shared).head(80), scorer)
    with pytest.raises(StageError, match="rank 1: rank 0's batch-size plan .* did not appear within 0.5 s"):
        other.batch_size(scorer, rank=1)  # batch_size auto: only rank 0 decides it
    assert other.batch_size(scorer, rank=0) == teachers.CPU_BATCH_SIZE == other.batch_size(scorer, rank=1)
    assert [p.name for p in other.folder.iterdir()] == [f"{other.digest}-plan.json"]  # no temporary left


def test_kl_div_trains_on_user_score_lists(workdir, tiny_params, shared):
    """A scored file whose score is a list per row ([positive, negative, negative_2]): the teacher
    stage passes the lists through as KL-div's labels (and their margins as MarginMSE's), and the
    student trains on them."""
    from pipeline.data.snapshots import training_rows
    from pipeline.stages import train

    toy = load_training(TrainDataConfig(source=str(shared / TOY_TRIPLETS),
                                        columns=["query", "positive", "negative"]))
    rows = toy.assign(negative_2=np.roll(toy["negative"].to_numpy(), 1),
                      scores=[[8 - i / 8, 1 + i / 16, -i / 32] for i in range(len(toy))])  # exact in JSON
    params = stage_params(tiny_params, write_rows(workdir / "kl.jsonl", rows), "no-such-model", 64, kind="scored")
    data = params.model_dump(by_alias=True)
    data["train"].update(loss="kl-div", epochs=1)
    params = Params.model_validate(data)
    snapshot.run(params)
    validate.run(params)
    assert teacher.run(params)["pairs_scored"] == 0
    scored = pd.read_parquet(TEACHER_SCORED)
    assert np.stack(scored["scores"]).tolist() == rows["scores"].tolist()
    assert np.stack(scored["label"]).tolist() == [[s[0] - s[1], s[0] - s[2]] for s in rows["scores"]]
    assert np.stack(training_rows(params.train, scored)["label"]).tolist() == rows["scores"].tolist()
    metrics = train.run(params)
    history = json.loads((RECORDS_DIR / "train.json").read_text())["facts"]["log_history"]
    losses = [e["base_loss"] for e in history if "base_loss" in e]
    assert metrics["steps"] == len(losses) > 0 and np.isfinite(losses).all()


def test_kl_div_on_single_scores_stops_at_validate(workdir, tiny_params, shared):
    toy = load_training(TrainDataConfig(source=str(shared / TOY_TRIPLETS),
                                        columns=["query", "positive", "negative"]))
    source = write_rows(workdir / "margins.jsonl", toy.assign(score=1.5))
    data = stage_params(tiny_params, source, "no-such-model", 64, kind="scored").model_dump(by_alias=True)
    data["train"]["loss"] = "kl-div"
    params = Params.model_validate(data)
    snapshot.run(params)
    with pytest.raises(StageError) as err:
        validate.run(params)
    assert "train.loss kl-div" in str(err.value) and str(source) in str(err.value)
    assert not TEACHER_SCORED.exists()
