""" Activation memory per image (DESIGN.md definition, MemTracker tensor accounting on CPU, fp32):
deterministic, so the ratios the reversible backward promises are asserted here.

The fast tests hold the small config to exact byte counts per block. The ratios use half width with
64-dim heads (256 = 4 x 64), which keeps every activation's share of the full model (token tensors,
65 x 65 attention maps per head) and costs a quarter of the compute. Batch 8 keeps the batch-independent
weight-gradient temporaries (a quarter of full width's) small beside the activations, as at the batch of
128 that the benchmark reports.
"""
import functools

import pytest
import timm

from timm_reversible.profiling import activation_memory_fit, activation_memory_per_image, count_train_step_flops
from timm_reversible.reversible.couplings import bdia_side_bits, momentum_as_fraction

from conftest import SMALL

pytestmark = pytest.mark.usefixtures('one_thread')

BATCH = 8
WIDTH = dict(embed_dim=256, num_heads=4)


@functools.lru_cache(maxsize=None)
def memory(name: str, depth: int, grad_checkpointing: bool = False, **kwargs) -> float:
    model = timm.create_model(name, depth=depth, **WIDTH, **kwargs)
    model.set_grad_checkpointing(grad_checkpointing)
    mib = activation_memory_per_image(model, batch_size=BATCH) / 2 ** 20
    print(f'{name} depth {depth} ckpt={grad_checkpointing} {kwargs}: {mib:.3f} MiB/img')
    return mib


def small_fit(name: str, depth: int):
    return activation_memory_fit(timm.create_model(name, **dict(SMALL, depth=depth)), batch_sizes=(2, 4))


def test_small_revvit_stores_nothing_per_block_and_vanilla_a_fixed_amount():
    revvit = [small_fit('revvit_small_cifar', depth) for depth in (2, 4, 8)]
    assert revvit[0] == revvit[1] == revvit[2]  # per-image and fixed bytes, to the byte
    vanilla = [small_fit('vit_small_cifar', depth).per_image_bytes for depth in (2, 4, 8)]
    assert vanilla[2] - vanilla[1] == 2 * (vanilla[1] - vanilla[0]) > 0


def test_small_exact_models_store_their_side_bits_per_block():
    """ Per block and image: the side bits of every stream element, packed 8 to a byte, and the 16-byte
    fingerprint of the reconstructed input; BDIA also keeps its random sign (one float per image). """
    bdia, momentum = (timm.create_model(name, **SMALL) for name in ('bdia_vit_small_cifar', 'momentum_revvit_small'))
    elements = bdia.pos_embed[0].numel()  # of one image's stream: tokens x width
    per_block = {
        'bdia_vit_small_cifar': elements * bdia_side_bits(bdia.bdia_gamma) // 8 + 16 + 4,
        'momentum_revvit_small': elements * momentum_as_fraction(momentum.momentum)[1] // 8 + 16,
    }
    for name, expected in per_block.items():
        fits = [small_fit(name, depth) for depth in (2, 8)]
        assert fits[1].per_image_bytes - fits[0].per_image_bytes == 6 * expected, name
        assert fits[1].fixed_bytes == fits[0].fixed_bytes, name


@pytest.mark.slow
def test_revvit_stores_no_per_block_activations():
    vanilla, revvit = memory('vit_small_cifar', 6), memory('revvit_small_cifar', 6)
    assert revvit <= 0.30 * vanilla
    assert memory('revvit_small_cifar', 24) <= 1.10 * revvit


@pytest.mark.parametrize('depth', [6] + [pytest.param(d, marks=pytest.mark.slow) for d in (12, 24)])
def test_revvit_beats_gradient_checkpointing(depth):
    assert memory('revvit_small_cifar', depth) < memory('vit_small_cifar', depth, grad_checkpointing=True)


@pytest.mark.slow
@pytest.mark.parametrize('name, depth, split', [
    ('bdia_vit_small_cifar', 6, False), ('bdia_vit_small_cifar', 24, False),
    ('momentum_revvit_small', 6, False),
    # 3 side bits per element per block: at depth 24 the momentum model needs the split recomputation for this
    ('momentum_revvit_small', 24, True),
])
def test_exact_models_within_a_quarter_of_revvit(name, depth, split):
    assert memory(name, depth, split_backward=split) <= 1.25 * memory('revvit_small_cifar', depth)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['bdia_vit_small_cifar', 'momentum_revvit_small'])
def test_exact_models_flat_in_depth(name):
    assert memory(name, 24) <= 1.10 * memory(name, 6)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['bdia_vit_small_cifar', 'momentum_revvit_small'])
def test_split_backward_saves_memory(name):
    joint = memory(name, 6, split_backward=False)
    split = memory(name, 6, split_backward=True)
    assert split < joint
    assert split <= 1.10 * memory('revvit_small_cifar', 6)


@pytest.mark.slow
def test_reversible_backward_recomputes_one_forward():
    """ The fused backward recomputes each block once while reconstructing it: a training step costs
    about 4/3 of an ordinary one in FLOPs (one extra forward is the floor); the split recomputation adds
    one attention forward per block, less than another whole forward.
    """
    vanilla = count_train_step_flops(timm.create_model('vit_small_cifar', **WIDTH))
    revvit = count_train_step_flops(timm.create_model('revvit_small_cifar', **WIDTH))
    print(f'revvit_small_cifar: train-step FLOPs {revvit / vanilla:.3f}x vit_small_cifar')
    assert revvit <= 1.35 * vanilla
    for name in ('bdia_vit_small_cifar', 'momentum_revvit_small'):
        joint = count_train_step_flops(timm.create_model(name, split_backward=False, **WIDTH))
        split = count_train_step_flops(timm.create_model(name, split_backward=True, **WIDTH))
        print(f'{name}: {joint / vanilla:.3f}x joint, {split / vanilla:.3f}x split')
        assert joint <= 1.35 * vanilla
        assert joint < split < joint + vanilla / 3
