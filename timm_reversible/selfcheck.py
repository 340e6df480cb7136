""" A self-check of the reversible models on this machine: gradients, exactness, randomness, memory and speed.

    python -m timm_reversible.selfcheck [--device cuda|cpu] [--amp none|bf16|fp16] [--models ...]
                                        [--size small|full|both] [--json PATH]

or `run_selfcheck(...)` from Python. Every proof of this package was made on a CPU; a GPU runs other kernels
(cuBLAS algorithms, the scaled-dot-product-attention backend, dropout inside fused attention, fp16 with a
GradScaler). A recomputation that differs from the forward by one rounding makes the exact models' gradients
silently wrong, so this checks, on the given device, for every registered reversible model:

- gradients of the reversible backward against ordinary autograd of the same weights (float32 and under the
  chosen autocast, dropout and drop-path on), by the float64-reference criterion of `gradient_error_report`;
- the exact models' block inputs reconstructed bit for bit, by the inverse and by the backward (whose run-time
  check raises `ReconstructionError` on any difference);
- the caller's RNG stream where ordinary autograd leaves it;
- with fp16, a `torch.amp.GradScaler` step through the reversible backward, and an overflowing step skipped;
- activation memory per image below the plain ViT and below the plain ViT with per-block checkpointing, at
  depths 6 and 24;
- the training step's time as a multiple of the plain ViT's (informational on CPU).

It prints a table with pass / fail per line and the environment, writes JSON, and exits 1 if a line failed.
"""
import argparse
import contextlib
import copy
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from .models import (
    QuantizedReversibleVisionTransformer, ReversibleVisionTransformer, SmallDataVisionTransformer, reconstruction_error)
from .profiling import activation_memory_per_image, time_train_steps
from .utils import MiB, model_input_size, package_models, timm_vit_models

__all__ = [
    'FLOAT64_TOLERANCE', 'FLOAT32_ERROR_MULTIPLE', 'REFERENCE_RANDOMNESS_TOLERANCE', 'STEP_SEED',
    'MAX_CUDA_TIME_RATIO', 'SIZES', 'AMP_DTYPES', 'StepResult', 'GradientErrors', 'relative_error',
    'seeded_training_step', 'gradient_error_report', 'CheckResult', 'SelfCheckReport', 'format_result',
    'format_environment', 'reversible_models', 'default_models', 'baseline_of', 'sizes_of', 'TIMM_VIT_SIZES',
    'environment_info', 'run_selfcheck', 'main',
]

# float64 runs compare the two backward passes directly: both are exact up to float64 rounding.
FLOAT64_TOLERANCE = 1e-10
# A float32 (or autocast) reversible backward is held to ordinary autograd's own float32 error against a
# float64 reference with the same weights and randomness. Both are float32 evaluations of the same
# function; the reversible backward adds one reconstruction rounding per block, of the size of the
# forward's own roundings, so its error stays a small multiple of autograd's. Measured over 20 seeds at
# depths 3, 12 and 24 the ratio stays within 0.7-1.5 for all three models; 4 leaves room for any machine.
FLOAT32_ERROR_MULTIPLE = 4
# The float64 reference must see the float32 run's random draws: other dropout masks would move its
# output by O(1), float32 arithmetic by far less than this.
REFERENCE_RANDOMNESS_TOLERANCE = 2 ** -8
STEP_SEED = 7
# One extra forward makes 4/3 of a plain step the floor; more than 1.6x on a GPU means the backward is slow
# there (a CPU's shared cores make its ratio informational only).
MAX_CUDA_TIME_RATIO = 1.6
BASELINE = 'vit_small_cifar'
DROPS = dict(drop_rate=0.1, pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.2)
MEMORY_DEPTHS = (6, 24)
AMP_DTYPES: Dict[str, Optional[torch.dtype]] = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# A scale at which this check's loss keeps its fp16 gradients finite: the scaled step must be taken.
SCALED_STEP_SCALE = 2. ** 10
# A scale that overflows any fp16 gradient, and a back-off that lands on SCALED_STEP_SCALE after one skip.
OVERFLOW_SCALE = 2. ** 40


@dataclass(frozen=True)
class _Size:
    """ A model size the check runs at: creation kwargs over the registered defaults, and its batches. """
    kwargs: Dict[str, Any]
    batch_size: int  # gradient and reconstruction checks (the float64 reference runs at it too)


SIZES: Dict[str, _Size] = {
    'small': _Size(dict(embed_dim=64, depth=3, num_heads=2), batch_size=4),
    'full': _Size({}, batch_size=8),  # the registered models as they are: dim 512, depth 6, 8 heads
}
# The reversible forms of timm's ViT (bdia_vit_base_patch16_224, ...): small at 32x32; full as registered (224)
TIMM_VIT_SIZES: Dict[str, _Size] = {
    'small': _Size(dict(embed_dim=64, depth=3, num_heads=2, img_size=32, patch_size=8), batch_size=4),
    'full': _Size({}, batch_size=4),
}
# What the self-check runs on the timm ViT family by default: the fine-tuning model, and the two-stream one
DEFAULT_TIMM_VITS = ('bdia_vit_base_patch16_224', 'revvit_base_patch16_224')


def _is_timm_vit(name: str) -> bool:
    """ A reversible timm ViT, or the plain timm ViT it is measured against. """
    return name not in package_models()


