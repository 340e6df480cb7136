""" Any timm ViT, reversible: `make_reversible` on timm's own VisionTransformer and the registered
bdia_vit_* / revvit_* models. Same parameters and keys as plain timm, the BDIA eval function within the
grid's bound of the plain ViT, gradients equal to ordinary autograd, bit-exact reconstruction, timm's model
API, pretrained cfgs and weights, the range error's advice, training on digits, the train and benchmark
scripts. Tiny configs (embed 64, 32x32, patch 8); weights come from plain timm ViTs built here.
"""
import copy
import json
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models import get_pretrained_cfg, resolve_pretrained_cfg
from timm.models.vision_transformer import ParallelScalingBlock, ParallelThingsBlock, ResPostBlock

from timm_reversible import GridRangeError, ReversibleTimmVisionTransformer, make_reversible, reconstruction_error
from timm_reversible.models import timm_vit
from timm_reversible.models.timm_vit import DEFAULT_QUANT_LEVEL, largest_exact_quant_level
from timm_reversible.profiling import activation_memory_per_image, count_flops, model_input_size
from timm_reversible.reversible import MAX_BDIA_SIDE_BITS
from timm_reversible.utils import package_models, timm_vit_models

from conftest import images, run_train_script
from test_reversible import DROPS, FLOAT64_TOLERANCE, _assert_same_gradients
from test_settings import MOMENTA

TINY = dict(embed_dim=64, depth=3, num_heads=2, img_size=32, patch_size=8, num_classes=10)
METHODS = ['bdia', 'two_stream', 'momentum']
EXACT = ['bdia', 'momentum']
# timm VisionTransformer layouts make_reversible must take: class token or not, registers, every pooling,
# dynamic input size, LayerScale, position embedding beside the prefix tokens, pre-norm, fc-norm
LAYOUTS = {
    'token': dict(),
    'no_class_token_avg': dict(class_token=False, global_pool='avg'),
    'registers': dict(reg_tokens=4, no_embed_class=True, init_values=1e-1),
    'avgmax': dict(global_pool='avgmax'),
    'max_fc_norm': dict(global_pool='max', fc_norm=True),
    'map': dict(global_pool='map', class_token=False),
    'no_pool': dict(global_pool=''),
    'dynamic_img_size': dict(dynamic_img_size=True, pre_norm=True),
}


def _plain_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('vit_base_patch16_224', **dict(TINY, **kwargs))


def _converted(method: str = 'bdia', plain_kwargs=None, **options) -> ReversibleTimmVisionTransformer:
    return make_reversible(_plain_vit(**(plain_kwargs or {})), method, **options)


# ---- the conversion keeps the model ----

@pytest.mark.parametrize('method', METHODS)
def test_conversion_keeps_modules_parameters_and_keys(method):
    model = _plain_vit(init_values=0.1)
    keys = list(model.state_dict())
    params = {name: p for name, p in model.named_parameters()}
    blocks = list(model.blocks)
    assert make_reversible(model, method) is model
    assert isinstance(model, ReversibleTimmVisionTransformer)
    assert list(model.state_dict()) == keys
    assert all(p is params[name] for name, p in model.named_parameters()) and len(params) == len(keys)
    assert all(a is b for a, b in zip(model.blocks, blocks))
    assert model.reversible_method == method and model.reversible


@pytest.mark.parametrize('layout', LAYOUTS)
def test_every_vit_layout_converts_with_exact_gradients(layout):
    """ float64, train mode with dropout and drop-path: the reversible backward gives ordinary autograd's
    gradients through the same converted function, for each timm layout. """
    model = _converted('bdia', dict(LAYOUTS[layout], **DROPS)).double().train()
    _assert_same_gradients(model, images(2, dtype=torch.float64))


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('method', METHODS)
def test_gradients_equal_ordinary_autograd_with_dropout_drop_path_and_layer_scale(method, dtype):
    model = _converted(method, dict(init_values=0.1, **DROPS)).to(dtype).train()
    _assert_same_gradients(model, images(4, dtype=dtype))


