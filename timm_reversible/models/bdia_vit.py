""" BDIA ViT: exact bit-level reversibility of an unchanged ViT by quantized activations.

"On Exact Bit-level Reversible Transformers Without Changing Architectures" (arXiv 2407.09093).
With h_k(x) = F(x) + G(x + F(x)) a block's residual branch and Q(y) = round(y 2^l) / 2^l:

    x_0     = Q(embedding)
    x_1     = x_0 + Q(h_0(x_0))
    x_{k+1} = gamma_k (x_{k-1} + s_k 2^-l) + Q((1 - gamma_k) x_k + (1 + gamma_k) h_k(x_k)),   k >= 1

gamma_k is drawn from {+gamma, -gamma} per sample and block in training and is 0 (its mean) in
evaluation, where the model is an ordinary ViT on quantized activations. s_k makes the grid index of
x_{k-1} divisible by 1 / gamma so the product stays on the grid; it is the only side information:
log2(1/gamma) bits per element per block (one for the default gamma = 0.5, at most 8), stored packed. The
inverse is then exact in float32, bit for bit:

    x_{k-1} = (x_{k+1} - Q((1 - gamma_k) x_k + (1 + gamma_k) h_k(x_k))) / gamma_k - s_k 2^-l

The stream stays in float32 (float64 for a float64 model; under autocast and for low-precision
weights only h_k runs in low precision); Q has a straight-through gradient.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from timm.models import generate_default_cfgs, register_model

from .._hub import hub_id
from ..reversible import BDIACoupling, BDIAFirstStep, ReversibleStep, State, bdia_side_bits
from .reversible_vit import (
    QuantizedReversibleVisionTransformer, check_scripted_inference, round_to_grid, scripted_stream_dtype)
from .vit_small_cifar import _cfg, _create_model

__all__ = ['BDIAVisionTransformer']


class BDIAVisionTransformer(QuantizedReversibleVisionTransformer):
    """ ViT trained as a BDIA integrator: exactly reversible in training, an ordinary ViT at evaluation. """

    def __init__(self, *args, bdia_gamma: float = 0.5, split_backward: bool = False, **kwargs):
        """
        Args:
            bdia_gamma: Magnitude of the random coefficient gamma_k in {+gamma, -gamma}: 2^-k with
                1 <= k <= 8 (0.5 by default: one side bit per element per block; 2^-k needs k).
            split_backward: Recompute each block's residual in two halves in the backward. Off by
                default: the joint recomputation already stays within 1.25x of the two-stream model's
                activation memory, at 4/3 of an ordinary training step's FLOPs instead of about 1.57.
            *args, **kwargs: As for QuantizedReversibleVisionTransformer (`quant_level`, ...).
        """
        super().__init__(*args, split_backward=split_backward, **kwargs)
        bdia_side_bits(bdia_gamma)
        self.bdia_gamma = bdia_gamma

    def uses_reversible_backward(self) -> bool:
        # gamma = 0 at evaluation is not invertible; nothing needs the reversible backward there
        return super().uses_reversible_backward() and self.training

    def initial_state(self, x: torch.Tensor) -> State:
        x0 = self.quantized_stream(x)
        return x0, x0

    def make_steps(self, blocks: Sequence[nn.Module]) -> List[ReversibleStep]:
        common = dict(level=self.quant_level, guard=self.range_guard, dtype=self.param_dtype, split=self.split_backward,
                      stream_dtype=self.stream_dtype)
        return [
            BDIAFirstStep(block, index=i, **common) if i == 0 else
            BDIACoupling(block, index=i, gamma=self.bdia_gamma, training=self.training, **common)
            for i, block in enumerate(blocks)]

    def reconstruct_block_inputs(self, x: torch.Tensor) -> Tuple[List[State], List[State]]:
        if not self.training:
            raise RuntimeError(
                'BDIA is reversible in training mode only: at evaluation gamma = 0 and x_{k-1} cannot be '
                'recovered. Call model.train() first.')
        return super().reconstruct_block_inputs(x)

    def state_features(self, state: State) -> torch.Tensor:
        return state[1].to(self.param_dtype)

    def scripted_inference_blocks(self, x: torch.Tensor) -> torch.Tensor:
        check_scripted_inference(self.training)
        param_dtype = self.pos_embed.dtype
        x = round_to_grid(x.to(scripted_stream_dtype(param_dtype)), self.quant_level)
        for i, block in enumerate(self.blocks):
            u = x.to(param_dtype)
            f = block.attn_residual(u)
            h = (f + block.mlp_residual(u + f)).to(x.dtype)
            x = x + round_to_grid(h, self.quant_level) if i == 0 else round_to_grid(x + h, self.quant_level)
        return x.to(param_dtype)


default_cfgs = generate_default_cfgs({
    'bdia_vit_small_cifar.c10': _cfg(hf_hub_id=hub_id('bdia_vit_small_cifar.c10')),
})


@register_model
def bdia_vit_small_cifar(pretrained: bool = False, **kwargs) -> BDIAVisionTransformer:
    """ BDIA ViT for small datasets, dim 512, depth 6, 8 heads, MLP 512, patch 4, 32x32, l = 9, gamma = 0.5. """
    model_args = dict(img_size=32, patch_size=4, embed_dim=512, depth=6, num_heads=8, mlp_ratio=1.)
    return _create_model(BDIAVisionTransformer, 'bdia_vit_small_cifar', pretrained, **dict(model_args, **kwargs))