def sizes_of(name: str) -> Dict[str, _Size]:
    return TIMM_VIT_SIZES if _is_timm_vit(name) else SIZES


def baseline_of(name: str) -> str:
    """ The plain model a reversible one is measured against: vit_small_cifar, or timm's own ViT of the same
    size (bdia_vit_base_patch16_224 and revvit_base_patch16_224 -> vit_base_patch16_224).
    """
    return 'vit_' + name.split('vit_', 1)[1] if _is_timm_vit(name) else BASELINE


# ---------------------------------------------------------------------------------------------------------
# Gradients against ordinary autograd, by a float64 reference


class StepResult(NamedTuple):
    out: torch.Tensor  # logits, detached
    grads: Dict[str, torch.Tensor]  # parameter name -> gradient, and 'input' -> the input's gradient
    rng: Tuple[torch.Tensor, ...]  # the CPU generator's state after the step, and the CUDA device's on CUDA
    scale: Optional[float] = None  # with a GradScaler: its scale after the step's update


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """ ||a - b|| / ||b||, in float64. """
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _seed(device: torch.device, seed: int) -> None:
    # only the generators the step draws from: a CPU run leaves the CUDA generators alone
    torch.random.default_generator.manual_seed(seed)
    if device.type == 'cuda':
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _rng_state(device: torch.device) -> Tuple[torch.Tensor, ...]:
    if device.type == 'cuda':
        return torch.get_rng_state(), torch.cuda.get_rng_state(device)
    return (torch.get_rng_state(),)


@contextlib.contextmanager
def _caller_rng_kept(device: torch.device) -> Iterator[None]:
    """ The caller's random streams as they were, whatever the checks inside draw or seed. """
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        yield


def _autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _loss(out: torch.Tensor) -> torch.Tensor:
    # every logit weighted differently, so that no gradient is zero by symmetry
    return (out.float() * torch.linspace(-1, 1, out.shape[-1], device=out.device)).square().sum()


def seeded_training_step(
        model: nn.Module,
        x: torch.Tensor,
        reversible: bool,
        autocast_dtype: Optional[torch.dtype] = None,
        grad_scaler: Optional[Callable[[], torch.amp.GradScaler]] = None,
        draws: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
) -> StepResult:
    """ One training forward + backward of `model` from the seed `STEP_SEED`, reversible or under ordinary autograd.

    The loss weights every logit differently (so that no gradient vanishes by symmetry). With `grad_scaler` (a
    factory), the loss is scaled, the gradients unscaled by the scaler and a zero-rate SGD step taken through
    it. `draws` wraps the forward (see `_RandomDraws`). The model is left in ordinary-autograd or reversible mode
    as asked.
    """
    model.set_reversible(reversible)
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    _seed(x.device, STEP_SEED)
    with _autocast(x.device, autocast_dtype), (draws or contextlib.nullcontext)():
        out = model(x)
    loss = _loss(out)
    scale = None
    if grad_scaler is None:
        loss.backward()
        input_grad = x.grad
    else:
        scaler = grad_scaler()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.)
        scaler.scale(loss).backward()
        input_grad = x.grad / scaler.get_scale()  # the scaler unscales the optimizer's parameters only
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        scale = scaler.get_scale()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads['input'] = input_grad
    return StepResult(out.detach(), grads, _rng_state(x.device), scale)


class _RandomDraws(TorchDispatchMode):
    """ Records the random draws of one forward and replays them, in order, in a forward of another dtype.

    The float64 reference must use the float32 run's dropout masks. Seeding alone does that only where the
    generators draw alike for every dtype (CPU); CUDA's draw differently for float64 (e.g. `bernoulli_`
    unrolls by dtype). The ops that draw carry torch's `nondeterministic_seeded` tag: a fill (`bernoulli_`)
    or a draw (`randint`) is overwritten with the recorded values, `native_dropout` is redone with the
    recorded mask. A fused attention kernel that drops out inside itself cannot be replayed: run the
    float32 side with the math attention kernel (`torch.nn.attention.sdpa_kernel`) then.
    """

    def __init__(self):
        super().__init__()
        self.recorded: List[Tuple[str, Optional[torch.Tensor]]] = []
        self.replaying = False
        self.position = 0

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        self.recorded, self.replaying = [], False
        with self:
            yield

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        self.replaying, self.position = True, 0
        with self:
            yield
        if self.position != len(self.recorded):
            raise RuntimeError(
                f'The float64 reference drew {self.position} times, the run it replays {len(self.recorded)}.')

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded not in func.tags or _dropout_p(func, args, kwargs) == 0:
            return func(*args, **kwargs)  # draws nothing (a fused attention kernel without dropout draws nothing)
        if func is torch.ops.aten.native_dropout.default:
            return self._dropout(func, args, kwargs)
        out = func(*args, **kwargs)
        single = isinstance(out, torch.Tensor)
        if not self.replaying:
            self.recorded.append((func.name(), out.detach().clone() if single else None))
            return out
        values = self._next(func)
        if values is None:
            raise RuntimeError(
                f'{func.name()} draws its randomness inside itself (e.g. dropout in a fused attention kernel): a '
                f'float64 reference cannot replay it. Pin the math kernel: torch.nn.attention.sdpa_kernel('
                f'SDPBackend.MATH).')
        out.copy_(values)  # a fill (bernoulli_) returns the tensor it filled
        return out

    def _dropout(self, func, args, kwargs):
        if not self.replaying:
            out, mask = func(*args, **kwargs)
            self.recorded.append((func.name(), mask.clone()))
            return out, mask
        x, p = args[0], args[1] if len(args) > 1 else kwargs['p']
        mask = self._next(func)
        return x * mask.to(x.dtype) * (1. / (1. - p)), mask.clone()

    def _next(self, func) -> Optional[torch.Tensor]:
        if self.position >= len(self.recorded) or self.recorded[self.position][0] != func.name():
            expected = self.recorded[self.position][0] if self.position < len(self.recorded) else 'nothing'
            raise RuntimeError(
                f'The float64 reference draws {func.name()} where the run it replays drew {expected}.')
        self.position += 1
        return self.recorded[self.position - 1][1]


