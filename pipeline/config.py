"""One typed schema for params.yaml, validated once at the edge; every stage reads its own section.

Unknown keys are refused (a typo in params.yaml must not silently fall back to a default)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

PARAMS_FILE = Path("params.yaml")

# Where each stage writes; dvc.yaml declares the same paths as the stage graph's outs.
INPUTS_DIR = Path("inputs")  # links to the local files and folders params name (pipeline.stages.inputs)
SNAPSHOT_DIR = Path("data/snapshot")
SNAPSHOT_TRAIN = SNAPSHOT_DIR / "train.parquet"
# id-based training rows: the texts they name, each once (Arrow files, memory-mapped when read)
SNAPSHOT_TRAIN_QUERIES = SNAPSHOT_DIR / "train_queries.arrow"
SNAPSHOT_TRAIN_CORPUS = SNAPSHOT_DIR / "train_corpus.arrow"
SNAPSHOT_EVAL = SNAPSHOT_DIR / "eval"  # one folder of Parquet files per evaluation set
SNAPSHOT_LEXICON = SNAPSHOT_DIR / "lexicon.json"  # the synthetic world's synonyms (quickstart teacher)
SNAPSHOT_MANIFEST = SNAPSHOT_DIR / "manifest.json"
VALIDATION_REPORT = Path("data/validation/report.json")
TEACHER_DIR = Path("data/teacher")
TEACHER_SCORED = TEACHER_DIR / "train_scored.parquet"
TEACHER_SHARDS_DIR = Path("data/teacher_shards")  # kept across runs: a crashed run resumes from it
EVAL_SHARDS_DIR = Path("data/eval_shards")  # the evaluated models' corpus vectors: kept, as the teacher's
BASE_MODEL_DIR = Path("models/base")
STUDENT_DIR = Path("models/student")
CHECKPOINTS_DIR = Path("models/checkpoints")  # kept across runs: a crashed training resumes from it
EXPORT_DIR = Path("models/export")  # the student's ONNX files, laid out as in its folder (merged at push)
EVAL_METRICS = Path("metrics/eval.json")
NDCG_TABLE = Path("metrics/ndcg_per_dataset.csv")
PER_QUERY = Path("metrics/per_query.csv")  # each scored model's headline metrics per query (committed)
RUNS_DIR = Path("data/runs")  # each scored model's top 100 per set, TREC run files (DVC cache)
PLOTS_DIR = Path("metrics/plots")
TRAIN_LOSS = Path("metrics/train_loss.csv")
CARD_DIR = Path("build/card")
PUSH_DIR = Path("build/push")
PUSH_PLAN = Path("build/push_plan.json")
RECORDS_DIR = Path("records")
# The stages that keep a record (records/<stage>.json), in the order dvc.yaml runs them
RECORDED_STAGES = ("snapshot", "validate", "teacher", "train", "export", "evaluate", "card", "push")


# A Hub revision pins only as a full commit id: a branch or a tag moves, and a short id is resolved
# against whatever the repository holds when it is read
COMMIT_ID = re.compile(r"[0-9a-f]{40}")


def pinned_revision(value: str | None) -> str | None:
    if value is not None and not COMMIT_ID.fullmatch(str(value)):
        raise ValueError(f"{value!r} is not a commit id: a Hub revision is pinned only by its full 40-hex commit "
                         "(a branch or a tag moves, a short id is resolved against the repository as it is then); "
                         "the commit is on the repository's page under 'Files and versions' > history")
    return value


Revision = Annotated[str | None, AfterValidator(pinned_revision)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticConfig(Section):
    """Size and difficulty of the quickstart's generated world (see pipeline.data.synthetic)."""

    seed: int = 13
    topics: PositiveInt = 50
    terms_per_topic: PositiveInt = 6
    terms_per_doc: PositiveInt = 4
    docs_per_topic: PositiveInt = 4
    filler_words: PositiveInt = 300
    filler_per_doc: int = Field(6, ge=0)
    train_queries_per_topic: PositiveInt = 48
    eval_queries_per_topic: PositiveInt = 2
    terms_per_query: PositiveInt = 3
    synonym_rate: float = Field(0.8, ge=0, le=1)
    filler_per_query: int = Field(2, ge=0)
    negatives_per_query: PositiveInt = 2

    @model_validator(mode="after")
    def _a_world_these_numbers_can_make(self) -> "SyntheticConfig":
        """Numbers no world satisfies fail here, at load, naming the keys that clash (the generator
        would otherwise draw forever, or fail deep inside with a bare sampling error)."""
        problems = [f"{small} {getattr(self, small)} > {big} {getattr(self, big)}: a draw takes {small} distinct "
                    f"words out of {big}" for small, big in (("terms_per_doc", "terms_per_topic"),
                                                              ("terms_per_query", "terms_per_topic"),
                                                              ("filler_per_doc", "filler_words"),
                                                              ("filler_per_query", "filler_words"))
                    if getattr(self, small) > getattr(self, big)]
        if self.topics < 2:
            problems.append(f"topics {self.topics}: a query's negatives come from other topics; use at least 2")
        elif self.negatives_per_query > self.docs_per_topic ** 2 * (self.topics - 1):
            problems.append(f"negatives_per_query {self.negatives_per_query} > the {self.docs_per_topic ** 2 * (self.topics - 1)} "
                            "distinct (positive, negative) pairs that topics and docs_per_topic allow")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class TrainDataConfig(Section):
    """Where the training rows come from, and what they are."""

    # "synthetic", a file (.jsonl .parquet .tsv .csv), a BEIR or NanoBEIR folder (its qrels split
    # becomes (query, positive) pairs), or a Hugging Face dataset id (pin `revision`)
    source: str = "synthetic"
    format: Literal["auto", "jsonl", "parquet", "tsv", "csv", "beir", "nanobeir", "hf"] = "auto"
    kind: Literal["pairs", "triplets", "scored"] = "triplets"
    columns: list[str] | None = None  # column names of a header-less tsv/csv, in order
    rename: dict[str, str] = {}  # source column -> pipeline column, e.g. {anchor: query}
    split: str = "train"  # Hugging Face split, or the BEIR/NanoBEIR qrels split
    config: str | None = None  # Hugging Face dataset config
    revision: Revision = None  # Hugging Face commit (40 hex); required for Hub ids
    # id-based rows (query_id, positive_id, negative_id...) are joined against these (tsv or jsonl)
    corpus: str | None = None
    queries: str | None = None


