"""The benchmarks' --smoke modes: each runs in seconds on tiny sizes, so that a crash shows in CI,
and its numbers are checked where they promise something."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.project import PROJECT


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


def test_teacher_bench_reports_deduplication_and_scoring_apart(tmp_path, shared):
    """bench/teacher.py --smoke (2 SciFact queries, 4 hard negatives each): 16 pairs labelled, 10
    unique pairs scored; the project's scores are stock's; the overall speedup is the product of
    the de-duplication's and the scoring's on the same pairs."""
    done = subprocess.run([sys.executable, str(PROJECT / "bench/teacher.py"), "--smoke"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["pairs_labelled"] == 16 and result["unique_pairs_scored"] == 10
    assert result["max_abs_diff_vs_stock"] < 1e-4
    assert result["speedup"] == pytest.approx(result["dedup_speedup"] * result["speedup_same_pairs"], rel=0.01)