def _dropout_p(func, args, kwargs) -> Optional[float]:
    """ The `dropout_p` argument of an op that has one (the fused attention kernels), else None. """
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == 'dropout_p':
            return kwargs.get(arg.name, args[i] if i < len(args) else arg.default_value)
    return None


def _errors_by_role(grads: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """ Relative gradient error per parameter role: the same parameter of every block as one vector.

    A single block's scalar gradient (an attention temperature) can nearly cancel, so its own relative
    error measures the cancellation, not the arithmetic; the same parameter across blocks has one scale.
    """
    roles: Dict[str, List[str]] = {}
    for name in reference:
        roles.setdefault(re.sub(r'^blocks\.\d+\.', 'blocks.*.', name), []).append(name)
    errors = {}
    for role, names in roles.items():
        diff = sum((grads[n].double() - reference[n].double()).square().sum() for n in names).sqrt()
        norm = sum(reference[n].double().square().sum() for n in names).sqrt()
        errors[role] = (diff / norm.clamp_min(1e-300)).item()
    return errors


@dataclass(frozen=True)
class GradientErrors:
    """ The reversible backward's gradients against ordinary autograd's, as `gradient_error_report` measures them.

    float64 (no autocast): `reversible` is the worst relative error of a gradient against autograd's, held
    below `FLOAT64_TOLERANCE`. Otherwise both are the worst error per parameter role against a float64
    reference, and the reversible one is held to `FLOAT32_ERROR_MULTIPLE` times autograd's.
    """
    reversible: float
    autograd: float  # ordinary autograd's own error against the float64 reference (0.0 for float64 runs)
    worst: str  # the parameter (role) of the reversible backward's worst error
    outputs_equal: bool  # the reversible forward's logits equal autograd's bit for bit
    rng_equal: bool  # the random streams after the reversible step equal those after the autograd step
    reference_gap: Optional[float] = None  # float32 forward vs the float64 reference (None for float64 runs)
    scales: Optional[Tuple[float, float]] = None  # with a GradScaler: (autograd, reversible) scales after the step

    @property
    def float64(self) -> bool:
        return self.reference_gap is None

    @property
    def limit(self) -> float:
        return FLOAT64_TOLERANCE if self.float64 else FLOAT32_ERROR_MULTIPLE * self.autograd

    @property
    def within_limit(self) -> bool:
        return self.reversible < self.limit if self.float64 else self.reversible <= self.limit

    @property
    def reference_matches(self) -> bool:
        return self.float64 or self.reference_gap < REFERENCE_RANDOMNESS_TOLERANCE

    def problems(self) -> List[str]:
        """ What failed, in words (empty when the reversible backward passes). """
        problems = []
        if not self.outputs_equal:
            problems.append('the reversible forward computes other logits than ordinary autograd')
        if not self.rng_equal:
            problems.append('the random streams are not where ordinary autograd leaves them')
        if not self.reference_matches:
            problems.append(f'the float64 reference saw other randomness (output gap {self.reference_gap:.3g})')
        if not self.within_limit:
            problems.append(f'{self.worst}: relative gradient error {self.reversible:.3g}, limit {self.limit:.3g}')
        return problems

    @property
    def passed(self) -> bool:
        return not self.problems()

    def __str__(self) -> str:
        if self.float64:
            return f'relative error {self.reversible:.3g} ({self.worst}) < {FLOAT64_TOLERANCE:.0e}'
        return (f'reversible {self.reversible:.3g} ({self.worst}) vs autograd {self.autograd:.3g} against float64, '
                f'limit {FLOAT32_ERROR_MULTIPLE}x')


def gradient_error_report(
        model: nn.Module,
        x: torch.Tensor,
        autocast_dtype: Optional[torch.dtype] = None,
        grad_scaler: Optional[Callable[[], torch.amp.GradScaler]] = None,
) -> GradientErrors:
    """ The reversible backward's gradients against ordinary autograd's on the same weights and randomness.

    One training step each way from the same seed (`seeded_training_step`, train mode with the model's dropout
    and drop-path). In float64 the two are compared directly. In float32 or under autocast both are compared
    with a float64 reference (a float64 copy of the model, ordinary autograd, no autocast) that replays the
    float32 run's random draws, per parameter role. The caller's random streams are left as they were; the
    model is left in the mode it was in.

    Args:
        model: A reversible model in train mode.
        x: A batch of images; its dtype is the run's (float64: direct comparison).
        autocast_dtype: Autocast for both steps (the reference runs without).
        grad_scaler: A GradScaler factory: each step scales its loss and unscales its gradients through a
            fresh scaler and steps through it; `GradientErrors.scales` holds the scales after.
    """
    was_reversible = model.reversible
    try:
        with _caller_rng_kept(x.device):
            return _gradient_errors(model, x, autocast_dtype, grad_scaler)
    finally:
        model.set_reversible(was_reversible)
        model.zero_grad(set_to_none=True)


def _gradient_errors(model, x, autocast_dtype, grad_scaler) -> GradientErrors:
    draws = _RandomDraws()
    autograd = seeded_training_step(model, x, False, autocast_dtype, grad_scaler, draws.record)
    reversible = seeded_training_step(model, x, True, autocast_dtype, grad_scaler)
    outputs_equal = torch.equal(reversible.out, autograd.out)
    rng_equal = all(torch.equal(a, b) for a, b in zip(reversible.rng, autograd.rng))
    scales = (autograd.scale, reversible.scale) if grad_scaler is not None else None
    if x.dtype == torch.float64 and autocast_dtype is None:
        errors = {n: relative_error(reversible.grads[n], autograd.grads[n]) for n in autograd.grads}
        worst = max(errors, key=errors.get)
        return GradientErrors(errors[worst], 0., worst, outputs_equal, rng_equal, scales=scales)

    # the math kernel is the attention kernel that takes float64 everywhere, whichever one the caller pinned
    with sdpa_kernel(SDPBackend.MATH):
        exact = seeded_training_step(copy.deepcopy(model).double(), x.double(), False, draws=draws.replay)
    with torch.no_grad(), draws.replay():
        # the float32 forward without autocast: autocast's own rounding is not the reference's concern here
        plain_out = model(x)
    autograd_errors = _errors_by_role(autograd.grads, exact.grads)
    reversible_errors = _errors_by_role(reversible.grads, exact.grads)
    worst = max(reversible_errors, key=reversible_errors.get)
    return GradientErrors(
        reversible_errors[worst], max(autograd_errors.values()), worst, outputs_equal, rng_equal,
        relative_error(plain_out, exact.out), scales)


# ---------------------------------------------------------------------------------------------------------
# The report


@dataclass
class CheckResult:
    """ One line of the self-check: `status` is 'pass', 'fail' or 'info' (measured, not judged). """
    model: str
    size: str
    check: str
    status: str
    detail: str
    values: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SelfCheckReport:
    """ Every line of a self-check, the options it ran with and the environment it ran in. """
    options: Dict[str, Any]
    environment: Dict[str, Any]
    results: List[CheckResult] = field(default_factory=list)
    seconds: float = 0.

    @property
    def failures(self) -> List[CheckResult]:
        return [r for r in self.results if r.status == 'fail']

    @property
    def passed(self) -> bool:
        return bool(self.results) and not self.failures

    def to_dict(self) -> Dict[str, Any]:
        return dict(
            passed=self.passed, seconds=round(self.seconds, 1), options=self.options,
            environment=self.environment, results=[asdict(r) for r in self.results])

    def write_json(self, path: os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + '\n')
        return path

    def format_table(self) -> str:
        """ The environment, one line per check and a summary. """
        lines = [format_environment(self.environment), _TABLE_HEADER]
        lines += [format_result(r) for r in self.results]
        lines.append(self.summary())
        return '\n'.join(lines)

    def summary(self) -> str:
        counts = {s: sum(r.status == s for r in self.results) for s in ('pass', 'fail', 'info')}
        verdict = 'PASSED' if self.passed else 'FAILED'
        return (f'{verdict}: {counts["pass"]} passed, {counts["fail"]} failed, {counts["info"]} informational '
                f'({self.seconds:.0f} s)')


_COLUMNS = (('model', 25), ('size', 5), ('check', 34), ('result', 6))
_TABLE_HEADER = '  '.join(name.ljust(width) for name, width in _COLUMNS) + '  detail'


def format_result(result: CheckResult) -> str:
    cells = (result.model, result.size, result.check, result.status)
    return '  '.join(c.ljust(w) for c, (_, w) in zip(cells, _COLUMNS)) + '  ' + result.detail


def format_environment(env: Dict[str, Any]) -> str:
    cuda = f"CUDA {env['cuda']}, cuDNN {env['cudnn']}" if env.get('cuda') else 'CUDA -'
    lines = [
        f"device {env['device']} ({env['device_name']}); torch {env['torch']}, timm {env['timm']}, {cuda}",
        f"deterministic algorithms {'on' if env['deterministic_algorithms'] else 'off'}, "
        f"CUBLAS_WORKSPACE_CONFIG={env['cublas_workspace_config'] or '-'}, "
        f"float32 matmul precision {env['float32_matmul_precision']}",
        'SDPA backends enabled: ' + (', '.join(k for k, v in env['sdpa_enabled'].items() if v) or 'none'),
    ]
    for dtype, by_dropout in env['sdpa_choice'].items():
        lines.append(f'SDPA kernel of the models\' attention, {dtype}, without / with grad: ' + '; '.join(
            f'{case} {by_grad["no grad"]} / {by_grad["grad"]}' for case, by_grad in by_dropout.items()))
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------------
# The environment


def _device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            name = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), name)
    threads = torch.get_num_threads()
    return f'{name}, {threads} thread{"s" if threads != 1 else ""}'


