""" Activation memory per image (DESIGN.md definition, MemTracker tensor accounting on CPU, fp32):
deterministic, so the ratios the reversible backward promises are asserted here.

Half width with 64-dim heads (256 = 4 x 64) keeps every activation's share of the full model (token
tensors, 65 x 65 attention maps per head) and costs a quarter of the compute. Batch 8 keeps the
batch-independent weight-gradient temporaries (a quarter of full width's) small beside the
activations, as at the batch of 128 that the benchmark reports.
"""
import functools

import pytest
import timm

from timm_reversible.profiling import activation_memory_per_image

BATCH = 8
WIDTH = dict(embed_dim=256, num_heads=4)


@functools.lru_cache(maxsize=None)
def memory(name: str, depth: int, grad_checkpointing: bool = False, **kwargs) -> float:
    model = timm.create_model(name, depth=depth, **WIDTH, **kwargs)
    model.set_grad_checkpointing(grad_checkpointing)
    mib = activation_memory_per_image(model, batch_size=BATCH) / 2 ** 20
    print(f'{name} depth {depth} ckpt={grad_checkpointing} {kwargs}: {mib:.3f} MiB/img')
    return mib


def test_revvit_stores_no_per_block_activations():
    vanilla, revvit = memory('vit_small_cifar', 6), memory('revvit_small_cifar', 6)
    assert revvit <= 0.30 * vanilla
    assert memory('revvit_small_cifar', 24) <= 1.10 * revvit


@pytest.mark.parametrize('depth', [6, 12, 24])
def test_revvit_beats_gradient_checkpointing(depth):
    assert memory('revvit_small_cifar', depth) < memory('vit_small_cifar', depth, grad_checkpointing=True)


@pytest.mark.parametrize('depth', [6, 24])
@pytest.mark.parametrize('name', ['bdia_vit_small_cifar', 'momentum_revvit_small'])
def test_exact_models_within_a_quarter_of_revvit(name, depth):
    assert memory(name, depth) <= 1.25 * memory('revvit_small_cifar', depth)


@pytest.mark.parametrize('name', ['bdia_vit_small_cifar', 'momentum_revvit_small'])
def test_exact_models_flat_in_depth(name):
    assert memory(name, 24) <= 1.10 * memory(name, 6)


@pytest.mark.parametrize('name', ['bdia_vit_small_cifar', 'momentum_revvit_small'])
def test_split_backward_saves_memory(name):
    joint = memory(name, 6, split_backward=False)
    split = memory(name, 6, split_backward=True)
    assert split < joint
    assert split <= 1.10 * memory('revvit_small_cifar', 6)
