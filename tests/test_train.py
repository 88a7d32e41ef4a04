import json
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from sentence_transformers import SparseEncoder
from transformers import BertTokenizerFast

from pipeline.config import (
    BASE_MODEL_DIR,
    CHECKPOINTS_DIR,
    RECORDS_DIR,
    STUDENT_DIR,
    TEACHER_SCORED,
    VALIDATION_REPORT,
    Params,
    StudentConfig,
)
from pipeline.modelling import training
from pipeline.modelling.encoders import (
    SPECIAL_TOKENS,
    build_synthetic_mlm,
    csr_encoder,
    wordpiece_vocabulary,
)
from pipeline.stages import snapshot, teacher, train, validate


def test_vocabulary_spells_any_word_and_keeps_frequent_words_whole():
    texts = ["kalo mife kalo", "zeru kalo, mife!"]
    vocabulary = wordpiece_vocabulary(texts, size=100)
    assert vocabulary[:5] == SPECIAL_TOKENS
    characters = {c for c in "kalomifezeru,!"}
    assert characters <= set(vocabulary) and {f"##{c}" for c in characters} <= set(vocabulary)
    words = vocabulary[5 + 2 * len(characters):]
    assert words == ["kalo", "mife", "zeru"]  # by frequency, ties alphabetically
    assert wordpiece_vocabulary(texts, size=5 + 2 * len(characters) + 1)[-1] == "kalo"


def test_synthetic_student_tokenizes_as_trained(tmp_path):
    build_synthetic_mlm(["kalo mife kalo", "zeru kalo mife"], StudentConfig(vocab_size=100, hidden_size=16), 32,
                        tmp_path)
    tokenizer = BertTokenizerFast.from_pretrained(tmp_path)
    assert tokenizer.tokenize("Kalo zeru") == ["kalo", "zeru"]
    assert tokenizer.tokenize("zamo") == ["z", "##a", "##m", "##o"]  # unseen word: spelt, not [UNK]


def prepared(tiny_params, **train_overrides):
    """A workdir with the snapshot and teacher labels in place, and params to train on them."""
    data = tiny_params.model_dump(by_alias=True)
    data["train"].update(train_overrides)
    params = Params.model_validate(data)
    for stage in (snapshot, validate, teacher):
        stage.run(params)
    return params


def test_kl_div_distillation_trains_on_the_teacher_score_lists(workdir, tiny_params):
    params = prepared(tiny_params, loss="kl-div", epochs=2)
    metrics = train.run(params)
    history = json.loads((RECORDS_DIR / "train.json").read_text())["facts"]["log_history"]
    losses = [e["base_loss"] for e in history if "base_loss" in e]
    assert metrics["steps"] == len(losses) and np.isfinite(losses).all()
    # the FLOPS term is warmed up: it starts near zero and grows as its weight does
    regularizer = [e["document_regularizer_loss"] for e in history if "base_loss" in e]
    assert regularizer[0] < regularizer[-1]
    assert SparseEncoder(str(STUDENT_DIR)).encode_query(["a query"]).shape[-1] > 0


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1])
                  for p in (workdir / CHECKPOINTS_DIR).glob("*/checkpoint-*/trainer_state.json"))


TRAIN_COMMAND = [sys.executable, "-m", "pipeline.stages.train", "--params", "params.yaml"]


def write_params(workdir, params: Params) -> None:
    (workdir / "params.yaml").write_text(yaml.safe_dump(params.model_dump(by_alias=True, mode="json")))