@pytest.mark.parametrize('method', METHODS)
def test_bfloat16_autocast_and_weights(method):
    """ Under autocast the blocks run in bfloat16 and the quantized stream stays in float32; the reversible
    backward's error against float64 is that of ordinary autograd under the same autocast. bfloat16 weights
    train too. """
    model = _converted(method, dict(init_values=0.1, **DROPS)).train()
    _assert_same_gradients(model, images(4), torch.bfloat16)
    model.to(torch.bfloat16)
    out = model(images(2, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize('split', [False, True])
@pytest.mark.parametrize('method', EXACT)
def test_bit_exact_reconstruction_in_train_mode(method, split):
    model = _converted(method, dict(init_values=0.1, **DROPS), split_backward=split).train()
    x = images(4) * 2.5
    assert reconstruction_error(model, x) == 0.0
    inputs, reconstructed = model.reconstruct_block_inputs(x)
    for block, (original, recovered) in enumerate(zip(inputs, reconstructed)):
        assert all(torch.equal(a, b) for a, b in zip(original, recovered)), f'block {block}'
    _assert_same_gradients(model.double(), images(2, dtype=torch.float64))


def test_two_stream_reconstruction_is_close_not_exact():
    assert 0 <= reconstruction_error(_converted('two_stream', DROPS).train(), images(4)) < 1e-4


def test_bdia_reconstruction_needs_train_mode():
    with pytest.raises(RuntimeError, match='train'):
        _converted('bdia').eval().reconstruct_block_inputs(images(2))


# ---- BDIA at evaluation: the plain ViT on the grid ----

def _logit_bound(plain, x: torch.Tensor, level: int) -> torch.Tensor:
    """ First-order bound on |BDIA eval logits - plain logits|, per sample and class.

    BDIA at evaluation rounds the residual stream to the grid 2^-l at K + 1 places: the embedding x_0, the first
    block's residual (x_1 = x_0 + Q(h_0)) and every later block's output (x_{k+1} = Q(x_k + h_k)). Each rounding
    moves an element by at most 2^-(l+1), so to first order logit c moves by at most
    2^-(l+1) * sum_k ||d logit_c / d x_k||_1, the Jacobians taken along the plain model's own forward. The second
    order is of relative size 2^-l: negligible at the levels used here.
    """
    x = plain.patch_embed(x)
    tokens = plain.norm_pre(plain.patch_drop(plain._pos_embed(x)))
    stream = [tokens]
    for block in plain.blocks:
        stream.append(block(stream[-1]))
    logits = plain.forward_head(plain.norm(stream[-1]))
    bound = torch.zeros_like(logits)
    for c in range(logits.shape[1]):
        grads = torch.autograd.grad(logits[:, c].sum(), stream, retain_graph=True)
        bound[:, c] = sum(g.abs().flatten(1).sum(dim=1) for g in grads) * 2. ** -(level + 1)
    return bound


def _eval_deviation(plain, x: torch.Tensor, level: int):
    """ |BDIA eval logits - plain logits|, the grid's bound on it, and the plain logits. """
    model = make_reversible(copy.deepcopy(plain), 'bdia', quant_level=level).eval()
    with torch.no_grad():
        plain_logits, logits = plain.eval()(x), model(x)
    return (logits - plain_logits).abs(), _logit_bound(plain, x, level), plain_logits, logits


@pytest.mark.parametrize('layout, level', [
    ('token', DEFAULT_QUANT_LEVEL), ('registers', DEFAULT_QUANT_LEVEL), ('no_class_token_avg', DEFAULT_QUANT_LEVEL),
    ('token', 16)])
def test_bdia_eval_is_the_plain_vit_within_the_grid_bound(layout, level):
    deviation, bound, _, _ = _eval_deviation(_plain_vit(**LAYOUTS[layout]), images(4), level)
    worst = (deviation / bound).max().item()
    print(f'quant_level {level} {layout}: |logit deviation| up to {deviation.max():.3g}, {worst:.3f} of the grid '
          f'bound (largest {bound.max():.3g})')
    assert (deviation <= bound).all(), f'deviation reaches {worst:.3f}x the bound'
    assert deviation.max() > 0  # the grid is in the function


def _decided_by_the_bound(plain_logits: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """ Samples whose top-1 margin exceeds twice the largest bound: no deviation within it changes their class. """
    top2 = plain_logits.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1] > 2 * bound.max(dim=1).values


@pytest.mark.slow
def test_bdia_eval_has_the_trained_plain_vits_top1(digits_vit, digits):
    """ A ViT trained on digits (decision margins as a trained model has them), converted. The grid's bound
    guarantees the same class wherever the top-1 margin exceeds twice it: there the classes must agree, and so
    they must on a batch of such images. """
    x, y = digits[1]
    deviation, bound, plain_logits, logits = _eval_deviation(digits_vit, x, DEFAULT_QUANT_LEVEL)
    assert (deviation <= bound).all()
    decided = _decided_by_the_bound(plain_logits, bound)
    same = logits.argmax(dim=1) == plain_logits.argmax(dim=1)
    print(f'digits test set ({len(y)} images): |logit deviation| up to {deviation.max():.3g}, bound up to '
          f'{bound.max():.3g}; margin above twice the bound for {int(decided.sum())}; same top-1 for '
          f'{int(same.sum())}; plain top-1 {(plain_logits.argmax(1) == y).float().mean():.4f}')
    assert same[decided].all()
    assert int(decided.sum()) >= 64  # a batch of 64 test images whose top-1 the grid cannot change


def test_bdia_eval_with_grad_needs_no_engine(monkeypatch):
    model = _converted('bdia').eval()
    monkeypatch.setattr(timm_vit, 'reversible_forward', _engine_must_not_run)
    model(images(2)).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def _engine_must_not_run(*args, **kwargs):
    raise AssertionError('the reversible engine ran where the plain steps should')


# ---- weights: to and from plain timm ----

@pytest.mark.parametrize('method', METHODS)
def test_fine_tuned_state_dict_loads_into_plain_timm(method):
    model = _converted(method, DROPS).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(images(4)), torch.arange(4)).backward()
        optimizer.step()
    plain = timm.create_model('vit_base_patch16_224', **TINY)
    plain.load_state_dict(model.state_dict(), strict=True)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    if method == 'bdia':  # at evaluation the same function, up to the grid
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(images(4)), plain.eval()(images(4)), rtol=0, atol=1e-2)


