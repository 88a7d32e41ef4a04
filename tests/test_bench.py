"""The benchmarks' --smoke modes: each runs in seconds on tiny sizes, so that a crash shows in CI,
and its numbers are checked where they promise something."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.project import PROJECT


def smoke(bench: str, tmp_path, *arguments: str) -> dict:
    """`python bench/BENCH.py --smoke`: its JSON line (it must succeed)."""
    done = subprocess.run([sys.executable, str(PROJECT / "bench" / bench), "--smoke", *arguments],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_paired_bench_agrees_with_ranx_arch_and_ir_measures_on_the_run_files(tmp_path, shared):
    """bench/paired.py --smoke (splade-tiny against BM25 on 40 SciFact queries): the run files give
    eval.json's metrics through ir-measures within 1e-6; ranx reads the same per-query nDCG@10 from
    them (means within 1e-6); arch's bootstrap interval of the difference matches ours within
    bootstrap noise, and both standard errors the textbook's; ranx's two-sided Fisher randomization
    p-value is ours within the tests' own noise."""
    out = tmp_path / "paired.json"
    done = subprocess.run([sys.executable, str(PROJECT / "bench/paired.py"), "--smoke", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    diff = result["student_minus_bm25"]
    print(f"\nsmoke: splade-tiny {result['eval_student']:.4f}, BM25 {result['eval_bm25']:.4f}, difference "
          f"{diff['difference']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}], se {diff['standard_error']:.4f}; "
          f"arch {result['arch_interval']}, ranx p {result['ranx_fisher_p_two_sided']:.3f} vs ours {result['ours_two_sided_p']:.3f}")
    assert result["queries"] == 40
    for model in ("student", "bm25"):
        for name, value in result["eval_metrics"][model].items():
            assert result["run_file_metrics"][model][name] == pytest.approx(value, abs=1e-6), (model, name)
    assert result["ranx_student"] == pytest.approx(result["eval_student"], abs=1e-6)
    assert result["ranx_bm25"] == pytest.approx(result["eval_bm25"], abs=1e-6)
    assert result["ranx_difference"] == pytest.approx(diff["difference"], abs=1e-6)
    noise = diff["standard_error"]
    assert abs(result["arch_interval"][0] - diff["low"]) < 0.25 * noise
    assert abs(result["arch_interval"][1] - diff["high"]) < 0.25 * noise
    assert diff["standard_error"] == pytest.approx(result["textbook_standard_error"], rel=0.15)
    assert result["ranx_fisher_p_two_sided"] == pytest.approx(result["ours_two_sided_p"], abs=0.03)


def test_gpu_kit_refuses_without_a_gpu_and_its_smoke_runs_train_teacher_evaluate_and_parity(tmp_path, shared):
    """bench/gpu.py without a GPU stops with a sentence saying so (status 2, no traceback). Its
    --smoke runs every step tiny on the CPU, bf16 forced where the CPU emulates it:
    - train (bench/train.py --smoke): stock and project both in bf16 (stock with use_cpu, without
      which transformers refuses bf16 on a CPU), finite held-out losses, a largest batch each;
    - teacher (bench/teacher.py --smoke): 16 pairs labelled, 10 unique scored, the project's
      scores stock's, the speedup the product of its two parts, stock in bf16 close to fp32;
    - evaluate (bench/evaluate.py --smoke): exact equals the stock evaluator within 1e-4, bf16
      within 0.05 on every ranking metric;
    - parity: the fused head's bf16 vectors no further from fp32 than stock's bf16."""
    refused = subprocess.run([sys.executable, str(PROJECT / "bench/gpu.py")], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "has none" in refused.stderr and "Traceback" not in refused.stderr

    result = smoke("gpu.py", tmp_path, "--out", str(tmp_path / "gpu.json"))
    assert json.loads((tmp_path / "gpu.json").read_text()) == result
    assert result["device"] == "cpu" and result["smoke"] is True
    assert not [step for step in ("train", "teacher", "evaluate", "parity") if "error" in result[step]], result

    train = result["train"]
    assert train["precision"] == {"stock": "bf16", "project": "bf16"}
    assert all(math.isfinite(loss) for loss in train["held_out_loss"].values())
    assert train["largest_batch"] == {"stock": 4, "project": 4} and train["speedup"] > 0

    teacher = result["teacher"]
    assert teacher["pairs_labelled"] == 16 and teacher["unique_pairs_scored"] == 10
    assert teacher["max_abs_diff_vs_stock"] < 1e-4
    assert teacher["speedup"] == pytest.approx(teacher["dedup_speedup"] * teacher["speedup_same_pairs"], rel=0.01)
    assert 0 < teacher["stock_bf16_max_abs_dev_vs_fp32"] < 0.25 * teacher["score_std"]

    evaluate = result["evaluate"]
    assert evaluate["exact_max_metric_difference"] < 1e-4
    assert evaluate["fast_max_ranking_difference"] < 0.05
    assert evaluate["corpus_docs"] >= 40 and evaluate["exact_docs_per_s"] > 0

    parity = result["parity"]
    assert parity["fused_bf16"]["max_vector_error"] > 0 and parity["fused_no_further_than_stock"], parity


def test_cached_loss_bench_gives_the_uncached_loss(tmp_path, shared):
    """bench/cached_loss.py --smoke: GradCache's loss is the whole batch's."""
    result = smoke("cached_loss.py", tmp_path)
    assert result["batch_size"] == 8 and result["mini_batch_size"] == 4
    assert result["loss_difference"] < 1e-5 * max(1.0, abs(result["uncached"]["loss"]))
    assert result["peak_ratio"] > 0


def test_export_bench_onnx_fp32_is_torch_and_int8_runs(tmp_path, shared):
    """bench/export.py --smoke: the exported fp32 encoder gives torch's vectors within 1e-4."""
    result = smoke("export.py", tmp_path)
    assert result["queries"] == 30
    assert max(result["onnx_fp32_max_abs_diff"].values()) < 1e-4
    assert result["onnx_int8_ms"] > 0 and result["onnx_fp32_speedup"] > 0


def test_msmarco_scale_bench_trains_on_an_id_based_margin_set_over_an_ms_marco_shaped_corpus(tmp_path, shared):
    """bench/msmarco_scale.py --smoke: 2,000 id-based margin rows over 3,000 passages through
    snapshot, validate, teacher, 10 training steps, export and evaluate, no check failing (MS MARCO's
    own mojibake, in the real words the texts are drawn from, is a warning); the evaluate stage's
    phases cover its run: each model's corpus, queries and search, BM25, and the outputs."""
    result = smoke("msmarco_scale.py", tmp_path)
    assert result["margin_rows"] == 2_000 and result["validation_success"] is True and result["validation_errors"] == 0
    assert set(result["validation_warnings"]) <= {"mojibake"}
    assert result["steps_trained"] == result["train_steps"] == 10 and np.isfinite(result["final_loss"])
    for stage in ("snapshot", "validate", "teacher", "train", "export", "evaluate"):
        assert result[f"{stage}_seconds"] > 0 and result[f"{stage}_peak_rss_gb"] > 0
    phases = [phase["phase"] for phase in result["evaluate_phases"]]
    for model in ("models/student on", "models/base on", "models/student (ONNX int8) on"):
        assert sum(phase.startswith(f"scoring {model}") for phase in phases) == 1, phases
    assert phases.count("searching 300 queries over 3000 documents") == 3 and phases.count("encoding 300 queries") == 3
    assert any(phase.startswith("BM25") for phase in phases) and "writing run files, metrics and figures" in phases
    assert sum(phase["seconds"] for phase in result["evaluate_phases"]) == pytest.approx(result["evaluate_seconds"],
                                                                                          abs=0.1)
    # sampled every 0.1 s: at most the process's peak (within the rounding), and near it
    assert 0.8 * result["evaluate_peak_rss_gb"] < max(phase["peak_rss_gb"] for phase in result["evaluate_phases"]) \
        <= result["evaluate_peak_rss_gb"] + 0.002
    assert result["evaluated"]["queries"] == 300 and result["evaluated"]["index"]["msmarco-shaped"]["kind"] == "exact"
    assert result["eval_docs"] == 3_000 and result["standalone_beir_peak_rss_gb"] > 0


def test_evaluate_scale_bench_rank_safe_is_exact_and_threads_agree(tmp_path, shared):
    """bench/evaluate_scale.py --smoke (3,000 mixed documents from 200 real passage vectors): exact
    search on every core returns one thread's; blockmax rank-safe returns exact's top 100, bmp's and
    PISA's rank-safe searches nearly so (their weights in a byte); each swept index reaches about
    each recall target on all queries; --timed-queries times that many more end to end."""
    result = smoke("evaluate_scale.py", tmp_path, "--timed-queries", "30")
    assert result["corpus"] == "mixed" and result["docs"] == 3_000 and result["source"]["passages"] == 200
    timed = result["blockmax"]["rank_safe_timed"]
    assert timed["queries"] == 30 and timed["ms_per_query"] > 0 and timed["seconds"] >= timed["search_seconds"]
    assert result["exact_threads"]["same_as_one_thread"] is True
    assert result["blockmax"]["rank_safe"]["recall_at_100"] >= 0.999
    assert result["bmp"]["rank_safe"]["recall_at_100"] >= 0.97
    assert all(search["recall_at_100"] >= 0.97 for search in result["pisa"]["rank_safe"].values())
    for kind in ("blockmax", "bmp", "seismic"):
        for target, searched in result[kind]["at_recall"].items():
            assert searched["recall_at_100"] >= float(target) - 0.05, (kind, target, searched)


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, PROJECT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_mixed_generator_shuffles_each_documents_terms_as_lexsort_did():
    """shuffled_within (a group at a time) gives np.lexsort's order, ties included, so the mixed corpus
    is the one the earlier figures were measured on."""
    scale = load_bench("evaluate_scale")
    rng = np.random.default_rng(0)
    group = np.sort(rng.integers(0, 300, 5_000))
    keys = rng.integers(0, 40, len(group)).astype(np.float64)  # many ties within a group
    starts = np.searchsorted(group, np.arange(301))
    assert np.array_equal(scale.shuffled_within(starts, keys), np.lexsort((keys, group)))


def test_the_mixed_scale_corpus_has_no_near_duplicate_clusters_the_perturbed_one_has():
    """The same 100 source vectors, 2,000 documents each way: a perturbed document shares most of
    its terms with its nearest other document (the copies of its passage), a mixed one far fewer;
    lengths follow the sources' in both, and every term of a mixed document comes from a source."""
    from scipy.sparse import random as sparse_random

    scale = load_bench("evaluate_scale")
    rng = np.random.default_rng(0)
    sources = sparse_random(100, 3_000, density=0.02, format="csr", random_state=1, dtype=np.float32)
    sources.data = rng.lognormal(0.0, 1.0, sources.nnz).astype(np.float32)

    def nearest_overlap(matrix) -> float:
        binary = (matrix > 0).astype(np.float32)
        shared = (binary @ binary.T).toarray()
        np.fill_diagonal(shared, 0)
        return float(np.mean(shared.max(1) / np.maximum(np.asarray(binary.sum(1)).ravel(), 1)))

    mixed = scale.GENERATORS["mixed"](np.random.default_rng(2), sources, 2_000)
    perturbed = scale.GENERATORS["perturbed"](np.random.default_rng(2), sources, 2_000)
    assert nearest_overlap(perturbed) > 0.6 and nearest_overlap(mixed) < 0.4
    lengths = np.diff(sources.indptr)
    assert abs(np.diff(mixed.indptr).mean() - lengths.mean()) < 0.1 * lengths.mean()
    assert set(mixed.indices) <= set(sources.indices)