def _sdpa_choices(device: torch.device, dtypes: Sequence[torch.dtype]) -> Dict[str, Dict[str, Dict[str, str]]]:
    """ dtype -> 'dropout' / 'no dropout' -> 'no grad' / 'grad' -> the kernel `scaled_dot_product_attention` picks
    for the models' attention (a boolean mask, scale 1, 64-dim heads). A kernel that changes with grad is one
    the backward's recomputation runs and the forward did not.
    """
    choices: Dict[str, Dict[str, Dict[str, str]]] = {}
    tokens, head_dim = 65, 64
    mask = ~torch.eye(tokens, dtype=torch.bool, device=device)
    for dtype in dtypes:
        by_dropout = choices.setdefault(str(dtype).replace('torch.', ''), {})
        for dropout in (0., 0.1):
            by_grad = by_dropout.setdefault('dropout' if dropout else 'no dropout', {})
            for grad in (False, True):
                q = torch.zeros(2, 2, tokens, head_dim, device=device, dtype=dtype, requires_grad=grad)
                try:
                    with torch.set_grad_enabled(grad):
                        backend = torch._fused_sdp_choice(q, q, q, mask, dropout, False, scale=1.)
                    by_grad['grad' if grad else 'no grad'] = SDPBackend(backend).name
                except Exception as e:  # a private function of torch: report, never fail on it
                    by_grad['grad' if grad else 'no grad'] = f'unknown ({type(e).__name__})'
    return choices