def test_plain_timm_weights_load_into_the_registered_model(tmp_path):
    source = _plain_vit(num_classes=1000)
    timm.models.save_for_hf(source, tmp_path / 'vit', safe_serialization=True)
    for model in (
        timm.create_model('bdia_vit_base_patch16_224', pretrained=True, **dict(TINY, num_classes=1000),
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'vit' / 'model.safetensors'))),
        make_reversible(timm.create_model(f'local-dir:{tmp_path / "vit"}', pretrained=True)),
    ):
        assert type(model) is ReversibleTimmVisionTransformer
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    # another head: timm drops the classifier and keeps the rest
    model = timm.create_model('bdia_vit_base_patch16_224', pretrained=True, **dict(TINY, num_classes=5),
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'vit' / 'model.safetensors')))
    assert model(images(2)).shape == (2, 5)
    assert torch.equal(model.blocks[2].mlp.fc2.weight, source.blocks[2].mlp.fc2.weight)


def test_pretrained_tag_downloads_timm_weights_from_its_hub_repo(fake_hub, tmp_path):
    """ The Hub repository of timm's weights, served in-process: the real huggingface_hub and timm loading
    code fetch timm/vit_base_patch16_224.augreg2_in21k_ft_in1k for the BDIA model. """
    source = _plain_vit(num_classes=1000)
    save_file(source.state_dict(), str(tmp_path / 'model.safetensors'))
    fake_hub.repos['timm/vit_base_patch16_224.augreg2_in21k_ft_in1k'] = {
        'model.safetensors': (tmp_path / 'model.safetensors').read_bytes()}
    model = timm.create_model(
        'bdia_vit_base_patch16_224.augreg2_in21k_ft_in1k', pretrained=True, **dict(TINY, num_classes=1000))
    assert any('timm/vit_base_patch16_224.augreg2_in21k_ft_in1k/resolve/main/model.safetensors' in u
               for u in fake_hub.urls())
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


# ---- registered models and timm's pretrained cfgs ----

BDIA_VITS = [n for n in timm_vit_models() if n.startswith('bdia_')]


def test_registered_names():
    sizes = ('tiny', 'small', 'base', 'large')
    assert BDIA_VITS == sorted(f'bdia_vit_{s}_patch16_{r}' for s in sizes for r in (224, 384))
    assert sorted(set(timm_vit_models()) - set(BDIA_VITS)) == ['revvit_base_patch16_224', 'revvit_small_patch16_224']
    assert not set(timm_vit_models()) & set(package_models())


def _without_architecture(cfg) -> dict:
    cfg = dict(cfg)
    cfg.pop('architecture')
    return cfg


