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
paper. Training and evaluation use the same update. The backward recomputes each block's residual
in two halves by default (`split_backward`), which keeps the activation memory within 1.25x of the
two-stream model's at depth 24 despite the side bits.
"""
from typing import List, Optional, Sequence, Tuple

import torch

from timm.models import generate_default_cfgs, register_model

from .._hub import hub_id
from ..layers import Block
from ..reversible import ReplayTape, ReversibleStep, State, Tape, pack_bits, straight_through, unpack_bits
from .reversible_vit import (
    GridRangeGuard, QuantizedReversibleVisionTransformer, block_residual, block_residual_backward, grid_index_dtype,
    quantize)
from .vit_small_cifar import _cfg, _create_model

__all__ = ['MomentumCoupling', 'MomentumVisionTransformer', 'momentum_as_fraction']

MAX_MOMENTUM_BITS = 7  # a < 2^7 keeps a * index(v) inside int32 for every |index| < 2^24


def momentum_as_fraction(momentum: float) -> Tuple[int, int]:
    """ momentum = a / 2^m with a odd; returns (a, m). """
    for bits in range(1, MAX_MOMENTUM_BITS + 1):
        numerator = momentum * 2 ** bits
        if numerator == int(numerator) and int(numerator) % 2 == 1:
            if 0 < momentum < 1:
                return int(numerator), bits
    raise ValueError(
        f'momentum must be a / 2^m with a odd and m <= {MAX_MOMENTUM_BITS}, between 0 and 1 '
        f'(e.g. 0.875 = 7/8, 0.9375 = 15/16), got {momentum}.')


class MomentumCoupling(ReversibleStep):
    """ (x_k, v_k) -> (x_{k+1}, v_{k+1}), the momentum update on the 2^-l grid. """

    def __init__(self, block: Block, level: int, momentum: float, guard: GridRangeGuard, index: int,
                 split: bool = False, dtype: Optional[torch.dtype] = None):
        self.block, self.level, self.guard, self.index = block, level, guard, index
        self.split, self.dtype = split, dtype
        self.gamma = momentum
        self.numerator, self.bits = momentum_as_fraction(momentum)
        self.scaled_h = block_residual(block, dtype, 1 - momentum)

    def _decay(self, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ gamma v rounded down to the grid, and the low bits the rounding dropped. """
        product = torch.round(v * 2 ** self.level).to(grid_index_dtype(v)).mul_(self.numerator)
        decayed = (product >> self.bits).to(v.dtype).div_(2 ** self.level)
        return decayed, product.bitwise_and_(2 ** self.bits - 1)

    def _undecay(self, decayed: torch.Tensor, tape: Tape) -> torch.Tensor:
        index_dtype = grid_index_dtype(decayed)
        dropped = unpack_bits(tape.load('dropped'), decayed.shape, self.bits).to(index_dtype)
        product = (torch.round(decayed * 2 ** self.level).to(index_dtype) << self.bits).add_(dropped)
        return product.div_(self.numerator, rounding_mode='floor').to(decayed.dtype).div_(2 ** self.level)

    def _velocity_input(self, x: torch.Tensor, tape: Tape) -> torch.Tensor:
        return quantize(tape.run('h', self.scaled_h, x), self.level)

    def forward(self, state: State, tape: Tape) -> State:
        x, v = state
        decayed, dropped = self._decay(v.detach())
        tape.save('dropped', lambda: pack_bits(dropped, self.bits))
        decayed = straight_through(v, lambda _: decayed, self.gamma)
        v_next = decayed + self._velocity_input(x, tape)
        x_next = x + v_next
        self.guard.track(self.index, x_next, v_next)
        return x_next, v_next

    def inverse(self, state: State, tape: Tape) -> State:
        x_next, v_next = state
        x = x_next - v_next
        decayed = v_next - self._velocity_input(x, tape)
        return x, self._undecay(decayed, tape)

    def backward(self, state: State, grads: State, tape: ReplayTape) -> Tuple[State, State]:
        x_next, v_next = state
        dx_next, dv_next = grads
        x = x_next.sub_(v_next)
        dv_total = dv_next.add_(dx_next)  # v_{k+1} reaches the loss directly and through x_{k+1}

        def reconstruct(scaled_h: torch.Tensor) -> None:
            v_next.copy_(self._undecay(v_next.sub_(quantize(scaled_h, self.level)), tape))

        block_residual_backward(
            tape, 'h', self.block, x, dv_total, dx_next, reconstruct, 1 - self.gamma, self.split, self.dtype)
        return (x, v_next), (dx_next, dv_total.mul_(self.gamma))


class MomentumVisionTransformer(QuantizedReversibleVisionTransformer):
    """ ViT whose blocks drive a velocity stream; exactly reversible, same update in train and eval. """

    def __init__(self, *args, momentum: float = 0.875, split_backward: bool = True, **kwargs):
        """
        Args:
            momentum: gamma = a / 2^m with a odd (0.875 = 7/8 by default: 3 side bits per element per block).
            split_backward: Recompute each block's residual in two halves in the backward. On by
                default: with 3 side bits per element per block, the joint recomputation exceeds 1.25x
                the two-stream model's activation memory at depth 24; the split costs about 1.57x an
                ordinary training step's FLOPs instead of 4/3.
            *args, **kwargs: As for QuantizedReversibleVisionTransformer (`quant_level`, ...).
        """
        super().__init__(*args, split_backward=split_backward, **kwargs)
        momentum_as_fraction(momentum)
        self.momentum = momentum

    def initial_state(self, x: torch.Tensor) -> State:
        x0 = self.quantized_stream(x)
        return x0, torch.zeros_like(x0)

    def make_steps(self, blocks: Sequence[Block]) -> List[ReversibleStep]:
        guard = self.range_guard()
        return [
            MomentumCoupling(
                block, self.quant_level, self.momentum, guard, index=i,
                split=self.split_backward, dtype=self.pos_embed.dtype)
            for i, block in enumerate(blocks)]

    def state_features(self, state: State) -> torch.Tensor:
        return state[0].to(self.pos_embed.dtype)


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
