""" BDIA ViT: exact bit-level reversibility of an unchanged ViT by quantized activations.

"On Exact Bit-level Reversible Transformers Without Changing Architectures" (arXiv 2407.09093).
With h_k(x) = F(x) + G(x + F(x)) a block's residual branch and Q(y) = round(y 2^l) / 2^l:

    x_0     = Q(embedding)
    x_1     = x_0 + Q(h_0(x_0))
    x_{k+1} = gamma_k (x_{k-1} + s_k 2^-l) + Q((1 - gamma_k) x_k + (1 + gamma_k) h_k(x_k)),   k >= 1

gamma_k is drawn from {+gamma, -gamma} per sample and block in training and is 0 (its mean) in
evaluation, where the model is an ordinary ViT on quantized activations. s_k makes the grid index of
x_{k-1} divisible by 1 / gamma so the product stays on the grid; it is the only side information:
log2(1/gamma) bits per element per block (one for the default gamma = 0.5), stored packed. The
inverse is then exact in float32, bit for bit:

    x_{k-1} = (x_{k+1} - Q((1 - gamma_k) x_k + (1 + gamma_k) h_k(x_k))) / gamma_k - s_k 2^-l

The stream stays in float32 (float64 for a float64 model; under autocast and for low-precision
weights only h_k runs in low precision); Q has a straight-through gradient.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch

from timm.models import generate_default_cfgs, register_model

from .._hub import hub_id
from ..layers import Block
from ..reversible import ReplayTape, ReversibleStep, State, Tape, pack_bits, unpack_bits
from .reversible_vit import (
    GridRangeGuard, QuantizedReversibleVisionTransformer, block_residual, block_residual_backward, grid_index_dtype,
    quantize)
from .vit_small_cifar import _cfg, _create_model

__all__ = ['BDIAFirstStep', 'BDIACoupling', 'BDIAVisionTransformer']


class BDIAFirstStep(ReversibleStep):
    """ (x_0, x_0) -> (x_0, x_0 + Q(h_0(x_0))): the first block needs no inverse of its own. """

    def __init__(self, block: Block, level: int, guard: GridRangeGuard, index: int = 0,
                 split: bool = False, dtype: Optional[torch.dtype] = None):
        self.block, self.level, self.guard, self.index = block, level, guard, index
        self.split, self.dtype = split, dtype
        self.h = block_residual(block, dtype)

    def forward(self, state: State, tape: Tape) -> State:
        x0 = state[1]
        x1 = x0 + quantize(tape.run('h', self.h, x0), self.level)
        self.guard.track(self.index, x1)
        return x0, x1

    def inverse(self, state: State, tape: Tape) -> State:
        return state[0], state[0]

    def backward(self, state: State, grads: State, tape: ReplayTape) -> Tuple[State, State]:
        x0 = state[0]
        dx0, dx1 = grads
        dx0.add_(dx1)
        block_residual_backward(tape, 'h', self.block, x0, dx1, dx0, lambda h: None, None, self.split, self.dtype)
        return (x0, x0), (dx0, dx1.zero_())


class BDIACoupling(BDIAFirstStep):
    """ (x_{k-1}, x_k) -> (x_k, x_{k+1}), the BDIA update with side bits s_k and random sign gamma_k. """

    def __init__(self, block: Block, level: int, guard: GridRangeGuard, index: int, gamma: float,
                 training: bool, split: bool = False, dtype: Optional[torch.dtype] = None):
        super().__init__(block, level, guard, index, split, dtype)
        self.gamma = gamma
        self.training = training
        self.side_bits = int(round(-math.log2(gamma)))

    def _sample_gamma(self, x: torch.Tensor) -> torch.Tensor:
        sign = torch.randint(0, 2, (x.shape[0],) + (1,) * (x.ndim - 1), device=x.device)
        return (sign * 2 - 1).to(x.dtype) * self.gamma

    def _quantized_update(self, x: torch.Tensor, scaled_h: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return quantize((1 - gamma) * x + scaled_h, self.level)

    def _grid_steps(self, x_prev: torch.Tensor) -> torch.Tensor:
        """ s: the grid steps (an integer tensor) that make x_prev's index a multiple of 1 / gamma. """
        index = torch.round(x_prev * 2 ** self.level).to(grid_index_dtype(x_prev))
        return index.neg_().bitwise_and_(2 ** self.side_bits - 1)  # (-index) mod 2^side_bits

    def forward(self, state: State, tape: Tape) -> State:
        x_prev, x = state
        if not self.training:
            x_next = quantize(x + tape.run('h', self.h, x), self.level)
            self.guard.track(self.index, x_next)
            return x, x_next
        gamma = self._sample_gamma(x)
        steps = self._grid_steps(x_prev)
        tape.save('gamma', lambda: gamma)
        tape.save('steps', lambda: pack_bits(steps, self.side_bits))
        scaled_h = tape.run('h', block_residual(self.block, self.dtype, 1 + gamma), x)
        x_next = gamma * torch.add(x_prev, steps, alpha=2 ** -self.level) + self._quantized_update(x, scaled_h, gamma)
        self.guard.track(self.index, x_next)
        return x, x_next

    def _load_offset(self, tape: Tape, like: torch.Tensor) -> torch.Tensor:
        """ s 2^-l, from the packed side bits. """
        bits = unpack_bits(tape.load('steps'), like.shape, self.side_bits)
        return bits.to(like.dtype).mul_(2 ** -self.level)

    def inverse(self, state: State, tape: Tape) -> State:
        x, x_next = state
        gamma = tape.load('gamma')
        scaled_h = tape.run('h', block_residual(self.block, self.dtype, 1 + gamma), x)
        x_prev = (x_next - self._quantized_update(x, scaled_h, gamma)) / gamma - self._load_offset(tape, x)
        return x_prev, x

    def backward(self, state: State, grads: State, tape: ReplayTape) -> Tuple[State, State]:
        x, x_next = state
        dx, dx_next = grads
        gamma = tape.load('gamma')

        def reconstruct(scaled_h: torch.Tensor) -> None:
            # x_next's buffer becomes x_prev
            x_next.sub_(self._quantized_update(x, scaled_h, gamma)).div_(gamma).sub_(self._load_offset(tape, x))

        dx.addcmul_(dx_next, 1 - gamma)
        block_residual_backward(
            tape, 'h', self.block, x, dx_next, dx, reconstruct, 1 + gamma, self.split, self.dtype)
        return (x_next, x), (dx_next.mul_(gamma), dx)


