""" Small helpers shared by the package's measuring, publishing and testing code. """
from typing import List, Tuple

import timm
import torch.nn as nn
from timm.models import get_model_input_config

__all__ = ['MiB', 'package_models', 'model_input_size']

MiB = 2 ** 20


def package_models() -> List[str]:
    """ Every model this package registers with timm, read from timm's registry. """
    return sorted(
        name for name in timm.list_models()
        if timm.models.model_entrypoint(name).__module__.startswith('timm_reversible'))


def model_input_size(model: nn.Module) -> Tuple[int, ...]:
    """ (C, H, W) the model was created for: its `in_chans` and `img_size`, not its checkpoint's. """
    if not hasattr(model, '_traits'):  # not built by timm: its pretrained_cfg is all there is
        return tuple(model.pretrained_cfg['input_size'])
    return tuple(get_model_input_config(model)['input_size'])
