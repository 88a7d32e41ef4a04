"""The SPLADE head (vocabulary projection, relu, log1p, max over a text's real tokens) without the
texts x tokens x vocabulary logits, for training and for encoding.

sentence-transformers' SparseEncoder computes the MLM logits of every token, padding included, as
one (texts, tokens, vocabulary) tensor, activates and max-pools it in passes over that tensor, and
in training keeps it and a gradient of the same shape: 1.5 GB each in fp32 for 48 texts of 256
tokens at BERT's 30522 words. `fused_head(model)` runs the same stock modules differently (the
model, its state dict and what it saves are untouched):
- forward: each text's real tokens are projected on their own and max-pooled, keeping the argmax
  token; relu and log1p are monotonic, so they apply after the max, to one row per text;
- backward: a max passes its gradient to its argmax token only, and log1p(relu) has none where the
  max is <= 0, so the gradients of the hidden states, of the projection's weight and of its bias
  are sparse products over the (text, active dimension) pairs, not dense products over the logits.
The same vectors and gradients as stock (tests/test_splade_head.py), in O(texts x vocabulary) memory.

With a bf16 projection (under bf16 autocast, or asked for), the projection only finds each active
dimension's argmax token; its value is recomputed in fp32 from that token, a few hundred dot
products per text instead of 30522.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from types import MethodType

import numpy as np
import torch


def routed(model) -> bool:
    """Whether `model` is a Router of query and document routes (inference-free SPLADE)."""
    from sentence_transformers.sparse_encoder.modules import Router

    return len(model) == 1 and isinstance(model[0], Router)


def splade_route(model) -> list:
    """The modules that make a SPLADE vector: the model's own, or an inference-free model's document
    route (its query route has no MLM)."""
    if routed(model):
        return list(model[0].sub_modules["document"]) if "document" in model[0].sub_modules else []
    return list(model)


def projection(model) -> torch.nn.Linear | None:
    """The MLM's vocabulary projection when `model` (or its document route) is an MLM with SPLADE
    max pooling (the models this module runs), else None."""
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    modules = splade_route(model)
    if len(modules) != 2 or not isinstance(modules[1], SpladePooling) or modules[1].pooling_strategy != "max":
        return None
    head = getattr(getattr(modules[0], "auto_model", None), "get_output_embeddings", lambda: None)()
    return head if isinstance(head, torch.nn.Linear) else None


def activation(z: torch.Tensor, twice: bool) -> torch.Tensor:
    """SpladePooling's log1p(relu(z)), or log1p(log1p(relu(z))) for its "log1p_relu"."""
    out = z.clamp_min(0).log1p()
    return out.log1p() if twice else out


def activation_slope(z: torch.Tensor, twice: bool) -> torch.Tensor:
    """d activation / dz, zero where z <= 0 (relu's gradient)."""
    slope = (z > 0) / (1 + z.clamp_min(0))
    return slope / (1 + z.clamp_min(0).log1p()) if twice else slope


# logits held at once: a group of texts is projected in one product (one text of 256 tokens at
# 30522 words fills it; a whole batch of short texts with a small vocabulary shares one)
LOGITS_PER_GROUP = 1 << 23


# batches whose whole logits tensor is at most this take the stock head (measured on the quickstart:
# 600 steps of 32 triplets, 941 words, 32 tokens: stock 51 s, this head 57 s)
STOCK_HEAD_UP_TO = LOGITS_PER_GROUP


def text_groups(lengths: list[int], vocabulary: int) -> list[tuple[int, int, int]]:
    """Consecutive texts as (first, end, longest), each group's (texts x longest x vocabulary)
    logits within LOGITS_PER_GROUP (a longer text alone)."""
    groups, first, longest = [], 0, 0
    for text, length in enumerate(lengths):
        if text > first and (text - first + 1) * max(longest, length) * vocabulary > LOGITS_PER_GROUP:
            groups.append((first, text, longest))
            first, longest = text, 0
        longest = max(longest, length)
    if lengths:
        groups.append((first, len(lengths), longest))
    return groups


