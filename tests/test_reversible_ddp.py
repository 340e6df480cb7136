""" Data-parallel training with Accelerate's defaults (DDP, find_unused_parameters=False) across two CPU
processes (gloo): the reduced gradients of the reversible backward equal one process on the whole batch.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from ddp_gradient_worker import SMALL_DDP, batch

pytestmark = pytest.mark.slow  # each test trains models or starts processes

TESTS = Path(__file__).parent


@pytest.mark.parametrize('name', ['revvit_small_cifar', 'momentum_revvit_small'])
def test_ddp_gradients_equal_single_process(name, tmp_path):
    out = tmp_path / 'grads.pt'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get('PYTHONPATH', '')]))
    subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
         str(TESTS / 'ddp_gradient_worker.py'), name, str(out)],
        check=True, env=env, timeout=300, cwd=tmp_path)
    ddp_grads = torch.load(out)

    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL_DDP)
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[n], p.grad, msg=lambda m: f'{n}: {m}')
