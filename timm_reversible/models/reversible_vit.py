""" Base of the reversible ViTs: the stem, blocks, head and timm contract of `vit_small_cifar`, with the
blocks chained as invertible steps that run on the reversible engine.

A subclass says how the token embedding becomes the initial state (`initial_state`), which step
each block becomes (`make_steps`), and how a state reads out as token features (`state_features`).
"""
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.models._manipulate import checkpoint

from ..layers import Block
from ..reversible import (
    ReplayTape, ReversibleStep, State, Tape, reconstruct, reversible_forward, straight_through)
from .vit_small_cifar import SmallDataVisionTransformer

Scale = Union[None, float, torch.Tensor]

__all__ = [
    'ReversibleVisionTransformer', 'QuantizedReversibleVisionTransformer', 'GridRangeGuard', 'stream_dtype',
    'grid_index_dtype', 'block_residual', 'block_residual_backward', 'quantize',
    'reconstruction_error',
]


def grid_index_dtype(stream: torch.Tensor) -> torch.dtype:
    """ Integer dtype that holds every grid index of an exact stream (|index| < 2^24, or 2^53 in float64). """
    return torch.int64 if stream.dtype == torch.float64 else torch.int32


def stream_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """ The dtype of a quantized residual stream: float64 for float64 models, float32 otherwise (also
    under autocast and for bfloat16 / float16 weights, where only the residual functions run low).
    """
    return torch.float64 if param_dtype == torch.float64 else torch.float32


class ReversibleVisionTransformer(SmallDataVisionTransformer):
    """ A ViT whose blocks are invertible steps; the backward reconstructs activations block by block.

    `reversible=True` (default) uses the reversible backward whenever grad is enabled;
    `set_reversible(False)` runs the same weights, same function, under ordinary autograd.
    """

    def __init__(self, *args, reversible: bool = True, **kwargs):
        """
        Args:
            reversible: Use the reversible backward (activations reconstructed, not stored).
            *args, **kwargs: As for SmallDataVisionTransformer.
        """
        super().__init__(*args, **kwargs)
        self.reversible = reversible

    @torch.jit.ignore
    def set_reversible(self, enable: bool = True) -> None:
        """ Switch between the reversible backward and ordinary autograd (same weights, same function). """
        self.reversible = enable

    def initial_state(self, x: torch.Tensor) -> State:
        raise NotImplementedError

    def make_steps(self, blocks: Sequence[Block]) -> List[ReversibleStep]:
        raise NotImplementedError

    def state_features(self, state: State) -> torch.Tensor:
        raise NotImplementedError

    def uses_reversible_backward(self) -> bool:
        """ Eval and no-grad forwards take the plain path: nothing would be stored anyway. """
        return self.reversible and torch.is_grad_enabled()

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        state = self.initial_state(x)
        steps = self.make_steps(self.blocks)
        if self.uses_reversible_backward():
            state = reversible_forward(steps, state)
        else:
            for step in steps:
                state = self._run_plain_step(step, state)
        self._check_steps(steps)
        return self.state_features(state)

    def block_outputs(self, x: torch.Tensor, num_blocks: int) -> Iterator[torch.Tensor]:
        state = self.initial_state(x)
        steps = self.make_steps(self.blocks[:num_blocks])
        for step in steps:
            state = self._run_plain_step(step, state)
            yield self.state_features(state)
        self._check_steps(steps)

    def _run_plain_step(self, step: ReversibleStep, state: State) -> State:
        """ One step under ordinary autograd, checkpointed when gradient checkpointing is on. """
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(_run_step, step, *state)
        return step.forward(state, Tape())

    def _check_steps(self, steps: Sequence[ReversibleStep]) -> None:
        """ Hook for range checks collected while the steps ran (one device sync per forward). """

    @torch.no_grad()
    def reconstruct_block_inputs(self, x: torch.Tensor) -> Tuple[List[State], List[State]]:
        """ Each block's input state as the forward computed it and as the inverse reconstructs it. """
        state = self.initial_state(self.embed(x))
        steps = self.make_steps(self.blocks)
        inputs, reconstructed = reconstruct(steps, state)
        self._check_steps(steps)
        return inputs, reconstructed


class QuantizedReversibleVisionTransformer(ReversibleVisionTransformer):
    """ Base of the exactly reversible models: a residual stream on the grid 2^-quant_level, in float32
    (float64 for float64 models) whatever the blocks' dtype, guarded against leaving the exact range.
    """

    def __init__(self, *args, quant_level: int = 9, split_backward: bool = False, **kwargs):
        """
        Args:
            quant_level: l, the stream lives on the grid 2^-l. Exact while |x| < 2^(24 - l) in float32.
            split_backward: Recompute each block's residual in two halves in the backward (the MLP's
                graph first, then the attention's): less activation memory for one more attention
                forward per block.
            *args, **kwargs: As for ReversibleVisionTransformer.
        """
        super().__init__(*args, **kwargs)
        if not 0 <= quant_level < 24:
            raise ValueError(f'quant_level must be in [0, 24), got {quant_level}.')
        self.quant_level = quant_level
        self.split_backward = split_backward

    def quantized_stream(self, x: torch.Tensor) -> torch.Tensor:
        """ Token embedding -> the quantized residual stream. """
        return quantize(x.to(stream_dtype(self.pos_embed.dtype)), self.quant_level)

    def range_guard(self) -> 'GridRangeGuard':
        return GridRangeGuard(self.quant_level, type(self).__name__, stream_dtype(self.pos_embed.dtype))

    def _check_steps(self, steps: Sequence[ReversibleStep]) -> None:
        if steps:
            steps[0].guard.check()