def environment_info(device: torch.device, autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """ What decides which kernels run: versions, the GPU, determinism settings and the attention backends. """
    from . import __version__
    cuda = device.type == 'cuda'
    dtypes = [torch.float32] + ([autocast_dtype] if autocast_dtype is not None else [])
    return {
        'device': str(device),
        'device_name': _device_name(device),
        'python': platform.python_version(),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'timm_reversible': __version__,
        'cuda': torch.version.cuda if cuda else None,
        'cudnn': torch.backends.cudnn.version() if cuda else None,
        'gpu_capability': '.'.join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        'cpu_threads': torch.get_num_threads(),
        'deterministic_algorithms': torch.are_deterministic_algorithms_enabled(),
        'deterministic_warn_only': torch.is_deterministic_algorithms_warn_only_enabled(),
        'cudnn_deterministic': torch.backends.cudnn.deterministic,
        'cudnn_benchmark': torch.backends.cudnn.benchmark,
        'cublas_workspace_config': os.environ.get('CUBLAS_WORKSPACE_CONFIG'),
        'float32_matmul_precision': torch.get_float32_matmul_precision(),
        'sdpa_enabled': {
            'flash': torch.backends.cuda.flash_sdp_enabled(),
            'mem_efficient': torch.backends.cuda.mem_efficient_sdp_enabled(),
            'math': torch.backends.cuda.math_sdp_enabled(),
            'cudnn': torch.backends.cuda.cudnn_sdp_enabled(),
        },
        'flash_attention_available': torch.backends.cuda.is_flash_attention_available() if cuda else None,
        'sdpa_choice': _sdpa_choices(device, dtypes),
    }


# ---------------------------------------------------------------------------------------------------------
# The checks


def reversible_models() -> List[str]:
    """ Every registered model of this package that has a reversible backward: the small-data ones and the
    reversible timm ViTs.
    """
    return [
        name for name in package_models()
        if isinstance(timm.create_model(name, **SIZES['small'].kwargs), ReversibleVisionTransformer)
    ] + timm_vit_models()


def default_models() -> List[str]:
    """ The small-data reversible models, and the base timm ViT's BDIA and two-stream forms. """
    return [n for n in reversible_models() if not _is_timm_vit(n)] + list(DEFAULT_TIMM_VITS)


def _batch_size(model: nn.Module, size: str) -> int:
    return (SIZES if isinstance(model, SmallDataVisionTransformer) else TIMM_VIT_SIZES)[size].batch_size


def _is_exact(model: nn.Module) -> bool:
    """ The quantized models (BDIA, momentum), whose reconstruction is bit for bit. """
    return isinstance(model, QuantizedReversibleVisionTransformer) or getattr(model, 'quant_level', None) is not None


def _precision_name(dtype: Optional[torch.dtype]) -> str:
    return {None: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}[dtype]


def _images(batch_size: int, model: nn.Module, device: torch.device, scale: float = 1.) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return (scale * torch.randn(batch_size, *model_input_size(model), generator=generator)).to(device)


class _Checker:
    """ Runs the checks of one self-check and collects their lines. """

    def __init__(self, device: torch.device, amp: Optional[torch.dtype],
                 on_result: Optional[Callable[[CheckResult], None]]):
        self.device, self.amp, self.on_result = device, amp, on_result
        self.results: List[CheckResult] = []

    def line(self, model: str, size: str, check: str, run: Callable[[], Tuple[str, str, Dict[str, Any]]]) -> None:
        """ Run one check; one that raises (a ReconstructionError, out of memory, ...) fails its line. """
        try:
            status, detail, values = run()
        except Exception as e:
            # the table keeps the first sentence; the JSON the whole message (the engine's names the remedies)
            message = f'{type(e).__name__}: {" ".join(str(e).split())}'
            status, detail, values = 'fail', message.split('. ')[0], dict(error=message)
            if self.device.type == 'cuda':
                torch.cuda.empty_cache()
        result = CheckResult(model, size, check, status, detail, values)
        self.results.append(result)
        if self.on_result is not None:
            self.on_result(result)

    def create(self, name: str, size: str, **kwargs: Any) -> nn.Module:
        _seed(self.device, 0)  # the same weights on every run (inside the caller's forked random streams)
        return timm.create_model(name, **{**sizes_of(name)[size].kwargs, **kwargs}).to(self.device).train()

    # -- exactness: gradients, reconstruction, random streams, GradScaler

    def exactness(self, name: str, size: str) -> None:
        for amp in [None] + ([self.amp] if self.amp is not None else []):
            p = _precision_name(amp)
            for label, kwargs, kernels in self._gradient_variants():
                self.line(
                    name, size, f'gradients {p}{label}', lambda: self._gradients(name, size, amp, kwargs, kernels))
            model = self.create(name, size, **DROPS)
            exact = _is_exact(model)
            if exact:
                self.line(name, size, f'reconstruction {p}, inverse', lambda: self._inverse(model, size, amp))
            steps: List[Any] = []  # the paired steps, or the exception they raised
            if exact:
                self.line(name, size, f'reconstruction {p}, backward', lambda: self._backward(model, size, amp, steps))
            self.line(name, size, f'caller RNG {p}', lambda: self._caller_rng(model, size, amp, steps))
        if self.amp == torch.float16:
            self.line(name, size, 'GradScaler fp16 scaled step', lambda: self._scaled_step(name, size))
            self.line(name, size, 'GradScaler fp16 skips inf', lambda: self._overflow_skipped(name, size))

    def _gradient_variants(self) -> List[Tuple[str, Dict[str, Any], Optional[SDPBackend]]]:
        """ (label, model kwargs, pinned attention kernel) of the gradient lines on this device.

        CPU attention drops out through `bernoulli_`, which the float64 reference replays. A GPU's fused
        attention kernels drop out inside themselves, which no float64 reference can replay: there, one line
        runs the models' default kernels without attention dropout, one the math kernel with it.
        """
        if self.device.type == 'cpu':
            return [('', DROPS, None)]
        return [('', dict(DROPS, attn_drop_rate=0.), None), (', math attention', DROPS, SDPBackend.MATH)]

    def _gradients(self, name, size, amp, kwargs, kernels) -> Tuple[str, str, Dict[str, Any]]:
        model = self.create(name, size, **kwargs)
        with sdpa_kernel(kernels) if kernels is not None else contextlib.nullcontext():
            errors = gradient_error_report(model, _images(sizes_of(name)[size].batch_size, model, self.device), amp)
        return _judge(errors)

    def _inverse(self, model, size, amp) -> Tuple[str, str, Dict[str, Any]]:
        # inputs of realistic scale, so that the grid's low bits are all in use
        with _autocast(self.device, amp):
            error = reconstruction_error(model, _images(_batch_size(model, size), model, self.device, 2.5))
        status = 'pass' if error == 0.0 else 'fail'
        return status, f'largest block-input difference {error:.3g} (must be 0.0)', dict(error=error)

    def _paired_steps(self, model, size, amp, steps: List[Any]) -> List[StepResult]:
        """ An ordinary and a reversible training step from one seed, on the default kernels with every dropout on
        (done once, kept in `steps` for the lines that read them; a failure is re-raised for each of them).
        """
        if not steps:
            x = _images(_batch_size(model, size), model, self.device)
            try:
                with _caller_rng_kept(self.device):
                    # both or neither: a list, not a generator that extend would consume halfway
                    steps.extend([seeded_training_step(model, x, reversible, amp) for reversible in (False, True)])
            except Exception as e:
                steps.append(e)
        if isinstance(steps[0], Exception):
            raise steps[0]
        return steps

    def _backward(self, model, size, amp, steps) -> Tuple[str, str, Dict[str, Any]]:
        # the engine compares each reconstructed block input with a fingerprint of the forward's and raises
        # ReconstructionError on any difference: the line fails with its message
        if not model.verify_reconstruction:
            return 'fail', 'the run-time reconstruction check is off (verify_reconstruction=False)', {}
        self._paired_steps(model, size, amp, steps)
        return 'pass', 'bit for bit: the run-time check raised no ReconstructionError', {}

    def _caller_rng(self, model, size, amp, steps) -> Tuple[str, str, Dict[str, Any]]:
        autograd, reversible = self._paired_steps(model, size, amp, steps)
        streams = ['CPU'] + (['CUDA'] if self.device.type == 'cuda' else [])
        equal = {s: torch.equal(a, b) for s, a, b in zip(streams, autograd.rng, reversible.rng)}
        detail = ', '.join(f'{s} generator {"as" if e else "NOT as"} after ordinary autograd' for s, e in equal.items())
        return ('pass' if all(equal.values()) else 'fail'), detail, dict(rng_equal=equal)

    def _scaled_step(self, name, size) -> Tuple[str, str, Dict[str, Any]]:
        model = self.create(name, size, **DROPS)
        x = _images(sizes_of(name)[size].batch_size, model, self.device)
        problems = []
        if _is_exact(model):
            with _autocast(self.device, torch.float16):
                inputs, _ = model.reconstruct_block_inputs(x)
            dtypes = {t.dtype for state in inputs for t in state}
            if dtypes != {torch.float32}:
                problems.append(f'the stream is {", ".join(map(str, dtypes))}, not float32')
        scaler = lambda: torch.amp.GradScaler(self.device.type, init_scale=SCALED_STEP_SCALE)
        errors = gradient_error_report(model, x, torch.float16, scaler)
        problems += errors.problems()
        if errors.scales != (SCALED_STEP_SCALE, SCALED_STEP_SCALE):
            problems.append(f'scales after the step {errors.scales}: a path found inf gradients')
        detail = '; '.join(problems) if problems else f'scale 2^10, step taken in both; {errors}'
        return ('fail' if problems else 'pass'), detail, dict(_error_values(errors), scales=errors.scales)

    def _overflow_skipped(self, name, size) -> Tuple[str, str, Dict[str, Any]]:
        """ A scale that overflows the fp16 gradients: the scaler skips the step in both paths and backs off;
        the next step, at the backed-off scale, is taken in both.
        """
        original = self.create(name, size, **DROPS)
        x = _images(sizes_of(name)[size].batch_size, original, self.device)
        paths: Dict[str, Tuple[List[bool], float]] = {}
        for reversible in (False, True):
            model = copy.deepcopy(original)
            model.set_reversible(reversible)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            scaler = torch.amp.GradScaler(
                self.device.type, init_scale=OVERFLOW_SCALE, backoff_factor=SCALED_STEP_SCALE / OVERFLOW_SCALE)
            taken = []
            for _ in range(2):
                before = [p.detach().clone() for p in model.parameters()]
                optimizer.zero_grad(set_to_none=True)
                with _autocast(self.device, torch.float16):
                    loss = model(x).float().logsumexp(dim=1).mean()
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                taken.append(any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before)))
            paths['reversible' if reversible else 'autograd'] = taken, scaler.get_scale()
        problems = []
        for path, (taken, scale) in paths.items():
            if taken[0]:
                problems.append(f'{path}: the overflowing step was taken')
            if not taken[1]:
                problems.append(f'{path}: the step after the back-off was skipped')
            if scale != SCALED_STEP_SCALE:
                problems.append(f'{path}: scale {scale} after the back-off, not 2^10')
        detail = '; '.join(problems) or 'scale 2^40 overflowed: skipped in both, backed off to 2^10, next step taken'
        return ('fail' if problems else 'pass'), detail, {}

    # -- memory and speed

    def memory(self, names: Sequence[str], size: str) -> None:
        """ Activation memory per image as DESIGN.md defines it: float32, whatever autocast is checked (under
        autocast the exact models keep a float32 stream while the plain ViT stores low-precision activations).
        `names` share one baseline (`baseline_of`).
        """
        baseline = baseline_of(names[0])
        width = {k: v for k, v in sizes_of(baseline)[size].kwargs.items() if k != 'depth'}
        batch = (16 if _is_timm_vit(baseline) else 128) if self.device.type == 'cuda' else 8
        for depth in MEMORY_DEPTHS:
            baselines: Dict[str, float] = {}

            def measure(name: str, checkpointing: bool = False) -> float:
                model = timm.create_model(name, depth=depth, **width).to(self.device)
                model.set_grad_checkpointing(checkpointing)
                mib = activation_memory_per_image(model, batch) / MiB
                del model
                if self.device.type == 'cuda':
                    torch.cuda.empty_cache()
                return mib

            def judge(name: str) -> Tuple[str, str, Dict[str, Any]]:
                if not baselines:
                    baselines.update(vanilla=measure(baseline), checkpointed=measure(baseline, True))
                mib = measure(name)
                vanilla, checkpointed = baselines['vanilla'], baselines['checkpointed']
                status = 'pass' if mib < vanilla and mib < checkpointed else 'fail'
                detail = (f'{mib:.3f} MiB/img, {baseline} {vanilla:.3f}, with block checkpointing '
                          f'{checkpointed:.3f} (fp32, batch {batch})')
                return status, detail, dict(mib_per_image=mib, batch_size=batch, **baselines)

            for name in names:
                self.line(name, size, f'activation memory depth {depth}', lambda: judge(name))

    def speed(self, names: Sequence[str], size: str) -> None:
        """ Train step time against the baseline that `names` share, all timed in one loop. """
        cuda = self.device.type == 'cuda'
        baseline = baseline_of(names[0])
        batch, repeats, warmup = ((32 if _is_timm_vit(baseline) else 128), 10, 3) if cuda else (16, 3, 1)
        times: Dict[str, List[float]] = {}

        def judge(name: str) -> Tuple[str, str, Dict[str, Any]]:
            if not times:
                models = {n: self.create(n, size) for n in [baseline, *names]}
                times.update(time_train_steps(models, batch, repeats, warmup, autocast_dtype=self.amp))
            ratio = statistics.median(times[name]) / statistics.median(times[baseline])
            status = _time_status(ratio, self.device.type)
            limit = f', limit {MAX_CUDA_TIME_RATIO}x' if cuda else ' (CPU: informational)'
            detail = (f'{ratio:.2f}x {baseline} (median of {repeats} steps, batch {batch}, '
                      f'{_precision_name(self.amp)}){limit}')
            return status, detail, dict(ratio=ratio, seconds=times[name], baseline_seconds=times[baseline])

        for name in names:
            self.line(name, size, 'train step time', lambda: judge(name))


