"""Stage 1: freeze the training and evaluation data as files with a manifest.

Training rows become data/snapshot/train.parquet (columns of the data's kind); each evaluation set
is written in BEIR layout under data/snapshot/eval/<set name>/. The manifest records source, revision, content
hash, row counts, schema, length statistics and sample rows. The content hash depends on the rows
only, so the same source always gives the same hash.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import synthetic
from pipeline.cli import stage_main
from pipeline.config import SNAPSHOT_DIR, Params
from pipeline.sources import RetrievalSet, load_training, read_eval_sets, read_retrieval_set, write_beir
from pipeline.tracking import stage_record, write_json

TRAIN_FILE = "train.parquet"
EVAL_DIR = "eval"
LEXICON_FILE = "lexicon.json"
MANIFEST_FILE = "manifest.json"
TEXT_COLUMN = re.compile(r"query|positive|negative(_\d+)?")


def text_columns(frame: pd.DataFrame) -> list[str]:
    """The text columns of a snapshot: query, positive, negative and any negative_N."""
    return [c for c in frame.columns if TEXT_COLUMN.fullmatch(c)]


def row_hashes(frame: pd.DataFrame, chunk_rows: int = 100_000) -> np.ndarray:
    """One 64-bit hash per row (pandas' hash_pandas_object), computed a chunk at a time: hashing
    converts strings to Python objects, which for a million rows would double the memory."""
    hashable = frame.copy(deep=False)
    for column in frame.columns:  # list cells (several negatives' scores) hash by their repr
        if len(frame) and isinstance(frame[column].iloc[0], (list, tuple, np.ndarray)):
            hashable[column] = frame[column].map(lambda cell: repr(list(cell)))
    parts = [pd.util.hash_pandas_object(hashable.iloc[start:start + chunk_rows], index=False).to_numpy()
             for start in range(0, len(frame), chunk_rows)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)


def frame_digest(frame: pd.DataFrame) -> str:
    """sha256 of the rows' values (and column names), independent of how they were stored."""
    digest = hashlib.sha256("\x1f".join(frame.columns).encode())
    digest.update(row_hashes(frame).tobytes())
    return digest.hexdigest()


def length_stats(frame: pd.DataFrame, rows: int = 1000) -> dict[str, dict[str, float]]:
    """min / mean / max words per text column over the first `rows` rows, as the reference model
    cards' dataset tables do (they count tokens; whitespace words need no tokenizer here)."""
    head = frame.head(rows)
    stats = {}
    for column in text_columns(head):
        if pd.api.types.is_string_dtype(head[column]):
            words = head[column].fillna("").astype(str).str.split().str.len()
            stats[column] = {"min_words": int(words.min()), "mean_words": round(float(words.mean()), 2),
                             "max_words": int(words.max()), "rows": len(head)}
    return stats


def read_eval_snapshot(snapshot_dir: Path, split: str) -> dict[str, RetrievalSet]:
    """The snapshot's evaluation sets, by name."""
    return {folder.name: read_retrieval_set(folder, split)
            for folder in sorted((snapshot_dir / EVAL_DIR).iterdir()) if folder.is_dir()}


def run(params: Params, out_dir: Path = SNAPSHOT_DIR) -> dict:
    cfg = params.snapshot
    with stage_record("snapshot", cfg, params.tracking) as record:
        world = None
        if "synthetic" in (cfg.train.source, cfg.eval.source):
            world = synthetic.generate(cfg.synthetic)
        # read everything before touching the previous snapshot: a bad source leaves it intact
        if cfg.train.source == "synthetic":
            train = pd.DataFrame(world.triplets, columns=["query", "positive", "negative"])
        else:
            train = load_training(cfg.train)
        if cfg.eval.source == "synthetic":
            evaluation = {"synthetic": RetrievalSet(world.corpus, world.eval_queries, world.eval_qrels)}
        else:
            evaluation = read_eval_sets(cfg.eval)

        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        train.to_parquet(out_dir / TRAIN_FILE, index=False)
        for name, data in evaluation.items():
            write_beir(data, out_dir / EVAL_DIR / name, cfg.eval.split)
        if cfg.train.source == "synthetic":
            write_json(out_dir / LEXICON_FILE, world.lexicon)

        manifest = {
            "train": {"source": cfg.train.source, "format": cfg.train.format, "kind": cfg.train.kind,
                      "split": cfg.train.split, "revision": cfg.train.revision,
                      "rows": len(train), "sha256": frame_digest(train),
                      "schema": {c: str(t) for c, t in train.dtypes.items()},
                      "lengths": length_stats(train),
                      "samples": train.head(3).to_dict(orient="records")},
            "eval": {"source": cfg.eval.source, "split": cfg.eval.split, "revision": cfg.eval.revision,
                     "sets": {name: {"docs": len(data.corpus), "queries": len(data.queries),
                                     "judged_queries": len(data.qrels),
                                     "qrels": sum(len(d) for d in data.qrels.values())}
                              for name, data in evaluation.items()}},
        }
        write_json(out_dir / MANIFEST_FILE, manifest)
        record["metrics"] = {"train_rows": len(train), "eval_sets": len(evaluation),
                             "eval_docs": sum(len(data.corpus) for data in evaluation.values()),
                             "eval_queries": sum(len(data.qrels) for data in evaluation.values())}
        record["facts"]["manifest"] = manifest
    return manifest


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