class MaxPooledProjection(torch.autograd.Function):
    """(tokens, hidden) states of all texts -> (texts, vocabulary) SPLADE vectors, where text i is
    the tokens at `segments[i]`. Backward through the argmax tokens of the active dimensions only."""

    @staticmethod
    def forward(ctx, flat, weight, bias, segments, low_precision, twice, keep_for_backward):
        with torch.autocast(flat.device.type, enabled=False):
            dtype = torch.bfloat16 if low_precision else torch.float32
            weight_p, bias_p = weight.to(dtype), bias.to(dtype)
            vocabulary, device = len(weight), flat.device
            lengths = [len(s) for s in segments]
            positions = torch.nn.utils.rnn.pad_sequence(list(segments), batch_first=True)  # (texts, longest)
            groups = text_groups(lengths, vocabulary)
            # one reused buffer: a fresh block per group makes the allocator hold on to memory
            buffer = torch.empty(max((e - f) * n * vocabulary for f, e, n in groups), dtype=dtype, device=device)
            maxima = torch.empty(len(segments), vocabulary, dtype=dtype, device=device)
            with_argmax = keep_for_backward or low_precision
            rows, cols, tokens_at = [], [], []
            for first, end, longest in groups:
                where = positions[first:end, :longest]
                states = flat[where].to(dtype).transpose(1, 2)  # (texts, hidden, tokens)
                # vocabulary-major: the max runs along contiguous rows
                logits = torch.matmul(weight_p, states, out=buffer[:(end - first) * vocabulary * longest]
                                      .view(end - first, vocabulary, longest))
                padding = torch.arange(longest, device=device) >= torch.tensor(lengths[first:end], device=device)[:, None]
                if min(lengths[first:end]) < longest:
                    logits.masked_fill_(padding[:, None, :], float("-inf"))
                # the bias is the same for every token: added after the max, to one row, not to n
                # (rounding is monotonic, so this is the max of the biased logits to the bit)
                torch.amax(logits, 2, out=maxima[first:end]).add_(bias_p)
                if with_argmax:  # of the active dimensions only (a few hundred of 30522): cheaper
                    text, active = (maxima[first:end] > 0).nonzero().unbind(1)
                    rows.append(text + first)
                    cols.append(active)
                    tokens_at.append(where[text, logits[text, active].argmax(1)])
            if with_argmax:
                rows, cols, tokens_at = torch.cat(rows), torch.cat(cols), torch.cat(tokens_at)
            else:
                rows, cols = (maxima > 0).nonzero().unbind(1)
            if low_precision:  # the chosen token's exact value
                values = (flat[tokens_at].float() * weight[cols].float()).sum(1) + bias[cols].float()
            else:
                values = maxima[rows, cols]
            pooled = torch.zeros(len(segments), vocabulary, device=device)
            pooled[rows, cols] = activation(values, twice)
        if keep_for_backward:
            ctx.save_for_backward(flat, weight, rows, cols, tokens_at, values)
            ctx.twice = twice
            ctx.bias_dtype = bias.dtype
        return pooled

    @staticmethod
    def backward(ctx, grad_pooled):
        flat, weight, rows, cols, tokens_at, z = ctx.saved_tensors
        with torch.autocast(flat.device.type, enabled=False):
            g = grad_pooled[rows, cols].float() * activation_slope(z, ctx.twice)
            # the logits' gradient: g at each active pair's (argmax token, dimension), zero elsewhere;
            # sparse products with it (an untrained head has thousands of active dimensions per
            # text, and the sparse kernels stay as fast as dense ones there, without a (pairs,
            # hidden) gather)
            logits_grad = torch.sparse_coo_tensor(torch.stack([tokens_at, cols]), g, (len(flat), len(weight)))
            want_flat, want_weight, want_bias = ctx.needs_input_grad[:3]
            grad_flat = torch.sparse.mm(logits_grad, weight.float()).to(flat.dtype) if want_flat else None
            grad_weight = torch.sparse.mm(logits_grad.t(), flat.float()).to(weight.dtype) if want_weight else None
            grad_bias = (torch.zeros(len(weight), device=weight.device).index_add_(0, cols, g).to(ctx.bias_dtype)
                         if want_bias else None)
        return grad_flat, grad_weight, grad_bias, None, None, None, None