@pytest.mark.parametrize('name', BDIA_VITS)
def test_pretrained_cfgs_are_timms(name):
    vit = name.removeprefix('bdia_')
    vit_tags = timm.list_models(vit, include_tags=True)
    assert timm.list_models(name, include_tags=True) == [f'bdia_{t}' for t in vit_tags] and vit_tags
    assert get_pretrained_cfg(name).tag == get_pretrained_cfg(vit).tag  # the same default tag
    for tagged in [vit] + vit_tags:
        ours, theirs = resolve_pretrained_cfg(f'bdia_{tagged}'), resolve_pretrained_cfg(tagged)
        assert _without_architecture(ours.to_dict()) == _without_architecture(theirs.to_dict()), tagged
        assert ours.architecture == name and ours.hf_hub_id.startswith('timm/vit_')


def test_base_augreg2_resolves_to_timms_weights():
    model = timm.create_model('bdia_vit_base_patch16_224.augreg2_in21k_ft_in1k', **TINY)
    assert model.pretrained_cfg['hf_hub_id'] == 'timm/vit_base_patch16_224.augreg2_in21k_ft_in1k'
    assert model.pretrained_cfg['tag'] == 'augreg2_in21k_ft_in1k'


@pytest.mark.parametrize('name', timm_vit_models())
def test_full_size_models_match_timms_vit(name):
    """ Same architecture as the timm ViT of the same name (parameter names and shapes), on the meta device. """
    vit = {'revvit_small_patch16_224': 'vit_small_patch16_224',
           'revvit_base_patch16_224': 'vit_base_patch16_224'}.get(name, name.removeprefix('bdia_'))
    with torch.device('meta'):
        ours, theirs = timm.create_model(name), timm.create_model(vit)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.reversible_method == ('two_stream' if name.startswith('revvit') else 'bdia')
    assert model_input_size(ours) == model_input_size(theirs)


def test_revvit_has_no_weights_and_is_two_stream():
    cfg = get_pretrained_cfg('revvit_base_patch16_224')
    assert not cfg.has_weights and cfg.input_size == (3, 224, 224)
    with pytest.raises(RuntimeError):
        timm.create_model('revvit_base_patch16_224', pretrained=True, **TINY)


# ---- timm's model API ----

@pytest.mark.parametrize('method', METHODS)
def test_timm_api(method):
    plain = _plain_vit(reg_tokens=2)
    model = make_reversible(copy.deepcopy(plain), method).eval()
    x = images(2)
    assert model.group_matcher() == plain.group_matcher() and model.no_weight_decay() == plain.no_weight_decay()
    with torch.no_grad():
        features = model.forward_features(x)
        assert torch.equal(model.forward_head(features), model(x))
        final, intermediates = model.forward_intermediates(x)
        assert torch.equal(final, features)
        assert len(intermediates) == TINY['depth'] and intermediates[-1].shape == (2, 64, 4, 4)
        assert torch.equal(model.norm(intermediates[-1].flatten(2).transpose(1, 2)), features[:, 3:])
        for options in (dict(indices=2, norm=True), dict(indices=[0], return_prefix_tokens=True, output_fmt='NLC'),
                        dict(output_dict=True, return_prefix_tokens=True), dict(indices=1, intermediates_only=True),
                        dict(indices=[0], stop_early=True)):
            _assert_same_structure(model.forward_intermediates(x, **options), plain.forward_intermediates(x, **options))
        only = model.forward_intermediates(x, indices=1, intermediates_only=True)
        assert torch.equal(only[0], intermediates[-1])
        assert torch.equal(model.get_intermediate_layers(x, n=1, reshape=True)[0], intermediates[-1])
    with pytest.raises(NotImplementedError, match='mask'):
        model(x, attn_mask=torch.ones(19, 19, dtype=torch.bool))
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0, 'avg')
    assert model(x).shape == (2, 64)


def _assert_same_structure(ours, theirs):
    assert type(ours) is type(theirs)
    if isinstance(ours, torch.Tensor):
        assert ours.shape == theirs.shape
    elif isinstance(ours, dict):
        assert ours.keys() == theirs.keys()
        for key in ours:
            _assert_same_structure(ours[key], theirs[key])
    else:
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            _assert_same_structure(a, b)


