""" Measuring a model: parameters, FLOPs, memory and speed of a training step (definitions in DESIGN.md).

Memory figures are bytes of live tensors: CUDA's allocator statistics on CUDA, torch's MemTracker (exact
tensor accounting, independent of machine load) on CPU. Timings are medians of repeated, device-synchronised
runs with the warm-up excluded; models compared with each other are timed round-robin in one loop so that
a change in machine load hits them all alike.
"""
import contextlib
import ctypes
import ctypes.util
import functools
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from .utils import model_input_size

__all__ = [
    'count_params', 'count_flops', 'count_train_step_flops', 'activation_memory_per_image', 'train_step',
    'MemoryFit', 'activation_memory_fit', 'training_state_bytes', 'input_bytes_per_image',
    'predicted_peak_training_memory', 'peak_training_memory', 'max_batch_size', 'largest_batch_in_budget',
    'default_optimizer', 'make_train_step_fn', 'make_inference_fn', 'alternating_timings',
    'time_train_steps', 'time_inference', 'training_graphs', 'train_step_time_ratio', 'throughput',
    'PROFILE_CATEGORIES', 'profile_category', 'StepProfile', 'step_profile_from_events', 'profile_train_steps',
    'keep_freed_host_memory',
]


def count_params(model: nn.Module) -> int:
    """ Number of parameters (shared parameters counted once). """
    return sum(p.numel() for p in model.parameters())


@flop_counter.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
def _sdpa_cpu_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    # torch counts the CUDA attention kernels but not the fused CPU one; count it the same way
    return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)


