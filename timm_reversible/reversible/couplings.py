""" The invertible steps of the reversible models: the two-stream coupling, and the exactly invertible
BDIA and momentum steps built on a block's residual branch and the 2^-level grid.

A block is anything with two residual functions, `attn_residual` (F) and `mlp_residual` (G), whose
ordinary forward is x + F(x), then + G(...): their sum h(x) = F(x) + G(x + F(x)) is the block's
residual branch.
"""
import math
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.profiler import record_function

from .engine import ReplayTape, ReversibleStep, State, Tape
from .grid import GridRangeGuard, grid_index_dtype, pack_bits, quantize, straight_through, unpack_bits

__all__ = [
    'TwoStreamCoupling', 'ResidualStep', 'QuantizedStep', 'BDIAFirstStep', 'BDIACoupling', 'MomentumCoupling',
    'MAX_BDIA_SIDE_BITS', 'MAX_MOMENTUM_BITS', 'bdia_side_bits', 'momentum_as_fraction',
]

Scale = Union[None, float, torch.Tensor]

MAX_BDIA_SIDE_BITS = 8  # bdia_gamma >= 2^-8: the grid offsets are packed from uint8
MAX_MOMENTUM_BITS = 7  # a < 2^7 keeps a * index(v) inside int32 for every |index| < 2^24


class TwoStreamCoupling(ReversibleStep):
    """ (X1, X2) -> (X1 + F(X2), X2 + G(X1 + F(X2))) with F, G a block's attention and MLP residuals. """

    def __init__(self, block: nn.Module):
        self.f = block.attn_residual
        self.g = block.mlp_residual

    def forward(self, state: State, tape: Tape) -> State:
        x1, x2 = state
        y1 = x1 + tape.run('f', self.f, x2)
        y2 = x2 + tape.run('g', self.g, y1)
        return y1, y2

    def inverse(self, state: State, tape: Tape) -> State:
        y1, y2 = state
        x2 = y2 - tape.run('g', self.g, y1)
        x1 = y1 - tape.run('f', self.f, x2)
        return x1, x2

    def backward(self, state: State, grads: State, tape: ReplayTape) -> Tuple[State, State]:
        y1, y2 = state
        dy1, dy2 = grads
        # G's graph first: it gives Y1's share of the gradient and, by subtraction, X2
        g, dy1_from_g = tape.vjp('g', self.g, y1, dy2)
        with record_function('reversible.reconstruct'):
            x2 = y2.sub_(g)
        dy1.add_(dy1_from_g)
        del g, dy1_from_g
        f, dx2_from_f = tape.vjp('f', self.f, x2, dy1)
        with record_function('reversible.reconstruct'):
            x1 = y1.sub_(f)
        dy2.add_(dx2_from_f)
        return (x1, x2), (dy1, dy2)


def _scaled(h: torch.Tensor, scale: Scale) -> torch.Tensor:
    return h if scale is None else scale * h