def kill_after_checkpoint(workdir, step: int) -> int:
    """Start the train stage and kill -9 it once a checkpoint at `step` or later is complete;
    returns the newest complete checkpoint's step."""
    process = subprocess.Popen(TRAIN_COMMAND, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    while not [s for s in checkpoint_steps(workdir) if s >= step]:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return max(checkpoint_steps(workdir))


def weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.e2e
def test_kill_mid_training_then_rerun_ends_with_the_uninterrupted_runs_weights(workdir, tiny_params):
    """kill -9 mid-training, rerun: the resumed run continues the step count, the optimiser, the
    scheduler, the FLOPS warm-up and the data order, so its final weights equal an uninterrupted
    run's (dropout off: nothing else is random)."""
    student = {**tiny_params.train.student.model_dump(), "dropout": 0.0}
    params = prepared(tiny_params, epochs=10, save_steps=10, student=student)
    train.run(params)
    uninterrupted = weights(workdir / STUDENT_DIR)

    write_params(workdir, params)
    last = kill_after_checkpoint(workdir, 30)  # kill -9
    train.run(params)  # the rerun
    record = json.loads((workdir / RECORDS_DIR / "train.json").read_text())
    steps = 10 * -(-record["facts"]["training_rows"] // 16)
    assert record["metrics"]["resumed_from_step"] == last and 30 <= last < steps  # killed mid-training
    assert record["metrics"]["steps"] == steps
    # the step count continued: one loss per step, 1..N, the first `last` from before the kill
    assert [e["step"] for e in record["facts"]["log_history"] if "loss" in e] == list(range(1, steps + 1))
    assert not checkpoint_steps(workdir)  # finished: nothing left to resume
    resumed = weights(workdir / STUDENT_DIR)
    base = weights(workdir / BASE_MODEL_DIR)
    worst = 0.0
    for name, value in uninterrupted.items():
        assert not torch.equal(value, base[name]) or "bias" in name  # it trained
        assert (resumed[name] - value).abs().max() <= 1e-6 * value.abs().max() + 1e-12, name
        worst = max(worst, float((resumed[name] - value).abs().max() / value.abs().max().clamp_min(1e-12)))
    print(f"\nresumed from step {last} of {steps}: largest relative weight difference {worst:.2e}")


def test_csr_learns_from_pairs_with_in_batch_negatives(workdir, tiny_params, shared, tiny_dense_model):
    toy = pd.read_csv(shared / "data/msmarco-toy-triplets/triplets.tsv", sep="\t", header=None,
                      names=["query", "positive", "negative"])
    toy[["query", "positive"]].to_json(workdir / "pairs.jsonl", orient="records", lines=True)
    data = tiny_params.model_dump(by_alias=True)
    data["snapshot"]["train"].update(source=str(workdir / "pairs.jsonl"), kind="pairs")
    data["train"].update(architecture="csr", base_model=str(tiny_dense_model), loss="mnrl",
                         batch_sampler="no-duplicates", epochs=2, learning_rate=1e-3,
                         csr={"hidden_dim": 128, "k": 8, "k_aux": 16, "beta": 0.1, "gamma": 1.0},
                         max_active_dims=None)
    params = Params.model_validate(data)
    for stage in (snapshot, validate, teacher):
        stage.run(params)
    assert json.loads((RECORDS_DIR / "teacher.json").read_text())["metrics"]["pairs_scored"] == 0
    metrics = train.run(params)
    assert metrics["steps"] == 2 * -(-100 // 16)

    model = SparseEncoder(str(STUDENT_DIR))
    embeddings = model.encode_document(toy["positive"].head(5).tolist(), convert_to_tensor=True).to_dense()
    assert embeddings.shape == (5, 128)
    assert ((embeddings != 0).sum(1) <= 8).all()  # top-k: at most k active dimensions
    # the contrastive loss fell: in-batch negatives were told apart better at the end
    history = json.loads((RECORDS_DIR / "train.json").read_text())["facts"]["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_mnrl_scale_reaches_the_contrastive_loss_inside_csr(tiny_dense_model):
    from pipeline.config import CSRConfig, TrainConfig

    cfg = TrainConfig(architecture="csr", base_model=str(tiny_dense_model), loss="mnrl", mnrl_scale=20,
                      csr=CSRConfig(hidden_dim=64, k=8, k_aux=16), max_active_dims=None)
    rows = pd.DataFrame({"query": ["q"], "positive": ["p"]})
    loss = training.training_loss(cfg, csr_encoder(str(tiny_dense_model), cfg), rows)
    assert loss.loss.scale == 20 and list(train.training_rows(cfg, rows)) == ["query", "positive"]


def test_length_grouped_batches_cover_every_row_once_with_little_padding():
    from datasets import Dataset

    rng = np.random.default_rng(0)
    texts = ["w " * int(n) for n in rng.integers(1, 200, size=1000)]
    dataset = Dataset.from_dict({"query": texts, "label": [0.0] * 1000})
    sampler = training.LengthGroupedBatchSampler(dataset, batch_size=16, drop_last=False,
                                              valid_label_columns=["label"], seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 63
    assert sorted(i for b in batches for i in b) == list(range(1000))
    lengths = np.array([len(t) for t in texts])
    padded = sum(lengths[b].max() * len(b) for b in batches)
    random_padded = sum(lengths[b].max() * len(b) for b in np.array_split(rng.permutation(1000), 63))
    assert padded < 0.7 * random_padded
    assert batches == list(sampler)  # the same batches for the same epoch: resumable
    sampler.set_epoch(1)
    assert batches != list(sampler)


def crash_after_first_checkpoint(monkeypatch) -> None:
    """The train stage's trainer raises once its first checkpoint is complete, as a crash would."""
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise RuntimeError(f"crashed after checkpoint-{state.global_step}")

    build = training.build_trainer

    def crashing(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(Crash())
        return trainer

    monkeypatch.setattr(train, "build_trainer", crashing)


def flat_weights(folder) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in SparseEncoder(str(folder)).parameters()])


def test_bf16_training_on_a_cpu_autocasts_and_lands_near_fp32(workdir, tiny_params, monkeypatch):
    """train.precision bf16 forced on this CPU (transformers refuses bf16 on a CPU unless told
    use_cpu): the stage trains, its weights differ from the fp32 run's (autocast ran), and they
    moved from the start the way fp32's did (the difference a fraction of the distance travelled)."""
    student = {**tiny_params.train.student.model_dump(), "dropout": 0.0}
    weights = {}
    for precision in ("fp32", "bf16"):
        (workdir / precision).mkdir()
        monkeypatch.chdir(workdir / precision)  # each its own checkpoints
        train.run(prepared(tiny_params, precision=precision, student=student))
        weights[precision] = flat_weights(STUDENT_DIR)
    start = flat_weights(BASE_MODEL_DIR)
    apart = float((weights["bf16"] - weights["fp32"]).norm() / (weights["fp32"] - start).norm())
    assert 0 < apart < 0.3, apart


def train_on_two_processes(workdir) -> subprocess.CompletedProcess:
    """The train stage under torchrun: 2 CPU processes (gloo), on workdir's params.yaml."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", "-m", "pipeline.stages.train", "--params", "params.yaml"],
                          cwd=workdir, capture_output=True, text=True)


@pytest.mark.e2e
def test_ddp_on_two_processes_trains_as_one_process_on_the_whole_batch(workdir, tiny_params, monkeypatch):
    """torchrun, 2 CPU processes (gloo), 16 rows each, against one process with 32 rows: the same
    model, because FLOPS is taken over the whole batch (per-process FLOPS would differ). Dropout is
    off so that the only difference is how the batch is split; the regulariser weights are large so
    that FLOPS shapes the result. The checkpoints a crashed one-process run left (batch 16 on one
    process) are not resumed under 2 processes: the global batch differs, and the run says so."""
    student = {**tiny_params.train.student.model_dump(), "dropout": 0.0}
    weights = {"query_regularizer_weight": 0.5, "document_regularizer_weight": 0.3,
               "regularizer_warmup_ratio": 0.0, "epochs": 3, "student": student}
    one = prepared(tiny_params, batch_size=32, **weights)
    train.run(one)
    single = SparseEncoder(str(STUDENT_DIR))

    data = one.model_dump(by_alias=True)
    data["train"].update(batch_size=16, save_steps=2)  # per process
    ddp = Params.model_validate(data)
    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="crashed"):
        crash_after_first_checkpoint(patch)
        train.run(ddp)  # one process, batch 16: crashed, checkpoints left
    left = max(checkpoint_steps(workdir))
    write_params(workdir, ddp)
    ddp = train_on_two_processes(workdir)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    record = json.loads((RECORDS_DIR / "train.json").read_text())
    assert record["metrics"]["steps"] == 3 * -(-record["facts"]["training_rows"] // 32)
    assert record["metrics"]["resumed_from_step"] == 0  # started fresh, and said why:
    (reason,) = record["facts"]["not_resumed"]
    assert f"checkpoint-{left} (another training: global_batch 16 -> 32; world_size 1 -> 2)" in reason
    assert reason in ddp.stderr
    distributed = SparseEncoder(str(STUDENT_DIR))
    base = SparseEncoder(str(BASE_MODEL_DIR))
    for (name, a), b, start in zip(single.named_parameters(), distributed.parameters(), base.parameters()):
        moved = (a - start).abs().max()
        assert (a - b).abs().max() <= 1e-3 * moved + 1e-6, name


@pytest.mark.e2e
def test_bf16_under_torchrun_trains_as_one_bf16_process(workdir, tiny_params):
    """train.precision bf16 forced on this CPU under torchrun (2 processes, gloo, 16 rows each):
    every rank autocasts (transformers told use_cpu): the model lands as far from one fp32 process's
    (on the whole 32-row batch) as one bf16 process's does, and nearer to the bf16 one (on this
    machine 0.39 of the way; under fp32 the split changes the weights by under 1e-3 of their move)."""
    student = {**tiny_params.train.student.model_dump(), "dropout": 0.0}
    weights = {}
    for precision in ("fp32", "bf16"):
        one = prepared(tiny_params, batch_size=32, epochs=3, precision=precision, student=student)
        train.run(one)
        weights[precision] = flat_weights(STUDENT_DIR)
    start = flat_weights(BASE_MODEL_DIR)
    data = one.model_dump(by_alias=True)
    data["train"]["batch_size"] = 16  # per process
    write_params(workdir, Params.model_validate(data))
    ddp = train_on_two_processes(workdir)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    args = json.loads((RECORDS_DIR / "train.json").read_text())["facts"]["training_args"]
    assert args["bf16"] and args["use_cpu"]
    distributed = flat_weights(STUDENT_DIR)
    travelled = float((weights["bf16"] - start).norm())
    rounding = float((weights["bf16"] - weights["fp32"]).norm())
    split = float((distributed - weights["bf16"]).norm())
    from_fp32 = float((distributed - weights["fp32"]).norm())
    assert 0 < rounding < 0.3 * travelled, (rounding, travelled)
    assert from_fp32 > 0.5 * rounding and split < 0.75 * from_fp32, (split, from_fp32, rounding)


@pytest.mark.parametrize("fused", [True, False])
def test_cached_loss_gives_the_uncached_loss_and_gradients(tmp_path, fused):
    """train.mini_batch_size encodes the batch in pieces (GradCache) and must change memory only:
    the loss and every parameter's gradient equal the whole-batch loss's, through the fused head too."""
    from pipeline.config import TrainConfig
    from pipeline.modelling.encoders import splade_encoder
    from pipeline.modelling.splade_head import fused_head

    rows = pd.DataFrame({"query": [f"kalo mife {i}" for i in range(7)],
                         "positive": [f"kalo zeru mife doc {i} " * (1 + i % 3) for i in range(7)],
                         "negative": [f"zamo dop {i}" for i in range(7)],
                         "label": np.linspace(-2, 3, 7)})
    build_synthetic_mlm(rows[["query", "positive", "negative"]].stack().tolist(),
                        StudentConfig(vocab_size=200, hidden_size=32, dropout=0.0), 32, tmp_path)

    def loss_and_gradients(mini_batch_size):
        model = splade_encoder(str(tmp_path), 32)
        cfg = TrainConfig(mini_batch_size=mini_batch_size, loss="margin-mse")
        loss = training.training_loss(cfg, model, rows)
        features = [model.preprocess(rows[c].tolist()) for c in ("query", "positive", "negative")]
        with fused_head(model) if fused else nullcontext():
            total = sum(loss(features, torch.tensor(rows["label"].to_numpy(), dtype=torch.float32)).values())
            total.backward()
        return float(total.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, whole_gradients = loss_and_gradients(None)
    cached, cached_gradients = loss_and_gradients(3)  # pieces of 3, 3 and 1 rows
    assert type(training.training_loss(TrainConfig(mini_batch_size=3), splade_encoder(str(tmp_path), 32), rows)).__name__ \
        == "CachedSpladeLoss"
    assert cached == pytest.approx(whole, rel=1e-5)
    assert cached_gradients.keys() == whole_gradients.keys() and len(whole_gradients) > 10
    for name, gradient in whole_gradients.items():
        torch.testing.assert_close(cached_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    assert max(float(g.abs().max()) for g in whole_gradients.values()) > 1e-3  # gradients that can differ


def test_id_based_rows_train_exactly_as_the_same_rows_given_as_texts(workdir, tiny_params, monkeypatch):
    """MS MARCO's distillation sets name their texts by id: kept as ids through snapshot, validate
    and teacher, joined per batch, they train the same student as the same rows given as texts."""
    for stage in (snapshot, validate, teacher):  # the quickstart's triplets and its teacher's margins
        stage.run(tiny_params)
    scored = pd.read_parquet(TEACHER_SCORED)[["query", "positive", "negative", "label"]].rename(columns={"label": "score"})
    queries = {text: f"q{i}" for i, text in enumerate(scored["query"].unique())}
    documents = {text: f"d{i}" for i, text in enumerate(pd.concat([scored["positive"], scored["negative"]]).unique())}
    sources = workdir / "sources"
    sources.mkdir()
    scored.to_parquet(sources / "texts.parquet", index=False)
    pd.DataFrame({"query_id": scored["query"].map(queries), "positive_id": scored["positive"].map(documents),
                  "negative_id": scored["negative"].map(documents), "score": scored["score"]}).to_parquet(
        sources / "ids.parquet", index=False)
    for name, texts in (("queries", queries), ("corpus", documents)):  # BEIR files, in another order than the rows
        (sources / f"{name}.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n"
                                                       for t, i in reversed(texts.items())))
    data = tiny_params.model_dump(by_alias=True)
    data["snapshot"]["train"].update(kind="scored", corpus=str(sources / "corpus.jsonl"),
                                     queries=str(sources / "queries.jsonl"))
    results = {}
    for rows in ("texts", "ids"):
        data["snapshot"]["train"]["source"] = str(sources / f"{rows}.parquet")
        params = Params.model_validate(data)
        (workdir / rows).mkdir()
        monkeypatch.chdir(workdir / rows)
        for stage in (snapshot, validate, teacher):
            stage.run(params)
        report = json.loads(VALIDATION_REPORT.read_text())
        labels = pd.read_parquet(TEACHER_SCORED)["label"].tolist()
        results[rows] = (train.run(params), weights(STUDENT_DIR), report, labels)
    assert (workdir / "ids/data/snapshot/train_corpus.arrow").exists()
    assert pq.read_schema(workdir / "ids" / TEACHER_SCORED).names == ["query_id", "positive_id", "negative_id",
                                                                       "score", "label"]
    (text_metrics, text_weights, text_report, text_labels), (id_metrics, id_weights, id_report, id_labels) = \
        results["texts"], results["ids"]
    assert id_labels == text_labels == scored["score"].tolist()
    for report in (text_report, id_report):
        for finding in report["findings"]:
            finding.pop("file")
    assert id_report == text_report | {"snapshot_sha256": id_report["snapshot_sha256"]}
    assert id_metrics["steps"] == text_metrics["steps"] > 0 and id_metrics["final_loss"] == text_metrics["final_loss"]
    assert text_weights.keys() == id_weights.keys()
    for name in text_weights:
        torch.testing.assert_close(id_weights[name], text_weights[name], rtol=0, atol=0)