def count_flops(model: nn.Module, input_size: Optional[Sequence[int]] = None, batch_size: int = 1) -> int:
    """ Forward FLOPs per image (2 per multiply-add) at the model's input size, eval mode, no grad. """
    input_size = input_size or model_input_size(model)
    param = next(model.parameters())
    x = torch.randn(batch_size, *input_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // batch_size


def count_train_step_flops(model: nn.Module, input_size: Optional[Sequence[int]] = None, batch_size: int = 2) -> int:
    """ FLOPs per image of one training forward + backward (FlopCounterMode, 2 per multiply-add): the
    deterministic part of a step's cost, e.g. the recomputation a reversible backward adds.
    """
    images, targets = _batch(model, batch_size, input_size)
    model.train()
    with FlopCounterMode(display=False) as counter:
        train_step(model, images, targets)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() // batch_size


def train_step(
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        autocast_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """ One forward + backward with cross-entropy (no optimizer step); returns the loss. """
    autocast = torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with autocast:
        loss = F.cross_entropy(model(images), targets)
    loss.backward()
    return loss.detach()


def _batch(model: nn.Module, batch_size: int, input_size: Optional[Sequence[int]] = None, seed: int = 0):
    input_size = input_size or model_input_size(model)
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, *input_size, generator=generator, dtype=param.dtype).to(param.device)
    targets = torch.randint(0, max(model.num_classes, 1), (batch_size,), generator=generator).to(param.device)
    return images, targets


@functools.lru_cache(maxsize=None)
def _peak_only_tracker_cls() -> type:
    from torch.distributed._tools.mem_tracker import MemTracker

    class PeakOnlyMemTracker(MemTracker):
        """ MemTracker whose global peak is all that is kept up to date.

        MemTracker also keeps each module's own peak by visiting every module seen so far after every op,
        which makes tracking quadratic in depth (most of the time of a depth-24 measurement). The global peak
        is updated exactly as MemTracker does it, so the figures are the same.
        """

        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap['Total']:
                    self._peak_mem[dev] = snap['Total']
                    self._peak_mem_snap[dev] = dict(snap)

    probe = MemTracker()
    internals = ('_update_peak_stats', '_curr_mem_snap', '_peak_mem', '_peak_mem_snap')
    # another torch version may keep its state differently: then the plain (slower) tracker
    return PeakOnlyMemTracker if all(hasattr(probe, a) for a in internals) else MemTracker


def _mem_tracker():
    return _peak_only_tracker_cls()()


def _activation_bytes(
        model: nn.Module,
        batch_sizes: Sequence[int],
        input_size: Optional[Sequence[int]] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        step_fn: Callable[..., torch.Tensor] = train_step,
) -> Dict[int, float]:
    """ Batch size -> peak minus baseline bytes of one step (the whole batch), after one shared warm-up step. """
    model.train()
    device = next(model.parameters()).device
    # the warm-up allocates the gradients (then zeroed in place): the baseline is parameters + gradients
    step_fn(model, *_batch(model, min(batch_sizes), input_size), autocast_dtype)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()

    out = {}
    for batch_size in batch_sizes:
        images, targets = _batch(model, batch_size, input_size)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step_fn(model, images, targets, autocast_dtype)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        else:
            tracker = _mem_tracker()
            tracker.track_external(model, images, targets)
            with tracker:
                before = tracker.get_tracker_snapshot('current')[device]['Total']
                step_fn(model, images, targets, autocast_dtype)
            peak = tracker.get_tracker_snapshot('peak')[device]['Total']
        out[batch_size] = peak - before
        del images, targets
    return out


def activation_memory_per_image(
        model: nn.Module,
        batch_size: int = 8,
        input_size: Optional[Sequence[int]] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        step_fn: Callable[..., torch.Tensor] = train_step,
) -> float:
    """ Activation memory of one training step, in bytes per image.

    (Peak bytes of live tensors during one forward + backward) - (bytes held just before it), divided by
    the batch size. A warm-up step allocates the gradients first (then zeroed in place), so the baseline
    is parameters + gradients for every model. CUDA: the allocator's peak; CPU: torch's MemTracker, i.e.
    deterministic tensor accounting.
    """
    return _activation_bytes(model, [batch_size], input_size, autocast_dtype, step_fn)[batch_size] / batch_size


# ---------------------------------------------------------------------------------------------------------
# Memory: a linear model of the activation memory, the training state, the peak and the largest batch


@dataclass(frozen=True)
class MemoryFit:
    """ Activation memory of a training step as `fixed_bytes + per_image_bytes * batch_size`.

    Fitted through two measured batch sizes: activations grow linearly with the batch, while a few
    buffers (weight-gradient temporaries, the loss) do not, so a single batch would fold those into
    the per-image figure and misjudge how large a batch fits.
    """
    per_image_bytes: float
    fixed_bytes: float
    measured: Dict[int, float] = field(default_factory=dict)  # batch size -> activation bytes (whole batch)

    def activation_bytes(self, batch_size: int) -> float:
        """ Peak minus baseline of one forward + backward at `batch_size`, in bytes. """
        return self.fixed_bytes + self.per_image_bytes * batch_size

    def per_image_at(self, batch_size: int) -> float:
        """ DESIGN.md's activation memory per image at `batch_size` (the fixed part shared by the batch). """
        return self.activation_bytes(batch_size) / batch_size


def activation_memory_fit(
        model: nn.Module,
        batch_sizes: Sequence[int] = (8, 16),
        input_size: Optional[Sequence[int]] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        step_fn: Callable[..., torch.Tensor] = train_step,
) -> MemoryFit:
    """ Per-image and fixed activation memory from `activation_memory_per_image` at two batch sizes. """
    sizes = sorted(set(int(b) for b in batch_sizes))
    if len(sizes) != 2 or sizes[0] <= 0:
        raise ValueError(f'Need two different positive batch sizes, got {tuple(batch_sizes)}.')
    b1, b2 = sizes
    measured = _activation_bytes(model, sizes, input_size, autocast_dtype, step_fn)
    per_image = (measured[b2] - measured[b1]) / (b2 - b1)
    return MemoryFit(per_image_bytes=per_image, fixed_bytes=measured[b1] - per_image * b1, measured=measured)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def training_state_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """ Bytes a training step starts from: parameters, one gradient per trainable parameter, optimizer state.

    Gradients are counted whether or not they exist right now (`zero_grad(set_to_none=True)` frees them
    between steps, but every backward brings them back, so they are part of the peak). Optimizers create
    their state lazily: call this after one optimizer step.
    """
    params = list({id(p): p for p in model.parameters()}.values())
    total = sum(_tensor_bytes(p) for p in params)
    total += sum(_tensor_bytes(p) for p in params if p.requires_grad)
    if optimizer is not None:
        seen = set()
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                    seen.add(value.data_ptr())
                    total += _tensor_bytes(value)
    return total


def input_bytes_per_image(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> int:
    """ Bytes of one input image plus its integer target, in the model's parameter dtype. """
    input_size = input_size or model_input_size(model)
    param = next(model.parameters())
    return math.prod(input_size) * param.element_size() + torch.empty((), dtype=torch.long).element_size()


def predicted_peak_training_memory(
        fit: MemoryFit,
        state_bytes: float,
        batch_size: int,
        input_bytes: float = 0,
) -> float:
    """ Peak bytes of a training step at `batch_size` from the fit: state + batch + activation peak.

    The optimizer step's own temporaries are left out: they appear after the activations are freed and
    stay below the activation peak at any batch worth training with.
    """
    return state_bytes + input_bytes * batch_size + fit.activation_bytes(batch_size)


def max_batch_size(
        fit: MemoryFit,
        state_bytes: float,
        budget_bytes: float,
        input_bytes: float = 0,
) -> int:
    """ Largest batch whose predicted training peak stays within `budget_bytes` (0 if none does). """
    per_image = fit.per_image_bytes + input_bytes
    if per_image <= 0:
        raise ValueError(f'Per-image memory must be positive, got {per_image} bytes.')
    return max(0, math.floor((budget_bytes - state_bytes - fit.fixed_bytes) / per_image))


def _optimizer_step(
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        images: torch.Tensor,
        targets: torch.Tensor,
        autocast_dtype: Optional[torch.dtype],
        step_fn: Callable[..., torch.Tensor],
) -> None:
    # Gradients stay allocated between steps, as in DESIGN.md's baseline (parameters + gradients), so the
    # measured peak and the one predicted from the activation fit count the same things.
    optimizer.zero_grad(set_to_none=False)
    step_fn(model, images, targets, autocast_dtype)
    optimizer.step()


def peak_training_memory(
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batch_size: int,
        input_size: Optional[Sequence[int]] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        step_fn: Callable[..., torch.Tensor] = train_step,
) -> int:
    """ Peak bytes during one full training step (zero_grad keeping the gradients, forward, backward, optimizer step).

    Counts everything the step holds: parameters, gradients, optimizer state, the batch and activations.
    CUDA: the allocator's peak, i.e. every tensor on the device (keep other models off it while measuring);
    CPU: MemTracker, counting the model, the optimizer and the batch. An optimizer without state first takes
    one untracked step at batch 1 (it creates its state lazily), so the figure is that of every later step.
    """
    model.train()
    if not optimizer.state:
        # optimizers create their state in the first step; measure the steady state every later step has
        _optimizer_step(model, optimizer, *_batch(model, 1, input_size), autocast_dtype, step_fn)
    images, targets = _batch(model, batch_size, input_size)
    device = images.device
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        _optimizer_step(model, optimizer, images, targets, autocast_dtype, step_fn)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    from torch.distributed._tools.mem_tracker import MemTracker
    tracker = MemTracker()
    tracker.track_external(model, optimizer, images, targets)
    with tracker:
        _optimizer_step(model, optimizer, images, targets, autocast_dtype, step_fn)
    return tracker.get_tracker_snapshot('peak')[device]['Total']


def largest_batch_in_budget(
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        fit: MemoryFit,
        budget_bytes: float,
        input_size: Optional[Sequence[int]] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        check: Optional[bool] = None,
        max_tries: int = 4,
) -> Tuple[int, Optional[int]]:
    """ The largest batch that fits `budget_bytes`, and the peak bytes of a real step at it (None if unchecked).

    The batch is computed from the fit and the training state; with `check` (default: on CUDA) one real
    training step at that batch confirms it, and the batch shrinks in proportion while the step overshoots
    the budget or runs out of memory. A checked batch of 0 means even the smallest step did not fit.
    """
    device = next(model.parameters()).device
    check = device.type == 'cuda' if check is None else check
    state = training_state_bytes(model, optimizer)
    per_input = input_bytes_per_image(model, input_size)
    batch = max_batch_size(fit, state, budget_bytes, per_input)
    if not check or batch == 0:
        return batch, None
    for _ in range(max_tries):
        try:
            peak = peak_training_memory(model, optimizer, batch, input_size, autocast_dtype)
        except torch.OutOfMemoryError:
            peak = None
        if peak is not None and peak <= budget_bytes:
            return batch, peak
        optimizer.zero_grad(set_to_none=True)
        if device.type == 'cuda':
            torch.cuda.empty_cache()
        shrink = 0.9 if peak is None else 0.99 * budget_bytes / peak
        batch = min(batch - 1, math.floor(batch * shrink))
        if batch <= 0:
            break
    return 0, None


# ---------------------------------------------------------------------------------------------------------
# Speed: round-robin timing of several models in one loop


def default_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """ AdamW, as in the reference study's training; a small rate keeps random-data steps from diverging. """
    return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)


def make_train_step_fn(
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batch_size: int,
        input_size: Optional[Sequence[int]] = None,
        autocast_dtype: Optional[torch.dtype] = None,
) -> Callable[[], None]:
    """ A closure running one full training step (zero_grad, forward, backward, optimizer step) on a fixed batch. """
    images, targets = _batch(model, batch_size, input_size)

    def step() -> None:
        model.train()
        _optimizer_step(model, optimizer, images, targets, autocast_dtype, train_step)
    return step


def make_inference_fn(
        model: nn.Module,
        batch_size: int,
        input_size: Optional[Sequence[int]] = None,
        autocast_dtype: Optional[torch.dtype] = None,
) -> Callable[[], None]:
    """ A closure running one eval-mode forward without autograd on a fixed batch. """
    images, _ = _batch(model, batch_size, input_size)
    autocast = (lambda: torch.autocast(images.device.type, dtype=autocast_dtype)) if autocast_dtype \
        else contextlib.nullcontext

    def forward() -> None:
        model.eval()
        with torch.inference_mode(), autocast():
            model(images)
    return forward


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_host_memory() -> bool:
    """ Make glibc's malloc keep freed memory for reuse, as CUDA's caching allocator does, so that CPU timings
    measure computation. By default glibc serves every large tensor from a fresh mmap and returns it when freed,
    so each training step page-faults its activation buffers in again: a cost that grows with the activations a
    step keeps, which penalises the plain model against the reversible ones. Returns False where the C library
    is not glibc (nothing changed).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def _synchronize(device: Optional[torch.device]) -> None:
    if device is not None and device.type == 'cuda':
        torch.cuda.synchronize(device)


def alternating_timings(
        fns: Mapping[str, Callable[[], object]],
        repeats: int = 5,
        warmup: int = 1,
        device: Optional[torch.device] = None,
        on_round: Optional[Callable[[int], None]] = None,
) -> Dict[str, List[float]]:
    """ Seconds per call of each function, `repeats` timed rounds after `warmup` untimed ones.

    Every round calls each function once; the order flips every round so that no function always
    runs right after the same neighbour. `device` is synchronised around each call (CUDA runs async).
    `on_round(i)` is called after each round (progress display).
    """
    names = list(fns)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        for name in (names if r % 2 == 0 else reversed(names)):
            _synchronize(device)
            start = time.perf_counter()
            fns[name]()
            _synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
        if on_round is not None:
            on_round(r)
    return times


def _device_of(models: Mapping[str, nn.Module]) -> torch.device:
    return next(next(iter(models.values())).parameters()).device


def time_train_steps(
        models: Mapping[str, nn.Module],
        batch_size: int = 16,
        repeats: int = 5,
        warmup: int = 1,
        input_size: Optional[Sequence[int]] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] = default_optimizer,
        on_round: Optional[Callable[[int], None]] = None,
) -> Dict[str, List[float]]:
    """ Seconds per full training step of each model, timed round-robin in one loop (see `alternating_timings`). """
    fns = {
        name: make_train_step_fn(model, optimizer_factory(model), batch_size, input_size, autocast_dtype)
        for name, model in models.items()}
    return alternating_timings(fns, repeats, warmup, _device_of(models), on_round)


def time_inference(
        models: Mapping[str, nn.Module],
        batch_size: int = 16,
        repeats: int = 5,
        warmup: int = 1,
        input_size: Optional[Sequence[int]] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        on_round: Optional[Callable[[int], None]] = None,
) -> Dict[str, List[float]]:
    """ Seconds per eval-mode, no-grad forward of each model, timed round-robin in one loop. """
    fns = {name: make_inference_fn(model, batch_size, input_size, autocast_dtype) for name, model in models.items()}
    return alternating_timings(fns, repeats, warmup, _device_of(models), on_round)


def training_graphs(
        model: nn.Module, batch_size: int = 2, input_size: Optional[Sequence[int]] = None) -> Tuple[int, int]:
    """ (graphs, graph-break sites) of the model's training forward under torch.compile, by `torch._dynamo.explain`.
    A break inside a nested call is one site, and every frame it unwinds through resumes in a graph of its own.
    """
    import torch._dynamo as dynamo

    images, _ = _batch(model, batch_size, input_size)
    was_training = model.training
    dynamo.reset()  # what explain compiled must not stand in for a later torch.compile of the same code
    try:
        explanation = dynamo.explain(model.train())(images)
    finally:
        dynamo.reset()
        model.train(was_training)
    return explanation.graph_count, len(explanation.break_reasons)


def train_step_time_ratio(
        model: nn.Module,
        baseline: nn.Module,
        batch_size: int = 16,
        repeats: int = 5,
        warmup: int = 1,
        input_size: Optional[Sequence[int]] = None,
        autocast_dtype: Optional[torch.dtype] = None,
) -> float:
    """ Median training-step time of `model` over that of `baseline`, both timed alternating in one loop. """
    times = time_train_steps(
        {'model': model, 'baseline': baseline}, batch_size, repeats, warmup, input_size, autocast_dtype)
    return statistics.median(times['model']) / statistics.median(times['baseline'])


def throughput(times: Sequence[float], batch_size: int) -> float:
    """ Images per second from per-call times (median, so one disturbed call does not move it). """
    return batch_size / statistics.median(times)


# ---------------------------------------------------------------------------------------------------------
# Profile: where the time of one training step goes

# Category -> what it counts. The reversible engine labels its regions with `record_function('reversible.*')`;
# the profile adds one range around each call of a block's submodules (the residual functions) and reads
# the optimizer's own ranges. An op counts under the innermost of these ranges; op names decide only inside
# the engine's forward and backward (copies vs the couplings' arithmetic) and, outside every range, forward
# vs autograd's backward.
PROFILE_CATEGORIES: Dict[str, str] = {
    'residual functions': "the blocks' attention and MLP branches in the forward: norms, matmuls, attention, "
                          'activations (the reversible models: in the engine\'s no-grad forward)',
    'backward': "autograd's backward outside the reversible engine: the plain model's whole backward, the "
                'reversible models\' patch embedding, head and loss',
    'recomputation': 'reversible.recompute: residual functions recomputed with grad and backpropagated',
    'reconstruction': 'reversible.reconstruct: the inverse arithmetic that recovers a step\'s input',
    'side information': 'reversible.side_info: grid indices, bit packing and unpacking, random signs, range checks',
    'engine bookkeeping': 'reversible.rng (RNG snapshots and restores), copies in the engine\'s forward and '
                          'backward, and the Python driving them',
    'stream arithmetic': "other ops in the engine's forward and backward: the couplings' updates (adds, "
                         'quantization, packing side bits), gradient sums, reconstruction fingerprints',
    'other forward': 'the rest of the forward: patch embedding, class token and position embedding, the plain '
                     "blocks' residual adds, final norm, head, loss",
    'optimizer': 'zero_grad and the AdamW step',
}

_ENGINE_LABELS = {
    'reversible.recompute': 'recomputation',
    'reversible.reconstruct': 'reconstruction',
    'reversible.side_info': 'side information',
    'reversible.rng': 'engine bookkeeping',
    'reversible.forward': None,  # by op: residual functions, copies or stream arithmetic
    'reversible.backward': None,  # by op: copies or stream arithmetic
}
_OPTIMIZER_LABEL_PREFIXES = ('Optimizer.step#', 'Optimizer.zero_grad#')
_RESIDUAL_LABEL = 'profile.residual'
_AUTOGRAD_PREFIX = 'autograd::engine::evaluate_function'
_STEP_LABEL = 'profile.train_step'
_COPY_OPS = frozenset({
    'aten::copy_', 'aten::clone', 'aten::to', 'aten::_to_copy', 'aten::contiguous', 'aten::zeros_like',
    'aten::empty_like', 'aten::detach', 'aten::detach_', 'detach', 'detach_'})


def profile_category(label: Optional[str], in_residual: bool, op_name: str) -> str:
    """ The category of an op's self time from the innermost engine or optimizer range around it (`label`, None
    outside all), whether a residual function's range lies between that range and the op, and the name of the
    outermost op below the range (the range's own name for the range's own time: Python between its ops).
    """
    if label is not None and label.startswith(_OPTIMIZER_LABEL_PREFIXES):
        return 'optimizer'
    if _ENGINE_LABELS.get(label) is not None:
        return _ENGINE_LABELS[label]
    if label is None and op_name.startswith(_AUTOGRAD_PREFIX):
        return 'backward'  # also what gradient checkpointing recomputes in it
    if in_residual:
        return 'residual functions'
    if label is None:
        return 'other forward'
    return 'engine bookkeeping' if op_name in _COPY_OPS or op_name == label else 'stream arithmetic'


def _is_label(name: str) -> bool:
    return name in _ENGINE_LABELS or name.startswith(_OPTIMIZER_LABEL_PREFIXES)


def _event_category(event) -> str:
    """ Walks from an op up to the step: the innermost label, whether a residual range encloses the op below
    that label, and the outermost op below both. """
    outermost, in_residual, node = event, False, event
    while node is not None and node.name != _STEP_LABEL:
        if _is_label(node.name):
            return profile_category(node.name, in_residual, outermost.name)
        if node.name == _RESIDUAL_LABEL:
            in_residual = True
        else:
            outermost = node
        node = node.cpu_parent
    return profile_category(None, in_residual, outermost.name)


@dataclass(frozen=True)
class StepProfile:
    """ One training step's time by category (`PROFILE_CATEGORIES`), in ms.

    On CPU each op's self CPU time counts; on CUDA the device time of the kernels each op launched. The
    categories and `unattributed_ms` (time inside the step but in no op: Python between ops on CPU, the
    device idle on CUDA) add up to `step_ms`, the step from its start to the end of its last kernel.
    """
    step_ms: float
    times_ms: Dict[str, float]
    unattributed_ms: float
    device_type: str

    def percent(self, category: str) -> float:
        """ A category's (or 'unattributed') share of the step, in %. """
        value = self.unattributed_ms if category == 'unattributed' else self.times_ms[category]
        return 100 * value / self.step_ms