@pytest.mark.parametrize('method', METHODS)
def test_features_only(method):
    model = timm.create_model(
        'bdia_vit_base_patch16_224', features_only=True, out_indices=(0, 2), method=method, **TINY)
    feats = model(images(2))
    assert [f.shape for f in feats] == [(2, 64, 4, 4)] * 2
    assert len(model.model.blocks) == 3


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated', 'ignore:`torch.jit.save` is deprecated',
                            'ignore:`torch.jit.load` is deprecated')
@pytest.mark.parametrize('layout', [l for l in LAYOUTS if l != 'dynamic_img_size'])  # timm's ViT does not script it
@pytest.mark.parametrize('method', METHODS)
def test_torchscript_is_the_eager_eval_function_bit_for_bit(method, layout, tmp_path):
    model = _converted(method, LAYOUTS[layout]).eval()
    scripted = torch.jit.script(model)
    torch.jit.save(scripted, tmp_path / 'model.pt')
    x = images(2)
    with torch.no_grad():
        assert torch.equal(torch.jit.load(tmp_path / 'model.pt')(x), model(x))
    scripted.train()
    with pytest.raises(torch.jit.Error, match='runs at evaluation only'):
        scripted(x)


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
@pytest.mark.parametrize('method, options', [
    ('bdia', dict(quant_level=0)), ('bdia', dict(quant_level=23)), ('momentum', dict(quant_level=0)),
    ('momentum', dict(quant_level=23)), ('momentum', dict(momentum=0.5)), ('momentum', dict(momentum=127 / 128)),
    ('momentum', dict(momentum=1 / 128))])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
def test_torchscript_of_every_setting_and_dtype(method, options, dtype):
    model = _converted(method, **options).to(dtype).eval()
    x = images(2).to(dtype)
    with torch.no_grad():
        assert torch.equal(torch.jit.script(model)(x), model(x))


@pytest.mark.parametrize('method', METHODS)
def test_fx_trace_and_fx_features_are_the_eager_function(method):
    model = _converted(method, LAYOUTS['registers']).eval()
    traced = torch.fx.symbolic_trace(model)
    torch.manual_seed(0)
    features_model = timm.create_model(
        'bdia_vit_base_patch16_224', features_only=True, feature_cls='fx', out_indices=(0, 2), method=method,
        **dict(TINY, **LAYOUTS['registers']))
    features_model.load_state_dict({f'graph_module.{k}': v for k, v in model.state_dict().items()
                                    if not k.startswith(('norm.', 'head.'))})
    x = images(2)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))
        expected = model.forward_intermediates(x, indices=(0, 2), output_fmt='NLC', intermediates_only=True)
        features = features_model.eval()(x)
    assert len(features) == 2
    for feature, tokens in zip(features, expected):
        assert torch.equal(feature[:, model.num_prefix_tokens:], tokens)
    with pytest.raises(NotImplementedError, match='without attention masks'):  # the traced model checks its mask
        traced(x, torch.ones(1, 1, 21, 21, dtype=torch.bool))


def test_dynamic_img_size_takes_other_input_sizes():
    model = _converted('bdia', LAYOUTS['dynamic_img_size']).train()
    out = model(images(2, size=48))
    out.sum().backward()
    _, intermediates = model.eval().forward_intermediates(images(2, size=48))
    assert intermediates[-1].shape == (2, 64, 6, 6)


@pytest.mark.parametrize('reversible', [True, False])
@pytest.mark.parametrize('method', METHODS)
def test_grad_checkpointing_keeps_outputs_and_gradients(method, reversible):
    model = _converted(method, DROPS, reversible=reversible).double().train()
    x = images(2, dtype=torch.float64)
    runs = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        out = model(x)
        out.square().sum().backward()
        runs.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert model.grad_checkpointing
    assert torch.equal(runs[0][0], runs[1][0])
    for name, grad in runs[0][1].items():
        assert ((runs[1][1][name] - grad).norm() / grad.norm()).item() < FLOAT64_TOLERANCE, name


def test_set_reversible_switches_to_ordinary_autograd(monkeypatch):
    model = _converted('bdia').train()
    model.set_reversible(False)
    monkeypatch.setattr(timm_vit, 'reversible_forward', _engine_must_not_run)
    model(images(2)).sum().backward()
    with pytest.raises(TypeError, match='True or False'):
        model.set_reversible('yes')