class EvalDataConfig(Section):
    """The held-out retrieval set(s). "synthetic"; a BEIR folder; a NanoBEIR folder (one set); or a
    Hugging Face dataset (format: hf), a Hub id pinned with `revision` or a local copy of one, in the
    NanoBEIR-en layout (configs corpus, queries and qrels, one split per set) or BEIR's layout on the
    Hub (configs corpus, queries and default, the qrels split `split`): MS MARCO dev is
    mteb/msmarco at revision c5a29a104738b98a9e76336939199e264163d4a0, split dev."""

    source: str = "synthetic"
    format: Literal["auto", "beir", "nanobeir", "hf"] = "auto"
    split: str = "test"  # the BEIR qrels split (MS MARCO: dev)
    revision: Revision = None  # Hugging Face commit (40 hex); required for Hub ids
    # hf: the sets to score, as split names (NanoSciFact) or sentence-transformers' short names
    # (scifact, msmarco, nq, ...); empty: every set the dataset has (NanoBEIR-en: all 13)
    datasets: list[str] = []


class SnapshotConfig(Section):
    train: TrainDataConfig = TrainDataConfig()
    eval: EvalDataConfig = EvalDataConfig()
    synthetic: SyntheticConfig = SyntheticConfig()


CHECKS = ("row_count", "not_null", "not_empty", "length", "duplicates",
          "query_is_positive", "positive_is_negative", "finite_scores", "mojibake",
          "qrels_missing_ids", "eval_leak", "corpus_duplicate_texts")
# real corpora (MS MARCO, NQ, Quora) hold the same text under several ids: worth knowing, not a refusal
DEFAULT_SEVERITY = {check: "warning" if check in ("mojibake", "corpus_duplicate_texts") else "error"
                    for check in CHECKS}


