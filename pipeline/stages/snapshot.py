"""Stage 1: freeze the training and evaluation data as files with a manifest.

Training rows become data/snapshot/train.parquet (columns of the data's kind); id-based rows stay
ids there, the texts they name written once each to train_queries.arrow and train_corpus.arrow
(pipeline.data.snapshots.write_id_training); each evaluation set
is written as Parquet files (its texts a row group at a time: pipeline.data.snapshots) under
data/snapshot/eval/<set name>/. The manifest records source, revision, content
hash, row counts, schema, length statistics and sample rows, and the evaluation sets' content hash
(part of the evaluation's identity: scores compare only within one). The content hashes depend on
the rows only, so the same source always gives the same hash.
"""

from __future__ import annotations

import pandas as pd

from pipeline.cli import stage_main
from pipeline.config import (
    SNAPSHOT_DIR,
    SNAPSHOT_EVAL,
    SNAPSHOT_LEXICON,
    SNAPSHOT_MANIFEST,
    SNAPSHOT_TRAIN,
    Params,
)
from pipeline.data import synthetic
from pipeline.data.snapshots import (
    frame_digest,
    retrieval_sets_digest,
    text_columns,
    write_eval_set,
    write_id_training,
)
from pipeline.data.sources import (
    IdRows,
    RetrievalSet,
    load_training,
    read_eval_sets,
)
from pipeline.tracking.records import replace_folder, stage_record, write_json


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


def run(params: Params) -> dict:
    cfg = params.snapshot
    with stage_record("snapshot", params) as record:
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

        id_based = isinstance(train, IdRows)  # kept as ids, their texts written once each
        manifest = {
            "train": {"source": cfg.train.source, "format": cfg.train.format, "kind": cfg.train.kind,
                      "split": cfg.train.split, "revision": cfg.train.revision, "rows": len(train),
                      "id_based": id_based},
            "eval": {"source": cfg.eval.source, "split": cfg.eval.split, "revision": cfg.eval.revision,
                     "sha256": retrieval_sets_digest(evaluation),
                     "sets": {name: {"docs": len(data.corpus), "queries": len(data.queries),
                                     "judged_queries": len(data.qrels),
                                     "qrels": sum(len(d) for d in data.qrels.values())}
                              for name, data in evaluation.items()}},
        }

        def describe_training(rows: pd.DataFrame, sha256: str, schema: dict) -> None:
            manifest["train"].update(sha256=sha256, schema=schema, lengths=length_stats(rows),
                                     samples=rows.head(3).to_dict(orient="records"))

        if not id_based:
            describe_training(train, frame_digest(train), {c: str(t) for c, t in train.dtypes.items()})

        def write(folder):  # into a new folder, swapped in whole: a crash never leaves half a snapshot
            def inside(path):
                return folder / path.relative_to(SNAPSHOT_DIR)

            if id_based:
                sha256 = write_id_training(train, folder)
                describe_training(train.head(1000), sha256,
                                  {c: str(t) for c, t in zip(train.table.column_names, train.table.schema.types)})
            else:
                train.to_parquet(inside(SNAPSHOT_TRAIN), index=False)
            for name, data in evaluation.items():
                write_eval_set(data, inside(SNAPSHOT_EVAL / name))
            if cfg.train.source == "synthetic":
                write_json(inside(SNAPSHOT_LEXICON), world.lexicon)
            write_json(inside(SNAPSHOT_MANIFEST), manifest)

        replace_folder(SNAPSHOT_DIR, write)
        record["metrics"] = {"train_rows": len(train), "eval_sets": len(evaluation),
                             "eval_docs": sum(len(data.corpus) for data in evaluation.values()),
                             "eval_queries": sum(len(data.qrels) for data in evaluation.values())}
        record["facts"]["manifest"] = manifest
    return manifest


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
