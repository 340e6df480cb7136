""" Where the package's pretrained weights live on the Hugging Face Hub, and a clear error when they don't. """
import os
from typing import Any

import torch.nn as nn
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled
from timm.models import build_model_with_cfg
from timm.models._builder import resolve_pretrained_cfg

__all__ = ['HUB_NAMESPACE_ENV', 'DEFAULT_HUB_NAMESPACE', 'hub_namespace', 'hub_id', 'build_with_pretrained_hint']

HUB_NAMESPACE_ENV = 'TIMM_REVERSIBLE_HUB_NAMESPACE'
DEFAULT_HUB_NAMESPACE = 'timm-reversible'


def hub_namespace() -> str:
    """ The Hub user or organisation that hosts the weights; `$TIMM_REVERSIBLE_HUB_NAMESPACE` overrides it. """
    return os.environ.get(HUB_NAMESPACE_ENV) or DEFAULT_HUB_NAMESPACE


def hub_id(model_tag: str) -> str:
    """ 'vit_small_cifar.c10' -> '<namespace>/vit_small_cifar.c10', timm's naming of Hub repositories. """
    return f'{hub_namespace()}/{model_tag}'


class PretrainedWeightsNotFoundError(RuntimeError):
    """ `pretrained=True` found no published weights for the model. """


def build_with_pretrained_hint(model_cls: type, variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """ timm's `build_model_with_cfg`, turning a failed Hub download into an error that says what to do. """
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled, ConnectionError) as e:
        if not pretrained:
            raise
        cfg = resolve_pretrained_cfg(
            variant, pretrained_cfg=kwargs.get('pretrained_cfg'), pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
        repo = cfg.hf_hub_id or hub_id(variant)
        raise PretrainedWeightsNotFoundError(
            f'No pretrained weights for {variant!r} could be loaded from the Hugging Face Hub repository '
            f'hf-hub:{repo} ({type(e).__name__}). Weights appear there once a run is published:\n'
            f'  accelerate launch scripts/train.py --model {variant} --dataset torch/cifar10 '
            f'--dataset-download --data-dir data --output output --experiment {variant}\n'
            f'  python scripts/publish.py output/{variant} --repo-id {repo}\n'
            f'Set ${HUB_NAMESPACE_ENV} to load from another namespace, or pass '
            f'pretrained_cfg_overlay=dict(file="model.safetensors") for a local file.'
        ) from e