class ValidateConfig(Section):
    min_rows: PositiveInt = 10
    max_chars: PositiveInt = 20_000
    # what a failed check does: error stops the pipeline, warning is reported, off skips it
    severity: dict[str, Literal["error", "warning", "off"]] = DEFAULT_SEVERITY

    @field_validator("severity", mode="before")
    @classmethod
    def _yaml_off(cls, value: dict) -> dict:
        # YAML reads a bare `off` as false
        return {k: "off" if v is False else v for k, v in value.items()} if isinstance(value, dict) else value

    @field_validator("severity")
    @classmethod
    def _known_checks(cls, value: dict) -> dict:
        unknown = sorted(set(value) - set(CHECKS))
        if unknown:
            raise ValueError(f"unknown check(s) {unknown}; known: {list(CHECKS)}")
        return {**DEFAULT_SEVERITY, **value}


class RayConfig(Section):
    """Where a stage's shards run with backend: ray (pipeline.data.ray_shards)."""
    # a running cluster: "auto" (one `ray start` began on this machine) or ray://HOST:10001; the
    # RAY_ADDRESS variable wins; none: Ray starts one on this machine for the run
    address: str | None = None
    # workers (Ray actors, each loading the model once); none: as many as the cluster's CPUs (or GPUs) hold
    workers: PositiveInt | None = None
    cpus_per_worker: PositiveInt = 1  # also each worker's torch threads
    # auto: one GPU per worker where the cluster has GPUs, none otherwise
    gpus_per_worker: NonNegativeFloat | Literal["auto"] = "auto"


class TeacherConfig(Section):
    # lexicon-bm25: BM25 over the training documents with queries expanded through the synthetic
    # lexicon (the quickstart's teacher); cross-encoder: any CrossEncoder folder or Hub id;
    # bi-encoder: any SentenceTransformer folder or Hub id (its similarity of query and document).
    kind: Literal["lexicon-bm25", "cross-encoder", "bi-encoder"] = "lexicon-bm25"
    model: str | None = None
    revision: Revision = None  # the Hub commit (40 hex); required for a Hub id
    # pairs per forward pass; "auto": the largest that fits on a GPU, a measured default on CPU
    batch_size: PositiveInt | Literal["auto"] = "auto"
    # auto: bf16 autocast on CUDA, fp32 on CPU; bf16 on CPU pays off with AVX512-BF16 or AMX
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # unique (query, document) pairs per shard: the most work a crash can lose
    shard_size: PositiveInt = 50_000
    # pairs snapshots: mine this many hard negatives per row with the bi-encoder teacher, among the
    # snapshot's positives, and score them (0: keep pairs for contrastive training)
    hard_negatives: NonNegativeInt = 0
    # multiplies the teacher's scores before margins are taken: a bi-encoder's cosine margins are
    # much narrower than a SPLADE student's dot-product margins (MiniLM vs splade-tiny: 58x)
    score_scale: PositiveFloat = 1.0
    # several ranks: how long one rank waits for another (rank 0 for the next shard, the others for
    # rank 0's batch-size plan) before failing with the missing shards and ranks named
    wait_seconds: PositiveFloat = 3600.0
    # local: this process (and the ranks torchrun starts); ray: the shards as tasks of Ray workers
    backend: Literal["local", "ray"] = "local"
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _mining_needs_a_bi_encoder(self) -> "TeacherConfig":
        if self.hard_negatives and self.kind != "bi-encoder":
            raise ValueError("hard_negatives needs kind: bi-encoder (it mines with the teacher's embeddings)")
        return self


class StudentConfig(Section):
    """Shape of the BertForMaskedLM built from config when train.base_model is "synthetic"."""

    vocab_size: PositiveInt = 3000
    hidden_size: PositiveInt = 128
    layers: PositiveInt = 2
    heads: PositiveInt = 2
    dropout: float = Field(0.1, ge=0, lt=1)
    seed: int = 0


class CSRConfig(Section):
    """The sparse autoencoder head of a CSR model and the weights of CSRLoss."""

    hidden_dim: PositiveInt = 4096
    k: PositiveInt = 256  # active dimensions per vector
    k_aux: PositiveInt = 512
    beta: float = Field(0.1, ge=0)  # weight of the auxiliary reconstruction loss
    gamma: float = Field(1.0, ge=0)  # weight of the main (ranking or distillation) loss


