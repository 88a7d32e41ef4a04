"""Stage 1: freeze the training and evaluation data as files with a manifest.

Training triplets become data/snapshot/train.parquet; the evaluation set is written in BEIR layout
under data/snapshot/eval/. The manifest records source, content hash, row counts, schema and samples.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pandas as pd

from pipeline import synthetic
from pipeline.cli import stage_main
from pipeline.config import SNAPSHOT_DIR, Params
from pipeline.sources import RetrievalSet, read_beir, read_triplets, write_beir
from pipeline.tracking import stage_record, write_json

TRAIN_FILE = "train.parquet"
EVAL_DIR = "eval"
LEXICON_FILE = "lexicon.json"
MANIFEST_FILE = "manifest.json"


def content_hash(folder: Path) -> str:
    """sha256 over every file's relative path and bytes, in a fixed order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run(params: Params, out_dir: Path = SNAPSHOT_DIR) -> dict:
    cfg = params.snapshot
    with stage_record("snapshot", cfg, params.tracking) as record:
        world = None
        if "synthetic" in (cfg.train_source, cfg.eval_source):
            world = synthetic.generate(cfg.synthetic)

        if cfg.train_source == "synthetic":
            train = pd.DataFrame(world.triplets, columns=["query", "positive", "negative"])
        else:
            train = read_triplets(Path(cfg.train_source))
        if cfg.eval_source == "synthetic":
            evaluation = RetrievalSet(world.corpus, world.eval_queries, world.eval_qrels)
        else:
            evaluation = read_beir(Path(cfg.eval_source), cfg.eval_split)

        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        train.to_parquet(out_dir / TRAIN_FILE, index=False)
        write_beir(evaluation, out_dir / EVAL_DIR, cfg.eval_split)
        if cfg.train_source == "synthetic":
            write_json(out_dir / LEXICON_FILE, world.lexicon)

        manifest = {
            "train": {"source": cfg.train_source, "rows": len(train),
                      "schema": {c: str(t) for c, t in train.dtypes.items()},
                      "samples": train.head(3).to_dict(orient="records")},
            "eval": {"source": cfg.eval_source, "split": cfg.eval_split,
                     "docs": len(evaluation.corpus), "queries": len(evaluation.queries),
                     "qrels": sum(len(d) for d in evaluation.qrels.values())},
            "content_sha256": content_hash(out_dir),
        }
        write_json(out_dir / MANIFEST_FILE, manifest)
        record["metrics"] = {"train_rows": len(train), "eval_docs": len(evaluation.corpus),
                             "eval_queries": len(evaluation.queries)}
        record["facts"]["manifest"] = manifest
    return manifest


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