def test_activation_memory_does_not_grow_with_depth():
    """ Per extra block, ordinary autograd keeps the block's activations (more than ten float32 tensors of the
    token size: norms, qkv, attention, MLP hidden); BDIA keeps one side bit per element, 1/32 of one such tensor,
    plus a few bytes per sample: its growth stays below a tenth of the plain model's. """
    memory = {}
    for depth in (2, 6):
        plain = _plain_vit(depth=depth)
        memory['plain', depth] = activation_memory_per_image(plain, batch_size=8)
        memory['bdia', depth] = activation_memory_per_image(make_reversible(plain), batch_size=8)
    growth = {kind: memory[kind, 6] - memory[kind, 2] for kind in ('plain', 'bdia')}
    print(f'activation memory per image, depth 2 -> 6: plain +{growth["plain"] / 1024:.1f} KiB, '
          f'BDIA +{growth["bdia"] / 1024:.1f} KiB')
    assert growth['bdia'] < 0.1 * growth['plain']


# ---- what is rejected, with what message ----

@pytest.mark.parametrize('block_fn', [ResPostBlock, ParallelScalingBlock, ParallelThingsBlock])
def test_other_block_types_are_rejected_by_name(block_fn):
    model = _plain_vit(block_fn=block_fn)
    with pytest.raises(TypeError, match=f'blocks.0 is a timm.models.vision_transformer.{block_fn.__name__}'):
        make_reversible(model)
    assert type(model) is timm.models.vision_transformer.VisionTransformer  # left as it was
    with pytest.raises(TypeError, match=block_fn.__name__):
        timm.create_model('bdia_vit_base_patch16_224', block_fn=block_fn, **TINY)


def test_other_models_are_rejected_by_name():
    with pytest.raises(TypeError, match='VisionTransformerDistilled'):
        make_reversible(timm.create_model('deit_tiny_distilled_patch16_224', **TINY))
    with pytest.raises(TypeError, match='Eva'):
        make_reversible(timm.create_model('eva02_tiny_patch14_224', **dict(TINY, patch_size=8)))
    with pytest.raises(TypeError, match='already reversible'):
        make_reversible(_converted('bdia'))


def _assert_exact(method: str, gradients: bool, **options) -> None:
    """ Bit-exact reconstruction in float32 and, with `gradients`, float64 gradients equal to ordinary autograd.
    The steps themselves are swept with gradients in test_settings.py; here the converted model's plumbing. """
    model = _converted(method, dict(depth=2, **DROPS), **options).train()
    # inputs of realistic scale, smaller where the finest grids hold only |x| < 2^(24 - l) (2 at l = 23)
    scale = min(2.5, 2. ** (20 - model.quant_level))
    assert reconstruction_error(model, images(2) * scale) == 0.0
    if gradients:
        _assert_same_gradients(model.double(), images(2, dtype=torch.float64))


@pytest.mark.parametrize('quant_level', range(0, 24))
@pytest.mark.parametrize('method', EXACT)
def test_every_accepted_quant_level_is_exact(method, quant_level):
    _assert_exact(method, quant_level in (0, DEFAULT_QUANT_LEVEL, 23), quant_level=quant_level)


@pytest.mark.parametrize('side_bits', range(1, MAX_BDIA_SIDE_BITS + 1))
def test_every_accepted_bdia_gamma_is_exact(side_bits):
    _assert_exact('bdia', side_bits in (1, MAX_BDIA_SIDE_BITS), bdia_gamma=2. ** -side_bits)


@pytest.mark.parametrize('momentum', MOMENTA)
def test_every_accepted_momentum_is_exact(momentum):
    _assert_exact('momentum', momentum in (MOMENTA[0], 0.875, MOMENTA[-1]), momentum=momentum)


@pytest.mark.parametrize('method', EXACT)
def test_verify_reconstruction_off_keeps_gradients(method):
    model = _converted(method, DROPS, verify_reconstruction=False).double().train()
    assert not model.verify_reconstruction
    _assert_same_gradients(model, images(2, dtype=torch.float64))


