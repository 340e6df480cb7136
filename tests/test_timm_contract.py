""" timm's per-model checks, run on every model the package registers (picked up from timm's registry), and the
base model's settings: every accepted value works, every other is rejected at creation saying what is allowed.

timm's own tests/test_models.py runs in test_timm_suite.py; the checks it picks by model name or module are
here for every model. Where a check fails because of a reversible model's own files, that case is an xfail
(strict) naming the cause, so it turns into a failure once fixed.
"""
import copy
import fnmatch
import inspect
import math

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.layers import calculate_drop_path_rates
from timm.models._manipulate import group_parameters

from timm_reversible.profiling import activation_memory_per_image, count_flops, count_params

from conftest import SMALL, images, package_models
from timm_suite_plugin import REVERSIBLE

MODELS = package_models()
# The reversible timm ViTs run the checks timm picks by name or module as well (they match neither), at 32x32
TIMM_VITS = {'bdia_vit_tiny_patch16_224': dict(img_size=32, patch_size=8),
             'revvit_small_patch16_224': dict(img_size=32, patch_size=8)}
NAME_PICKED = MODELS + list(TIMM_VITS)


def test_registry_holds_the_package_models():
    assert 'vit_small_cifar' in MODELS


@pytest.mark.parametrize('name', MODELS)
def test_forward_shape_and_finite(name):
    model = timm.create_model(name, **SMALL)
    out = model(images())
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('name', MODELS)
def test_backward_reaches_every_parameter(name):
    model = timm.create_model(name, **SMALL)
    model.train()
    model(images()).logsumexp(dim=1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f'{pname} got no gradient'
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f'{pname} got a zero gradient'


@pytest.mark.parametrize('name', MODELS)
def test_default_cfg_consistent(name):
    model = timm.create_model(name, **SMALL)
    cfg = model.pretrained_cfg
    assert cfg['num_classes'] == model.num_classes == 10
    assert tuple(cfg['input_size']) == (3, 32, 32)
    assert cfg['input_size'][0] == model.patch_embed.in_chans
    assert tuple(cfg['input_size'][1:]) == model.patch_embed.img_size
    assert len(cfg['mean']) == len(cfg['std']) == 3
    modules = dict(model.named_modules())
    first_conv = modules[cfg['first_conv']]
    assert isinstance(first_conv, nn.Conv2d) and first_conv.weight.shape[1] == 3
    assert modules[cfg['classifier']] is model.get_classifier()
    assert cfg['hf_hub_id'].endswith(f'/{name}.{cfg["tag"]}')


@pytest.mark.parametrize('name', MODELS)
def test_reset_classifier_and_pre_logits(name):
    model = timm.create_model(name, **SMALL).eval()
    x = images()
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0)
        out = model(x)
    assert out.shape == (2, model.num_features) == (2, model.head_hidden_size)
    torch.testing.assert_close(out, pre_logits, rtol=0, atol=0)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)


@pytest.mark.parametrize('name', MODELS)
def test_num_classes_zero(name):
    model = timm.create_model(name, num_classes=0, **SMALL)
    assert model(images()).shape == (2, SMALL['embed_dim'])


