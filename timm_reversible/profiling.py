""" Measuring a model: parameters, FLOPs and activation memory per image (definitions in DESIGN.md). """
import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_params', 'count_flops', 'activation_memory_per_image', 'train_step']


def count_params(model: nn.Module) -> int:
    """ Number of parameters (shared parameters counted once). """
    return sum(p.numel() for p in model.parameters())


@flop_counter.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
def _sdpa_cpu_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    # torch counts the CUDA attention kernels but not the fused CPU one; count it the same way
    return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)


def count_flops(model: nn.Module, input_size: Optional[Sequence[int]] = None, batch_size: int = 1) -> int:
    """ Forward FLOPs per image (2 per multiply-add) at the model's input size, eval mode, no grad. """
    input_size = input_size or model.pretrained_cfg['input_size']
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
    input_size = input_size or model.pretrained_cfg['input_size']
    num_classes = model.num_classes
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, *input_size, generator=generator, dtype=dtype).to(device)
    targets = torch.randint(0, max(num_classes, 1), (batch_size,), generator=generator).to(device)
    model.train()

    step_fn(model, images, targets, autocast_dtype)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()

    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step_fn(model, images, targets, autocast_dtype)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        from torch.distributed._tools.mem_tracker import MemTracker
        tracker = MemTracker()
        tracker.track_external(model, images, targets)
        with tracker:
            before = tracker.get_tracker_snapshot('current')[device]['Total']
            step_fn(model, images, targets, autocast_dtype)
        peak = tracker.get_tracker_snapshot('peak')[device]['Total']
    return (peak - before) / batch_size