def _time_status(ratio: float, device_type: str) -> str:
    """ A GPU's ratio is judged; a CPU's is informational (shared cores, and it does not predict a GPU's). """
    if device_type != 'cuda':
        return 'info'
    return 'pass' if ratio <= MAX_CUDA_TIME_RATIO else 'fail'


def _error_values(errors: GradientErrors) -> Dict[str, Any]:
    return dict(reversible_error=errors.reversible, autograd_error=errors.autograd, worst=errors.worst,
                limit=errors.limit, reference_gap=errors.reference_gap, outputs_equal=errors.outputs_equal,
                rng_equal=errors.rng_equal)


def _judge(errors: GradientErrors) -> Tuple[str, str, Dict[str, Any]]:
    problems = errors.problems()
    return ('fail' if problems else 'pass'), '; '.join(problems + [str(errors)]), _error_values(errors)


def run_selfcheck(
        device: Optional[str] = None,
        amp: str = 'none',
        models: Optional[Sequence[str]] = None,
        size: Optional[str] = None,
        on_start: Optional[Callable[[SelfCheckReport], None]] = None,
        on_result: Optional[Callable[[CheckResult], None]] = None,
) -> SelfCheckReport:
    """ Check the reversible models on `device` (default: CUDA where there is one, else the CPU).

    Args:
        device: 'cuda', 'cuda:1', 'cpu', ...
        amp: 'none', 'bf16' or 'fp16': the autocast checked besides float32 (fp16 adds the GradScaler lines);
            the train step is timed under it (activation memory is float32's, as DESIGN.md defines it).
        models: Reversible models to check, any of `reversible_models()` (default: `default_models()`, the
            small-data models and the base timm ViT's BDIA and two-stream forms).
        size: 'small', 'full' or 'both' (default: both on CUDA, small on CPU). Memory and speed are measured
            at the largest of them.
        on_start: Called with the (still empty) report once the options are checked and the environment read.
        on_result: Called with each line as it is done (progress).
    """
    dev = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'{dev} was asked for, but torch sees no CUDA device here.')
    if amp not in AMP_DTYPES:
        raise ValueError(f'amp must be one of {", ".join(AMP_DTYPES)}, got {amp!r}.')
    size = size or ('both' if dev.type == 'cuda' else 'small')
    sizes = ['small', 'full'] if size == 'both' else [size]
    if any(s not in SIZES for s in sizes):
        raise ValueError(f'size must be small, full or both, got {size!r}.')
    # every model created here draws its weights from the forked streams, never the caller's
    with _caller_rng_kept(dev):
        available = reversible_models()
        names = list(models) if models else default_models()
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f'Not a reversible model of this package: {", ".join(unknown)} (choose from '
                             f'{", ".join(available)}).')
        amp_dtype = AMP_DTYPES[amp]
        report = SelfCheckReport(
            options=dict(device=str(dev), amp=amp, models=names, size=size),
            environment=environment_info(dev, amp_dtype))
        if on_start is not None:
            on_start(report)
        start = time.perf_counter()
        checker = _Checker(dev, amp_dtype, on_result)
        for s in sizes:
            for name in names:
                checker.exactness(name, s)
        by_baseline: Dict[str, List[str]] = {}
        for name in names:
            by_baseline.setdefault(baseline_of(name), []).append(name)
        for group in by_baseline.values():
            checker.memory(group, sizes[-1])
        for group in by_baseline.values():
            checker.speed(group, sizes[-1])
    report.results = checker.results
    report.seconds = time.perf_counter() - start
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m timm_reversible.selfcheck',
        description='Check that the reversible models are right on this machine: gradients against ordinary '
                    'autograd, bit-exact reconstruction, random streams, GradScaler, activation memory and speed.')
    parser.add_argument('--device', default=None, help='cuda, cuda:N or cpu (default: cuda where there is one)')
    parser.add_argument('--amp', default='none', choices=list(AMP_DTYPES),
                        help='autocast to check besides float32; fp16 adds the GradScaler lines (default: none)')
    parser.add_argument('--models', nargs='+', default=None,
                        help='reversible models (default: the small-data ones, bdia_vit_base_patch16_224 and '
                             'revvit_base_patch16_224)')
    parser.add_argument('--size', default=None, choices=['small', 'full', 'both'],
                        help='model sizes (default: both on CUDA, small on CPU)')
    parser.add_argument('--json', default='selfcheck.json', help='where to write the JSON report')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """ The command line: prints the table as it goes, writes the JSON; 0 if every line passed, else 1. """
    args = _parser().parse_args(argv)

    def start(report: SelfCheckReport) -> None:
        print(format_environment(report.environment), _TABLE_HEADER, sep='\n', flush=True)

    def show(result: CheckResult) -> None:
        print(format_result(result), flush=True)

    try:
        report = run_selfcheck(args.device, args.amp, args.models, args.size, start, show)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(report.summary())
    print(f'JSON: {report.write_json(args.json)}')
    return 0 if report.passed else 1


if __name__ == '__main__':
    sys.exit(main())
