""" Base of the reversible ViTs: the stem, blocks, head and timm contract of `vit_small_cifar`, with the
blocks chained as invertible steps that run on the reversible engine.

A subclass says how the token embedding becomes the initial state (`initial_state`), which step
each block becomes (`make_steps`), and how a state reads out as token features (`state_features`).
"""
from typing import Any, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn

from timm.models._manipulate import checkpoint

from ..reversible import (
    GridRangeGuard, ReversibleStep, State, Tape, check_quant_level, quantize, reconstruct, reversible_forward,
    stream_dtype)
from .vit_small_cifar import SmallDataVisionTransformer

__all__ = ['ReversibleVisionTransformer', 'QuantizedReversibleVisionTransformer', 'reconstruction_error']


def check_flag(name: str, value: Any) -> bool:
    """ An on / off setting of a reversible model: True or False, nothing that only looks like one ('no', 0). """
    if not isinstance(value, bool):
        raise TypeError(f'{name} must be True or False, got {value!r}.')
    return value


class ReversibleVisionTransformer(SmallDataVisionTransformer):
    """ A ViT whose blocks are invertible steps; the backward reconstructs activations block by block.

    `reversible=True` (default) uses the reversible backward whenever grad is enabled;
    `set_reversible(False)` runs the same weights, same function, under ordinary autograd.
    """
    verify_reconstruction = False  # the exact models check their reconstruction in the backward
    __jit_unused_properties__ = ['param_dtype', 'stream_dtype']  # eager only; TorchScript reads a parameter

    def __init__(self, *args, reversible: bool = True, **kwargs):
        """
        Args:
            reversible: Use the reversible backward (activations reconstructed, not stored).
            *args, **kwargs: As for SmallDataVisionTransformer.
        """
        super().__init__(*args, **kwargs)
        self.reversible = check_flag('reversible', reversible)

    @torch.jit.ignore
    def set_reversible(self, enable: bool = True) -> None:
        """ Switch between the reversible backward and ordinary autograd (same weights, same function). """
        self.reversible = check_flag('enable', enable)

    @property
    def param_dtype(self) -> torch.dtype:
        """ The dtype of the model's weights (the blocks run in it, or under autocast). """
        # a parameter from parameters(), not an attribute: fx tracing turns attributes into proxies
        return next(self.parameters()).dtype

    def initial_state(self, x: torch.Tensor) -> State:
        raise NotImplementedError

    def make_steps(self, blocks: Sequence[nn.Module]) -> List[ReversibleStep]:
        raise NotImplementedError

    def state_features(self, state: State) -> torch.Tensor:
        raise NotImplementedError

    def uses_reversible_backward(self) -> bool:
        """ No-grad forwards take the plain path: nothing would be stored anyway; so does fx tracing, which
        records the function the steps compute, not the engine that runs them.
        """
        return self.reversible and torch.is_grad_enabled() and not torch.fx._symbolic_trace.is_fx_symbolic_tracing()

    def _checks_ranges(self) -> bool:
        """ A training forward with grad has its activations checked; fx tracing records no values to check. """
        return self.training and torch.is_grad_enabled() and not torch.fx._symbolic_trace.is_fx_symbolic_tracing()

    def watch_steps(self, watch: bool) -> None:
        """ Hook called before the steps run; `watch` says whether their outputs are to be checked. """

    def check_steps(self, tokens: torch.Tensor) -> None:
        """ Hook called after the steps ran on `tokens` (one device sync per forward where it checks). """

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.scripted_inference_blocks(x)
        return self._forward_blocks_eager(x)

    def scripted_inference_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """ The eval-mode function of the blocks in code TorchScript compiles (the steps and the engine are
        Python objects it cannot); the same bits as the steps give at evaluation.
        """
        raise NotImplementedError

    @torch.jit.unused
    def _forward_blocks_eager(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_reversible_backward():
            return self._forward_reversible(x)
        self.watch_steps(self._checks_ranges())
        state = self.initial_state(x)
        tracing = torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        for step, block in zip(self.make_steps(self.blocks), self.blocks):
            state = self._run_plain_step(step, state)
            if tracing:  # fx feature extraction takes the last node in a block's scope as its output
                block.feature_tap(self.state_features(state))
        self.check_steps(x)
        return self.state_features(state)

    @torch._dynamo.disable
    def _forward_reversible(self, x: torch.Tensor) -> torch.Tensor:
        """ The reversible engine and its range check, run eagerly: under torch.compile they are one graph
        break between the compiled stem and head (the engine's backward recomputes with grad inside).
        """
        self.watch_steps(True)
        state = reversible_forward(self.make_steps(self.blocks), self.initial_state(x), self.verify_reconstruction)
        self.check_steps(x)
        return self.state_features(state)

    def block_outputs(self, x: torch.Tensor, num_blocks: int) -> Iterator[torch.Tensor]:
        self.watch_steps(self._checks_ranges())
        state = self.initial_state(x)
        for step in self.make_steps(self.blocks[:num_blocks]):
            state = self._run_plain_step(step, state)
            yield self.state_features(state)
        self.check_steps(x)

    def _run_plain_step(self, step: ReversibleStep, state: State) -> State:
        """ One step under ordinary autograd, checkpointed when gradient checkpointing is on. """
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(_run_step, step, *state)
        return step.forward(state, Tape())

    @torch.no_grad()
    def reconstruct_block_inputs(self, x: torch.Tensor) -> Tuple[List[State], List[State]]:
        """ Each block's input state as the forward computed it and as the inverse reconstructs it. """
        self.watch_steps(True)
        tokens = self.embed(x)
        inputs, reconstructed = reconstruct(self.make_steps(self.blocks), self.initial_state(tokens))
        self.check_steps(tokens)
        return inputs, reconstructed


def check_scripted_inference(training: bool) -> None:
    """ The TorchScript path computes the evaluation function only: training runs the steps in eager mode. """
    torch._assert(not training, 'A scripted reversible model runs at evaluation only (model.eval() before '
                                'torch.jit.script); train in eager mode or under torch.compile.')


def round_to_grid(x: torch.Tensor, level: int) -> torch.Tensor:
    """ Q(x) for the TorchScript inference path: the bits of `quantize`, without its straight-through gradient. """
    scale = float(2 ** level)
    return torch.round(x * scale) / scale


def scripted_stream_dtype(param_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def momentum_decay(v: torch.Tensor, level: int, numerator: int, bits: int) -> torch.Tensor:
    """ a v / 2^m rounded down to the grid, as `MomentumCoupling` computes it, for the TorchScript path. """
    index_dtype = torch.int64 if v.dtype == torch.float64 else torch.int32
    product = torch.round(v * float(2 ** level)).to(index_dtype) * numerator
    return torch.bitwise_right_shift(product, bits).to(v.dtype) / float(2 ** level)


def _run_step(step: ReversibleStep, *state: torch.Tensor) -> State:
    return step.forward(state, Tape())


class QuantizedReversibleVisionTransformer(ReversibleVisionTransformer):
    """ Base of the exactly reversible models: a residual stream on the grid 2^-quant_level, in float32
    (float64 for float64 models) whatever the blocks' dtype, guarded against leaving the exact range.
    """

    def __init__(
            self,
            *args,
            quant_level: int = 9,
            split_backward: bool = False,
            verify_reconstruction: bool = True,
            **kwargs,
    ):
        """
        Args:
            quant_level: l, an integer in [0, 24): the stream lives on the grid 2^-l, exact while
                |x| < 2^(24 - l) in float32.
            split_backward: Recompute each block's residual in two halves in the backward (the MLP's
                graph first, then the attention's): less activation memory for one more attention
                forward per block.
            verify_reconstruction: Keep a fingerprint of each block's input (16 bytes per sample) and
                raise `ReconstructionError` if the backward reconstructs anything else, e.g. where a GPU runs
                other kernels with grad enabled than without.
            *args, **kwargs: As for ReversibleVisionTransformer.
        """
        super().__init__(*args, **kwargs)
        self.verify_reconstruction = check_flag('verify_reconstruction', verify_reconstruction)
        self.quant_level = check_quant_level(quant_level)
        self.split_backward = check_flag('split_backward', split_backward)
        self.range_guard = GridRangeGuard(quant_level, type(self).__name__)

    @property
    def stream_dtype(self) -> torch.dtype:
        return stream_dtype(self.param_dtype)

    def quantized_stream(self, x: torch.Tensor) -> torch.Tensor:
        """ Token embedding -> the quantized residual stream. """
        return quantize(x.to(self.stream_dtype), self.quant_level)

    def _checks_ranges(self) -> bool:
        """ A training forward with grad has its activations checked; fx tracing records no values to check. """
        return self.training and torch.is_grad_enabled() and not torch.fx._symbolic_trace.is_fx_symbolic_tracing()

    def watch_steps(self, watch: bool) -> None:
        self.range_guard.start(watch)

    def check_steps(self, tokens: torch.Tensor) -> None:
        self.range_guard.check(lambda: self._non_finite_cause(tokens))

    def _non_finite_cause(self, tokens: torch.Tensor) -> str:
        bad_samples = (~torch.isfinite(tokens.detach())).flatten(1).any(dim=1).nonzero().flatten().tolist()
        if bad_samples:
            return (f'The blocks\' input is already NaN / inf in sample(s) {bad_samples[:8]} of the batch: check '
                    f'the input images (NaN / inf pixels) or the embedding weights.')
        bad_params = [n for n, p in self.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad_params:
            return (f'The weights diverged: {", ".join(bad_params[:4])}{" ..." if len(bad_params) > 4 else ""} '
                    f'hold NaN / inf. Resume from an earlier checkpoint with a lower learning rate or gradient '
                    f'clipping.')
        return ('The input and the weights are finite: the activations overflowed, the weights are diverging. '
                'Lower the learning rate or clip gradients.')


@torch.no_grad()
def reconstruction_error(model: nn.Module, x: torch.Tensor) -> float:
    """ Largest absolute difference between the block inputs of a forward pass and those the inverse
    reconstructs from the final state (0.0 for the exactly reversible models). Runs in the model's
    current mode: in train mode with its dropout and random coefficients.
    """
    if not hasattr(model, 'reconstruct_block_inputs'):  # also the reversible timm ViTs (models/timm_vit.py)
        raise TypeError(f'{type(model).__name__} has no reversible blocks to reconstruct.')
    inputs, reconstructed = model.reconstruct_block_inputs(x)
    error = 0.
    for original, recovered in zip(inputs, reconstructed):
        for a, b in zip(original, recovered):
            error = max(error, (a.float() - b.float()).abs().max().item())
    return error
