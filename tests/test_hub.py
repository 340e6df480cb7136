""" The Hub namespace and the clear error of `pretrained=True` before weights are published, offline, against
conftest's in-process `fake_hub`.
"""
from pathlib import Path

import pytest
import timm
import yaml
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from timm_reversible import _hub
from timm_reversible._hub import HUB_NAMESPACE_ENV, PretrainedWeightsNotFoundError, hub_id, hub_namespace

from conftest import SMALL, package_models

MODELS = package_models()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """ HF_HUB_OFFLINE=1 with an empty cache. """
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path / 'hub_cache'))


def test_namespace_default_and_env_override(monkeypatch):
    monkeypatch.delenv(HUB_NAMESPACE_ENV, raising=False)
    assert hub_namespace() == _hub.DEFAULT_HUB_NAMESPACE == 'timm-reversible'
    assert hub_id('vit_small_cifar.c10') == 'timm-reversible/vit_small_cifar.c10'
    monkeypatch.setenv(HUB_NAMESPACE_ENV, 'someone')
    assert hub_id('vit_small_cifar.c10') == 'someone/vit_small_cifar.c10'
    with pytest.raises(ValueError):
        hub_id('vit_small_cifar')


@pytest.mark.parametrize('name', MODELS)
def test_default_cfgs_are_tagged_hub_repos_under_the_namespace(name, monkeypatch):
    monkeypatch.delenv(HUB_NAMESPACE_ENV, raising=False)
    tags = timm.list_pretrained(f'{name}.*')
    assert f'{name}.c10' in tags
    for model_tag in tags:
        cfg = timm.models.get_pretrained_cfg(model_tag)
        assert cfg.hf_hub_id == hub_id(model_tag), model_tag
    model = timm.create_model(name, **SMALL)
    assert model.pretrained_cfg['hf_hub_id'] == hub_id(f'{name}.c10')
    assert model.pretrained_cfg['hf_hub_filename'] == 'model.safetensors'


def test_namespace_set_after_import_takes_effect_at_creation(monkeypatch):
    monkeypatch.setenv(HUB_NAMESPACE_ENV, 'late-org')
    model = timm.create_model('vit_small_cifar', **SMALL)
    assert model.pretrained_cfg['hf_hub_id'] == 'late-org/vit_small_cifar.c10'
    # an explicit hub id is left alone
    model = timm.create_model('vit_small_cifar', pretrained_cfg_overlay=dict(hf_hub_id='x/y'), **SMALL)
    assert model.pretrained_cfg['hf_hub_id'] == 'x/y'


def _check_clear_error(error: PretrainedWeightsNotFoundError, repo: str, reason: str):
    message = str(error)
    assert f"'{repo}'" in message and f'https://huggingface.co/{repo}' in message
    assert reason in message
    assert ('scripts/train.py -c recipes/cifar10_vit_small.yaml --dataset torch/cifar10 --data-dir data '
            '--dataset-download --model vit_small_cifar --output output --experiment vit_small_cifar.c10') in message
    assert f'scripts/publish.py output/vit_small_cifar.c10 --repo-id {repo}' in message
    assert HUB_NAMESPACE_ENV in message
    assert error.__cause__ is not None  # the Hub's own error stays attached


def test_pretrained_offline_gives_clear_error(offline, monkeypatch):
    monkeypatch.delenv(HUB_NAMESPACE_ENV, raising=False)
    with pytest.raises(PretrainedWeightsNotFoundError) as info:
        timm.create_model('vit_small_cifar', pretrained=True, **SMALL)
    _check_clear_error(info.value, 'timm-reversible/vit_small_cifar.c10', 'offline mode')
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)


def test_pretrained_unpublished_repo_gives_clear_error(fake_hub, monkeypatch):
    monkeypatch.setenv(HUB_NAMESPACE_ENV, 'late-org')
    with pytest.raises(PretrainedWeightsNotFoundError) as info:
        timm.create_model('vit_small_cifar.c10', pretrained=True, **SMALL)
    _check_clear_error(info.value, 'late-org/vit_small_cifar.c10', 'does not exist')
    assert isinstance(info.value.__cause__, HfHubHTTPError)
    # safetensors only: the pickle fallback is never asked for
    downloads = [u for u in fake_hub.urls() if '/resolve/' in u]
    assert downloads == ['https://huggingface.co/late-org/vit_small_cifar.c10/resolve/main/model.safetensors']


def test_pretrained_false_never_touches_the_hub(fake_hub):
    timm.create_model('vit_small_cifar', **SMALL)
    assert not [u for u in fake_hub.urls() if 'vit_small_cifar' in u]


def test_hint_names_existing_recipes():
    repo = Path(__file__).resolve().parent.parent
    for tag, (dataset, _, recipe) in _hub.TAG_DATASETS.items():
        assert (repo / recipe).is_file(), recipe
        assert yaml.safe_load((repo / recipe).read_text())['dataset'] == dataset