def text_segments(features: dict) -> list[torch.Tensor]:
    """Per text, the positions of its real tokens in the flattened token states: from the attention
    mask of a padded batch, or from sentence-transformers' unpadded (flash-attention) layout."""
    if "cu_seq_lens_q" in features:
        bounds = features["cu_seq_lens_q"].tolist()
        device = features["token_embeddings"].device
        return list(torch.arange(bounds[-1], device=device).split([e - s for s, e in zip(bounds, bounds[1:])]))
    mask = features["attention_mask"]
    return list(mask.reshape(-1).nonzero().squeeze(1).split(mask.sum(1).tolist()))


def fused_pooling_forward(pooling, features: dict) -> dict:
    """SpladePooling.forward on the MLM's pre-projection states (the projection is deferred here)."""
    head, projection_dtype = pooling.__dict__["fused_with"]
    hidden = features["token_embeddings"]
    flat = hidden.reshape(-1, hidden.shape[-1])
    device = flat.device.type
    if projection_dtype is None:
        projection_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
    if len(flat) * len(head.weight) <= STOCK_HEAD_UP_TO:
        # small logits (short texts, a small vocabulary: the quickstart's student): the stock head
        # is as fast there, and its memory is no concern
        features["token_embeddings"] = torch.nn.functional.linear(hidden, head.weight, head.bias)
        return type(pooling).forward(pooling, features)
    bias = head.bias if head.bias is not None else torch.zeros(len(head.weight), device=flat.device)
    keep = torch.is_grad_enabled() and (flat.requires_grad or head.weight.requires_grad)
    pooled = MaxPooledProjection.apply(flat, head.weight, bias, text_segments(features),
                                       projection_dtype == torch.bfloat16,
                                       pooling.activation_function == "log1p_relu", keep)
    if pooling.embedding_dimension is None:
        pooling.embedding_dimension = pooled.shape[1]
    features["sentence_embedding"] = pooled
    return features


def identity(states: torch.Tensor) -> torch.Tensor:
    return states


@contextmanager
def fused_head(model, projection_dtype: torch.dtype | None = None):
    """Within: `model` (a SPLADE SparseEncoder; anything else is left as it is) computes its vectors
    and their gradients through MaxPooledProjection. The vocabulary projection's forward becomes
    the identity and the pooling projects, both as instance attributes: no module, parameter or
    config changes, so checkpoints and saves are stock. `projection_dtype` None follows autocast."""
    head = projection(model)
    if head is None:
        yield False
        return
    pooling = splade_route(model)[1]
    head.forward = identity
    pooling.__dict__["fused_with"] = (head, projection_dtype)  # not a submodule: the state dict stays stock
    pooling.forward = MethodType(fused_pooling_forward, pooling)
    try:
        yield True
    finally:
        del head.forward, pooling.forward
        pooling.__dict__.pop("fused_with")


