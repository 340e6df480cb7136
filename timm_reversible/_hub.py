""" Where the package's pretrained weights live on the Hugging Face Hub, and a clear error when they don't.

The Hub namespace (user or organisation) is defined here and nowhere else: `DEFAULT_HUB_NAMESPACE`,
overridden by the environment variable `TIMM_REVERSIBLE_HUB_NAMESPACE`. Each pretrained tag of a model
lives in the repository `<namespace>/<model>.<tag>` (timm's naming), e.g. `timm-reversible/vit_small_cifar.c10`.

When the variable is read:
- The model files build their `default_cfgs` at import, so timm's registry
  (`timm.models.get_pretrained_cfg('vit_small_cifar.c10').hf_hub_id`) shows the namespace of import time.
- Creating a model reads it again: `build_with_pretrained_hint` re-points a package-made `hf_hub_id` to
  the current namespace, so setting the variable at any time before `timm.create_model(...)` takes effect,
  and `model.pretrained_cfg['hf_hub_id']` names the repository actually used.
An explicit `pretrained_cfg_overlay=dict(hf_hub_id=...)`, `hf-hub:` or `local-dir:` model names are left alone.

Weights of the package's own repositories are loaded from `model.safetensors` only (`hf_hub_filename`),
never from a pickle. If that fails (nothing published yet, no network, offline mode, private
repository), `pretrained=True` raises `PretrainedWeightsNotFoundError`, which names the repository it
tried and the commands that publish weights there; the Hub's own error is chained as its cause.
"""
import os
from typing import Any, Dict, Optional

import torch.nn as nn
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

__all__ = [
    'HUB_NAMESPACE_ENV', 'DEFAULT_HUB_NAMESPACE', 'HUB_WEIGHTS_FILE', 'TAG_DATASETS', 'hub_namespace', 'hub_id',
    'PretrainedWeightsNotFoundError', 'pretrained_hint', 'build_with_pretrained_hint',
]

HUB_NAMESPACE_ENV = 'TIMM_REVERSIBLE_HUB_NAMESPACE'
DEFAULT_HUB_NAMESPACE = 'timm-reversible'
HUB_WEIGHTS_FILE = 'model.safetensors'

# Pretrained tag -> (the train script's --dataset, display name, its recipe); the tag names the training data.
TAG_DATASETS: Dict[str, tuple] = {
    'c10': ('torch/cifar10', 'CIFAR-10', 'recipes/cifar10_vit_small.yaml'),
}

# Hub ids made by `hub_id` -> the model tag they were made for, to re-point them when the namespace changes.
_PACKAGE_HUB_IDS: Dict[str, str] = {}


def hub_namespace() -> str:
    """ The Hub user or organisation that hosts the weights; `$TIMM_REVERSIBLE_HUB_NAMESPACE` overrides it. """
    return os.environ.get(HUB_NAMESPACE_ENV, '').strip().strip('/') or DEFAULT_HUB_NAMESPACE


def hub_id(model_tag: str) -> str:
    """ 'vit_small_cifar.c10' -> '<namespace>/vit_small_cifar.c10', timm's naming of Hub repositories. """
    if '.' not in model_tag or '/' in model_tag:
        raise ValueError(f"hub_id takes '<model>.<tag>', e.g. 'vit_small_cifar.c10', got {model_tag!r}.")
    repo_id = f'{hub_namespace()}/{model_tag}'
    _PACKAGE_HUB_IDS[repo_id] = model_tag
    return repo_id


class PretrainedWeightsNotFoundError(RuntimeError):
    """ `pretrained=True` found no published weights for the model. """


def pretrained_hint(model_tag: str, repo_id: str) -> str:
    """ What to run so that `timm.create_model(model_tag, pretrained=True)` finds weights in `repo_id`. """
    model_name, _, tag = model_tag.partition('.')
    if tag in TAG_DATASETS:
        data = f'-c {TAG_DATASETS[tag][2]} --dataset {TAG_DATASETS[tag][0]}'
    else:
        data = '--dataset <dataset>'
    return (
        f'  accelerate launch scripts/train.py {data} --data-dir data --dataset-download --model {model_name} '
        f'--output output --experiment {model_tag}\n'
        f'  python scripts/publish.py output/{model_tag} --repo-id {repo_id}'
    )


def _reason(error: Exception) -> str:
    if isinstance(error, OfflineModeIsEnabled) or (
            hf_constants.HF_HUB_OFFLINE and isinstance(error, (EntryNotFoundError, FileNotFoundError))):
        return 'Hub offline mode is on (HF_HUB_OFFLINE=1) and the weights are not in the local cache'
    if isinstance(error, GatedRepoError):
        return 'the repository is gated; request access on its page and log in (`hf auth login` or HF_TOKEN)'
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, 'response', None), 'status_code', None)
        if status in (401, 404):
            return ('the repository or its file does not exist, or it is private and no token with access is set '
                    '(`hf auth login` or HF_TOKEN)')
    if isinstance(error, EntryNotFoundError):
        if type(error).__name__ == 'LocalEntryNotFoundError':
            return 'the Hub could not be reached and the weights are not in the local cache'
        return f'the repository has no {HUB_WEIGHTS_FILE}'
    return 'the Hub could not be reached'


def _current_hub_overlay(cfg: Any, overlay: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """ Overlay that points a package-made `hf_hub_id` at the current namespace and at safetensors weights. """
    overlay = dict(overlay or {})
    model_tag = _PACKAGE_HUB_IDS.get(cfg.hf_hub_id or '')
    if model_tag is None or 'hf_hub_id' in overlay:
        return overlay
    overlay['hf_hub_id'] = hub_id(model_tag)
    overlay.setdefault('hf_hub_filename', HUB_WEIGHTS_FILE)
    return overlay


def build_with_pretrained_hint(model_cls: type, variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """ timm's `build_model_with_cfg` with the Hub id resolved now, turning a failed download into a clear error. """
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get('pretrained_cfg'), pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if cfg.source not in ('hf-hub', 'local-dir'):
        kwargs['pretrained_cfg_overlay'] = _current_hub_overlay(cfg, kwargs.get('pretrained_cfg_overlay'))
        cfg = resolve_pretrained_cfg(
            variant, pretrained_cfg=kwargs.get('pretrained_cfg'), pretrained_cfg_overlay=kwargs['pretrained_cfg_overlay'])
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled, ConnectionError) as e:
        if not pretrained:
            raise
        repo = cfg.hf_hub_id or hub_id(f'{variant}.{cfg.tag or "c10"}')
        model_tag = f'{variant}.{cfg.tag}' if cfg.tag else variant
        raise PretrainedWeightsNotFoundError(
            f'No pretrained weights for {model_tag!r}: could not load {HUB_WEIGHTS_FILE} from the Hugging Face Hub '
            f'repository {repo!r} (https://huggingface.co/{repo}): {_reason(e)} [{type(e).__name__}].\n'
            f'Weights appear there once a training run is published:\n'
            f'{pretrained_hint(model_tag, repo)}\n'
            f'Set ${HUB_NAMESPACE_ENV} to load from another namespace (now {hub_namespace()!r}), load a published '
            f'folder with timm.create_model("local-dir:<folder>", pretrained=True), or pass '
            f'pretrained_cfg_overlay=dict(file="<run>/model.safetensors").'
        ) from e
