"""Stage: the trained student's ONNX files, for serving SPLADE on CPUs without torch's overhead.

The MLM (of a SPLADE model, or an inference-free model's document side: its queries need no
transformer) is exported to ONNX in fp32 and dynamically quantized to int8 (pipeline.modelling.onnx),
into models/export/ laid out as the student's own folder (onnx/model.onnx, onnx/model_qint8.onnx
beside the MLM's weights); the push stage merges them into the folder it uploads. Both are checked
against torch on the evaluation set's first export.parity_texts queries and documents (vectors
before the model's top-k cut, whose ties could pick other dimensions): the fp32 file must give
torch's vectors within 1e-4 or the stage fails; the int8 file's distance is recorded, and its nDCG@10
is scored by the evaluate stage. CSR models (a dense encoder and an autoencoder head) are not exported.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import torch

from pipeline.cli import StageError, stage_main
from pipeline.config import EXPORT_DIR, STUDENT_DIR, Params
from pipeline.data.snapshots import read_eval_snapshot
from pipeline.modelling.encoders import load_encoder
from pipeline.modelling.onnx import (
    ONNX_FILES,
    export_mlm,
    mlm_subfolder,
    onnx_encoder,
    onnx_path,
)
from pipeline.modelling.splade_head import splade_route
from pipeline.tracking.records import replace_folder, stage_record

log = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4  # the largest difference from torch an fp32 export may show


def parity_texts(params: Params) -> dict[str, list[str]]:
    """The first N queries and documents of the evaluation set(s)."""
    n = params.export.parity_texts
    sets = read_eval_snapshot().values()
    return {"query": list(itertools.islice((t for data in sets for t in data.queries.values()), n)),
            "document": list(itertools.islice((t for data in sets for t in data.corpus.values()), n))}


def vectors(model, texts: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    model.max_active_dims = None  # compare whole vectors: a top-k cut breaks ties either way
    return {side: (model.encode_query if side == "query" else model.encode_document)(
        batch, batch_size=16, convert_to_tensor=True).to_dense().float() for side, batch in texts.items()}


def run(params: Params) -> dict:
    with stage_record("export", params) as record:
        if not params.export.onnx or params.train.architecture == "csr":
            reason = "export.onnx is false" if not params.export.onnx else "a CSR model has no MLM to export"
            replace_folder(EXPORT_DIR, lambda folder: None)
            record["facts"]["skipped"] = reason
            log.info("no ONNX export: %s", reason)
            return record["metrics"]
        model = load_encoder(STUDENT_DIR)
        mlm = splade_route(model)[0]
        subfolder = mlm_subfolder(STUDENT_DIR)
        replace_folder(EXPORT_DIR, lambda folder: export_mlm(
            mlm.auto_model, mlm.tokenizer, *(folder / subfolder / "onnx" / ONNX_FILES[v] for v in ("fp32", "int8"))))

        texts = parity_texts(params)
        reference = vectors(model, texts)
        for variant in ONNX_FILES:
            exported = vectors(onnx_encoder(STUDENT_DIR, EXPORT_DIR, variant), texts)
            for side in texts:
                record["metrics"][f"{variant}_{side}_max_abs_diff"] = float((exported[side] - reference[side]).abs().max())
            record["metrics"][f"{variant}_megabytes"] = onnx_path(EXPORT_DIR, STUDENT_DIR, variant).stat().st_size / 2 ** 20
        record["facts"]["files"] = [str(Path(subfolder) / "onnx" / name) for name in ONNX_FILES.values()]
        worst = max(record["metrics"][f"fp32_{side}_max_abs_diff"] for side in texts)
        if worst > FP32_TOLERANCE:
            raise StageError(f"the fp32 ONNX export's vectors differ from torch's by up to {worst:.3g} "
                             f"(more than {FP32_TOLERANCE}) on the evaluation set's texts: not kept")
    return record["metrics"]


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