@pytest.mark.parametrize('method, options, error, match', [
    ('bdia', dict(quant_level=24), ValueError, r'quant_level must be an integer in \[0, 24\)'),
    ('bdia', dict(quant_level=9.5), ValueError, r'quant_level must be an integer'),
    ('momentum', dict(quant_level=-1), ValueError, r'quant_level must be an integer'),
    ('bdia', dict(quant_level=True), ValueError, r'quant_level must be an integer'),
    ('bdia', dict(bdia_gamma=0.3), ValueError, r'2\^-k with 1 <= k <= 8'),
    ('bdia', dict(bdia_gamma=2. ** -9), ValueError, r'2\^-k with 1 <= k <= 8'),
    ('momentum', dict(momentum=0.9), ValueError, r'a / 2\^m with a odd'),
    ('bdia', dict(split_backward=1), TypeError, 'split_backward must be True or False'),
    ('momentum', dict(verify_reconstruction='no'), TypeError, 'verify_reconstruction must be True or False'),
    ('bdia', dict(reversible='yes'), TypeError, 'reversible must be True or False'),
    ('bdia', dict(momentum=0.875), TypeError, r"method='bdia' takes no option momentum; its options are: "
                                              r'quant_level, bdia_gamma, split_backward, verify_reconstruction'),
    ('momentum', dict(bdia_gamma=0.5), TypeError, r"method='momentum' takes no option bdia_gamma"),
    ('two_stream', dict(quant_level=9, split_backward=True), TypeError,
     r"method='two_stream' takes no option quant_level, split_backward; its options are: none"),
    ('revnet', {}, ValueError, r"method must be one of 'bdia', 'two_stream', 'momentum'"),
])
def test_rejected_options(method, options, error, match):
    model = _plain_vit()
    with pytest.raises(error, match=match):
        make_reversible(model, method, **options)
    assert type(model) is timm.models.vision_transformer.VisionTransformer
    with pytest.raises(error, match=match):
        timm.create_model('bdia_vit_base_patch16_224', method=method, **options, **TINY)


# ---- activations beyond the grid's exact range ----

def test_largest_exact_quant_level():
    assert largest_exact_quant_level(2. ** 9) == 13  # 2 * 2^9 * 2^13 = 2^23 < 2^24; 2^14 would reach 2^24
    assert largest_exact_quant_level(3e5) == 4 and largest_exact_quant_level(300.) == 14
    assert largest_exact_quant_level(2. ** 9, significand_bits=53) == 42
    assert largest_exact_quant_level(1e7) == -1
    for max_abs in (0.3, 1., 300., 3e5, 1e6):
        level = largest_exact_quant_level(max_abs)
        assert 2 * max_abs * 2 ** level < 2 ** 24 <= 2 * max_abs * 2 ** (level + 1)


@pytest.mark.parametrize('method', EXACT)
def test_out_of_range_error_names_the_block_and_the_level_to_pick(method):
    def train_step(model):
        with torch.no_grad():
            model.blocks[1].mlp.fc2.bias.fill_(3e5)  # |x| ~ 3e5 from block 1 on: beyond 2^(24 - 9) = 32768
        model.train()(images(2)).sum().backward()

    with pytest.raises(GridRangeError) as error:
        train_step(_converted(method))
    message = str(error.value)
    print(message)
    level = largest_exact_quant_level(float(re.search(r'reached \|x\| = ([0-9.e+]+)', message).group(1)))
    assert level == (4 if method == 'bdia' else 7)  # |x| ~ 3e5; momentum's velocity carries (1 - 7/8) of it
    assert 'block 1' in message and 'log2(|x|)' in message and 'Pretrained ViTs' in message
    assert f'quant_level={level} (make_reversible(model, quant_level={level})' in message
    train_step(_converted(method, quant_level=level))  # the level the message gives works


# ---- training ----

DIGITS_VIT = dict(TINY, depth=4, img_size=16, patch_size=4, init_values=0.1, drop_path_rate=0.1)


@pytest.fixture(scope='module')
def digits():
    from torchvision.transforms import functional as TF
    from timm_reversible.data import DigitsDataset
    out = []
    for split in ('train', 'test'):
        ds = DigitsDataset(split, img_size=DIGITS_VIT['img_size'])
        out.append(((torch.stack([TF.to_tensor(i) for i in ds.images]) - 0.5) / 0.5, torch.tensor(ds.targets)))
    return out


@pytest.fixture(scope='module')
def digits_vit(digits):
    """ A plain timm ViT trained on digits for 3 epochs: not yet converged, with a trained model's margins. """
    torch.manual_seed(0)
    model = timm.create_model('vit_base_patch16_224', **DIGITS_VIT)
    _fit(model, *digits[0], epochs=3, lr=2e-3)
    return model.eval()


def _fit(model, x, y, epochs: int, lr: float) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y)).split(32):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    return (model.eval()(x).argmax(dim=1) == y).float().mean().item()


