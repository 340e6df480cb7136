""" Small helpers shared by the package's measuring, publishing and testing code. """
from typing import List, Tuple

import timm
import torch.nn as nn
from timm.models import get_model_input_config

__all__ = ['MiB', 'package_models', 'timm_vit_models', 'model_input_size']

MiB = 2 ** 20

# Where the reversible forms of timm's own ViT are registered (ImageNet sizes, timm's weights)
_TIMM_VIT_MODULE = 'timm_reversible.models.timm_vit'


def _registered_by(predicate) -> List[str]:
    return sorted(name for name in timm.list_models() if predicate(timm.models.model_entrypoint(name).__module__))


def package_models() -> List[str]:
    """ The models of this package's own architecture (the small-data ViTs), read from timm's registry: what
    the package trains, publishes and benchmarks. The reversible timm ViTs are `timm_vit_models()`.
    """
    return _registered_by(lambda module: module.startswith('timm_reversible') and module != _TIMM_VIT_MODULE)


def timm_vit_models() -> List[str]:
    """ The reversible forms of timm's own VisionTransformer that this package registers (e.g.
    bdia_vit_base_patch16_224), read from timm's registry.
    """
    return _registered_by(lambda module: module == _TIMM_VIT_MODULE)


def model_input_size(model: nn.Module) -> Tuple[int, ...]:
    """ (C, H, W) the model was created for: its `in_chans` and `img_size`, not its checkpoint's. """
    if not hasattr(model, '_traits'):  # not built by timm: its pretrained_cfg is all there is
        return tuple(model.pretrained_cfg['input_size'])
    return tuple(get_model_input_config(model)['input_size'])
