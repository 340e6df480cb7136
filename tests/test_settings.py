""" Every setting the reversible models accept is exact over its whole range, and everything else is
rejected at creation with a message saying what is allowed; the run-time reconstruction check catches a
recomputation that differs. (Faults, bad inputs and interrupted runs: tests/test_faults.py.)
"""
import pytest
import timm
import torch

from timm_reversible import ReconstructionError, reconstruction_error
from timm_reversible.reversible import MAX_BDIA_SIDE_BITS, MAX_MOMENTUM_BITS

from conftest import images
from test_reversible import DROPS, EXACT, REVERSIBLE, _assert_same_gradients

TINY = dict(embed_dim=32, num_heads=2)


def _assert_exact(name: str, depth: int = 3, **kwargs) -> None:
    """ Bit-exact reconstruction in float32 and float64, and float64 gradients equal to ordinary autograd. """
    model = timm.create_model(name, depth=depth, **TINY, **DROPS, **kwargs).train()
    assert reconstruction_error(model, images(2) * 2.5) == 0.0
    _assert_same_gradients(model.double(), images(2, dtype=torch.float64))


@pytest.mark.parametrize('side_bits', range(1, MAX_BDIA_SIDE_BITS + 1))
def test_every_accepted_bdia_gamma_is_exact(side_bits):
    _assert_exact('bdia_vit_small_cifar', bdia_gamma=2. ** -side_bits)


@pytest.mark.parametrize('gamma', [2. ** -(MAX_BDIA_SIDE_BITS + 1), 2. ** -15, 2. ** -30, 0.3, 1., 2., 0., -0.5, True])
def test_other_bdia_gammas_are_rejected(gamma):
    with pytest.raises(ValueError, match=r'2\^-k with 1 <= k <= 8'):
        timm.create_model('bdia_vit_small_cifar', depth=2, **TINY, bdia_gamma=gamma)


# for every m, the smallest, a middle and the largest odd numerator
MOMENTA = sorted({
    a / 2 ** m for m in range(1, MAX_MOMENTUM_BITS + 1) for a in (1, 2 ** (m - 1) + 1, 2 ** m - 1) if a % 2 and a < 2 ** m})


@pytest.mark.parametrize('momentum', MOMENTA)
def test_every_accepted_momentum_is_exact(momentum):
    _assert_exact('momentum_revvit_small', momentum=momentum)


@pytest.mark.parametrize('momentum', [0.9, 1 / 2 ** (MAX_MOMENTUM_BITS + 1), 255 / 256, 1., 0., -0.5, 1.5, True])
def test_other_momenta_are_rejected(momentum):
    with pytest.raises(ValueError, match=r'a / 2\^m with a odd and 1 <= m <= 7'):
        timm.create_model('momentum_revvit_small', depth=2, **TINY, momentum=momentum)


@pytest.mark.parametrize('quant_level', range(0, 24))
@pytest.mark.parametrize('name', EXACT)
def test_every_accepted_quant_level_is_exact(name, quant_level):
    _assert_exact(name, quant_level=quant_level)


@pytest.mark.parametrize('quant_level', [9.5, 9.25, 8.7, -1, 24, 30, '9', True])
@pytest.mark.parametrize('name', EXACT)
def test_other_quant_levels_are_rejected(name, quant_level):
    with pytest.raises(ValueError, match=r'quant_level must be an integer in \[0, 24\)'):
        timm.create_model(name, depth=2, **TINY, quant_level=quant_level)


@pytest.mark.parametrize('depth', [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 20, 24])
@pytest.mark.parametrize('name', REVERSIBLE)
def test_every_depth_gives_the_same_gradients(name, depth):
    model = timm.create_model(name, depth=depth, **TINY, **DROPS).double().train()
    _assert_same_gradients(model, images(2, dtype=torch.float64))
    if name in EXACT:
        assert reconstruction_error(model.float(), images(2)) == 0.0


@pytest.mark.parametrize('rate', [0., 0.25, 0.5, 0.9, 0.99])
@pytest.mark.parametrize('name', REVERSIBLE)
def test_every_drop_rate_gives_the_same_gradients(name, rate):
    drops = dict(drop_rate=rate, pos_drop_rate=rate, proj_drop_rate=rate, attn_drop_rate=rate, drop_path_rate=rate)
    model = timm.create_model(name, depth=3, **TINY, **drops).double().train()
    _assert_same_gradients(model, images(2, dtype=torch.float64))


@pytest.mark.parametrize('split', [False, True])
@pytest.mark.parametrize('name', EXACT)
def test_both_backward_modes_are_exact(name, split):
    _assert_exact(name, split_backward=split)


@pytest.mark.parametrize('value', [1, 0, 'no', 0.])  # None: timm.create_model drops it (the default)
@pytest.mark.parametrize('flag, names', [
    ('reversible', REVERSIBLE), ('split_backward', EXACT), ('verify_reconstruction', EXACT)])
def test_on_off_settings_take_true_or_false_only(flag, names, value):
    for name in names:
        with pytest.raises(TypeError, match=f'{flag} must be True or False, got {value!r}'):
            timm.create_model(name, depth=2, **TINY, **{flag: value})
        timm.create_model(name, depth=2, **TINY, **{flag: False})  # the two values it takes
        timm.create_model(name, depth=2, **TINY, **{flag: True})
    model = timm.create_model(names[0], depth=2, **TINY)
    with pytest.raises(TypeError, match=f'enable must be True or False, got {value!r}'):
        model.set_reversible(value)
    assert model.reversible is True


# ---- the run-time reconstruction check ----

def _recompute_differently(model, block: int) -> None:
    """ Make block `block` compute slightly otherwise with grad enabled, as another GPU kernel might: off by
    2^-12, enough to move values that lie near a 2^-9 rounding boundary onto the other side.
    """
    target = model.blocks[block]
    original = target.mlp_residual  # in the split backward, the MLP is the half recomputed with grad
    target.mlp_residual = lambda x: original(x) + (2. ** -12 if torch.is_grad_enabled() else 0.)


@pytest.mark.parametrize('name', EXACT)
def test_a_recomputation_that_differs_is_caught_in_the_backward(name):
    model = timm.create_model(name, depth=4, **TINY).train()
    _recompute_differently(model, block=2)
    with pytest.raises(ReconstructionError, match=r'step 2 \(block 2\).*use_deterministic_algorithms'):
        model(images(4)).sum().backward()


@pytest.mark.parametrize('name', EXACT)
def test_without_the_check_such_a_recomputation_gives_wrong_gradients(name):
    model = timm.create_model(name, depth=4, **TINY, verify_reconstruction=False).train()
    _recompute_differently(model, block=2)
    grads = []
    for reversible in (False, True):
        model.set_reversible(reversible)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        model(images(4)).sum().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1], rtol=1e-3, atol=0)


@pytest.mark.parametrize('name', EXACT)
def test_the_check_keeps_sixteen_bytes_per_sample_and_block(name, monkeypatch):
    from timm_reversible.reversible import engine
    kept = []
    fingerprint = engine._fingerprint
    monkeypatch.setattr(engine, '_fingerprint', lambda state: kept.append(fingerprint(state)) or kept[-1])
    model = timm.create_model(name, depth=3, **TINY).train()
    model(images(4)).sum().backward()
    # the forward's fingerprints, one per block that needs one (BDIA's first block reconstructs nothing)
    forward = kept[:2 if name == 'bdia_vit_small_cifar' else 3]
    assert all(f.dtype == torch.int64 and f.shape == (1, 2, 4) for f in forward)  # 1 stream x 2 sums x batch
    assert len(kept) == 2 * len(forward)