def step_profile_from_events(events: Sequence, device_type: str = 'cpu') -> StepProfile:
    """ A `StepProfile` from torch.profiler's events of one step run inside `record_function(_STEP_LABEL)`. """
    host_events = [e for e in events if e.device_type == DeviceType.CPU]
    step = next(e for e in host_events if e.name == _STEP_LABEL)
    times = dict.fromkeys(PROFILE_CATEGORIES, 0.)
    if device_type == 'cuda':
        # kernels count under the op that launched them, whichever thread it ran in (autograd's is another)
        for event in host_events:
            if event.self_device_time_total:
                times[_event_category(event)] += event.self_device_time_total / 1e3
    else:
        below = list(step.cpu_children)
        while below:
            event = below.pop()
            below.extend(event.cpu_children)
            times[_event_category(event)] += event.self_cpu_time_total / 1e3
    step_ms = step.cpu_time_total / 1e3
    return StepProfile(step_ms, times, step_ms - sum(times.values()), device_type)


@contextlib.contextmanager
def _residual_ranges(model: nn.Module) -> Iterator[None]:
    """ A profiler range around every call of a block's submodules (its norms, attention, MLP, drop-path): the
    residual functions, however a model wires them (a plain block's forward, or a reversible coupling). """
    open_ranges: List[Any] = []

    def enter(module, args):
        open_ranges.append(record_function(_RESIDUAL_LABEL).__enter__())

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    handles = []
    for block in getattr(model, 'blocks', ()):
        for module in block.children():
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _profile_one_step(model: nn.Module, step: Callable[[], None], profiles: List[StepProfile]) -> None:
    device = next(model.parameters()).device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with _residual_ranges(model), profile(activities=activities) as prof:
        with record_function(_STEP_LABEL):
            step()
            _synchronize(device)  # the step ends with its last kernel
    profiles.append(step_profile_from_events(prof.events(), device.type))


