"""Run under torchrun by tests/test_splade_head.py: each process takes its half of the rows, the
model wrapped in DistributedDataParallel, the fused head forced on, the loss the pipeline trains
with (SpladeLoss over MarginMSE with the global-batch FLOPS); rank 0 saves the averaged gradients.

    torchrun --nproc-per-node 2 tests/helpers/ddp_fused_head.py SHARED OUT.pt
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pipeline.config import TrainConfig
from pipeline.modelling import splade_head
from pipeline.modelling.encoders import splade_encoder
from pipeline.modelling.training import training_loss
from tests.helpers.splade_cases import (
    loss_and_gradients,
    no_dropout,
    random_student,
    scifact_rows,
)


def main(shared: Path, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    splade_head.STOCK_HEAD_UP_TO = 0
    if rank == 0:  # transformers writes a model from the main process only
        random_student(out.parent, shared)
    dist.barrier()
    model = no_dropout(splade_encoder(str(out.parent / "mlm"), 128))
    rows = scifact_rows(shared, 8).drop(columns="scores")
    share = rows.iloc[rank * len(rows) // world:(rank + 1) * len(rows) // world]
    loss = training_loss(TrainConfig(query_regularizer_weight=0.5, document_regularizer_weight=0.3), model, share)
    loss.model = DistributedDataParallel(model)  # the loss calls the wrapper, as the trainer's does
    _, gradients, _ = loss_and_gradients(model, loss, share, fused=True)
    if rank == 0:
        torch.save(gradients, out)
    # DDP's reducer holds the process group; dropped last by the reducer, the group would join its
    # gloo threads in this thread without releasing the GIL one of them may be waiting for: a hang
    # at exit, one run in six here (pytorch/pytorch#56297). destroy_process_group releases it.
    del loss.model
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
