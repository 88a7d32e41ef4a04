"""The teachers whose scores the student is distilled from: a cross-encoder (sentence-transformers' CrossEncoder,
each unique pair scored once, in length-sorted batches), a bi-encoder (cosines; also mines hard negatives), and
the quickstart's lexicon-aware BM25; and the resumable, rank-split scoring of the unique pairs into shards
(ShardPlan, score_shards), or by Ray workers (score_shards_on_ray). The teacher stage and the benches call it."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.cli import StageError
from pipeline.config import (
    TeacherConfig,
    unpinned_hub_id,
)
from pipeline.data.shards import ShardFiles
from pipeline.data.snapshots import (
    ID_COLUMN,
    TrainingSnapshot,
    TrainingTexts,
    frame_digest,
    taken,
    text_columns,
)
from pipeline.runtime import (
    folder_digest,
    import_bm25s,
    native_bf16,
    use_bf16,
    weights_digest,
)
from pipeline.tracking.records import write_atomically, write_json

log = logging.getLogger(__name__)


# bench/teacher.py --batch-sizes on a 2-core CPU (MiniLM-L6, SciFact lengths): 8 to 32 score alike
# (17-24 pairs/s, run-to-run noise included), 64 and 128 slower (13.9-17.2)
CPU_BATCH_SIZE = 16


GPU_MAX_BATCH_SIZE = 1024
AUTO_BATCH_SAMPLE = 100_000  # pairs whose longest the automatic batch size is found on


def document_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in text_columns(frame) if c != "query"]


def unique_pairs(frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """Each (query, document) pair of the rows once, in order of first appearance, and for every
    row and document column the index of its pair: an int64 array (rows, document columns)."""
    columns = document_columns(frame)
    query_codes, queries = pd.factorize(frame["query"])
    doc_codes, documents = pd.factorize(pd.concat([frame[c] for c in columns], ignore_index=True))
    keys = np.tile(query_codes.astype(np.int64), len(columns)) * len(documents) + doc_codes
    pair_codes, unique_keys = pd.factorize(keys)
    pairs = pd.DataFrame({"query": np.asarray(queries, dtype=object)[unique_keys // len(documents)],
                          "document": np.asarray(documents, dtype=object)[unique_keys % len(documents)]})
    return pairs, pair_codes.reshape(len(columns), len(frame)).T


class IdPairs:
    """The unique (query, document) pairs of id-based rows, held as rows of the snapshot's query and
    document texts (train_queries.arrow, train_corpus.arrow): the texts of a slice of pairs joined
    when it is scored. Memory: 16 bytes a pair."""

    def __init__(self, queries: np.ndarray, documents: np.ndarray, texts: TrainingTexts):
        self.queries, self.documents, self.texts = queries, documents, texts

    def __len__(self) -> int:
        return len(self.queries)

    def frame(self, start: int, stop: int) -> pd.DataFrame:
        """Pairs start to stop as a pairs frame (query, document texts)."""
        tables = self.texts.tables
        return pd.DataFrame({"query": taken(tables["queries"].column("text"), self.queries[start:stop]),
                             "document": taken(tables["corpus"].column("text"), self.documents[start:stop])})

    @cached_property
    def digest(self) -> str:
        """What the pairs' texts are: the pairs as rows of the texts files, and those files."""
        texts = folder_digest(self.texts.paths["corpus"].parent, lambda path: path in self.texts.paths.values())
        return hashlib.sha256(self.queries.tobytes() + self.documents.tobytes() + texts.encode()).hexdigest()


