"""The text path at MS MARCO's scale: each stage as the pipeline runs it (`python -m
pipeline.stages.<stage>`, one process each), its wall time and peak RSS, in one JSON line.

The data is MS MARCO-shaped: passages and queries whose lengths and words are drawn from the real
MS MARCO passages and queries of the shared TREC-DL19 subset (word frequencies as they occur there),
with MS MARCO's numeric ids. The evaluation set is a BEIR folder of --eval-docs passages and MS MARCO
dev's 6,980 queries (one judged passage each). Training rows are either --rows synthetic (query,
positive) text pairs, or, with --margin-rows N, an id-based margin set over that corpus as
MS MARCO's cross-encoder score sets ship (query_id, positive_id, negative_id, score; ~20 rows a
training query): then the teacher passes the scores through and the train stage runs
--train-steps steps of the quickstart's student on them; with --evaluate, the export and evaluate
stages follow (the student, its untrained start, BM25 and the int8 ONNX student on the corpus), and
the evaluate stage's phases (each line it logs starts one) get their seconds and sampled peak RSS.
With --rows, a plain pandas parquet read + write of the same pairs is measured as the floor.

    python bench/msmarco_scale.py [--rows 1000000] [--eval-docs 2000000]
    python bench/msmarco_scale.py --eval-docs 2000000 --margin-rows 10000000 [--train-steps 200]
    python bench/msmarco_scale.py --eval-docs 2000000 --margin-rows 200000 --evaluate --max-seq-length 8
    python bench/msmarco_scale.py --smoke   # 2,000 margin rows over 3,000 passages, 10 steps, evaluated
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import re
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

PROJECT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPLADE_SHARED", PROJECT.parent / "shared"))
REAL_TEXT = SHARED / "data/beir/trec-dl19-subset"  # 5,000 MS MARCO passages and their queries


class TextModel:
    """Texts drawn like MS MARCO's: each length from the real texts' word counts, each word by its
    frequency there."""

    def __init__(self, path: Path, seed: int):
        texts = [json.loads(line)["text"] for line in path.open()]
        counts = Counter(word for text in texts for word in text.split())
        self.words = np.array(list(counts))
        frequencies = np.fromiter(counts.values(), dtype=np.float64)
        self.cumulative = np.cumsum(frequencies / frequencies.sum())
        self.lengths = np.array([len(text.split()) for text in texts])
        self.rng = np.random.default_rng(seed)

    def texts(self, count: int, salt: str, max_words: int | None = None) -> list[str]:
        """`count` texts, each led by its own marker (no two alike), of at most `max_words` words."""
        lengths = np.minimum(self.rng.choice(self.lengths, size=count), max_words or self.lengths.max())
        drawn = np.searchsorted(self.cumulative, self.rng.random(int(lengths.sum())))
        words = self.words[np.minimum(drawn, len(self.words) - 1)]
        return [f"{salt}{i} " + " ".join(chunk) for i, chunk in enumerate(np.split(words, np.cumsum(lengths)[:-1]))]


def make_pairs(rows: int, seed: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"query": TextModel(REAL_TEXT / "queries.jsonl", seed).texts(rows, "q"),
                         "positive": TextModel(REAL_TEXT / "corpus.jsonl", seed + 1).texts(rows, "p")})


def write_texts(path: Path, ids, texts, title: bool) -> None:
    with path.open("w") as handle:
        for doc_id, text in zip(ids, texts):
            handle.write(json.dumps({"_id": str(doc_id), **({"title": ""} if title else {}), "text": text}) + "\n")


def write_beir(docs: int, folder: Path, queries: int = 6_980, max_words: int | None = None) -> None:
    """An MS MARCO-shaped BEIR folder: `docs` passages, `queries` queries judging one passage each."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    passages = TextModel(REAL_TEXT / "corpus.jsonl", 0)
    with (folder / "corpus.jsonl").open("w") as corpus:
        for start in range(0, docs, 100_000):  # a chunk at a time: the generator's memory stays small
            for doc, text in enumerate(passages.texts(min(100_000, docs - start), f"p{start}-", max_words), start):
                corpus.write(json.dumps({"_id": str(doc), "title": "", "text": text}) + "\n")
    judged = np.random.default_rng(1).choice(docs, min(queries, docs), replace=False)
    write_texts(folder / "queries.jsonl", range(1_000_000, 1_000_000 + len(judged)),
                TextModel(REAL_TEXT / "queries.jsonl", 1).texts(len(judged), "dev"), title=False)
    with (folder / "qrels/test.tsv").open("w") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for query, doc in enumerate(judged):
            qrels.write(f"{1_000_000 + query}\t{doc}\t1\n")