def profile_train_steps(
        models: Mapping[str, nn.Module],
        batch_size: int = 16,
        repeats: int = 1,
        warmup: int = 1,
        input_size: Optional[Sequence[int]] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] = default_optimizer,
        on_round: Optional[Callable[[int], None]] = None,
) -> Dict[str, StepProfile]:
    """ Each model's full training step (zero_grad, forward, backward, AdamW step) under torch.profiler, its
    time split by `PROFILE_CATEGORIES`: CPU ops, and CUDA kernels for a CUDA model.

    After `warmup` unprofiled steps, `repeats` steps of each model are profiled, round-robin in one loop as in
    `alternating_timings`; of each model's, the step of median length is returned.
    """
    steps = {
        name: make_train_step_fn(model, optimizer_factory(model), batch_size, input_size, autocast_dtype)
        for name, model in models.items()}
    device = _device_of(models)
    alternating_timings(steps, repeats=0, warmup=warmup, device=device)
    profiles: Dict[str, List[StepProfile]] = {name: [] for name in models}
    alternating_timings(
        {name: functools.partial(_profile_one_step, models[name], steps[name], profiles[name]) for name in models},
        repeats=repeats, warmup=0, device=device, on_round=on_round)
    return {name: sorted(p, key=lambda s: s.step_ms)[len(p) // 2] for name, p in profiles.items()}
