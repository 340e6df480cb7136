""" Every setting the reversible models accept is exact over its whole range, and everything else is
rejected at creation with a message saying what is allowed. Activations that are not finite are reported
as such; eval and no-grad forwards behave like the plain ViT; empty batches pass through.
"""
import pytest
import timm
import torch

from timm_reversible import GridRangeError, NonFiniteActivationError, ReconstructionError, reconstruction_error
from timm_reversible.reversible import MAX_BDIA_SIDE_BITS, MAX_MOMENTUM_BITS

from conftest import images, package_models
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


# ---- activations that are not finite ----

def _nan_in_sample_1() -> torch.Tensor:
    x = images(3)
    x[1, 0, 5, 7] = float('nan')
    return x


@pytest.mark.parametrize('name', package_models())
def test_nan_input_in_eval_gives_a_nan_row_for_that_sample_only(name):
    model = timm.create_model(name, depth=2, **TINY).eval()
    with torch.no_grad():
        out = model(_nan_in_sample_1())
    assert out[1].isnan().all()
    assert torch.isfinite(out[[0, 2]]).all()
    assert torch.equal(out[[0, 2]], model(images(3)[[0, 2]]).detach())


@pytest.mark.parametrize('name', package_models())
def test_nan_input_in_a_no_grad_train_forward_gives_a_nan_row(name):
    model = timm.create_model(name, depth=2, **TINY).train()
    with torch.no_grad():
        out = model(_nan_in_sample_1())
    assert out[1].isnan().all() and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize('reversible', [True, False])
@pytest.mark.parametrize('name', EXACT)
def test_nan_input_in_training_names_the_input_not_the_grid(name, reversible):
    model = timm.create_model(name, depth=3, **TINY, reversible=reversible).train()
    with pytest.raises(NonFiniteActivationError) as error:
        model(_nan_in_sample_1()).sum().backward()
    message = str(error.value)
    assert 'block 0' in message and 'NaN' in message and 'sample(s) [1]' in message and 'input' in message
    assert 'quant_level' not in message


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
@pytest.mark.parametrize('name', EXACT)
def test_diverged_weights_are_named(name, value):
    model = timm.create_model(name, depth=3, **TINY).train()
    with torch.no_grad():
        model.blocks[2].mlp.fc1.weight[0, 0] = value
    with pytest.raises(NonFiniteActivationError) as error:
        model(images(2)).sum().backward()
    message = str(error.value)
    assert 'block 2' in message and 'blocks.2.mlp.fc1.weight' in message and 'diverged' in message
    assert 'produced NaN activations' in message or 'produced infinite activations' in message
    assert 'quant_level' not in message


@pytest.mark.parametrize('name', EXACT)
def test_grid_range_error_still_gives_the_quant_level_advice(name):
    model = timm.create_model(name, depth=3, **TINY).train()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.bias.fill_(3e5)
    with pytest.raises(GridRangeError, match=r'block 1\b.*quant_level=7'):
        model(images(2)).sum().backward()
    with torch.no_grad():  # no reversible backward to protect: like the plain ViT
        assert torch.isfinite(model.eval()(images(2))).all()


# ---- empty batches ----

@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('name', package_models())
def test_an_empty_batch_gives_an_empty_output(name, train):
    model = timm.create_model(name, depth=2, **TINY).train(train)
    out = model(images(2)[:0])
    assert out.shape == (0, model.num_classes)
    if train:
        out.sum().backward()
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


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