def write_margin_set(rows: int, docs: int, folder: Path, rows_per_query: int = 20) -> None:
    """An id-based margin set over the corpus's `docs` passages (margins.parquet) and its training
    queries (train_queries.jsonl), as MS MARCO's cross-encoder score sets come."""
    rng = np.random.default_rng(2)
    queries = max(1, rows // rows_per_query)
    write_texts(folder / "train_queries.jsonl", range(queries), TextModel(REAL_TEXT / "queries.jsonl", 2).texts(
        queries, "train"), title=False)
    positives = rng.integers(0, docs, size=queries)
    per_query = -(-rows // queries)
    query = np.repeat(np.arange(queries), per_query)[:rows]
    # a query's negatives: consecutive passages from a random offset, never its positive, never twice
    offsets = rng.integers(1, max(2, docs - per_query), size=queries)
    negative = (positives[query] + offsets[query] + np.tile(np.arange(per_query), queries)[:rows]) % docs
    pq.write_table(pa.table({"query_id": query.astype(str), "positive_id": positives[query].astype(str),
                             "negative_id": negative.astype(str), "score": rng.normal(4.0, 3.0, size=rows)}),
                   folder / "margins.parquet", row_group_size=1_000_000)


# run_stage's format (date time logger: message); a stage run with -m logs as __main__
PIPELINE_LOG = re.compile(r"^\S+ \S+ (?:pipeline\.[\w.]+|__main__): (.*)$")
SHARD_PROGRESS = re.compile(r"corpus shard \d+ of \d+")  # a line within a phase, not a new one


@dataclass
class Measured:
    seconds: float
    peak_rss_gb: float  # of the process and the children it waited for
    peak_anonymous_gb: float  # sampled: RSS also counts memory-mapped files' pages, which the kernel takes back
    phases: list[dict]  # each pipeline log line (but a shard's progress) starts one: its seconds and sampled peak

    def record(self, name: str) -> dict:
        return {f"{name}_seconds": round(self.seconds, 2), f"{name}_peak_rss_gb": round(self.peak_rss_gb, 3),
                f"{name}_peak_anonymous_gb": round(self.peak_anonymous_gb, 3)}


def timed(command: list[str], cwd: Path) -> Measured:
    """Run one child process, sampling its memory every 0.1 s and reading its log as it goes."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marks, tail = [(0.0, "start-up")], []

    def read_log() -> None:  # read as written: a full pipe would stall the child
        for line in proc.stderr:
            found = PIPELINE_LOG.match(line.strip())
            if found and not SHARD_PROGRESS.search(found.group(1)):
                marks.append((time.perf_counter() - started, found.group(1)))
            tail[:] = (tail + [line])[-40:]

    reader = threading.Thread(target=read_log)
    reader.start()
    samples = []  # (seconds, RSS KiB, anonymous KiB)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaped here: its rusage is the stage's
        if pid:
            break
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines())
        if "VmRSS" in fields:  # not when it has exited, before it is reaped
            samples.append((time.perf_counter() - started, int(fields["VmRSS"].split()[0]),
                            int(fields["RssAnon"].split()[0])))
        time.sleep(0.1)
    seconds = time.perf_counter() - started
    reader.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command} failed:\n{''.join(tail)}")
    phases = []
    for (start, name), (stop, _) in zip(marks, marks[1:] + [(seconds, "")]):
        within = [rss for at, rss, _ in samples if start <= at < stop]
        phases.append({"phase": name, "seconds": round(stop - start, 2),
                       "peak_rss_gb": round(max(within, default=0) / 1024 ** 2, 3)})
    return Measured(seconds, usage.ru_maxrss / 1024 ** 2,  # KiB on Linux
                    max((anonymous for *_, anonymous in samples), default=0) / 1024 ** 2, phases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="synthetic text pairs (without --margin-rows)")
    parser.add_argument("--eval-docs", type=int, default=0, help="an MS MARCO-shaped BEIR folder of this many "
                        "passages as the evaluation set (0: the quickstart's)")
    parser.add_argument("--eval-queries", type=int, default=6_980, help="judged queries (MS MARCO dev's 6,980)")
    parser.add_argument("--margin-rows", type=int, default=0, help="train on an id-based margin set of this many "
                        "rows over the evaluation corpus (needs --eval-docs)")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--max-seq-length", type=int, default=32, help="the student's tokens per text (the "
                        "quickstart's 32): with --evaluate, what encoding the corpus costs")
    parser.add_argument("--evaluate", action="store_true", help="then export the student and run the evaluate "
                        "stage (student, untrained start, BM25, int8 ONNX student) on the corpus")
    parser.add_argument("--passage-words", type=int, help="cut each passage to this many words (what "
                        "tokenizing the corpus costs: the student reads --max-seq-length tokens of each anyway)")
    parser.add_argument("--no-int8", action="store_true", help="no ONNX export: evaluate scores no int8 student")
    parser.add_argument("--index", choices=["auto", "exact", "blockmax"], default="auto", help="evaluate.index.kind")
    parser.add_argument("--smoke", action="store_true", help="2,000 margin rows over 3,000 passages, 10 steps")
    parser.add_argument("--step", choices=["generate", "generate-beir", "generate-margins", "pandas-copy"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.eval_docs, args.eval_queries, args.margin_rows, args.train_steps = 3_000, 300, 2_000, 10
        args.evaluate = True
    if args.margin_rows and not args.eval_docs:
        parser.error("--margin-rows needs --eval-docs (the corpus the rows name)")
    if args.evaluate and not args.margin_rows:
        parser.error("--evaluate needs --margin-rows (the student it scores is trained on them)")
    # every measured step runs in a child process that starts small: a forked child's peak RSS
    # would otherwise include whatever this process held
    if args.step == "generate":
        return make_pairs(args.rows).to_parquet(args.path, index=False)
    if args.step == "generate-beir":
        return write_beir(args.eval_docs, args.path, args.eval_queries, args.passage_words)
    if args.step == "generate-margins":
        return write_margin_set(args.margin_rows, args.eval_docs, args.path)
    if args.step == "pandas-copy":
        return pd.read_parquet(args.path).to_parquet(args.path.with_name("copy.parquet"), index=False)
    this = [sys.executable, str(Path(__file__).resolve())]
    result: dict = {"bench": "msmarco_scale", "eval_docs": args.eval_docs}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = yaml.safe_load((PROJECT / "params.yaml").read_text())
        beir = work / "msmarco-shaped"
        if args.eval_docs:
            timed(this + ["--step", "generate-beir", "--eval-docs", str(args.eval_docs), "--eval-queries",
                          str(args.eval_queries), "--path", str(beir)]
                  + (["--passage-words", str(args.passage_words)] if args.passage_words else []), work)
            params["snapshot"]["eval"].update(source=str(beir), format="beir", split="test")
        stages = ["snapshot", "validate"]
        if args.margin_rows:
            timed(this + ["--step", "generate-margins", "--margin-rows", str(args.margin_rows), "--eval-docs",
                          str(args.eval_docs), "--path", str(work)], work)
            params["snapshot"]["train"].update(source=str(work / "margins.parquet"), kind="scored",
                                               corpus=str(beir / "corpus.jsonl"),
                                               queries=str(work / "train_queries.jsonl"))
            params["train"].update(max_steps=args.train_steps, save_steps=10 ** 9, max_seq_length=args.max_seq_length)
            params["evaluate"]["index"]["kind"] = args.index
            params["export"]["onnx"] = not args.no_int8
            stages += ["teacher", "train"] + (["export", "evaluate"] if args.evaluate else [])
            result.update(margin_rows=args.margin_rows, train_steps=args.train_steps,
                          max_seq_length=args.max_seq_length, passage_words=args.passage_words)
        else:
            source = work / "pairs.parquet"
            timed(this + ["--step", "generate", "--rows", str(args.rows), "--path", str(source)], work)
            params["snapshot"]["train"].update(source=str(source), kind="pairs")
            params["train"]["loss"] = "mnrl"  # pairs train contrastively (no negatives to score)
            floor = timed(this + ["--step", "pandas-copy", "--path", str(source)], work)
            result.update(rows=args.rows, pandas_read_write_seconds=round(floor.seconds, 2),
                          pandas_read_write_peak_rss_gb=round(floor.peak_rss_gb, 3))
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        for stage in stages:
            measured = timed([sys.executable, "-m", f"pipeline.stages.{stage}"], work)
            result.update(measured.record(stage))
            if stage == "evaluate":
                result["evaluate_phases"] = measured.phases
        report = json.loads((work / "data/validation/report.json").read_text())
        result.update(validation_success=report["success"], validation_errors=report["errors"],
                      validation_warnings=sorted({f["check"] for f in report["findings"] if f["severity"] == "warning"}))
        if args.margin_rows:
            train = json.loads((work / "records/train.json").read_text())["metrics"]
            result.update(steps_trained=train["steps"], final_loss=round(train["final_loss"], 4))
        if args.evaluate:
            scores = json.loads((work / "metrics/eval.json").read_text())
            result["evaluated"] = {"queries": scores["queries"], "index": scores["index"],
                                   **{model: round(scores[model]["dot_ndcg@10"], 4)
                                      for model in ("student", "base", "bm25", "student_onnx_int8") if model in scores}}
        if args.eval_docs:
            standalone = timed([sys.executable, "-m", "pipeline.stages.validate", str(beir), "--kind", "beir",
                                "--params", str(work / "absent.yaml")], work)
            result.update(standalone_beir_seconds=round(standalone.seconds, 2),
                          standalone_beir_peak_rss_gb=round(standalone.peak_rss_gb, 3))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
