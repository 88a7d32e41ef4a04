"""Building and loading the sparse encoders: what the train and evaluate stages and the benchmarks
share, so that none of them imports another stage for it.

- splade_encoder: an MLM (a *ForMaskedLM folder or Hub id) with SPLADE max pooling;
- csr_encoder: a dense sentence-transformers model with a top-k sparse autoencoder head (CSR);
- inference_free_splade: documents through an MLM with SPLADE pooling, queries a learnt weight per
  token (a Router of SparseStaticEmbedding and the MLM, as sentence-transformers builds them);
- build_synthetic_mlm: a small random BertForMaskedLM whose WordPiece vocabulary is learnt from
  the training text (the quickstart's student);
- load_encoder: a saved SparseEncoder folder, at a given max length.
Every model built here is an ordinary SparseEncoder; training runs SPLADE ones through
pipeline.modelling.splade_head's fused head, which changes how they compute, not what they are.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

import torch

from pipeline.config import StudentConfig, TrainConfig

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_vocabulary(texts: Iterable[str], size: int) -> list[str]:
    """A WordPiece vocabulary learnt from `texts`: every character (as a word start and as a ##
    continuation) so that any word can be spelt, then the most frequent whole words.

    Deterministic by construction (ties go alphabetically); the `tokenizers` WordPiece trainer
    breaks ties in hash-map order, which gave a different vocabulary on every run."""
    from collections import Counter

    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer, pre_tokenizer = BertNormalizer(lowercase=True), BertPreTokenizer()
    counts = Counter(word for text in texts
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    characters = sorted({c for word in counts for c in word})
    vocabulary = SPECIAL_TOKENS + characters + [f"##{c}" for c in characters]
    known = set(vocabulary)
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(vocabulary) >= size:
            break
        if word not in known:
            vocabulary.append(word)
    return vocabulary


def build_synthetic_mlm(texts: Iterable[str], cfg: StudentConfig, max_seq_length: int, out: Path) -> None:
    """A randomly initialised BertForMaskedLM with a WordPiece vocabulary learnt from `texts`."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(wordpiece_vocabulary(texts, cfg.vocab_size)) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(out / "vocab.txt"), model_max_length=max_seq_length)
    torch.manual_seed(cfg.seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                        intermediate_size=4 * cfg.hidden_size,
                        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                        max_position_embeddings=max(64, max_seq_length))
    BertForMaskedLM(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def hub_kwargs(revision: str | None) -> dict:
    return {"revision": revision} if revision else {}


def splade_encoder(mlm_path: str, max_seq_length: int, revision: str | None = None):
    """SPLADE = MLM logits, log1p(relu), max over tokens."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import SpladePooling, Transformer

    pinned = hub_kwargs(revision)
    transformer = Transformer(mlm_path, transformer_task="fill-mask", max_seq_length=max_seq_length,
                              model_kwargs=pinned, processor_kwargs=pinned, config_kwargs=pinned)
    vocab_size = transformer.auto_model.config.vocab_size
    # without the dimension SpladePooling reports the hidden size until saved and reloaded
    return SparseEncoder(modules=[transformer, SpladePooling("max", embedding_dimension=vocab_size)])


def idf_weights(tokenizer, documents: Iterable[str]) -> torch.Tensor:
    """BM25's IDF of every vocabulary token over `documents` (a token no document has gets the
    largest), the weight an inference-free query gives a token before training."""
    import numpy as np

    counts = np.zeros(len(tokenizer.get_vocab()), dtype=np.int64)
    documents, n = iter(documents), 0
    while chunk := list(itertools.islice(documents, 10_000)):
        n += len(chunk)
        # whole documents (verbose=False: no warning that they exceed the encoder's length)
        for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            counts[np.unique(np.asarray(ids, dtype=np.int64))] += 1
    return torch.from_numpy(np.log1p((n - counts + 0.5) / (counts + 0.5))).float()


def inference_free_splade(mlm_path: str, max_seq_length: int, revision: str | None = None,
                          documents: Iterable[str] | None = None):
    """Inference-free SPLADE: the document route an MLM with SPLADE max pooling, the query route a
    weight per token of the same vocabulary (1, or the IDF over `documents` when given)."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import (
        Router,
        SparseStaticEmbedding,
    )

    document_side = splade_encoder(mlm_path, max_seq_length, revision)
    tokenizer = document_side[0].tokenizer
    weight = idf_weights(tokenizer, documents) if documents is not None else None
    router = Router.for_query_document(
        query_modules=[SparseStaticEmbedding(tokenizer=tokenizer, weight=weight, frozen=False)],
        document_modules=[document_side[0], document_side[1]])
    return SparseEncoder(modules=[router], similarity_fn_name="dot")


def csr_encoder(dense_path: str, cfg: TrainConfig):
    """CSR = a dense sentence-transformers model and a top-k sparse autoencoder on its embedding."""
    from sentence_transformers import SentenceTransformer, SparseEncoder
    from sentence_transformers.sparse_encoder.modules import SparseAutoEncoder

    dense = SentenceTransformer(dense_path, **hub_kwargs(cfg.revision))
    dense.max_seq_length = cfg.max_seq_length
    torch.manual_seed(cfg.seed)  # the autoencoder's initial weights
    head = SparseAutoEncoder(dense.get_embedding_dimension(), hidden_dim=cfg.csr.hidden_dim,
                             k=cfg.csr.k, k_aux=cfg.csr.k_aux)
    # the dense model's prompts (mxbai's query instruction) stay: encode_query applies "query"
    return SparseEncoder(modules=[*dense, head], prompts=dense.prompts,
                         default_prompt_name=dense.default_prompt_name)




def load_encoder(folder: Path, max_seq_length: int | None = None):
    """A saved SparseEncoder (SPLADE, CSR, or a plain MLM folder, which gets SPLADE pooling)."""
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(str(folder))
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model