class TrainConfig(Section):
    # splade: an MLM with SPLADE max pooling; csr: a dense sentence-transformers model with a sparse
    # autoencoder head (Contrastive Sparse Representation); inference-free-splade: documents through
    # the MLM with SPLADE pooling, queries a learnt weight per token (no transformer at query time)
    architecture: Literal["splade", "csr", "inference-free-splade"] = "splade"
    # splade, inference-free-splade: "synthetic" (a tiny student built from config) or a
    # *ForMaskedLM folder / Hub id; csr: a sentence-transformers folder / Hub id
    base_model: str = "synthetic"
    revision: Revision = None  # the Hub commit (40 hex); required for a Hub id
    student: StudentConfig = StudentConfig()
    # margin-mse: MSE on the teacher's margins; kl-div: KL divergence to the teacher's score lists;
    # mnrl: in-batch negatives (contrastive), needs no teacher
    loss: Literal["margin-mse", "kl-div", "mnrl"] = "margin-mse"
    # mnrl: similarities are multiplied by this before the softmax over the batch. 1 (the library's
    # default) suits SPLADE's dot products (tens); a CSR head on a normalised backbone (MiniLM) gives
    # dot products under 1, which a softmax over a batch reads as nearly uniform: use about 20
    mnrl_scale: PositiveFloat = 1.0
    csr: CSRConfig = CSRConfig()
    # inference-free-splade: the query tokens' weights start at 1 (sentence-transformers' default) or
    # at their IDF over the training documents; they learn at query_learning_rate (the reference
    # recipes: 1e-3, against 2e-5 for the document encoder)
    query_weights: Literal["ones", "idf"] = "ones"
    query_learning_rate: PositiveFloat = 1e-3
    max_seq_length: PositiveInt = 32
    epochs: PositiveFloat = 8
    # stop after this many steps, whatever epochs says (a run over part of a set of tens of millions
    # of rows); null: the epochs' steps
    max_steps: PositiveInt | None = None
    batch_size: PositiveInt = 32
    # encode the batch in pieces of this many rows (GradCache: sentence-transformers' CachedSpladeLoss),
    # so a large contrastive batch trains in the memory of a small one, with the same gradients;
    # null: the whole batch at once
    mini_batch_size: PositiveInt | None = None
    learning_rate: PositiveFloat = 3e-4
    # a long learning-rate warm-up: a student from random weights keeps its vectors alive until it
    # starts learning (docs/training.md, which settings matter)
    warmup_ratio: float = Field(0.2, ge=0, lt=1)
    query_regularizer_weight: float = Field(0.2, ge=0)
    document_regularizer_weight: float = Field(0.1, ge=0)
    # the FLOPS weights grow quadratically from 0 over this share of the steps (SPLADE's warm-up;
    # sentence-transformers' default is 1/3, which a short run from random weights does not survive)
    regularizer_warmup_ratio: float = Field(1.0, ge=0, le=1)
    # keep only the top-k dimensions of each vector the model encodes (saved with it); null: all
    # (a CSR model: its autoencoder's k)
    max_active_dims: PositiveInt | None = 32
    # auto: bf16 autocast on CUDA, fp32 on CPU
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    # SPLADE through pipeline.modelling.splade_head: no (texts, tokens, vocabulary) logits, a sparse backward
    # (the same vectors and gradients, several times faster); false: sentence-transformers' own head
    fused_head: bool = True
    # random; no-duplicates (no text twice in a batch: in-batch negatives stay negative, for mnrl);
    # length-grouped (rows of similar length together: less padding, faster)
    batch_sampler: Literal["random", "no-duplicates", "length-grouped"] = "random"
    save_steps: PositiveInt = 500  # checkpoint every N steps; a rerun resumes from the latest
    logging_steps: PositiveInt = 1
    # score the held-out set every N steps during training (logged at the step); null: only at the end
    eval_steps: PositiveInt | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _csr_needs_a_dense_model(self) -> "TrainConfig":
        if self.architecture == "csr" and self.base_model == "synthetic":
            raise ValueError("architecture csr needs base_model: a sentence-transformers folder or Hub id")
        if self.architecture == "csr" and self.max_active_dims and self.max_active_dims > self.csr.k:
            raise ValueError(f"max_active_dims {self.max_active_dims} > csr.k {self.csr.k}: a CSR vector has at "
                             "most k active dimensions (null keeps k)")
        if self.architecture == "csr" and self.mini_batch_size:
            raise ValueError("mini_batch_size (cached SpladeLoss) needs a SPLADE architecture; csr trains with CSRLoss")
        if self.architecture == "inference-free-splade" and self.query_regularizer_weight:
            raise ValueError(f"architecture inference-free-splade regularises documents only (its queries are "
                             f"their own tokens): set query_regularizer_weight 0, not {self.query_regularizer_weight}")
        return self


