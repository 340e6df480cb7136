""" Momentum reversible ViT: a velocity stream after "Momentum Residual Neural Networks" (ICML 2021),
made exactly reversible in floating point.

With h_k(x) = F(x) + G(x + F(x)) a block's residual branch, v_0 = 0 and momentum gamma:

    v_{k+1} = gamma v_k + (1 - gamma) h_k(x_k)        x_k = x_{k+1} - v_{k+1}
    x_{k+1} = x_k + v_{k+1}                           v_k = (v_{k+1} - (1 - gamma) h_k(x_k)) / gamma

Dividing by gamma amplifies rounding error by 1/gamma per block, so the stream is kept on the grid
2^-l instead: gamma = a / 2^m with a odd, gamma v_k is the integer product a * index(v_k) shifted
down by m bits, and the m bits the shift drops are stored (packed) as side information. The inverse
restores the product exactly and divides it by a exactly. (1 - gamma) h_k is quantized to the grid
with a straight-through gradient; gamma v_k has gradient gamma.

The default momentum is 0.875 = 7/8 (3 side bits per element per block), close to the 0.9 of the
paper. Training and evaluation use the same update. The backward recomputes each block's residual at
once by default; `split_backward` recomputes it in two halves for about 5% less activation memory at
one more attention forward per block.
"""
from typing import List, Sequence

import torch
import torch.nn as nn

from timm.models import generate_default_cfgs, register_model

from .._hub import hub_id
from ..reversible import MomentumCoupling, ReversibleStep, State, momentum_as_fraction
from .reversible_vit import (
    QuantizedReversibleVisionTransformer, check_scripted_inference, momentum_decay, round_to_grid,
    scripted_stream_dtype)
from .vit_small_cifar import _cfg, _create_model

__all__ = ['MomentumVisionTransformer']


class MomentumVisionTransformer(QuantizedReversibleVisionTransformer):
    """ ViT whose blocks drive a velocity stream; exactly reversible, same update in train and eval. """

    def __init__(self, *args, momentum: float = 0.875, split_backward: bool = False, **kwargs):
        """
        Args:
            momentum: gamma = a / 2^m with a odd and 1 <= m <= 7 (0.875 = 7/8 by default: 3 side bits per
                element per block).
            split_backward: Recompute each block's residual in two halves in the backward. Off by default:
                it saves about 5% of the activation memory at depth 24 (less than the 10% that would pay for
                it) for about 1.57x an ordinary training step's FLOPs instead of 4/3.
            *args, **kwargs: As for QuantizedReversibleVisionTransformer (`quant_level`, ...).
        """
        super().__init__(*args, split_backward=split_backward, **kwargs)
        self.momentum_numerator, self.momentum_bits = momentum_as_fraction(momentum)
        self.momentum = momentum

    def initial_state(self, x: torch.Tensor) -> State:
        x0 = self.quantized_stream(x)
        return x0, torch.zeros_like(x0)

    def make_steps(self, blocks: Sequence[nn.Module]) -> List[ReversibleStep]:
        return [
            MomentumCoupling(
                block, index=i, level=self.quant_level, guard=self.range_guard, momentum=self.momentum,
                dtype=self.param_dtype, split=self.split_backward, stream_dtype=self.stream_dtype)
            for i, block in enumerate(blocks)]

    def state_features(self, state: State) -> torch.Tensor:
        return state[0].to(self.param_dtype)

    def scripted_inference_blocks(self, x: torch.Tensor) -> torch.Tensor:
        check_scripted_inference(self.training)
        param_dtype = self.pos_embed.dtype
        x = round_to_grid(x.to(scripted_stream_dtype(param_dtype)), self.quant_level)
        v = torch.zeros_like(x)
        for block in self.blocks:
            u = x.to(param_dtype)
            f = block.attn_residual(u)
            scaled_h = (1. - self.momentum) * (f + block.mlp_residual(u + f)).to(x.dtype)
            v = momentum_decay(v, self.quant_level, self.momentum_numerator, self.momentum_bits) \
                + round_to_grid(scaled_h, self.quant_level)
            x = x + v
        return x.to(param_dtype)


default_cfgs = generate_default_cfgs({
    'momentum_revvit_small.c10': _cfg(hf_hub_id=hub_id('momentum_revvit_small.c10')),
})


@register_model
def momentum_revvit_small(pretrained: bool = False, **kwargs) -> MomentumVisionTransformer:
    """ Momentum reversible ViT for small datasets, dim 512, depth 6, 8 heads, MLP 512, patch 4, 32x32,
    momentum 7/8, l = 9.
    """
    model_args = dict(img_size=32, patch_size=4, embed_dim=512, depth=6, num_heads=8, mlp_ratio=1.)
    return _create_model(MomentumVisionTransformer, 'momentum_revvit_small', pretrained, **dict(model_args, **kwargs))
