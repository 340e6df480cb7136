""" Arithmetic on the grid 2^-level that makes the quantized steps exactly invertible: quantization with a
straight-through gradient, grid indices, bit packing of side information, and the guard that stops a
forward whose activations leave the range where the grid is exact.
"""
import math
import numbers
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch.profiler import record_function

__all__ = [
    'straight_through', 'quantize', 'grid_index_dtype', 'stream_dtype', 'significand_bits', 'check_quant_level',
    'pack_bits', 'unpack_bits', 'GridRangeGuard', 'NonFiniteActivationError', 'GridRangeError',
]


class _StraightThrough(torch.autograd.Function):

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], slope: float) -> torch.Tensor:
        ctx.slope = slope
        return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None]:
        return (grad if ctx.slope == 1 else grad * ctx.slope), None, None


def straight_through(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], slope: float = 1.) -> torch.Tensor:
    """ `fn(x)` whose gradient is taken to be `slope` (a straight-through estimator, e.g. for rounding). """
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing() or not (torch.is_grad_enabled() and x.requires_grad):
        return fn(x)  # nothing to backpropagate (fx records the function, not its gradient): eval stays traceable
    return _StraightThrough.apply(x, fn, slope)


def quantize(x: torch.Tensor, level: int) -> torch.Tensor:
    """ Q(x) = round(x * 2^level) / 2^level, with a straight-through (identity) gradient. """
    scale = float(2 ** level)
    return straight_through(x, lambda t: (t * scale).round_().div_(scale))


def grid_index_dtype(stream_dtype: torch.dtype) -> torch.dtype:
    """ Integer dtype that holds every grid index of an exact stream (|index| < 2^24, or 2^53 in float64). """
    return torch.int64 if stream_dtype == torch.float64 else torch.int32


def stream_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """ The dtype of a quantized residual stream: float64 for float64 models, float32 otherwise (also
    under autocast and for bfloat16 / float16 weights, where only the residual functions run low).
    """
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def significand_bits(dtype: torch.dtype) -> int:
    """ Integers below 2^bits are exact in `dtype`: 24 for float32, 53 for float64. """
    return 1 - int(math.log2(torch.finfo(dtype).eps))


def check_quant_level(quant_level: int, dtype: torch.dtype = torch.float32) -> int:
    """ The grid level l of 2^-l: an integer in [0, significand bits of `dtype`) (24 for float32); anything else
    is rejected with what is allowed.
    """
    max_level = significand_bits(dtype)
    if isinstance(quant_level, bool) or not isinstance(quant_level, numbers.Integral) \
            or not 0 <= quant_level < max_level:
        raise ValueError(f'quant_level must be an integer in [0, {max_level}), got {quant_level!r}.')
    return int(quant_level)


def pack_bits(values: torch.Tensor, num_bits: int = 1) -> torch.Tensor:
    """ Pack non-negative integers below 2**num_bits into bytes: num_bits bit-planes, 8 elements per byte. """
    flat = values.reshape(-1).to(torch.uint8)
    if flat.numel() % 8:
        flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    flat = flat.view(-1, 8)
    weights = (1 << torch.arange(8, device=values.device, dtype=torch.uint8))
    planes = [
        (flat if num_bits == 1 else (flat >> b) & 1).mul(weights).sum(dim=1, dtype=torch.uint8)
        for b in range(num_bits)]
    return torch.stack(planes)


def unpack_bits(packed: torch.Tensor, shape: Sequence[int], num_bits: int = 1) -> torch.Tensor:
    """ Inverse of `pack_bits`: the integers as uint8 in `shape`. """
    numel = math.prod(shape)
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    values = (packed[0].unsqueeze(1) >> shifts).bitwise_and_(1).view(-1)
    for b in range(1, num_bits):
        values |= ((packed[b].unsqueeze(1) >> shifts) & 1).view(-1) << b
    return values[:numel].view(*shape)


class NonFiniteActivationError(FloatingPointError):
    """ A block produced NaN or infinite activations (diverged weights or a bad input). """


class GridRangeError(FloatingPointError):
    """ Activations grew beyond the range where the quantized stream is exact. """


class GridRangeGuard:
    """ Exactness on the 2^-level grid holds while |x| * 2^level < 2^24 in float32 (2^53 in float64). While
    active, the steps report the largest magnitude of their outputs here; one check after the forward raises a
    clear error instead of letting wrong gradients through. NaN and infinities are reported as such.

    `remedy(max_abs, bits)` may replace the error's generic advice with the model's own, given the largest |x|
    reached and the significand bits of the stream's dtype.
    """

    def __init__(self, level: int, model_name: str, remedy: Optional[Callable[[float, int], str]] = None):
        self.level = level
        self.model_name = model_name
        self.remedy = remedy
        self.active = False
        self.records: List[Tuple[int, torch.Tensor]] = []

    def start(self, active: bool) -> None:
        """ Begin a forward: drop what an interrupted one left, and watch this one or not. """
        self.records = []
        self.active = active

    def track(self, block_index: int, *tensors: torch.Tensor) -> None:
        if not self.active:
            return
        with record_function('reversible.side_info'):
            for t in tensors:
                if t.numel():
                    low, high = torch.aminmax(t.detach())  # one pass instead of abs() then amax()
                    self.records.append((block_index, torch.maximum(-low, high)))

    def limit(self, dtype: torch.dtype) -> float:
        return 2. ** (significand_bits(dtype) - self.level)

    def check(self, explain_non_finite: Callable[[], str] = lambda: '') -> None:
        """ Raise for the first block out of range; `explain_non_finite` says what made NaN / inf likely. """
        records, self.records = self.records, []
        if not records or records[0][1].device.type == 'meta':  # meta tensors hold no values to check
            return
        with record_function('reversible.side_info'):
            amax = torch.stack([m.double() for _, m in records])
            limits = torch.tensor([self.limit(m.dtype) for _, m in records], dtype=torch.float64, device=amax.device)
            bad = ~(amax < limits)  # NaN counts as out of range
            if not bool(bad.any()):
                return
        first = int(bad.nonzero()[0, 0])
        block, value, limit = records[first][0], amax[first].item(), limits[first].item()
        if not math.isfinite(value):
            raise NonFiniteActivationError(
                f'{self.model_name}: block {block} produced {"NaN" if math.isnan(value) else "infinite"} '
                f'activations. {explain_non_finite()}'.rstrip())
        bits = significand_bits(records[first][1].dtype)
        remedy = self.remedy(value, bits) if self.remedy is not None else (
            f'Lower `quant_level` (e.g. quant_level={max(self.level - 2, 0)}), or lower the learning rate / add '
            f'gradient clipping if the activations diverged.')
        raise GridRangeError(
            f'{self.model_name}: activations in block {block} reached |x| = {value:.6g}, beyond the range where '
            f'the quantized stream is exact (|x| * 2^quant_level < 2^{bits}, here |x| < {limit:g} with '
            f'quant_level={self.level}). The reversible backward would give wrong gradients. {remedy}')
