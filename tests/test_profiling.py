""" The measurement functions on workloads whose figures are known exactly (no timing assertions). """
import math

import pytest
import timm
import torch
import torch.nn as nn

from timm_reversible import profiling
from timm_reversible.profiling import (
    MemoryFit, activation_memory_fit, activation_memory_per_image, alternating_timings, count_flops, count_params,
    default_optimizer, input_bytes_per_image, largest_batch_in_budget, max_batch_size, peak_training_memory,
    predicted_peak_training_memory, throughput, time_inference, time_train_steps, train_step_time_ratio,
    training_state_bytes)

from conftest import SMALL

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
