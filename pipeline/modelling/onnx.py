"""ONNX export of a SPLADE student's MLM, and SparseEncoders that run it with ONNX Runtime: what the
export stage, the evaluate stage and the benchmark share.

sentence-transformers exports and loads ONNX through optimum (`export_dynamic_quantized_onnx_model`,
`SparseEncoder(path, backend="onnx")`), but no optimum-onnx release installs beside transformers 5
(optimum-onnx 0.1.0 wants transformers < 4.58). So the MLM is exported with torch.onnx and quantized
with ONNX Runtime's dynamic int8 quantization, into the layout that backend reads: the MLM's folder
(the model's root, or an inference-free model's document_0_Transformer/) gets onnx/model.onnx
(inputs input_ids, attention_mask[, token_type_ids]; output logits, as optimum's ORTModelForMaskedLM
has them) and onnx/model_qint8.onnx. Here, `onnx_encoder` loads the saved model and puts an ONNX
Runtime session in the place of its MLM, as that backend puts optimum's model: tokenisation, top-k
and routing stay sentence-transformers' own. Its SPLADE max pooling takes the max over each text's
real tokens first and activates one row per text (relu and log1p are monotonic, as in
pipeline.modelling.splade_head): stock pooling activates every token's logits, which at one short query costs
more than the quantized model itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ONNX_FILES = {"fp32": "model.onnx", "int8": "model_qint8.onnx"}
MLM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def mlm_subfolder(model_dir: Path) -> str:
    """Where a saved SPLADE model keeps its MLM: the root, or a Router's first document module."""
    first = json.loads((model_dir / "modules.json").read_text())[0]
    if first["type"].endswith(".Router"):
        return json.loads((model_dir / first["path"] / "router_config.json").read_text())["structure"]["document"][0]
    return first["path"]


def onnx_path(export_dir: Path, model_dir: Path, variant: str) -> Path:
    return export_dir / mlm_subfolder(model_dir) / "onnx" / ONNX_FILES[variant]


class _Logits(torch.nn.Module):
    def __init__(self, mlm, names: list[str]):
        super().__init__()
        self.mlm, self.names = mlm, names

    def forward(self, *tensors):
        return self.mlm(**dict(zip(self.names, tensors))).logits


def export_mlm(mlm, tokenizer, fp32: Path, int8: Path) -> None:
    """The MLM's logits as ONNX (batch and sequence dynamic) at `fp32`, and dynamically quantized
    (int8 weights, activations quantized per batch) at `int8`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    sample = tokenizer(["a sample text to trace", "another"], return_tensors="pt", padding=True)
    names = [name for name in MLM_INPUTS if name in sample]
    fp32.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(_Logits(mlm.eval(), names), tuple(sample[n] for n in names), str(fp32),
                          input_names=names, output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in [*names, "logits"]})
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)


class OnnxMaskedLM(torch.nn.Module):
    """An ONNX Runtime session where a sentence-transformers Transformer module expects its MLM."""

    def __init__(self, path: Path, config, threads: int | None = None):
        import onnxruntime

        super().__init__()
        options = onnxruntime.SessionOptions()
        # ONNX Runtime's threads spin after each run by default, taking the cores torch needs for
        # the pooling that follows (on 2 cores: 3 ms of a 30522-wide log1p instead of 0.05 ms)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.config = config

    def forward(self, input_ids, attention_mask, token_type_ids=None, **_):
        given = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "token_type_ids": torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids}
        logits = self.session.run(["logits"], {n: given[n].cpu().numpy() for n in self.inputs})[0]
        return {"logits": torch.from_numpy(logits)}


def max_first_pooling(pooling, features: dict) -> dict:
    """SpladePooling("max")'s vectors: the max of each dimension over the real tokens, then
    relu and log1p (twice for "log1p_relu"), on one row per text instead of every token."""
    from pipeline.modelling.splade_head import activation

    logits, mask = features["token_embeddings"], features["attention_mask"]
    if not mask.all():  # in place: the session's own output, not worth a copy of every token's logits
        logits.masked_fill_(~mask.bool().unsqueeze(-1), float("-inf"))
    pooled = logits.amax(dim=1)
    features["sentence_embedding"] = activation(pooled, twice=pooling.activation_function == "log1p_relu")
    return features


def onnx_encoder(model_dir: Path, export_dir: Path, variant: str, threads: int | None = None):
    """The saved SparseEncoder at `model_dir` with its MLM run by ONNX Runtime from `export_dir`."""
    from types import MethodType

    from pipeline.modelling.encoders import load_encoder
    from pipeline.modelling.splade_head import splade_route

    model = load_encoder(model_dir)
    transformer, pooling = splade_route(model)
    transformer.model = OnnxMaskedLM(onnx_path(export_dir, model_dir, variant), transformer.model.config, threads)
    if pooling.pooling_strategy == "max":
        pooling.forward = MethodType(max_first_pooling, pooling)
    return model