@pytest.mark.parametrize('name', MODELS)
def test_features_only_getter(name):
    model = timm.create_model(name, features_only=True, feature_cls='getter', out_indices=(0, 1), **SMALL)
    feats = model(images())
    assert len(feats) == 2
    for feat, info in zip(feats, model.feature_info.get_dicts()):
        assert feat.shape == (2, info['num_chs'], 32 // info['reduction'], 32 // info['reduction'])


@pytest.mark.parametrize('name', MODELS)
def test_forward_intermediates_matches_forward_features(name):
    model = timm.create_model(name, **SMALL).eval()
    x = images()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert len(intermediates) == SMALL['depth']
        assert intermediates[-1].shape == (2, SMALL['embed_dim'], 8, 8)
        only = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert len(only) == 1 and torch.equal(only[0], intermediates[-1])


@pytest.mark.parametrize('name', MODELS)
def test_grad_checkpointing_leaves_outputs_unchanged(name):
    model = timm.create_model(name, **SMALL).eval()
    x = images()
    ref = model(x)
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing()
    out = model(x)
    out.sum().backward()
    assert torch.equal(out, ref)
    for g, p in zip(ref_grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize('name', MODELS)
def test_bfloat16(name):
    model = timm.create_model(name, **SMALL).to(torch.bfloat16)
    out = model(images(dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()


@pytest.mark.parametrize('name', MODELS)
def test_pretrained_file_with_other_in_chans_and_classes(name, tmp_path):
    source = timm.create_model(name, **SMALL)
    path = tmp_path / 'model.safetensors'
    save_file(source.state_dict(), str(path))
    model = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), in_chans=1, num_classes=5, **SMALL)
    assert model(images(in_chans=1)).shape == (2, 5)
    src = source.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith('head.'):
            continue
        if key == 'patch_embed.proj.weight':
            torch.testing.assert_close(value, src[key].sum(dim=1, keepdim=True))
        elif key.startswith('patch_embed.norm.'):
            torch.testing.assert_close(value, src[key].reshape(3, -1).mean(dim=0))
        else:
            assert torch.equal(value, src[key]), key


@pytest.mark.parametrize('name', MODELS)
def test_unknown_kwarg_raises_type_error(name):
    with pytest.raises(TypeError):
        timm.create_model(name, not_a_kwarg=1, **SMALL)


@pytest.mark.parametrize('name', MODELS)
def test_drop_rate_kwargs_have_timm_names(name):
    model = timm.create_model(
        name, drop_rate=0.1, pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1,
        img_size=16, patch_size=4, in_chans=3, num_classes=3, mlp_ratio=2., **SMALL)
    assert model(images(size=16)).shape == (2, 3)


@pytest.mark.parametrize('name', MODELS)
def test_bad_input_gives_clear_error(name):
    model = timm.create_model(name, **SMALL)
    with pytest.raises(ValueError, match='img_size'):
        model(images(size=64))
    with pytest.raises(ValueError, match='in_chans'):
        model(images(in_chans=1))


@pytest.mark.parametrize('name', MODELS)
def test_full_size_params_and_flops(name):
    """ The size anchors of the reference study: 9.59M params (1%), 1.237 GFLOPs per image (5%). """
    model = timm.create_model(name)
    params, flops = count_params(model), count_flops(model)
    print(f'{name}: {params / 1e6:.3f}M params, {flops / 1e9:.4f} GFLOPs')
    assert abs(params - 9.59e6) / 9.59e6 < 0.01
    assert abs(flops - 1.237e9) / 1.237e9 < 0.05


def test_grad_checkpointing_lowers_activation_memory():
    model = timm.create_model('vit_small_cifar', depth=4, embed_dim=128, num_heads=4)
    plain = activation_memory_per_image(model, batch_size=4)
    model.set_grad_checkpointing(True)
    checkpointed = activation_memory_per_image(model, batch_size=4)
    print(f'vit depth 4: {plain / 2**20:.3f} MiB/img plain, {checkpointed / 2**20:.3f} checkpointed')
    assert checkpointed < 0.6 * plain


@pytest.mark.parametrize('name', MODELS)
def test_measurements_use_the_created_input_size(name):
    """ A model created at another img_size / in_chans is measured at that size, not its checkpoint's. """
    from timm_reversible.profiling import model_input_size
    model = timm.create_model(name, img_size=16, in_chans=1, **SMALL)
    assert model_input_size(model) == (1, 16, 16)
    assert count_flops(model) < count_flops(timm.create_model(name, **SMALL))


# ---- timm's model contract: factory kwargs, meta device, classifier, TorchScript, torch.fx ----

@pytest.mark.parametrize('name', MODELS)
def test_factory_kwargs_place_every_tensor(name):
    model = timm.create_model(name, device='meta', dtype=torch.float64, **SMALL)
    assert all(t.device.type == 'meta' and t.dtype == torch.float64 for t in [*model.parameters(), *model.buffers()])
    model = timm.create_model(name, dtype=torch.float64, **SMALL).eval()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(images(dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize('name', MODELS)
def test_meta_model_after_to_empty_and_init_weights_equals_a_created_one(name):
    """ timm's convention: create under the meta device, `to_empty`, then `init_weights()` initialises every
    tensor (norm layers and the attention temperature too) as a model created on the device. """
    model = timm.create_model(name, **SMALL).eval()
    with torch.device('meta'):
        meta_model = timm.create_model(name, **SMALL).eval()
    meta_model.to_empty(device='cpu')
    with torch.no_grad():
        for p in meta_model.parameters():
            p.fill_(float('nan'))  # an uninitialised tensor cannot pass as one that happens to be finite
    for m in (model, meta_model):
        torch.manual_seed(1)
        m.init_weights()
    expected, state = model.state_dict(), meta_model.state_dict()
    assert expected.keys() == state.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    with torch.no_grad():
        assert torch.equal(meta_model(images()), model(images()))


@pytest.mark.parametrize('name', MODELS)
def test_reset_classifier_keeps_device_dtype_and_mode(name):
    model = timm.create_model(name, **SMALL).to(torch.float64).eval()
    model.reset_classifier(5)
    assert model.head.weight.dtype == torch.float64 and not model.head.training
    assert model(images(dtype=torch.float64)).shape == (2, 5)
    model.to('meta')
    model.reset_classifier(3)
    assert model.head.weight.device.type == 'meta' and model.head.weight.dtype == torch.float64


@pytest.mark.parametrize('name', MODELS)
def test_every_global_pool_pools_as_documented(name):
    model = timm.create_model(name, num_classes=0, **SMALL).eval()
    x = images()
    with torch.no_grad():
        features = model.forward_features(x)
        for pool, expected in (('token', features[:, 0]), ('avg', features[:, 1:].mean(dim=1)), ('', features)):
            model.reset_classifier(0, pool)
            assert torch.equal(model.forward_head(features), expected), pool
        created = timm.create_model(name, num_classes=0, global_pool='avg', **SMALL).eval()
        assert torch.equal(created(x), created.forward_features(x)[:, 1:].mean(dim=1))


@pytest.mark.parametrize('pool', ['max', 'avgmax', 'map', 'catavgmax'])
@pytest.mark.parametrize('name', MODELS)
def test_unsupported_global_pool_raises_assertion_error(name, pool):
    message = f"global_pool must be '', 'avg' or 'token', got '{pool}'"
    with pytest.raises(AssertionError, match=message):
        timm.create_model(name, global_pool=pool, **SMALL)
    model = timm.create_model(name, **SMALL)
    head = model.head
    with pytest.raises(AssertionError, match=message):
        model.reset_classifier(7, pool)
    assert model.global_pool == 'token' and model.num_classes == 10 and model.head is head


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
@pytest.mark.parametrize('name', MODELS)
def test_torchscript_matches_eager_and_checks_its_input(name, tmp_path):
    model = timm.create_model(name, **SMALL).eval()
    scripted = torch.jit.script(model)
    torch.jit.save(scripted, tmp_path / 'model.pt')  # nothing left in Python: the scripted model saves and loads
    loaded = torch.jit.load(tmp_path / 'model.pt')
    with torch.no_grad():
        assert torch.equal(scripted(images()), model(images()))
        assert torch.equal(loaded(images()), model(images()))
        with pytest.raises(torch.jit.Error, match='created with in_chans=3'):
            scripted(images(in_chans=1))


# the reversible models' TorchScript path rewrites their evaluation function: every setting it reads, at its ends
SCRIPTED_SETTINGS = [
    ('revvit_small_cifar', dict(drop_path_rate=0.5, proj_drop_rate=0.5)),
    ('bdia_vit_small_cifar', dict(quant_level=0)), ('bdia_vit_small_cifar', dict(quant_level=23)),
    ('bdia_vit_small_cifar', dict(bdia_gamma=2. ** -8, depth=1)),
    ('momentum_revvit_small', dict(quant_level=0)), ('momentum_revvit_small', dict(quant_level=23)),
    ('momentum_revvit_small', dict(momentum=0.5)), ('momentum_revvit_small', dict(momentum=127 / 128)),
    ('momentum_revvit_small', dict(momentum=1 / 128, depth=1)),
]


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
@pytest.mark.parametrize('name,settings', SCRIPTED_SETTINGS)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
def test_torchscript_of_every_setting_and_dtype_is_the_eager_function_bit_for_bit(name, settings, dtype):
    torch.manual_seed(0)
    model = timm.create_model(name, **dict(SMALL, **settings)).to(dtype).eval()
    x = images().to(dtype)
    with torch.no_grad():
        assert torch.equal(torch.jit.script(model)(x), model(x))


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
@pytest.mark.parametrize('name', REVERSIBLE)
def test_scripted_reversible_models_refuse_to_train(name):
    scripted = torch.jit.script(timm.create_model(name, **SMALL).eval())
    scripted.train()
    with pytest.raises(torch.jit.Error, match='runs at evaluation only'):
        scripted(images())


@pytest.mark.parametrize('name', MODELS)
def test_fx_trace_matches_eager_and_checks_its_input(name):
    """ Plain `torch.fx.symbolic_trace`; the input check is a leaf, so the traced model runs it on real input. """
    model = timm.create_model(name, **SMALL).eval()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.equal(traced(images()), model(images()))
        with pytest.raises(ValueError, match='created with in_chans=3'):
            traced(images(in_chans=1))


@pytest.mark.parametrize('name', MODELS)
def test_features_only_fx_equals_forward_intermediates(name):
    torch.manual_seed(0)
    features_model = timm.create_model(name, features_only=True, feature_cls='fx', out_indices=(0, 1), **SMALL).eval()
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL).eval()
    x = images()
    with torch.no_grad():
        features = features_model(x)
        expected = model.forward_intermediates(x, indices=(0, 1), output_fmt='NLC', intermediates_only=True)
    assert len(features) == 2
    for feature, tokens in zip(features, expected):
        assert torch.equal(feature[:, model.num_prefix_tokens:], tokens)


# ---- the checks timm's test_models.py picks by model name or module (see test_timm_suite.py) ----

@pytest.mark.parametrize('name', NAME_PICKED)
def test_timm_non_std_cfg_checks(name):
    """ timm's test_model_default_cfgs_non_std, which it runs on models whose names match its NON_STD_FILTERS,
    on the meta device as timm runs it. """
    with torch.device('meta'):
        model = timm.create_model(name, device='meta', dtype=torch.float32, **SMALL).eval()
        with pytest.raises(TypeError):
            timm.create_model(name, device='meta', not_a_model_arg=1, **SMALL)
    assert inspect.signature(model.reset_classifier).parameters['global_pool'].default is None
    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert len(set(groups.values())) > 1
    param_names = [n for n, _ in model.named_parameters()]
    for pattern in model.no_weight_decay():  # an entry matches a parameter, or names an optional one left out
        assert any(fnmatch.fnmatch(n, pattern) for n in param_names) or getattr(model, pattern, None) is None, pattern
    cfg, state = model.default_cfg, model.state_dict()
    assert f"{cfg['classifier']}.weight" in state and f"{cfg['first_conv']}.weight" in state
    assert model.in_chans == cfg['input_size'][0] and model.num_classes == cfg['num_classes']

    x = torch.randn(1, *cfg['input_size'], device='meta')
    features = model.forward_features(x)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert features.shape == (1, model.patch_embed.num_patches + model.num_prefix_tokens, model.num_features)
    assert pre_logits.shape == (1, model.head_hidden_size)
    model.to(torch.bfloat16)  # a dtype change after a forward leaves nothing stale
    assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16
    model.to(torch.float32)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre_logits.shape
    headless = timm.create_model(name, num_classes=0, device='meta', dtype=torch.float32, **SMALL).eval()
    assert headless(x).shape == pre_logits.shape

    frozen = timm.create_model(name, device='meta', dtype=torch.float32, **SMALL).requires_grad_(False)
    frozen.reset_classifier(0)
    assert not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize('name', NAME_PICKED)
def test_features_only_default(name):
    """ timm's test_model_forward_features (which skips 'vit_*'): the default features_only wrapper. """
    model = timm.create_model(
        name, features_only=True, embed_dim=64, depth=3, num_heads=2, **TIMM_VITS.get(name, {})).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 3
    features = model(images())
    assert [f.shape for f in features] == [(2, c, 32 // r, 32 // r) for c, r in zip(channels, reductions)]


@pytest.mark.parametrize('name', NAME_PICKED)
def test_forward_intermediates_with_grad_checkpointing(name):
    """ timm's test_model_forward_intermediates (selected by module): the same with gradient checkpointing. """
    model = timm.create_model(name, **SMALL, **TIMM_VITS.get(name, {})).eval()
    x = images()
    final, intermediates = model.forward_intermediates(x)
    model.set_grad_checkpointing()
    final_checkpointed, intermediates_checkpointed = model.forward_intermediates(x)
    assert torch.equal(final_checkpointed, final)
    assert all(torch.equal(a, b) for a, b in zip(intermediates_checkpointed, intermediates))


@pytest.mark.parametrize('name', NAME_PICKED)
def test_prune_intermediate_layers_contract(name):
    """ timm's test_prune_intermediate_layers_contract (selected by module): pruned and stop-early taps equal
    the full model's, pruning after the last block keeps the output, pruned models train every parameter. """
    model = timm.create_model(name, embed_dim=64, depth=3, num_heads=2, **TIMM_VITS.get(name, {})).eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
        taps = model.forward_intermediates(x, intermediates_only=True)
        pruned = copy.deepcopy(model)
        pruned.prune_intermediate_layers([2], prune_head=False)
        assert torch.equal(pruned(x), expected)
    for i in range(3):
        with torch.no_grad():
            selected = model.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
            assert torch.equal(selected[0], taps[i])
            pruned = copy.deepcopy(model)
            take_indices = pruned.prune_intermediate_layers([i])
            selected = pruned.forward_intermediates(x, indices=take_indices, intermediates_only=True)
            assert torch.equal(selected[0], taps[i])
        pruned.train()
        selected = pruned.forward_intermediates(x, indices=take_indices, intermediates_only=True)
        (sum(f.sum() for f in selected) + pruned.forward_features(x).sum()).backward()
        assert not [n for n, p in pruned.named_parameters() if p.grad is None], i


@pytest.mark.parametrize('name', MODELS)
def test_pretrained_file_with_features_only_and_no_head(name, tmp_path):
    """ timm's test_model_load_pretrained / test_model_features_pretrained, offline: weights from a file. """
    source = timm.create_model(name, **SMALL)
    path = tmp_path / 'model.safetensors'
    save_file(source.state_dict(), str(path))
    overlay = dict(file=str(path))
    headless = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1, num_classes=0, **SMALL)
    assert headless(images(in_chans=1)).shape == (2, SMALL['embed_dim'])
    features = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, features_only=True, **SMALL)
    assert torch.equal(features.model.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)


# ---- settings of the base model: every accepted value works, every other is rejected at creation ----

REJECTED_SETTINGS = [
    (dict(depth=0), r'depth must be an integer >= 1, got 0'),
    (dict(depth=-2), r'depth must be an integer >= 1'),
    (dict(depth=2.5), r'depth must be an integer >= 1'),
    (dict(depth=True), r'depth must be an integer >= 1'),
    (dict(embed_dim=0), r'embed_dim must be an integer >= 1'),
    (dict(num_classes=-1), r'num_classes must be an integer >= 0'),
    (dict(num_heads=3), r'num_heads must be an integer >= 1 that divides dim 64, got 3'),
    (dict(num_heads=0), r'num_heads must be an integer >= 1 that divides dim 64'),
    (dict(num_heads=-2), r'num_heads must be an integer >= 1 that divides dim 64'),
    (dict(mlp_ratio=0.), r'mlp_ratio must be > 0 and finite'),
    (dict(mlp_ratio=-1.), r'mlp_ratio must be > 0 and finite'),
    (dict(mlp_ratio=1 / 128), r'int\(embed_dim \* mlp_ratio\) >= 1'),
    (dict(mlp_ratio=math.nan), r'mlp_ratio must be > 0 and finite'),
    (dict(mlp_ratio=math.inf), r'mlp_ratio must be > 0 and finite'),
    *[(dict([(rate, value)]), rf'{rate} must be in \[0, 1\), got {value}')
      for rate in ('drop_rate', 'pos_drop_rate', 'proj_drop_rate', 'attn_drop_rate', 'drop_path_rate')
      for value in (1.0, 1.5, -0.1, math.nan)],
    (dict(patch_size=1), r'patch_size must be an integer >= 2 .*half a patch'),
    (dict(patch_size=0), r'patch_size must be an integer >= 2'),
    (dict(patch_size=(4, 4, 4)), r'patch_size must be an integer >= 2'),
    (dict(img_size=30), r'img_size must be a positive multiple of patch_size \(4, 4\)'),
    (dict(img_size=0), r'img_size must be a positive multiple of patch_size'),
    (dict(img_size=(32, 30)), r'img_size must be a positive multiple of patch_size'),
    (dict(img_size=(32, 32, 32)), r'img_size must be a positive multiple of patch_size'),
    (dict(img_size=32, patch_size=3), r'img_size must be a positive multiple of patch_size \(3, 3\)'),
    (dict(in_chans=0), r'in_chans must be an integer >= 1'),
]


@pytest.mark.parametrize('kwargs, message', REJECTED_SETTINGS, ids=[str(k) for k, _ in REJECTED_SETTINGS])
@pytest.mark.parametrize('name', MODELS)
def test_settings_outside_their_range_are_rejected_at_creation(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model(name, **dict(SMALL, **kwargs))


@pytest.mark.parametrize('depth', [1, 2, 5])
@pytest.mark.parametrize('rate', [0., 0.5, 0.99])
@pytest.mark.parametrize('name', MODELS)
def test_accepted_depths_and_drop_rates_build_what_they_say(name, depth, rate):
    model = timm.create_model(
        name, embed_dim=32, depth=depth, num_heads=2, drop_rate=rate, pos_drop_rate=rate, proj_drop_rate=rate,
        attn_drop_rate=rate, drop_path_rate=rate).train()
    assert len(model.blocks) == depth
    assert model.head_drop.p == model.pos_drop.p == rate
    for block, drop_path in zip(model.blocks, calculate_drop_path_rates(rate, depth)):
        assert block.attn.attn_drop == block.attn.proj_drop.p == block.mlp.drop1.p == block.mlp.drop2.p == rate
        for module in (block.drop_path1, block.drop_path2):
            assert module.drop_prob == drop_path if drop_path > 0 else isinstance(module, nn.Identity)
    out = model(images())
    assert out.shape == (2, 10) and torch.isfinite(out).all()


SHAPES = [  # img_size, patch_size, grid
    (32, 4, (8, 8)), (16, 2, (8, 8)), (24, 8, (3, 3)), (12, 3, (4, 4)), ((16, 32), 4, (4, 8)), (32, (4, 8), (8, 4)),
]


@pytest.mark.parametrize('img_size, patch_size, grid', SHAPES)
@pytest.mark.parametrize('name', MODELS)
def test_accepted_image_and_patch_sizes_give_their_token_grid(name, img_size, patch_size, grid):
    model = timm.create_model(name, img_size=img_size, patch_size=patch_size, **SMALL).eval()
    assert model.patch_embed.grid_size == grid
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, grid[0] * grid[1] + 1, SMALL['embed_dim'])
        assert model.forward_intermediates(x, intermediates_only=True)[-1].shape == (2, SMALL['embed_dim'], *grid)
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize('num_heads', [1, 2, 4, 8, 16, 32, 64])
@pytest.mark.parametrize('name', MODELS)
def test_every_num_heads_dividing_embed_dim_is_accepted(name, num_heads):
    model = timm.create_model(name, embed_dim=64, depth=2, num_heads=num_heads).eval()
    assert all(b.attn.num_heads * b.attn.head_dim == 64 for b in model.blocks)
    log_temperature = torch.tensor(math.log((64 // num_heads) ** -0.5))  # 1 / sqrt(head_dim), in float32
    assert all(torch.equal(b.attn.log_temperature, log_temperature) for b in model.blocks)
    assert torch.isfinite(model(images())).all()


@pytest.mark.parametrize('mlp_ratio, hidden', [(1 / 64, 1), (0.5, 32), (1., 64), (4., 256)])
@pytest.mark.parametrize('name', MODELS)
def test_every_mlp_ratio_giving_a_hidden_unit_is_accepted(name, mlp_ratio, hidden):
    model = timm.create_model(name, mlp_ratio=mlp_ratio, **SMALL).eval()
    assert all(b.mlp.fc1.out_features == hidden for b in model.blocks)
    assert torch.isfinite(model(images())).all()


@pytest.mark.parametrize('in_chans, num_classes', [(1, 0), (2, 1), (4, 100)])
@pytest.mark.parametrize('name', MODELS)
def test_accepted_channels_and_classes(name, in_chans, num_classes):
    model = timm.create_model(name, in_chans=in_chans, num_classes=num_classes, **SMALL).eval()
    out = model(images(in_chans=in_chans))
    assert out.shape == (2, num_classes or SMALL['embed_dim']) and torch.isfinite(out).all()


# ---- inputs: empty batches and dtypes ----

@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('name', MODELS)
def test_an_empty_batch_gives_an_empty_output(name, train):
    """ As timm's ViT: 0 images in, 0 rows out, and a backward that leaves every gradient zero. """
    model = timm.create_model(name, **SMALL).train(train)
    out = model(images()[:0])
    assert out.shape == (0, 10)
    if train:
        out.sum().backward()
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def _timm_vit() -> nn.Module:
    return timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=4, depth=1).eval()


@pytest.mark.parametrize('dtype', [torch.uint8, torch.int64, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('name', MODELS)
def test_input_of_another_dtype_gets_an_error_naming_the_dtype_it_needs(name, dtype):
    """ timm's ViT rejects these too (torch's dtype mismatch error); ours says what it needs. """
    x = (images() * 100).to(dtype)
    with pytest.raises(RuntimeError):
        _timm_vit()(x)
    model = timm.create_model(name, **SMALL).eval()
    with pytest.raises(TypeError, match=rf"model's dtype torch.float32 .*got {dtype}: convert it"):
        model(x)


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
@pytest.mark.parametrize('name', MODELS)
def test_a_model_cast_to_a_dtype_takes_input_of_that_dtype(name, dtype):
    model = timm.create_model(name, **SMALL).to(dtype).eval()
    out = model(images(dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    with pytest.raises(TypeError, match=rf"model's dtype {dtype}"):
        model(images())


@pytest.mark.parametrize('name', MODELS)
def test_under_autocast_a_float32_model_takes_the_autocast_dtype(name):
    """ As timm's ViT. Another half dtype (float16 under bfloat16 autocast), which timm's ViT takes, fails inside
    torch's autocast in the patch LayerNorm: ours says so first. """
    model = timm.create_model(name, **SMALL).eval()
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            assert _timm_vit()(images(dtype=dtype)).dtype == torch.bfloat16
            assert torch.isfinite(model(images(dtype=dtype))).all()
        with pytest.raises(TypeError, match=r'under torch.autocast also takes the autocast dtype\), got torch.float16'):
            model(images(dtype=torch.float16))