def encode(model, texts: list[str], side: str, batch_size: int, bf16: bool = False,
           show_progress_bar: bool = False) -> torch.Tensor:
    """Sparse (COO, float32, on the CPU) vectors of `texts`, in their order, as
    model.encode_query (side "query") or model.encode_document (side "document") gives them.
    Texts go longest first (fail fast on memory, little padding per batch).

    bf16 (fast on CUDA and on CPUs with AVX512-BF16 or AMX): the vocabulary projection, most of a
    small SPLADE's work, runs in bf16 with its active values recomputed in fp32; the encoder runs
    under bf16 autocast on CUDA only. Measured on splade-tiny (SciFact documents): a bf16 encoder
    moves values by up to 0.08, the bf16 projection with fp32 recompute by up to 0.015 (mean 6e-8)."""
    from sentence_transformers.util import select_max_active_dims
    from tqdm.auto import tqdm

    if routed(model) and side == "document" and projection(model) is not None:
        # an inference-free model's documents: its document route (the same modules) as a plain SPLADE
        from sentence_transformers import SparseEncoder

        documents = SparseEncoder(modules=splade_route(model), device=str(model.device))
        documents.max_active_dims = model.max_active_dims
        return encode(documents, texts, side, batch_size, bf16, show_progress_bar)
    vectors = GrowingCoo()
    if projection(model) is None or routed(model):  # sentence-transformers' own encoding (and routing)
        # a call a batch: its encode keeps every vector apart until the call ends (the fragmentation
        # GrowingCoo avoids); the batches are its own (its order), so that what depends on a
        # batch's other texts (int8 ONNX quantizes each batch's activations with a scale of their
        # own) is as it would be
        order = np.argsort([-len(text) for text in texts]).tolist()
        stock = model.encode_query if side == "query" else model.encode_document
        with torch.autocast(model.device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            for start in tqdm(range(0, len(texts), batch_size), desc=f"encoding {side}s",
                              disable=not show_progress_bar):
                vectors.append(start, stock([texts[i] for i in order[start:start + batch_size]],
                                            batch_size=batch_size, convert_to_tensor=True).float().cpu())
        return vectors.tensor(order)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    prompt = model.prompts.get(side)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and model.device.type == "cuda" else nullcontext()
    model.eval()
    with torch.inference_mode(), autocast, fused_head(model, torch.bfloat16 if bf16 else torch.float32):
        for start in tqdm(range(0, len(texts), batch_size), desc=f"encoding {side}s",
                          disable=not show_progress_bar):
            features = model.preprocess([texts[i] for i in order[start:start + batch_size]], prompt=prompt)
            features = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
            pooled = model(features)["sentence_embedding"]
            if model.max_active_dims:  # a model saved with a top-k cap, as encode applies it
                pooled = select_max_active_dims(pooled, model.max_active_dims)
            vectors.append(start, pooled.cpu())
    return vectors.tensor(order)


class GrowingCoo:
    """Sparse rows appended a batch at a time into buffers that double. Each batch's few kept
    entries in allocations of their own would land in the holes its freed temporaries left, and
    glibc, then unable to fit the next batch's temporaries there, grows the heap by about one
    batch's temporaries per batch: +1.7 GB over a 100,000-passage shard (measured), where these
    buffers hold 20 bytes an entry."""

    def __init__(self):
        self.indices = torch.empty(2, 0, dtype=torch.long)
        self.values = torch.empty(0)
        self.size, self.width = 0, 0

    def append(self, first_row: int, batch: torch.Tensor) -> None:
        """`batch` (dense or sparse) holds rows first_row, first_row + 1, ..."""
        batch = batch.coalesce() if batch.is_sparse else batch.to_sparse()
        count = batch._nnz()
        if self.size + count > self.values.numel():
            capacity = max(2 * self.values.numel(), self.size + count, 1 << 16)
            indices, values = torch.empty(2, capacity, dtype=torch.long), torch.empty(capacity)
            indices[:, :self.size], values[:self.size] = self.indices[:, :self.size], self.values[:self.size]
            self.indices, self.values = indices, values
        self.indices[:, self.size:self.size + count] = batch.indices()
        self.indices[0, self.size:self.size + count] += first_row
        self.values[self.size:self.size + count] = batch.values()
        self.size += count
        self.width = batch.shape[1]

    def tensor(self, order: list[int]) -> torch.Tensor:
        """The rows as one coalesced COO tensor, row i moved to order[i]."""
        indices = self.indices[:, :self.size].clone()
        indices[0] = torch.tensor(order, dtype=torch.long)[indices[0]]
        return torch.sparse_coo_tensor(indices, self.values[:self.size], (len(order), self.width),
                                       check_invariants=False).coalesce()
