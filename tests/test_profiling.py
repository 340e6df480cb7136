""" The measurement functions on workloads whose figures are known exactly (no timing assertions). """
import math

import pytest
import timm
import torch
import torch.nn as nn
from torch.autograd.profiler_util import FunctionEvent

from timm_reversible import profiling
from timm_reversible.profiling import (
    PROFILE_CATEGORIES, MemoryFit, StepProfile, activation_memory_fit, activation_memory_per_image,
    alternating_timings, count_flops, count_params, default_optimizer, input_bytes_per_image,
    largest_batch_in_budget, max_batch_size, peak_training_memory, predicted_peak_training_memory, profile_category,
    profile_train_steps, step_profile_from_events, throughput, time_inference, time_train_steps,
    train_step_time_ratio, training_state_bytes)

from conftest import SMALL, package_models

pytestmark = pytest.mark.usefixtures('one_thread')


class Probe(nn.Module):
    """ A model with the attributes the measurement functions read, around a single linear layer. """

    def __init__(self, in_features: int = 16, out_features: int = 8, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(in_features, out_features, bias=bias)
        self.num_classes = out_features
        self.pretrained_cfg = {'input_size': (in_features,)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def allocating_step(per_image_floats: int, fixed_floats: int = 0):
    """ A step_fn that holds exactly `fixed + per_image * batch` float32 values at its peak, and nothing else. """
    def step(model, images, targets, autocast_dtype=None):
        buffer = torch.empty(fixed_floats + per_image_floats * images.shape[0], dtype=torch.float32)
        del buffer
        return images.new_zeros(())  # allocated after the buffer is freed: does not move the peak
    return step


def test_count_params_of_a_linear_layer_and_shared_weights():
    assert count_params(nn.Linear(7, 5)) == 7 * 5 + 5
    shared = nn.Linear(4, 4)
    assert count_params(nn.Sequential(shared, shared)) == 4 * 4 + 4


def test_count_flops_of_a_linear_layer():
    # FlopCounterMode counts 2 per multiply-add; the bias add is not a multiply-add
    assert count_flops(Probe(16, 8)) == 2 * 16 * 8
    assert count_flops(Probe(16, 8), batch_size=4) == 2 * 16 * 8
    assert count_flops(Probe(10, 3), input_size=(10,)) == 2 * 10 * 3


def test_activation_memory_of_a_known_workload_is_exact():
    per_image = activation_memory_per_image(Probe(), batch_size=4, step_fn=allocating_step(256))
    assert per_image == 256 * 4  # bytes per image


def test_memory_fit_separates_fixed_and_per_image_bytes():
    fit = activation_memory_fit(Probe(), batch_sizes=(2, 6), step_fn=allocating_step(256, fixed_floats=1000))
    assert fit.per_image_bytes == 256 * 4
    assert fit.fixed_bytes == 1000 * 4
    assert fit.measured == {2: 4000 + 2 * 1024, 6: 4000 + 6 * 1024}
    assert fit.per_image_at(8) == (4000 + 8 * 1024) / 8
    with pytest.raises(ValueError):
        activation_memory_fit(Probe(), batch_sizes=(4, 4), step_fn=allocating_step(1))


def test_training_state_counts_params_grads_and_adam_state():
    model = Probe(16, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    n = 16 * 8 + 8
    assert training_state_bytes(model) == 2 * n * 4  # gradients count before they exist: they do at the peak
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    # Adam: two moments per parameter plus a scalar step counter per parameter tensor
    steps = sum(s['step'].numel() * s['step'].element_size() for s in optimizer.state.values())
    assert training_state_bytes(model, optimizer) == 4 * n * 4 + steps


def test_max_batch_from_budget():
    fit = MemoryFit(per_image_bytes=1000, fixed_bytes=500)
    assert max_batch_size(fit, state_bytes=2000, budget_bytes=2000 + 500 + 10 * 1100, input_bytes=100) == 10
    assert max_batch_size(fit, state_bytes=2000, budget_bytes=2000 + 500 + 10 * 1100 - 1, input_bytes=100) == 9
    assert max_batch_size(fit, state_bytes=10 ** 6, budget_bytes=10) == 0
    assert predicted_peak_training_memory(fit, 2000, 10, input_bytes=100) == 2000 + 500 + 10 * 1100


def test_measured_peak_matches_the_prediction_at_a_fitted_batch():
    # CPU tracking is exact tensor accounting, so state + batch + activation peak is what a real step holds
    model = timm.create_model('vit_small_cifar', **SMALL)
    fit = activation_memory_fit(model, batch_sizes=(2, 4))
    optimizer = default_optimizer(model)
    peak = peak_training_memory(model, optimizer, 4)
    state = training_state_bytes(model, optimizer)
    predicted = predicted_peak_training_memory(fit, state, 4, input_bytes_per_image(model))
    assert peak == pytest.approx(predicted, rel=1e-6)
    assert input_bytes_per_image(model) == 3 * 32 * 32 * 4 + 8

    batch, checked_peak = largest_batch_in_budget(model, optimizer, fit, budget_bytes=peak, check=True)
    assert batch >= 4 and checked_peak is not None and checked_peak <= peak
    batch, checked_peak = largest_batch_in_budget(model, optimizer, fit, budget_bytes=peak)
    assert batch >= 4 and checked_peak is None  # CPU: computed, not checked, by default


def test_alternating_timings_round_robin_excludes_warmup():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in 'abc'}
    times = alternating_timings(fns, repeats=3, warmup=2)
    assert calls == list('abc' 'cba' 'abc' 'cba' 'abc')
    assert {name: len(t) for name, t in times.items()} == {'a': 3, 'b': 3, 'c': 3}
    assert throughput([0.5, 0.25, 1.0], batch_size=8) == 8 / 0.5


def test_timing_functions_run_a_real_step():
    tiny = dict(SMALL, embed_dim=32, depth=1)
    models = {'a': timm.create_model('vit_small_cifar', **tiny), 'b': timm.create_model('vit_small_cifar', **tiny)}
    before = models['a'].head.weight.detach().clone()
    train = time_train_steps(models, batch_size=2, repeats=2, warmup=1)
    assert not torch.equal(before, models['a'].head.weight)  # the optimizer stepped
    infer = time_inference(models, batch_size=2, repeats=2, warmup=0)
    for times in (train, infer):
        assert set(times) == {'a', 'b'} and all(len(t) == 2 and min(t) > 0 for t in times.values())
    ratio = train_step_time_ratio(models['a'], models['b'], batch_size=2, repeats=1, warmup=0)
    assert math.isfinite(ratio) and ratio > 0


def test_peak_only_tracker_agrees_with_memtracker(monkeypatch):
    from torch.distributed._tools.mem_tracker import MemTracker
    model = timm.create_model('vit_small_cifar', **SMALL)
    fast = activation_memory_per_image(model, batch_size=2)
    monkeypatch.setattr(profiling, '_mem_tracker', MemTracker)
    assert activation_memory_per_image(model, batch_size=2) == fast


# ---------------------------------------------------------------------------------------------------------
# The profile of a training step

@pytest.mark.parametrize('label, in_residual, op, category', [
    ('reversible.recompute', True, 'aten::linear', 'recomputation'),  # the innermost engine label decides
    ('reversible.reconstruct', False, 'aten::sub_', 'reconstruction'),
    ('reversible.side_info', False, 'aten::round_', 'side information'),
    ('reversible.rng', False, 'reversible.rng', 'engine bookkeeping'),
    ('reversible.forward', True, 'aten::linear', 'residual functions'),
    ('reversible.forward', False, 'aten::copy_', 'engine bookkeeping'),
    ('reversible.forward', False, 'reversible.forward', 'engine bookkeeping'),  # the loop's own Python
    ('reversible.forward', False, 'aten::round_', 'stream arithmetic'),
    ('reversible.backward', False, 'aten::add_', 'stream arithmetic'),
    ('reversible.backward', False, 'aten::zeros_like', 'engine bookkeeping'),
    ('Optimizer.step#AdamW.step', False, 'aten::lerp_', 'optimizer'),
    ('Optimizer.zero_grad#AdamW.zero_grad', False, 'aten::zero_', 'optimizer'),
    (None, True, 'aten::layer_norm', 'residual functions'),
    (None, True, 'autograd::engine::evaluate_function: CheckpointFunctionBackward', 'backward'),
    (None, False, 'autograd::engine::evaluate_function: MmBackward0', 'backward'),
    (None, False, 'aten::cross_entropy_loss', 'other forward'),
])
def test_profile_category_rules(label, in_residual, op, category):
    assert profile_category(label, in_residual, op) == category


def _event(name, start, end, parent=None, kernel_us=0):
    event = FunctionEvent(id=start, name=name, thread=1, start_us=start, end_us=end, use_device='cuda')
    if kernel_us:
        event.append_kernel(name, 0, kernel_us)
    if parent is not None:
        event.set_cpu_parent(parent)
        parent.append_cpu_child(event)
    return event


def _step_events():
    """ A step of 100 us: each op's self time (and kernel time) is known, so is each category's. """
    step = _event('profile.train_step', 0, 100)
    forward = _event('reversible.forward', 1, 41, step)
    residual = _event('profile.residual', 2, 22, forward)
    _event('aten::linear', 3, 21, residual, kernel_us=7)  # 18 us
    _event('aten::copy_', 22, 25, forward)  # 3 us
    side_info = _event('reversible.side_info', 25, 35, forward)
    _event('aten::round_', 26, 34, side_info, kernel_us=2)  # 8 us; side_info's own 2 us
    backward = _event('autograd::engine::evaluate_function: _ReversibleFunctionBackward', 41, 81, step)
    recompute = _event('reversible.recompute', 42, 80, _event('reversible.backward', 41, 81, backward))
    _event('aten::mm', 43, 79, _event('profile.residual', 42, 80, recompute), kernel_us=11)  # 36 us
    _event('Optimizer.step#AdamW.step', 82, 97, step, kernel_us=5)  # 15 us
    return [step] + _descendants(step)


def _descendants(event):
    return [e for child in event.cpu_children for e in [child] + _descendants(child)]


def test_step_profile_counts_each_op_under_its_innermost_label():
    profile = step_profile_from_events(_step_events())
    assert profile.step_ms == 0.1 and profile.device_type == 'cpu'
    expected_us = {
        'residual functions': 2 + 18,  # the range's own time and the linear's
        'recomputation': 2 + 36,  # the recompute range holds only the residual range: 0 us of its own
        'side information': 2 + 8,
        # the copy; the engine forward's own 40 - 20 - 3 - 10 us; the engine backward's own 40 - 38 us
        'engine bookkeeping': 3 + 7 + 2,
        'optimizer': 15,
    }
    assert {c: round(t * 1e3, 6) for c, t in profile.times_ms.items() if t} == expected_us
    assert list(profile.times_ms) == list(PROFILE_CATEGORIES)
    assert profile.unattributed_ms == pytest.approx(5 / 1e3)  # the step's own time
    assert profile.percent('recomputation') == pytest.approx(38.0)
    assert profile.percent('unattributed') == pytest.approx(5.0)


def test_step_profile_on_cuda_counts_kernel_time():
    profile = step_profile_from_events(_step_events(), 'cuda')
    assert profile.device_type == 'cuda'
    assert {c: round(t * 1e3, 6) for c, t in profile.times_ms.items() if t} == {
        'residual functions': 7, 'side information': 2, 'recomputation': 11, 'optimizer': 5}
    assert profile.unattributed_ms == pytest.approx((100 - 25) / 1e3)  # the device idles for the rest of the step


ENGINE_CATEGORIES = ('recomputation', 'reconstruction', 'side information', 'engine bookkeeping', 'stream arithmetic')


def test_profile_of_a_training_step_of_every_model():
    models = {name: timm.create_model(name, **SMALL) for name in package_models()}
    profiles = profile_train_steps(models, batch_size=2, warmup=1)
    for name, p in profiles.items():
        times = p.times_ms
        print(name, f'{p.step_ms:.1f} ms:', ', '.join(f'{c} {p.percent(c):.1f}%' for c in times))
        assert list(times) == list(PROFILE_CATEGORIES) and p.device_type == 'cpu'
        assert min(times.values()) >= 0 and p.unattributed_ms >= 0
        # every op's self time is counted once: the categories and the time between ops make up the step
        assert sum(times.values()) + p.unattributed_ms == pytest.approx(p.step_ms, rel=1e-9)
        assert times['residual functions'] > 0 and times['other forward'] > 0 and times['optimizer'] > 0
        assert times['backward'] > 0  # the plain model's backward, the reversible models' head and embedding
    assert not any(profiles['vit_small_cifar'].times_ms[c] for c in ENGINE_CATEGORIES)
    for name in ('revvit_small_cifar', 'bdia_vit_small_cifar', 'momentum_revvit_small'):
        assert all(profiles[name].times_ms[c] > 0 for c in ENGINE_CATEGORIES if c != 'side information'), name
    assert profiles['revvit_small_cifar'].times_ms['side information'] == 0
    assert profiles['bdia_vit_small_cifar'].times_ms['side information'] > 0
    assert profiles['momentum_revvit_small'].times_ms['side information'] > 0
    # the residual functions' profiler ranges are gone once profiled
    assert not any(m._forward_hooks or m._forward_pre_hooks for model in models.values() for m in model.modules())


def test_profile_keeps_each_models_step_of_median_length(monkeypatch):
    lengths = iter([5., 1., 2., 9., 3., 4.])  # rounds alternate a, b then b, a: a gets 5, 9, 3 and b 1, 2, 4
    monkeypatch.setattr(profiling, 'step_profile_from_events', lambda events, device_type: StepProfile(
        next(lengths), dict.fromkeys(PROFILE_CATEGORIES, 0.), 0., device_type))
    tiny = dict(SMALL, embed_dim=32, depth=1)
    models = {'a': timm.create_model('vit_small_cifar', **tiny), 'b': timm.create_model('vit_small_cifar', **tiny)}
    rounds = []
    profiles = profile_train_steps(models, batch_size=1, repeats=3, warmup=0, on_round=rounds.append)
    assert {name: p.step_ms for name, p in profiles.items()} == {'a': 5., 'b': 2.}
    assert rounds == [0, 1, 2]
