""" Two-stream reversible ViT on the small-dataset ViT (SPT + LSA).

"Reversible Vision Transformers", CVPR 2022. The state is two token streams, both starting as the
token embedding; each block is an additive coupling of its attention (F) and MLP (G) residuals:

    Y1 = X1 + F(X2)        X2 = Y2 - G(Y1)
    Y2 = X2 + G(Y1)        X1 = Y1 - F(X2)

The streams are fused once, at the end, by their mean, so the model has exactly the parameters of
`vit_small_cifar`; the final LayerNorm and the head follow as in the ordinary ViT.
"""
from typing import List, Sequence

import torch
import torch.nn as nn

from timm.models import generate_default_cfgs, register_model

from .._hub import hub_id
from ..reversible import ReversibleStep, State, TwoStreamCoupling
from .reversible_vit import ReversibleVisionTransformer, check_scripted_inference
from .vit_small_cifar import _cfg, _create_model

__all__ = ['TwoStreamVisionTransformer']


class TwoStreamVisionTransformer(ReversibleVisionTransformer):
    """ Two-stream reversible ViT (additive coupling of each block's attention and MLP). """

    def initial_state(self, x: torch.Tensor) -> State:
        return x, x

    def make_steps(self, blocks: Sequence[nn.Module]) -> List[ReversibleStep]:
        return [TwoStreamCoupling(block) for block in blocks]

    def state_features(self, state: State) -> torch.Tensor:
        return (state[0] + state[1]) / 2

    def scripted_inference_blocks(self, x: torch.Tensor) -> torch.Tensor:
        check_scripted_inference(self.training)
        x1, x2 = x, x
        for block in self.blocks:
            x1 = x1 + block.attn_residual(x2)
            x2 = x2 + block.mlp_residual(x1)
        return (x1 + x2) / 2


default_cfgs = generate_default_cfgs({
    'revvit_small_cifar.c10': _cfg(hf_hub_id=hub_id('revvit_small_cifar.c10')),
})


@register_model
def revvit_small_cifar(pretrained: bool = False, **kwargs) -> TwoStreamVisionTransformer:
    """ Two-stream reversible ViT for small datasets, dim 512, depth 6, 8 heads, MLP 512, patch 4, 32x32. """
    model_args = dict(img_size=32, patch_size=4, embed_dim=512, depth=6, num_heads=8, mlp_ratio=1.)
    return _create_model(
        TwoStreamVisionTransformer, 'revvit_small_cifar', pretrained, **dict(model_args, **kwargs))