@pytest.mark.slow
def test_digits_vit_converted_and_fine_tuned_with_bdia_keeps_its_accuracy(digits_vit, digits):
    """ The digits ViT converted to BDIA (same accuracy: the same function up to the grid), fine-tuned with the
    reversible backward: test accuracy kept or improved, and the weights load back into plain timm with the
    fine-tuned accuracy. """
    (x_train, y_train), (x_test, y_test) = digits
    plain_acc = _accuracy(digits_vit, x_test, y_test)
    model = make_reversible(copy.deepcopy(digits_vit), 'bdia')
    converted_acc = _accuracy(model, x_test, y_test)
    torch.manual_seed(1)
    _fit(model, x_train, y_train, epochs=3, lr=5e-4)
    tuned_acc = _accuracy(model, x_test, y_test)
    back = timm.create_model('vit_base_patch16_224', **DIGITS_VIT)
    back.load_state_dict(model.state_dict(), strict=True)
    back_acc = _accuracy(back, x_test, y_test)
    print(f'digits top-1: plain {plain_acc:.4f}, converted {converted_acc:.4f}, BDIA fine-tuned {tuned_acc:.4f}, '
          f'loaded back into plain timm {back_acc:.4f}')
    assert plain_acc > 0.7 and tuned_acc >= plain_acc
    # plain and BDIA at evaluation differ only on images whose class the grid's bound leaves open
    for plain, acc in ((digits_vit, converted_acc), (back, tuned_acc)):
        _, bound, plain_logits, _ = _eval_deviation(plain, x_test, DEFAULT_QUANT_LEVEL)
        undecided = int((~_decided_by_the_bound(plain_logits, bound)).sum())
        assert abs(acc - _accuracy(plain, x_test, y_test)) * len(y_test) <= undecided


@pytest.mark.slow
def test_train_script_fine_tunes_a_pretrained_bdia_vit(tmp_path):
    """ `scripts/train.py --model bdia_vit_base_patch16_224 --pretrained --img-size N` through timm's
    create_model, weights from a plain timm ViT file; the best weights load into plain timm. """
    tiny = dict(embed_dim=64, depth=2, num_heads=2, patch_size=8)
    source = timm.create_model('vit_base_patch16_224', img_size=32, num_classes=10, **tiny)
    save_file(source.state_dict(), str(tmp_path / 'vit.safetensors'))
    overlay = f"pretrained_cfg_overlay={{'file': '{tmp_path / 'vit.safetensors'}'}}"
    run_train_script([
        '--model', 'bdia_vit_base_patch16_224', '--pretrained', '--img-size', '32', '--dataset', 'digits',
        '--model-kwargs', *[f'{k}={v}' for k, v in tiny.items()], overlay, '--train-num-samples', '256',
        '--epochs', '1', '-b', '32', '--opt', 'adamw', '--lr', '1e-3', '--warmup-epochs', '0', '--no-aug',
        '--hflip', '0', '--smoothing', '0', '--workers', '0', '--output', str(tmp_path), '--experiment', 'run'],
        tmp_path)
    results = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert results['model'] == 'bdia_vit_base_patch16_224' and results['img_size'] == 32
    plain = timm.create_model('vit_base_patch16_224', pretrained=True, img_size=32, num_classes=10, **tiny,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'run' / 'model.safetensors')))
    assert not torch.equal(plain.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)  # it trained


def test_benchmark_measures_the_models_at_their_own_input_size(tmp_path):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts'))
    try:
        import benchmark
    finally:
        sys.path.pop(0)
    args = ['--models', 'vit_base_patch16_224', 'bdia_vit_base_patch16_224', '--depths', '1', '--model-kwargs',
            'embed_dim=32', 'num_heads=2', '--batch-size', '2', '--repeats', '1', '--warmup', '0',
            '--memory-batch-sizes', '1', '2', '--no-progress', '--out', str(tmp_path)]
    assert benchmark.main(args) == 0
    rows = {r['model']: r for r in json.loads((tmp_path / 'results.json').read_text())['rows']}
    at_224 = count_flops(timm.create_model('vit_base_patch16_224', embed_dim=32, num_heads=2, depth=1)) / 1e9
    assert rows['bdia_vit_base_patch16_224']['gflops'] == pytest.approx(at_224, rel=1e-3)
    assert rows['bdia_vit_base_patch16_224']['reversible'] and rows['vit_base_patch16_224']['gflops'] > 0