def _run_step(step: ReversibleStep, *state: torch.Tensor) -> State:
    return step.forward(state, Tape())


@torch.no_grad()
def reconstruction_error(model: nn.Module, x: torch.Tensor) -> float:
    """ Largest absolute difference between the block inputs of a forward pass and those the inverse
    reconstructs from the final state (0.0 for the exactly reversible models). Runs in the model's
    current mode: in train mode with its dropout and random coefficients.
    """
    if not isinstance(model, ReversibleVisionTransformer):
        raise TypeError(f'{type(model).__name__} has no reversible blocks to reconstruct.')
    inputs, reconstructed = model.reconstruct_block_inputs(x)
    error = 0.
    for original, recovered in zip(inputs, reconstructed):
        for a, b in zip(original, recovered):
            error = max(error, (a.float() - b.float()).abs().max().item())
    return error


def quantize(x: torch.Tensor, level: int) -> torch.Tensor:
    """ Q(x) = round(x * 2^level) / 2^level, with a straight-through (identity) gradient. """
    scale = float(2 ** level)
    return straight_through(x, lambda t: torch.round(t * scale).div_(scale))


def block_residual(block: Block, dtype: Optional[torch.dtype] = None, scale: Scale = None):
    """ h(x) = F(x) + G(x + F(x)), a standard block's residual branch, times `scale` if given. Evaluated in
    the blocks' dtype, returned in the dtype of the stream it is given.
    """
    def h(x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        x = x.to(dtype) if dtype is not None else x
        f = block.attn_residual(x)
        return _scaled((f + block.mlp_residual(x + f)).to(out_dtype), scale)
    return h


def _scaled(h: torch.Tensor, scale: Scale) -> torch.Tensor:
    return h if scale is None else scale * h


def block_residual_backward(
        tape: ReplayTape,
        name: str,
        block: Block,
        x: torch.Tensor,
        grad_out: torch.Tensor,
        grad_x: torch.Tensor,
        reconstruct: Callable[[torch.Tensor], None],
        scale: Scale = None,
        split: bool = False,
        dtype: Optional[torch.dtype] = None,
) -> None:
    """ Backpropagate `grad_out` through scale * h(x) (as `block_residual`, recomputed with the forward's
    randomness), add the gradient wrt x into `grad_x` in place, and hand the recomputed scale * h to
    `reconstruct` once no graph is alive, so the caller's reconstruction temporaries add nothing to the
    peak. `grad_out` is only read; the scale is applied inside the graph, so no scaled copy is held.

    Unless `split`, the whole block's graph is built at once. With `split`, F is evaluated without grad,
    G's graph is built and freed first, then F is recomputed with grad: F's and G's graphs are never
    alive together, for one more evaluation of F.
    """
    if not split:
        scaled_h, grad = tape.vjp(name, block_residual(block, dtype, scale), x, grad_out)
        grad_x.add_(grad)
        del grad
        reconstruct(scaled_h)
        return
    x_in = x.detach().to(dtype) if dtype is not None else x.detach()
    with tape.replay(name):
        f = block.attn_residual(x_in)
        u = (x_in + f).requires_grad_(True)
        with torch.enable_grad():
            scaled_h = _scaled((f + block.mlp_residual(u)).to(x.dtype), scale)
    torch.autograd.backward(scaled_h, grad_out.to(scaled_h.dtype))
    scaled_h, f_dtype, grad_u = scaled_h.detach(), f.dtype, u.grad
    del f, u
    reconstruct(scaled_h)
    del scaled_h
    grad_x.add_(grad_u)
    # F's output reaches h directly and through u = x + F(x); summed in F's dtype, as autograd does
    grad_f = grad_u.to(f_dtype)
    del grad_u
    grad_f.add_(_scaled(grad_out, scale).to(f_dtype))
    _, grad = tape.vjp(name, block.attn_residual, x_in, grad_f)
    del grad_f
    grad_x.add_(grad)


class GridRangeGuard:
    """ Exactness on the 2^-level grid holds while |x| * 2^level < 2^24 in float32 (2^53 in float64). The
    steps report the largest magnitude of their outputs here; one check after the forward raises a
    clear error instead of letting wrong gradients through.
    """

    def __init__(self, level: int, model_name: str, dtype: torch.dtype = torch.float32):
        self.level = level
        self.exact_bits = 53 if dtype == torch.float64 else 24  # significand bits
        self.limit = 2. ** (self.exact_bits - level)
        self.model_name = model_name
        self.records: List[Tuple[int, torch.Tensor]] = []

    def track(self, block_index: int, *tensors: torch.Tensor) -> None:
        for t in tensors:
            low, high = torch.aminmax(t.detach())  # one pass instead of abs() then amax()
            self.records.append((block_index, torch.maximum(-low, high)))

    def check(self) -> None:
        if not self.records:
            return
        amax = torch.stack([m.float() for _, m in self.records])
        bad = ~(amax < self.limit)  # NaN counts as out of range
        records, self.records = self.records, []
        if not bool(bad.any()):
            return
        first = int(bad.nonzero()[0, 0])
        block = records[first][0]
        raise FloatingPointError(
            f'{self.model_name}: activations in block {block} reached |x| = {amax[first].item():.6g}, '
            f'beyond the range where the quantized stream is exact (|x| * 2^quant_level < 2^{self.exact_bits}, '
            f'here |x| < {self.limit:g} with quant_level={self.level}). The reversible backward would give '
            f'wrong gradients. Lower `quant_level` (e.g. quant_level={self.level - 2}), or lower the learning '
            f'rate / add gradient clipping if the activations diverged.')
