""" Worker of test_reversible_ddp: one process of `torchrun --nproc_per_node 2`, gloo on the CPU.

Each process takes its half of a fixed batch, in two accumulated micro-batches, through Accelerate's
DDP wrapper (default settings, find_unused_parameters=False) and the reversible backward, and saves
the reduced gradients (rank 0) for the test to compare with one process on the whole batch.
"""
import sys

import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator

import timm_reversible  # noqa: F401

from conftest import images

SMALL_DDP = dict(embed_dim=32, depth=3, num_heads=2)


def batch(batch_size: int = 8):
    x = images(batch_size)
    y = torch.arange(batch_size) % 10
    return x, y


def main(name: str, out_path: str) -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = accelerator.prepare(timm.create_model(name, **SMALL_DDP))
    x, y = batch()
    shard = accelerator.process_index * 4
    for micro in (slice(shard, shard + 2), slice(shard + 2, shard + 4)):
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x[micro]), y[micro]))
    if accelerator.is_main_process:
        torch.save({n: p.grad for n, p in accelerator.unwrap_model(model).named_parameters()}, out_path)
    accelerator.wait_for_everyone()


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