def unique_id_pairs(table, texts: TrainingTexts) -> tuple[IdPairs, np.ndarray]:
    """unique_pairs of id-based rows (an Arrow table), without their texts: pairs of the same ids are
    one pair, in order of first appearance."""
    positions = {column: rows.to_numpy().astype(np.int64) for column, rows in texts.positions(table).items()}
    columns = [c for c in table.column_names if ID_COLUMN.fullmatch(c) and c != "query_id"]
    documents = texts.tables["corpus"].num_rows
    keys = np.tile(positions["query_id"], len(columns)) * documents + np.concatenate([positions[c] for c in columns])
    pair_codes, unique_keys = pd.factorize(keys)
    return (IdPairs(unique_keys // documents, unique_keys % documents, texts),
            pair_codes.reshape(len(columns), table.num_rows).T)


def training_pairs(snapshot: TrainingSnapshot) -> tuple[pd.DataFrame | IdPairs, np.ndarray]:
    """unique_pairs of the snapshot's training rows: id-based ones without their texts."""
    return unique_id_pairs(snapshot.table, snapshot.texts) if snapshot.id_based else unique_pairs(snapshot.rows())


def pairs_frame(pairs: pd.DataFrame | IdPairs, start: int, stop: int) -> pd.DataFrame:
    """Pairs start to stop, with their texts."""
    return pairs.iloc[start:stop] if isinstance(pairs, pd.DataFrame) else pairs.frame(start, stop)


def margins(doc_scores: np.ndarray) -> np.ndarray:
    """MarginMSE's labels: positive - each negative (one column per negative)."""
    return doc_scores[:, :1] - doc_scores[:, 1:]


def labelled(frame: pd.DataFrame, doc_scores: np.ndarray) -> pd.DataFrame:
    """The rows with each document's score, the score list (KL-div) and the margins (MarginMSE);
    doc_scores is (rows, document columns), positive first."""
    out = frame.copy()
    for j, column in enumerate(document_columns(frame)):
        out[f"{column}_score"] = doc_scores[:, j]
    label = margins(doc_scores)
    out["scores"] = list(doc_scores)
    out["label"] = label[:, 0] if label.shape[1] == 1 else list(label)
    return out


def labelled_ids(table, doc_scores: np.ndarray | None = None):
    """Id-based rows (an Arrow table, as the snapshot keeps them) labelled as `labelled` labels text
    rows, from a teacher's doc_scores, or from the scores they carry: a single score is the
    MarginMSE margin (label); a score list becomes `scores` (KL-div) and the margins (label)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def lists(values: np.ndarray):
        return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])

    if doc_scores is None:
        scores = table.column("score")
        if not pa.types.is_list(scores.type):
            return table.append_column("label", scores)
        table = table.drop_columns(["score"])
        doc_scores = pc.list_flatten(scores).to_numpy().reshape(table.num_rows, -1)
    else:
        for j, column in enumerate(c for c in table.column_names if ID_COLUMN.fullmatch(c) and c != "query_id"):
            table = table.append_column(f"{column.removesuffix('_id')}_score", pa.array(doc_scores[:, j]))
        scores = lists(doc_scores)
    label = margins(doc_scores)
    return table.append_column("scores", scores).append_column(
        "label", pa.array(label[:, 0]) if label.shape[1] == 1 else lists(label))


class LexiconBM25:
    """BM25 (bm25s) whose queries are rewritten word by word through a synonym lexicon."""

    def __init__(self, documents: list[str], lexicon: dict[str, str]):
        bm25s = import_bm25s()
        self.lexicon = lexicon
        self.doc_index = {text: i for i, text in enumerate(documents)}
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(documents, stopwords=None, show_progress=False),
                             show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        bm25s = import_bm25s()
        words = bm25s.tokenize(query, stopwords=None, return_ids=False, show_progress=False)[0]
        return self.retriever.get_scores([self.lexicon.get(w, w) for w in words])

    def score_pairs(self, pairs: pd.DataFrame) -> np.ndarray:
        out = np.empty(len(pairs), dtype=np.float64)
        cache: dict[str, np.ndarray] = {}
        for i, (query, doc) in enumerate(zip(pairs["query"], pairs["document"])):
            if query not in cache:
                cache[query] = self.scores(query)
            out[i] = cache[query][self.doc_index[doc]]
        return out


def check_model(cfg: TeacherConfig) -> None:
    if not cfg.model:
        raise StageError(f"teacher.kind is {cfg.kind} but teacher.model is not set")
    unpinned = unpinned_hub_id("teacher.model", cfg.model, cfg.revision)
    if unpinned:
        raise StageError(unpinned)


def model_identity(cfg: TeacherConfig) -> dict:
    """What the scores depend on: a local folder by the sha256 of its weights, a Hub id by revision."""
    if Path(cfg.model).is_dir():
        return {"model": cfg.model, "weights_sha256": weights_digest(Path(cfg.model))}
    return {"model": cfg.model, "revision": cfg.revision}


class CrossEncoderTeacher:
    """The raw logits CrossEncoder.predict(activation_fn=Identity) gives, through the model's own
    preprocess and forward, with batches cut from pairs sorted by token length (least padding)."""

    def __init__(self, cfg: TeacherConfig, device: str | None = None):
        from sentence_transformers import CrossEncoder

        check_model(cfg)
        self.cfg = cfg
        self.model = CrossEncoder(cfg.model, revision=cfg.revision, device=device)
        self.model.eval()
        if self.model.num_labels != 1:
            raise StageError(f"teacher {cfg.model} has {self.model.num_labels} labels; distillation "
                             "needs a cross-encoder with one relevance logit (num_labels=1)")
        device_type = self.model.device.type
        self.bf16 = use_bf16(cfg.precision, device_type)
        if self.bf16 and not native_bf16(device_type):
            log.warning("teacher.precision bf16 without native bf16 on %s: expect it to be slower", device_type)

    @cached_property
    def identity(self) -> dict:
        return model_identity(self.cfg)

    @property
    def max_length(self) -> int:
        return self.model.max_seq_length

    def token_lengths(self, pairs: pd.DataFrame) -> np.ndarray:
        encoded = self.model.tokenizer(pairs["query"].tolist(), pairs["document"].tolist(),
                                       truncation=True, max_length=self.model.max_seq_length)
        return np.fromiter(map(len, encoded["input_ids"]), dtype=np.int64, count=len(pairs))

    def score_batch(self, batch: list[tuple[str, str]]) -> np.ndarray:
        import torch
        from sentence_transformers.util import batch_to_device

        with torch.inference_mode(), torch.autocast(self.model.device.type, dtype=torch.bfloat16,
                                                    enabled=self.bf16):
            features = batch_to_device(self.model.preprocess(batch), self.model.device)
            scores = self.model(features)["scores"]
        return scores.float().reshape(len(batch)).cpu().numpy()

    def score(self, pairs: pd.DataFrame, batch_size: int, progress=None) -> np.ndarray:
        order = np.argsort(-self.token_lengths(pairs), kind="stable")
        queries, documents = pairs["query"].to_numpy(), pairs["document"].to_numpy()
        out = np.empty(len(pairs), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self.score_batch(list(zip(queries[rows], documents[rows])))
            if progress is not None:
                progress.update(len(rows))
        return out

    def auto_batch_size(self, pairs: pd.DataFrame) -> int:
        """On CPU a measured constant; on a GPU the largest power of two that scores the longest
        pairs without running out of memory (sorted batching puts them together in the first batch)."""
        import torch

        if self.model.device.type != "cuda":
            return CPU_BATCH_SIZE
        sample = pairs.head(AUTO_BATCH_SAMPLE)
        longest = sample.iloc[np.argsort(-self.token_lengths(sample))[:GPU_MAX_BATCH_SIZE]]
        batch = list(zip(longest["query"], longest["document"]))
        size = 8
        while size < min(GPU_MAX_BATCH_SIZE, len(batch)):
            try:
                self.score_batch(batch[:size * 2])
            except torch.OutOfMemoryError:
                break
            finally:
                torch.cuda.empty_cache()
            size *= 2
        return size


class BiEncoderTeacher:
    """The similarity a SentenceTransformer gives a query and a document (cosine for most). Each
    unique text of a shard is encoded once (sentence-transformers sorts them by length)."""

    def __init__(self, cfg: TeacherConfig, device: str | None = None):
        from sentence_transformers import SentenceTransformer

        check_model(cfg)
        self.cfg = cfg
        self.model = SentenceTransformer(cfg.model, revision=cfg.revision, device=device)
        self.bf16 = use_bf16(cfg.precision, self.model.device.type)

    @cached_property
    def identity(self) -> dict:
        return model_identity(self.cfg)

    @property
    def max_length(self) -> int:
        return self.model.max_seq_length

    def encode(self, texts, batch_size: int, query: bool):
        import torch

        encode = self.model.encode_query if query else self.model.encode_document
        with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return encode(list(texts), batch_size=batch_size, convert_to_tensor=True).float()

    def score(self, pairs: pd.DataFrame, batch_size: int, progress=None) -> np.ndarray:
        queries, query_rows = np.unique(pairs["query"].to_numpy(dtype=object), return_inverse=True)
        documents, document_rows = np.unique(pairs["document"].to_numpy(dtype=object),
                                             return_inverse=True)
        scores = self.model.similarity_pairwise(
            self.encode(queries, batch_size, True)[query_rows],
            self.encode(documents, batch_size, False)[document_rows])
        if progress is not None:
            progress.update(len(pairs))
        return scores.cpu().numpy().astype(np.float32)

    def auto_batch_size(self, pairs: pd.DataFrame) -> int:
        # embeddings are small and sentence-transformers sorts by length: a fixed size does
        return CPU_BATCH_SIZE if self.model.device.type == "cpu" else 256


MODEL_TEACHERS = {"cross-encoder": CrossEncoderTeacher, "bi-encoder": BiEncoderTeacher}


def mine_negatives(train: pd.DataFrame, teacher: BiEncoderTeacher, count: int) -> pd.DataFrame:
    """(query, positive) rows -> (query, positive, negative, negative_2, ...): for each row the
    `count` documents the teacher ranks highest among all the snapshot's positives, except the
    query's own positives (sentence-transformers' mine_hard_negatives)."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    pairs = train[["query", "positive"]].drop_duplicates()
    mined = mine_hard_negatives(
        Dataset.from_pandas(pairs, preserve_index=False), teacher.model, num_negatives=count,
        output_format="n-tuple", batch_size=teacher.auto_batch_size(train), verbose=False,
    ).to_pandas().rename(columns={"negative_1": "negative"})
    # mining keeps one row per (query, positive) and drops those with fewer than `count` candidates:
    # give every snapshot row its negatives back, and say what had none
    rows = train[["query", "positive"]].merge(mined, on=["query", "positive"], how="inner",
                                               validate="many_to_one")
    if rows.empty:
        raise StageError(f"mining {count} hard negatives left no rows: the snapshot has too few "
                         "distinct positives; lower teacher.hard_negatives")
    if len(rows) < len(train):
        log.warning("%d of %d rows found fewer than %d negatives and were left out",
                    len(train) - len(rows), len(train), count)
    return rows