class ExportConfig(Section):
    """ONNX files of a SPLADE student's MLM (fp32 and int8), for CPU serving; checked against torch."""

    onnx: bool = True  # false: the stage writes no ONNX (and evaluate scores no int8 model)
    parity_texts: PositiveInt = 64  # evaluation queries and documents compared with torch's vectors


class IndexConfig(Section):
    """How each query's top 100 is found: exact (sparse products, what the stock evaluator ranks),
    blockmax (a block-max pruned index, a few bytes per posting: pipeline.retrieval.blockmax) or seismic
    (pyseismic-lsr's approximate learned-sparse index, 28 B per posting to build: extra `scale`);
    auto: exact up to exact_max_docs documents (1M took 45 ms per query on one CPU core), blockmax
    past it when its build fits memory_gb (exact otherwise, the reason in eval.json).

    Rank-safe by default: blockmax with every query term (query_cut null) and no early stop
    (heap_factor 1) returns exact search's top 100, its candidates rescored exactly (up to ties within
    its weights' rounding). A query_cut, a heap_factor below 1, a recall_target or seismic make the
    search approximate: faster, and eval.json then reports, on sweep_queries of the queries searched
    both ways, how far each headline metric is from exact search's."""

    kind: Literal["auto", "exact", "blockmax", "seismic"] = "auto"
    exact_max_docs: PositiveInt = 2_000_000
    query_cut: PositiveInt | None = None  # approximate: a query's largest terms searched (null: all)
    heap_factor: float = Field(1.0, gt=0, le=1)  # approximate below 1 (prunes more)
    # approximate: choose query_cut and heap_factor instead, the fastest whose recall@100 against exact
    # reaches this on sweep_queries of the queries (null: use the two above)
    recall_target: float | None = Field(None, gt=0, le=1)
    sweep_queries: PositiveInt = 200  # the sweep's queries, and those an approximate search is checked on
    # blockmax / seismic: the memory the index's build may take, checked (estimated from the corpus's
    # postings) before it starts; null: three quarters of this machine's memory
    memory_gb: PositiveFloat | None = None
    block_size: int = Field(4, gt=0, le=255)  # blockmax: documents per block (smaller: tighter bounds, more blocks)
    # exact: shards scored at once (0: one per core); each adds a shard to the memory it holds
    threads: NonNegativeInt = 0

    def rank_safe(self, kind: str) -> bool:
        """Whether an index of `kind` searched with these settings returns exact search's top k."""
        return kind == "exact" or (kind == "blockmax" and self.query_cut is None and self.heap_factor == 1
                                   and self.recall_target is None)


class IntervalConfig(Section):
    """How sure each number is: a percentile bootstrap over queries (paired for differences, within
    each set when there are several), and the paired randomization test the gate decides by."""

    resamples: int = Field(2000, ge=1000)
    confidence: float = Field(0.95, gt=0, lt=1)
    test_resamples: int = Field(10_000, ge=1000)  # the smallest p-value it can give is 1 / this
    seed: int = 0


