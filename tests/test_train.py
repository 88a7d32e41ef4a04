import json
import signal
import subprocess
import sys
import time

import numpy as np
import yaml
from sentence_transformers import SparseEncoder
from transformers import BertTokenizerFast

from pipeline import snapshot, teacher, train, validate
from pipeline.config import CHECKPOINTS_DIR, RECORDS_DIR, STUDENT_DIR, Params, StudentConfig
from pipeline.train import SPECIAL_TOKENS, build_synthetic_mlm, wordpiece_vocabulary


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


def test_kill_mid_training_then_rerun_resumes_from_the_last_checkpoint(workdir, tiny_params):
    params = prepared(tiny_params, epochs=40, save_steps=20)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params.model_dump(by_alias=True, mode="json")))
    command = [sys.executable, "-m", "pipeline.train", "--params", "params.yaml"]
    process = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    while not [s for s in checkpoint_steps(workdir) if s >= 60]:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # kill -9
    process.wait()
    last = max(checkpoint_steps(workdir))

    rerun = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    record = json.loads((workdir / RECORDS_DIR / "train.json").read_text())
    assert record["metrics"]["resumed_from_step"] == last
    steps = 40 * -(-record["facts"]["training_rows"] // 16)
    assert record["metrics"]["steps"] == steps and 60 <= last < steps  # killed mid-training
    # the step count continued: one loss per step, 1..N, the first `last` from before the kill
    logged = [e["step"] for e in record["facts"]["log_history"] if "loss" in e]
    assert logged == list(range(1, steps + 1))
    assert not checkpoint_steps(workdir)  # finished: nothing left to resume
    model = SparseEncoder(str(workdir / STUDENT_DIR))
    assert model.encode_document(["a document"]).shape[-1] == model.get_embedding_dimension()