class ResidualStep(ReversibleStep):
    """ A step built on one block's residual branch h(x) = F(x) + G(x + F(x)).

    h runs in the blocks' dtype (`dtype`, None for the stream's) and returns in the stream's dtype. With
    `split`, the backward recomputes h in two halves so that F's and G's graphs are never alive together.
    """

    def __init__(self, block: nn.Module, index: int, dtype: Optional[torch.dtype] = None, split: bool = False):
        self.block, self.index, self.dtype, self.split = block, index, dtype, split

    def residual(self, scale: Scale = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """ x -> scale * h(x). """
        def h(x: torch.Tensor) -> torch.Tensor:
            out_dtype = x.dtype
            x = x.to(self.dtype) if self.dtype is not None else x
            f = self.block.attn_residual(x)
            return _scaled((f + self.block.mlp_residual(x + f)).to(out_dtype), scale)
        return h

    def residual_backward(
            self,
            tape: ReplayTape,
            x: torch.Tensor,
            grad_out: torch.Tensor,
            grad_x: torch.Tensor,
            *,
            reconstruct: Callable[[torch.Tensor], None],
            scale: Scale = None,
            name: str = 'h',
    ) -> None:
        """ Backpropagate `grad_out` through scale * h(x) recomputed with the forward's randomness, add the
        gradient wrt x into `grad_x` in place, and hand the recomputed scale * h to `reconstruct` once no graph
        is alive, so the caller's reconstruction temporaries add nothing to the peak. `grad_out` is only read.
        """
        if not self.split:
            scaled_h, grad = tape.vjp(name, self.residual(scale), x, grad_out)
            grad_x.add_(grad)
            del grad
            with record_function('reversible.reconstruct'):
                reconstruct(scaled_h)
            return
        # F without grad; G's graph built and freed; then F again with grad: one more evaluation of F
        with record_function('reversible.recompute'):
            x_in = x.detach().to(self.dtype) if self.dtype is not None else x.detach()
            with tape.replay(name):
                f = self.block.attn_residual(x_in)
                u = (x_in + f).requires_grad_(True)
                with torch.enable_grad():
                    scaled_h = _scaled((f + self.block.mlp_residual(u)).to(x.dtype), scale)
            torch.autograd.backward(scaled_h, grad_out.to(scaled_h.dtype))
        scaled_h, f_dtype, grad_u = scaled_h.detach(), f.dtype, u.grad
        del f, u
        with record_function('reversible.reconstruct'):
            reconstruct(scaled_h)
        del scaled_h
        grad_x.add_(grad_u)
        # F's output reaches h directly and through u = x + F(x); summed in F's dtype, as autograd does
        grad_f = grad_u.to(f_dtype)
        del grad_u
        grad_f.add_(_scaled(grad_out, scale).to(f_dtype))
        _, grad = tape.vjp(name, self.block.attn_residual, x_in, grad_f)
        del grad_f
        grad_x.add_(grad)


class QuantizedStep(ResidualStep):
    """ A residual step whose stream lives on the grid 2^-level and reports its magnitude to a range guard. """

    def __init__(self, block: nn.Module, index: int, level: int, guard: GridRangeGuard,
                 dtype: Optional[torch.dtype] = None, split: bool = False, stream_dtype: torch.dtype = torch.float32):
        super().__init__(block, index, dtype, split)
        self.level, self.guard = level, guard
        # known when the step is made, not read off a tensor: fx tracing sees proxies there
        self.index_dtype = grid_index_dtype(stream_dtype)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return quantize(x, self.level)

    def track(self, tape: Tape, *outputs: torch.Tensor) -> None:
        if not tape.replaying:  # a replay recomputes what the forward already checked
            self.guard.track(self.index, *outputs)


class BDIAFirstStep(QuantizedStep):
    """ (x_0, x_0) -> (x_0, x_0 + Q(h_0(x_0))): the first block needs no inverse of its own. """

    def forward(self, state: State, tape: Tape) -> State:
        x0 = state[1]
        x1 = x0 + self.quantize(tape.run('h', self.residual(), x0))
        self.track(tape, x1)
        return x0, x1

    def inverse(self, state: State, tape: Tape) -> State:
        return state[0], state[0]

    def backward(self, state: State, grads: State, tape: ReplayTape) -> Tuple[State, State]:
        x0 = state[0]
        dx0, dx1 = grads
        dx0.add_(dx1)
        self.residual_backward(tape, x0, dx1, dx0, reconstruct=lambda h: None)
        return (x0, x0), (dx0, dx1.zero_())


def bdia_side_bits(gamma: float) -> int:
    """ gamma = 2^-k -> k, the side bits per element per block; anything else is rejected. """
    bits = -math.log2(gamma) if isinstance(gamma, (int, float)) and 0 < gamma < 1 else 0.5
    if bits != int(bits) or not 1 <= bits <= MAX_BDIA_SIDE_BITS:
        raise ValueError(
            f'bdia_gamma must be a power of two 2^-k with 1 <= k <= {MAX_BDIA_SIDE_BITS} (0.5, 0.25, ..., '
            f'{2. ** -MAX_BDIA_SIDE_BITS}): k side bits per element per block are stored; got {gamma!r}.')
    return int(bits)


class BDIACoupling(BDIAFirstStep):
    """ (x_{k-1}, x_k) -> (x_k, x_{k+1}), the BDIA update with grid offsets s_k and random sign gamma_k. """
    verified_inputs = (0,)  # x_{k-1}, recovered by dividing by gamma; x_k is the next step's x_{k-1}

    def __init__(self, block: nn.Module, index: int, level: int, guard: GridRangeGuard, gamma: float,
                 training: bool, dtype: Optional[torch.dtype] = None, split: bool = False,
                 stream_dtype: torch.dtype = torch.float32):
        super().__init__(block, index, level, guard, dtype, split, stream_dtype)
        self.gamma = gamma
        self.training = training
        self.side_bits = bdia_side_bits(gamma)

    def _sample_gamma(self, x: torch.Tensor) -> torch.Tensor:
        with record_function('reversible.side_info'):
            sign = torch.randint(0, 2, (x.shape[0],) + (1,) * (x.ndim - 1), device=x.device)
            return (sign * 2 - 1).to(x.dtype) * self.gamma

    def _update(self, x: torch.Tensor, scaled_h: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return self.quantize((1 - gamma) * x + scaled_h)

    def _grid_offsets(self, x_prev: torch.Tensor) -> torch.Tensor:
        """ s: the grid steps (an integer tensor) that make x_prev's index a multiple of 1 / gamma. """
        with record_function('reversible.side_info'):
            index = (x_prev * 2 ** self.level).round_().to(self.index_dtype)
            return index.neg_().bitwise_and_(2 ** self.side_bits - 1)  # (-index) mod 2^side_bits

    def _load_offsets(self, tape: Tape, like: torch.Tensor) -> torch.Tensor:
        """ s 2^-l, from the packed side bits. """
        with record_function('reversible.side_info'):
            bits = unpack_bits(tape.load('offsets'), like.shape, self.side_bits)
            return bits.to(like.dtype).mul_(2 ** -self.level)

    def forward(self, state: State, tape: Tape) -> State:
        x_prev, x = state
        if not self.training:
            x_next = self.quantize(x + tape.run('h', self.residual(), x))
            self.track(tape, x_next)
            return x, x_next
        gamma = tape.draw('gamma', lambda: self._sample_gamma(x))
        offsets = self._grid_offsets(x_prev)
        tape.save('offsets', lambda: pack_bits(offsets, self.side_bits))
        scaled_h = tape.run('h', self.residual(1 + gamma), x)
        x_next = gamma * torch.add(x_prev, offsets, alpha=2 ** -self.level) + self._update(x, scaled_h, gamma)
        self.track(tape, x_next)
        return x, x_next

    def inverse(self, state: State, tape: Tape) -> State:
        x, x_next = state
        gamma = tape.load('gamma')
        scaled_h = tape.run('h', self.residual(1 + gamma), x)
        x_prev = (x_next - self._update(x, scaled_h, gamma)) / gamma - self._load_offsets(tape, x)
        return x_prev, x

    def backward(self, state: State, grads: State, tape: ReplayTape) -> Tuple[State, State]:
        x, x_next = state
        dx, dx_next = grads
        gamma = tape.load('gamma')

        def reconstruct(scaled_h: torch.Tensor) -> None:
            # x_next's buffer becomes x_prev
            x_next.sub_(self._update(x, scaled_h, gamma)).div_(gamma).sub_(self._load_offsets(tape, x))

        dx.addcmul_(dx_next, 1 - gamma)
        self.residual_backward(tape, x, dx_next, dx, reconstruct=reconstruct, scale=1 + gamma)
        return (x_next, x), (dx_next.mul_(gamma), dx)


def momentum_as_fraction(momentum: float) -> Tuple[int, int]:
    """ momentum = a / 2^m with a odd and 1 <= m <= MAX_MOMENTUM_BITS; returns (a, m). """
    if isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and 0 < momentum < 1:
        for bits in range(1, MAX_MOMENTUM_BITS + 1):
            numerator = momentum * 2 ** bits
            if numerator == int(numerator) and int(numerator) % 2 == 1:
                return int(numerator), bits
    raise ValueError(
        f'momentum must be a / 2^m with a odd and 1 <= m <= {MAX_MOMENTUM_BITS}, between 0 and 1 '
        f'(e.g. 0.875 = 7/8, 0.9375 = 15/16), got {momentum!r}.')


class MomentumCoupling(QuantizedStep):
    """ (x_k, v_k) -> (x_{k+1}, v_{k+1}), the momentum update on the 2^-l grid. """
    verified_inputs = (1,)  # v_k goes through the recomputation; x_k = x_{k+1} - v_{k+1} is exact arithmetic

    def __init__(self, block: nn.Module, index: int, level: int, guard: GridRangeGuard, momentum: float,
                 dtype: Optional[torch.dtype] = None, split: bool = False, stream_dtype: torch.dtype = torch.float32):
        super().__init__(block, index, level, guard, dtype, split, stream_dtype)
        self.gamma = momentum
        self.numerator, self.bits = momentum_as_fraction(momentum)
        self.scaled_h = self.residual(1 - momentum)

    def _decay(self, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ gamma v rounded down to the grid, and the low bits the rounding dropped. """
        with record_function('reversible.side_info'):
            product = (v * 2 ** self.level).round_().to(self.index_dtype).mul_(self.numerator)
            decayed = (product >> self.bits).to(v.dtype).div_(2 ** self.level)
            return decayed, product.bitwise_and_(2 ** self.bits - 1)

    def _undecay(self, decayed: torch.Tensor, tape: Tape) -> torch.Tensor:
        with record_function('reversible.side_info'):
            dropped = unpack_bits(tape.load('dropped'), decayed.shape, self.bits).to(self.index_dtype)
            product = ((decayed * 2 ** self.level).round_().to(self.index_dtype) << self.bits).add_(dropped)
            return product.div_(self.numerator, rounding_mode='floor').to(decayed.dtype).div_(2 ** self.level)

    def _velocity_input(self, x: torch.Tensor, tape: Tape) -> torch.Tensor:
        return self.quantize(tape.run('h', self.scaled_h, x))

    def forward(self, state: State, tape: Tape) -> State:
        x, v = state
        decayed, dropped = self._decay(v.detach())
        tape.save('dropped', lambda: pack_bits(dropped, self.bits))
        decayed = straight_through(v, lambda _: decayed, self.gamma)
        v_next = decayed + self._velocity_input(x, tape)
        x_next = x + v_next
        self.track(tape, x_next, v_next)
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
            v_next.copy_(self._undecay(v_next.sub_(self.quantize(scaled_h)), tape))

        self.residual_backward(
            tape, x, dv_total, dx_next, reconstruct=reconstruct, scale=1 - self.gamma)
        return (x, v_next), (dx_next, dv_total.mul_(self.gamma))