class EvaluateConfig(Section):
    batch_size: PositiveInt = 64
    # fp32: the stock evaluator's numbers (within 1e-4); bf16: autocast, faster on CUDA and on CPUs
    # with AVX512-BF16 or AMX, ranking metrics within about 0.005; auto: bf16 on CUDA, fp32 elsewhere
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # training triplets checked for "positive ranked above negative" (the first N; all if fewer)
    max_train_triplets: PositiveInt = 1000
    # also score the student keeping only its top-k dimensions, for each k (CSR cards report 4...256)
    max_active_dims: list[PositiveInt] = []
    index: IndexConfig = IndexConfig()
    intervals: IntervalConfig = IntervalConfig()
    # corpus vectors per shard file (data/eval_shards/): the most encoding a crash can lose, and the
    # most of the corpus exact retrieval holds in memory at once
    shard_docs: PositiveInt = 100_000
    # several ranks: how long rank 0 waits for the next corpus shard before failing, naming the missing ones
    wait_seconds: PositiveFloat = 1800
    # local: this process (and the ranks torchrun starts); ray: the corpus shards as tasks of Ray workers
    backend: Literal["local", "ray"] = "local"
    ray: RayConfig = RayConfig()


class CardConfig(Section):
    model_name: str = "SPLADE quickstart (synthetic)"
    language: str = "en"
    license: str = "apache-2.0"


# the metrics reported side by side (student, untrained start, BM25, gain) in records and cards, with
# their per-query values and intervals
HEADLINE = ("dot_ndcg@10", "dot_mrr@10", "dot_map@100", "dot_recall@10", "dot_accuracy@1", "dot_graded_ndcg@10")

# What the push gate may compare (higher is better): the ranking metrics of sentence-transformers'
# IR evaluator at its default cut-offs, as pipeline.evaluation.measures names them, and graded nDCG@10
GATE_METRICS = tuple([f"dot_{name}@{k}" for name in ("accuracy", "precision", "recall") for k in (1, 3, 5, 10)]
                     + ["dot_ndcg@10", "dot_mrr@10", "dot_map@100", "dot_graded_ndcg@10"])


class GateConfig(Section):
    """What the model must reach to be pushed (and to become the registry's champion), on its main
    evaluation result (the mean when there are several sets): at least `minimum`, and by `rule`
    significance: significantly above the untrained model it started from (`beat_base`) and not
    significantly below the champion (one-sided paired randomization tests on the per-query values
    at `alpha`); threshold: above its untrained start and no more than `max_drop` below the
    champion. The champion is the registry's champion of the same evaluation (source, revision,
    split, sets and content hash); under threshold, the Hub push compares with the card on its
    branch instead, as before."""

    metric: str = "dot_ndcg@10"
    rule: Literal["significance", "threshold"] = "significance"
    alpha: float = Field(0.05, gt=0, lt=1)
    minimum: float | None = None
    max_drop: float | None = 0.01  # threshold; and significance against a champion with no per-query values
    beat_base: bool = True


class PushConfig(Section):
    repo_id: str = "your-username/splade-quickstart"
    dry_run: bool = True  # false uploads, with the token in the HF_TOKEN environment variable
    private: bool = True
    revision: str = "main"  # the branch to commit to (created from main if missing)
    gate: GateConfig = GateConfig()
    attempts: PositiveInt = 5  # tries of each Hub call that fails with a 5xx, a 429 or a timeout
    backoff_seconds: float = Field(2.0, ge=0)  # wait before the first retry, doubled after each


class TrackingConfig(Section):
    experiment: str = "sparse-encoder"
    tracking_uri: str = "sqlite:///mlflow.db"  # or a tracking server, http://host:5000
    artifact_root: str = "mlruns"
    # the registry name (each recipe has its own); aliases challenger, champion and
    # champion-<evaluation id> (the best version on each evaluation)
    registered_model: str = "sparse-encoder"
    country_iso_code: str = Field("USA", min_length=3, max_length=3)