class ShardPlan(ShardFiles):
    """Unique pairs cut into fixed shards of scores (parquet)."""

    def __init__(self, folder: Path, pairs: pd.DataFrame | IdPairs, teacher: "Teacher"):
        self.pairs, self.shard_size = pairs, teacher.cfg.shard_size
        key = {"pairs": frame_digest(pairs) if isinstance(pairs, pd.DataFrame) else pairs.digest,
               "teacher": teacher.identity,
               "bf16": teacher.bf16, "batch_size": teacher.cfg.batch_size,
               "shard_size": self.shard_size, "max_length": teacher.max_length}
        super().__init__(folder, key, max(1, -(-len(pairs) // self.shard_size)), ".parquet")

    def rows(self, index: int) -> pd.DataFrame:
        return pairs_frame(self.pairs, index * self.shard_size, (index + 1) * self.shard_size)

    def batch_size(self, teacher: "Teacher", rank: int) -> int:
        """The configured size, or the automatic one that rank 0 finds once and keeps with the plan
        (the only writer), so every rank, and a resumed run, batches (and so rounds) alike."""
        if teacher.cfg.batch_size != "auto":
            return teacher.cfg.batch_size
        plan_file = self.folder / f"{self.digest}-plan.json"
        if rank == 0 and not plan_file.exists():
            write_json(plan_file, {**self.key, "batch_size": teacher.auto_batch_size(
                pairs_frame(self.pairs, 0, AUTO_BATCH_SAMPLE))})
        deadline = time.monotonic() + teacher.cfg.wait_seconds
        while not plan_file.exists():
            if time.monotonic() > deadline:
                raise StageError(f"rank {rank}: rank 0's batch-size plan {plan_file} did not appear within "
                                 f"{teacher.cfg.wait_seconds:g} s (teacher.wait_seconds): is rank 0 running?")
            time.sleep(1)
        return json.loads(plan_file.read_text())["batch_size"]

    def write(self, index: int, scores: np.ndarray) -> None:
        # atomic, under a name no other process uses: a killed run leaves no half-written shard
        write_atomically(self.path(index), lambda tmp: pd.DataFrame({"score": scores}).to_parquet(tmp, index=False))

    def merged(self) -> np.ndarray:
        parts = [pd.read_parquet(self.path(i))["score"].to_numpy() for i in range(self.count)]
        scores = np.concatenate(parts)
        if len(scores) != len(self.pairs):
            raise StageError(f"shards in {self.folder} hold {len(scores)} scores for "
                             f"{len(self.pairs)} pairs; delete the folder and rerun")
        return scores


def score_shards(teacher: "Teacher", plan: ShardPlan, rank: int, world_size: int) -> dict:
    """Score this rank's missing shards; returns what it did."""
    from tqdm.auto import tqdm

    batch_size = plan.batch_size(teacher, rank)
    mine, todo = plan.owed(rank, world_size)
    total = sum(len(plan.rows(i)) for i in todo)
    started = time.perf_counter()
    with tqdm(total=total, unit="pair", desc=f"teacher (rank {rank}/{world_size})",
              disable=total == 0) as progress:
        for index in todo:
            plan.write(index, teacher.score(plan.rows(index), batch_size, progress))
    seconds = time.perf_counter() - started
    return {"shards": plan.count, "shards_reused": len(mine) - len(todo), "shards_scored": len(todo),
            "pairs_scored": total, "pairs_per_second": total / seconds if total else 0.0,
            "batch_size": batch_size}


class RayTeacher:
    """The teacher as Ray workers hold it (pipeline.data.ray_shards), seen from the stage: what names its
    shards (its identity, precision and length, which every worker must share) and its batch size."""

    def __init__(self, workers, cfg: TeacherConfig):
        self.workers, self.cfg = workers, cfg
        self.identity, self.bf16, self.max_length = workers.agreed(shard_facts)

    def auto_batch_size(self, pairs: pd.DataFrame) -> int:
        return self.workers.first(auto_batch_size, pairs.head(AUTO_BATCH_SAMPLE))


def shard_facts(teacher: "Teacher") -> tuple[dict, bool, int]:
    return teacher.identity, teacher.bf16, teacher.max_length


def auto_batch_size(teacher: "Teacher", pairs: pd.DataFrame) -> int:
    return teacher.auto_batch_size(pairs)


def score(teacher: "Teacher", pairs: pd.DataFrame, batch_size: int) -> np.ndarray:
    return teacher.score(pairs, batch_size)


def score_shards_on_ray(cfg: TeacherConfig, folder: Path, pairs: pd.DataFrame) -> tuple[ShardPlan, dict, RayTeacher]:
    """backend ray: the missing shards scored by Ray workers, each written here as it comes back."""
    from pipeline.data.ray_shards import RayWorkers

    with RayWorkers(cfg.ray, partial(MODEL_TEACHERS[cfg.kind], cfg), "teacher") as workers:
        teacher = RayTeacher(workers, cfg)
        plan = ShardPlan(folder, pairs, teacher)
        batch_size = plan.batch_size(teacher, rank=0)
        todo = plan.missing()
        started = time.perf_counter()
        redone = workers.map(todo, lambda index: (plan.rows(index), batch_size), score, plan.write,
                             lambda index: len(plan.rows(index)), "pair")
        seconds = time.perf_counter() - started
    total = sum(len(plan.rows(i)) for i in todo)
    return plan, {"shards": plan.count, "shards_reused": plan.count - len(todo), "shards_scored": len(todo),
                  "shards_redone": redone, "pairs_scored": total, "pairs_per_second": total / seconds if total else 0.0,
                  "batch_size": batch_size, "ray_workers": len(workers.actors)}, teacher


Teacher = CrossEncoderTeacher | BiEncoderTeacher
