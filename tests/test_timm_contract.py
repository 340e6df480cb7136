""" timm's per-model checks, run on every model the package registers (picked up from timm's registry). """
import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

from timm_reversible.profiling import activation_memory_per_image, count_flops, count_params

from conftest import SMALL, images, package_models

MODELS = package_models()


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