class Params(Section):
    snapshot: SnapshotConfig = SnapshotConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    teacher: TeacherConfig = TeacherConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    card: CardConfig = CardConfig()
    push: PushConfig = PushConfig()
    tracking: TrackingConfig = TrackingConfig()

    def section(self, stage: str) -> Section:
        """The params section a stage reads (validate's is stored as validate_)."""
        return self.validate_ if stage == "validate" else getattr(self, stage)

    def teacher_scores(self) -> bool:
        """Whether the teacher stage scores rows: triplets, or pairs it mines negatives for (pairs
        train contrastively; a scored snapshot carries its own scores)."""
        kind = self.snapshot.train.kind
        return kind == "triplets" or (kind == "pairs" and self.teacher.hard_negatives > 0)

    @model_validator(mode="after")
    def _stages_agree(self) -> "Params":
        """Combinations a later stage would refuse fail here, at load, before any compute, naming
        the keys that clash."""
        train_data, teacher, loss = self.snapshot.train, self.teacher, self.train.loss
        problems = []
        if teacher.hard_negatives and train_data.kind != "pairs":
            problems.append("teacher.hard_negatives mines negatives for a pairs snapshot; "
                            f"snapshot.train.kind is {train_data.kind}")
        if self.teacher_scores():
            if teacher.kind != "lexicon-bm25" and not teacher.model:
                problems.append(f"teacher.kind {teacher.kind} needs teacher.model (a folder or Hub id) to "
                                f"score the snapshot's {train_data.kind}")
            if teacher.kind == "lexicon-bm25" and train_data.source != "synthetic":
                problems.append("teacher.kind lexicon-bm25 scores with the synthetic world's lexicon, but "
                                f"snapshot.train.source is {train_data.source!r}: use teacher.kind "
                                "cross-encoder (or bi-encoder) with teacher.model")
        if loss != "mnrl" and train_data.kind == "pairs" and not teacher.hard_negatives:
            problems.append(f"train.loss {loss} needs teacher scores, but snapshot.train.kind pairs has no "
                            "negatives to score: use train.loss mnrl, or mine negatives "
                            "(teacher.hard_negatives with teacher.kind bi-encoder)")
        if self.push.gate.metric not in GATE_METRICS:
            problems.append(f"push.gate.metric {self.push.gate.metric!r} is not a ranking metric the "
                            f"evaluate stage reports; one of {list(GATE_METRICS)}")
        elif self.push.gate.rule == "significance" and self.push.gate.metric not in HEADLINE:
            problems.append(f"push.gate.rule significance tests per-query values, which evaluate keeps for "
                            f"{list(HEADLINE)}; push.gate.metric {self.push.gate.metric!r} is not among them "
                            "(or use rule threshold)")
        if self.evaluate.index.kind == "seismic" and importlib.util.find_spec("seismic") is None:
            problems.append("evaluate.index.kind seismic needs pyseismic-lsr: pip install -e '.[scale]'")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ParamsError(ValueError):
    pass


def unpinned_hub_id(key: str, named: str | None, revision: str | None) -> str | None:
    """The complaint about a model named by a Hub id (no folder of that name here) without a
    revision to pin it; None when it is a local folder, pinned, synthetic or unset."""
    if not named or named == "synthetic" or Path(named).is_dir() or revision:
        return None
    section = key.rsplit(".", 1)[0]
    return (f"{key} {named!r} is a Hub id (no folder of that name here): pin it with {section}.revision "
            "(its full 40-hex commit) so the run can be reproduced")


def unpinned_models(params: Params) -> list[str]:
    """The models the run would load from the Hub at no pinned revision (this machine's folders decide
    what is local, so this is checked when params are read for a run, not in the schema)."""
    named = [("train.base_model", params.train.base_model, params.train.revision)]
    if params.teacher_scores() and params.teacher.kind != "lexicon-bm25":
        named.append(("teacher.model", params.teacher.model, params.teacher.revision))
    return [problem for problem in (unpinned_hub_id(*each) for each in named) if problem]


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate a params file; errors name the file and each offending key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(part) for part in err["loc"])
            got = "" if err["type"] == "missing" else f" (got {err['input']!r})"
            problems.append(f"  {key or '(params as a whole)'}: {err['msg']}{got}")
        raise ParamsError(f"{path}: invalid params\n" + "\n".join(problems)) from None
    unpinned = unpinned_models(params)
    if unpinned:
        raise ParamsError(f"{path}: invalid params\n" + "\n".join(f"  {problem}" for problem in unpinned))
    return params