class BDIAVisionTransformer(QuantizedReversibleVisionTransformer):
    """ ViT trained as a BDIA integrator: exactly reversible in training, an ordinary ViT at evaluation. """

    def __init__(self, *args, bdia_gamma: float = 0.5, split_backward: bool = False, **kwargs):
        """
        Args:
            bdia_gamma: Magnitude of the random coefficient gamma_k in {+gamma, -gamma}; a power of two
                below 1 (0.5 by default: one side bit per element per block; 0.25 needs two).
            split_backward: Recompute each block's residual in two halves in the backward. Off by
                default: the joint recomputation already stays within 1.25x of the two-stream model's
                activation memory, at 4/3 of an ordinary training step's FLOPs instead of about 1.57.
            *args, **kwargs: As for QuantizedReversibleVisionTransformer (`quant_level`, ...).
        """
        super().__init__(*args, split_backward=split_backward, **kwargs)
        side_bits = -math.log2(bdia_gamma) if 0 < bdia_gamma < 1 else 0.5
        if side_bits != int(side_bits):
            raise ValueError(f'bdia_gamma must be a power of two below 1 (0.5, 0.25, ...), got {bdia_gamma}.')
        self.bdia_gamma = bdia_gamma

    def uses_reversible_backward(self) -> bool:
        # gamma = 0 at evaluation is not invertible; nothing needs the reversible backward there
        return super().uses_reversible_backward() and self.training

    def initial_state(self, x: torch.Tensor) -> State:
        x0 = self.quantized_stream(x)
        return x0, x0

    def make_steps(self, blocks: Sequence[Block]) -> List[ReversibleStep]:
        common = dict(
            level=self.quant_level, guard=self.range_guard(), split=self.split_backward, dtype=self.pos_embed.dtype)
        steps: List[ReversibleStep] = [BDIAFirstStep(blocks[0], index=0, **common)] if len(blocks) else []
        steps += [
            BDIACoupling(block, index=i, gamma=self.bdia_gamma, training=self.training, **common)
            for i, block in enumerate(blocks) if i > 0]
        return steps

    def reconstruct_block_inputs(self, x: torch.Tensor) -> Tuple[List[State], List[State]]:
        if not self.training:
            raise RuntimeError(
                'BDIA is reversible in training mode only: at evaluation gamma = 0 and x_{k-1} cannot be '
                'recovered. Call model.train() first.')
        return super().reconstruct_block_inputs(x)

    def state_features(self, state: State) -> torch.Tensor:
        return state[1].to(self.pos_embed.dtype)


default_cfgs = generate_default_cfgs({
    'bdia_vit_small_cifar.c10': _cfg(hf_hub_id=hub_id('bdia_vit_small_cifar.c10')),
})


@register_model
def bdia_vit_small_cifar(pretrained: bool = False, **kwargs) -> BDIAVisionTransformer:
    """ BDIA ViT for small datasets, dim 512, depth 6, 8 heads, MLP 512, patch 4, 32x32, l = 9, gamma = 0.5. """
    model_args = dict(img_size=32, patch_size=4, embed_dim=512, depth=6, num_heads=8, mlp_ratio=1.)
    return _create_model(BDIAVisionTransformer, 'bdia_vit_small_cifar', pretrained, **dict(model_args, **kwargs))
