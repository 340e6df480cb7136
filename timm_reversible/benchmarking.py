""" The comparison benchmark: every model at several depths, measured on this machine, as a table and plots,
and the profile of their training steps.

`scripts/benchmark.py` is the command-line front end; this module holds the model specs, the measuring
loops and the reports (terminal table, results.json, results.md, PNG plots; profile.md, profile.json), so
that the figures can also be produced from Python. Definitions of the figures: DESIGN.md, "Measuring memory
and speed", and `timm_reversible.profiling`.
"""
import argparse
import gc
import json
import math
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.utils import ParseKwargs

from .profiling import (
    PROFILE_CATEGORIES, StepProfile, activation_memory_fit, count_flops, count_params, default_optimizer,
    input_bytes_per_image, largest_batch_in_budget, make_train_step_fn, peak_training_memory,
    predicted_peak_training_memory, profile_train_steps, throughput, time_inference, time_train_steps,
    training_graphs, training_state_bytes)
from .utils import MiB, package_models

__all__ = [
    'BASELINE', 'ModelSpec', 'BenchmarkConfig', 'BenchmarkRow', 'parse_model_spec', 'default_model_specs',
    'run_benchmark', 'ProfileRow', 'run_profile', 'find_row', 'format_number', 'format_table', 'compile_markdown',
    'markdown_table',
    'markdown_report', 'profile_tables', 'profile_report', 'plot_memory_vs_depth', 'plot_memory_vs_throughput',
    'write_report', 'write_profile_report', 'machine_info',
]

GiB = 2 ** 30

# Every ratio in the table is against this model at the same depth and width (DESIGN.md).
BASELINE = 'vit_small_cifar'

_GRAD_CKPT_KEYS = ('grad_checkpointing', 'grad_ckpt')


@dataclass
class ModelSpec:
    """ One table row family: a registered model, extra creation kwargs, and whether to checkpoint blocks. """
    name: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    grad_checkpointing: bool = False

    @property
    def label(self) -> str:
        label = self.name + (' + grad ckpt' if self.grad_checkpointing else '')
        if self.kwargs:
            label += ' [' + ','.join(f'{k}={v}' for k, v in self.kwargs.items()) + ']'
        return label

    @property
    def is_baseline(self) -> bool:
        return self.name == BASELINE and not self.kwargs and not self.grad_checkpointing

    def create(self, depth: int, device: str = 'cpu', **common_kwargs: Any) -> nn.Module:
        """ The model at `depth`; `common_kwargs` (e.g. a smaller width for every row) come before the spec's own. """
        model = timm.create_model(self.name, **{**common_kwargs, **self.kwargs, 'depth': depth})
        if self.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model.to(device)


def _parse_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    # the values of a spec read as those of --model-kwargs, by timm's own parser: Python literals, else strings
    for item in items:
        if '=' not in item or not item.partition('=')[0].strip():
            raise ValueError(f'Expected key=value, got {item!r}.')
    namespace = argparse.Namespace()
    ParseKwargs(option_strings=[], dest='kwargs')(None, namespace, [item.strip() for item in items])
    return namespace.kwargs


def parse_model_spec(text: str) -> ModelSpec:
    """ 'name' or 'name:key=value,key=value' -> ModelSpec. Values are Python literals (1, 0.1, True, 'avg') or
    strings, as in `--model-kwargs`. `grad_checkpointing=1` (or True) turns on block checkpointing; every other
    key is passed to `timm.create_model`. """
    name, _, rest = text.partition(':')
    name = name.strip()
    if not timm.is_model(name):
        raise ValueError(f'Unknown model {name!r}; registered by this package: {", ".join(package_models())}.')
    kwargs = _parse_kwargs([item for item in rest.split(',') if item.strip()])
    grad_checkpointing = False
    for key in _GRAD_CKPT_KEYS:
        if key in kwargs:
            value = kwargs.pop(key)
            if value not in (0, 1):  # also True / False; a string such as 'yes' would be truthy
                raise ValueError(f'{text!r}: {key} takes 1 or 0 (True or False), got {value!r}.')
            grad_checkpointing = bool(value)
    if 'depth' in kwargs:
        raise ValueError(f'{text!r}: depth comes from the depth sweep (--depths), not from the model spec.')
    return ModelSpec(name, kwargs, grad_checkpointing)


def default_model_specs() -> List[ModelSpec]:
    """ All registered models, the baseline first, plus the baseline with gradient checkpointing. """
    names = sorted(package_models(), key=lambda n: (n != BASELINE, n))
    specs = [ModelSpec(n) for n in names]
    specs.insert(1, ModelSpec(BASELINE, grad_checkpointing=True))
    return specs


@dataclass
class BenchmarkConfig:
    """ What to measure and how. Fields left None get per-device defaults (`resolved`). """
    depths: Sequence[int] = (6, 12, 24)
    device: str = 'cpu'
    batch_size: Optional[int] = None  # timing batch: 16 on CPU, 128 on CUDA
    # the fit's two batches: (8, 16) on CPU, (64, 128) on CUDA. Below batch 8 some CPU kernels' buffers do not
    # grow with the batch; from 8 on the tracked figure is exactly linear, so the fit extrapolates to 128 exactly.
    memory_batch_sizes: Optional[Tuple[int, int]] = None
    ref_batch: int = 128  # batch the per-image and peak figures are reported at (DESIGN.md, reference study)
    repeats: Optional[int] = None  # timed rounds: 3 on CPU, 20 on CUDA
    warmup: Optional[int] = None  # untimed rounds first: 1 on CPU, 3 on CUDA
    amp: Optional[str] = None  # autocast dtype name ('bfloat16', 'float16') or None for fp32
    mem_budget_gib: float = 8.0
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    check_max_batch: Optional[bool] = None  # one real step at the computed batch: default on CUDA
    compile: bool = False  # also time each model's training step under torch.compile, in the same loop

    def resolved(self) -> 'BenchmarkConfig':
        cuda = torch.device(self.device).type == 'cuda'
        return replace(
            self,
            depths=tuple(dict.fromkeys(int(d) for d in self.depths)),  # in order, each once
            batch_size=self.batch_size or (128 if cuda else 16),
            memory_batch_sizes=tuple(self.memory_batch_sizes or ((64, 128) if cuda else (8, 16))),
            repeats=self.repeats or (20 if cuda else 3),
            warmup=(3 if cuda else 1) if self.warmup is None else self.warmup,
            check_max_batch=cuda if self.check_max_batch is None else self.check_max_batch,
        )

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return getattr(torch, self.amp) if self.amp else None


@dataclass
class BenchmarkRow:
    """ One model at one depth. Memory in MiB, times in ms; ratios are against the baseline at the same depth. """
    model: str
    name: str
    depth: int
    kwargs: Dict[str, Any] = field(default_factory=dict)
    grad_checkpointing: bool = False
    reversible: bool = False
    split_backward: bool = False  # the model recomputes each block's residual in two halves in its backward
    params_m: Optional[float] = None
    gflops: Optional[float] = None  # forward, per image
    act_mib_per_image: Optional[float] = None  # DESIGN.md's definition, at the reference batch
    act_slope_mib_per_image: Optional[float] = None  # the fit's per-image part
    act_fixed_mib: Optional[float] = None  # the fit's batch-independent part
    act_vs_baseline: Optional[float] = None
    state_mib: Optional[float] = None  # parameters + gradients + optimizer state
    peak_train_mib: Optional[float] = None  # a whole training step at the reference batch
    peak_train_measured: bool = False  # False: state + batch + activation fit (CPU), True: a real step (CUDA)
    train_img_s: Optional[float] = None
    infer_img_s: Optional[float] = None
    train_step_ms: Optional[float] = None
    train_step_vs_baseline: Optional[float] = None
    max_batch: Optional[int] = None  # largest batch whose training peak fits the budget
    max_batch_checked: bool = False  # confirmed by one real step at that batch
    max_batch_peak_mib: Optional[float] = None
    train_graphs: Optional[int] = None  # torch.compile: graphs of the training forward (`compile`)
    train_graph_break_sites: Optional[int] = None
    compiled_train_step_ms: Optional[float] = None
    compiled_vs_eager: Optional[float] = None  # compiled train step / eager train step, timed in one loop
    error: Optional[str] = None  # the model could not be measured at all
    timing_error: Optional[str] = None  # the timing loop failed (memory figures still valid)


def _with_baseline(specs: Sequence[ModelSpec]) -> List[ModelSpec]:
    # ratios need the baseline measured in the same run, so it is always a row
    specs = list(specs)
    if not any(s.is_baseline for s in specs):
        specs.insert(0, ModelSpec(BASELINE))
    return specs


def _unique(specs: Sequence[ModelSpec]) -> List[ModelSpec]:
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f'Duplicate model specs: {labels}.')
    return list(specs)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def _measure_memory(spec: ModelSpec, depth: int, cfg: BenchmarkConfig) -> BenchmarkRow:
    """ Size, FLOPs and memory of one model at one depth, with only that model on the device. """
    model = spec.create(depth, cfg.device, **cfg.model_kwargs)
    device = next(model.parameters()).device
    row = BenchmarkRow(
        model=spec.label, name=spec.name, depth=depth, kwargs=dict(spec.kwargs),
        grad_checkpointing=spec.grad_checkpointing,
        reversible=bool(getattr(model, 'reversible', False)),
        split_backward=bool(getattr(model, 'split_backward', False)))
    row.params_m = count_params(model) / 1e6
    row.gflops = count_flops(model) / 1e9
    fit = activation_memory_fit(model, cfg.memory_batch_sizes, autocast_dtype=cfg.autocast_dtype)
    row.act_mib_per_image = fit.per_image_at(cfg.ref_batch) / MiB
    row.act_slope_mib_per_image = fit.per_image_bytes / MiB
    row.act_fixed_mib = fit.fixed_bytes / MiB

    optimizer = default_optimizer(model)
    make_train_step_fn(model, optimizer, 1, autocast_dtype=cfg.autocast_dtype)()  # creates the optimizer state
    if device.type == 'cuda':
        try:
            row.peak_train_mib = peak_training_memory(
                model, optimizer, cfg.ref_batch, autocast_dtype=cfg.autocast_dtype) / MiB
            row.peak_train_measured = True
        except torch.OutOfMemoryError:  # the reference batch does not fit this device: predict it instead
            optimizer.zero_grad(set_to_none=False)
            _free(device)
    if not row.peak_train_measured:
        # a tracked step at batch 128 takes minutes on a CPU; the fit predicts it (exact at the fitted batches)
        row.peak_train_mib = predicted_peak_training_memory(
            fit, training_state_bytes(model, optimizer), cfg.ref_batch, input_bytes_per_image(model)) / MiB
    row.state_mib = training_state_bytes(model, optimizer) / MiB

    check = cfg.check_max_batch
    if check and device.type == 'cuda' and cfg.mem_budget_gib * GiB > torch.cuda.mem_get_info(device)[1]:
        check = False  # the budget is larger than this device: a real step could not confirm it
    batch, peak = largest_batch_in_budget(
        model, optimizer, fit, cfg.mem_budget_gib * GiB, autocast_dtype=cfg.autocast_dtype, check=check)
    row.max_batch, row.max_batch_checked = batch, peak is not None
    row.max_batch_peak_mib = None if peak is None else peak / MiB
    del model, optimizer
    _free(device)
    return row


def _time_depth(
        specs: Sequence[ModelSpec],
        rows: Mapping[str, BenchmarkRow],
        depth: int,
        cfg: BenchmarkConfig,
        on_round=None,
) -> None:
    """ Train-step and inference times of all models at one depth, round-robin in one loop each; with
    `cfg.compile`, each model's compiled training step joins the same loop (the warm-up rounds compile).
    """
    models = {s.label: s.create(depth, cfg.device, **cfg.model_kwargs) for s in specs}
    compiled = {}
    if cfg.compile:
        for label, model in models.items():
            rows[label].train_graphs, rows[label].train_graph_break_sites = training_graphs(model)
        compiled = {label + ' [compiled]': torch.compile(model) for label, model in models.items()}
    train = time_train_steps(
        {**models, **compiled}, cfg.batch_size, cfg.repeats, cfg.warmup, autocast_dtype=cfg.autocast_dtype,
        on_round=on_round)
    infer = time_inference(
        models, cfg.batch_size, cfg.repeats, cfg.warmup, autocast_dtype=cfg.autocast_dtype, on_round=on_round)
    for label in models:
        row = rows[label]
        row.train_step_ms = statistics.median(train[label]) * 1e3
        row.train_img_s = throughput(train[label], cfg.batch_size)
        row.infer_img_s = throughput(infer[label], cfg.batch_size)
        if compiled:
            row.compiled_train_step_ms = statistics.median(train[label + ' [compiled]']) * 1e3
            row.compiled_vs_eager = row.compiled_train_step_ms / row.train_step_ms
    device = next(next(iter(models.values())).parameters()).device
    del models, compiled
    _free(device)


def run_benchmark(
        specs: Optional[Sequence[ModelSpec]] = None,
        config: Optional[BenchmarkConfig] = None,
        progress: bool = True,
) -> List[BenchmarkRow]:
    """ Measure every spec at every depth. The baseline is always included (the ratios need it).

    Per depth: memory, size and FLOPs model by model (only one model on the device at a time, so peaks are
    its own), then train-step and inference times of all models together, alternating, so the speed ratios
    come from one run. A model that fails gets a row with `error` set and is left out of the timing.
    """
    from tqdm.auto import tqdm

    cfg = (config or BenchmarkConfig()).resolved()
    specs = _unique(_with_baseline(specs if specs is not None else default_model_specs()))
    torch.manual_seed(0)

    rounds = 2 * (cfg.warmup + cfg.repeats)
    results: List[BenchmarkRow] = []
    with tqdm(total=len(cfg.depths) * (len(specs) + rounds), disable=not progress, unit='task') as bar:
        for depth in cfg.depths:
            rows: Dict[str, BenchmarkRow] = {}
            for spec in specs:
                bar.set_description(f'memory {spec.label} depth {depth}')
                try:
                    rows[spec.label] = _measure_memory(spec, depth, cfg)
                except Exception as e:  # report the failure as a row and go on with the other models
                    rows[spec.label] = BenchmarkRow(
                        model=spec.label, name=spec.name, depth=depth, kwargs=dict(spec.kwargs),
                        grad_checkpointing=spec.grad_checkpointing, error=f'{type(e).__name__}: {e}')
                    _free(torch.device(cfg.device))
                bar.update()

            working = [s for s in specs if rows[s.label].error is None]
            bar.set_description(f'timing {len(working)} models depth {depth}')
            try:
                if working:
                    _time_depth(working, rows, depth, cfg, on_round=lambda _: bar.update())
            except Exception as e:  # keep the memory figures; the speed columns stay empty
                for spec in working:
                    rows[spec.label].timing_error = f'{type(e).__name__}: {e}'
                _free(torch.device(cfg.device))
            bar.n = (cfg.depths.index(depth) + 1) * (len(specs) + rounds)
            bar.refresh()

            base = next((rows[s.label] for s in specs if s.is_baseline), None)
            for row in rows.values():
                if base is not None and base.error is None and row.error is None:
                    row.act_vs_baseline = row.act_mib_per_image / base.act_mib_per_image
                    if row.train_step_ms is not None and base.train_step_ms is not None:
                        row.train_step_vs_baseline = row.train_step_ms / base.train_step_ms
            results.extend(rows[s.label] for s in specs)
    return results


@dataclass
class ProfileRow:
    """ One model at one depth: where the time of its training step goes (`timm_reversible.profiling`). """
    model: str
    depth: int
    profile: StepProfile


def run_profile(
        specs: Optional[Sequence[ModelSpec]] = None,
        config: Optional[BenchmarkConfig] = None,
        progress: bool = True,
) -> List[ProfileRow]:
    """ Profile one training step of every spec at every depth at the timing batch (`profile_train_steps`):
    per depth, the models are created together and profiled round-robin after their warm-up steps; with
    `repeats` > 1, each model's step of median length is kept.
    """
    from tqdm.auto import tqdm

    cfg = (config or BenchmarkConfig()).resolved()
    specs = _unique(specs if specs is not None else default_model_specs())
    torch.manual_seed(0)
    rows: List[ProfileRow] = []
    with tqdm(total=len(cfg.depths) * cfg.repeats, disable=not progress, unit='round') as bar:
        for depth in cfg.depths:
            bar.set_description(f'profiling {len(specs)} models depth {depth}')
            models = {s.label: s.create(depth, cfg.device, **cfg.model_kwargs) for s in specs}
            profiles = profile_train_steps(
                models, cfg.batch_size, cfg.repeats, cfg.warmup, autocast_dtype=cfg.autocast_dtype,
                on_round=lambda _: bar.update())
            rows += [ProfileRow(label, depth, profiles[label]) for label in models]
            del models
            _free(torch.device(cfg.device))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Tables

def find_row(
        rows: Sequence[BenchmarkRow],
        name: str,
        depth: int,
        grad_checkpointing: bool = False,
) -> Optional[BenchmarkRow]:
    """ The measured row of registered model `name` at `depth`, created without extra kwargs (None if absent). """
    return next((r for r in rows if r.name == name and r.depth == depth and not r.kwargs
                 and r.grad_checkpointing == grad_checkpointing and r.error is None), None)


def format_number(value: Any, digits: int = 2) -> str:
    """ A table cell: thousands separators and `digits` decimals for floats, '-' for a missing value. """
    if value is None:
        return '-'
    if isinstance(value, float):
        if math.isnan(value):
            return '-'
        return f'{value:,.{digits}f}'
    return str(value)


def _table_cells(rows: Sequence[BenchmarkRow], ref_batch: int, budget_gib: float) -> Tuple[List[str], List[List[str]]]:
    header = [
        'model', 'depth', 'params M', 'GFLOPs', 'act MiB/img', f'act x {BASELINE}',
        f'peak MiB @{ref_batch}', 'train img/s', 'infer img/s', f'step x {BASELINE}', f'max batch @{budget_gib:g} GiB']
    body = []
    for r in rows:
        if r.error is not None:
            body.append([r.model, str(r.depth), f'error: {r.error}'] + [''] * (len(header) - 3))
            continue
        peak = format_number(r.peak_train_mib, 0) + ('' if r.peak_train_measured else '*')
        max_batch = format_number(r.max_batch) + (' ok' if r.max_batch_checked else '*')
        body.append([
            r.model, str(r.depth), format_number(r.params_m), format_number(r.gflops, 3),
            format_number(r.act_mib_per_image), format_number(r.act_vs_baseline, 3), peak,
            format_number(r.train_img_s, 1), format_number(r.infer_img_s, 1),
            format_number(r.train_step_vs_baseline, 3), max_batch])
    return header, body


def format_table(rows: Sequence[BenchmarkRow], ref_batch: int = 128, budget_gib: float = 8.0) -> str:
    """ Plain-text table for the terminal. """
    header, body = _table_cells(rows, ref_batch, budget_gib)
    widths = [max(len(line[i]) for line in [header] + [b for b in body if not b[2].startswith('error')])
              for i in range(len(header))]
    lines = []
    for line in [header] + body:
        if line[2].startswith('error'):
            lines.append(f'{line[0]:<{widths[0]}}  {line[1]:>{widths[1]}}  {line[2]}')
            continue
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]
        lines.append('  '.join(cells))
        if line is header:
            lines.append('  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def compile_markdown(rows: Sequence[BenchmarkRow]) -> str:
    """ The torch.compile section of a run with `compile`: graphs and break sites of each model's training forward,
    and its compiled training step against the eager one. """
    header = ['model', 'depth', 'graphs (training forward)', 'graph-break sites', 'eager step ms',
              'compiled step ms', 'compiled x eager']
    body = [[r.model, str(r.depth), format_number(r.train_graphs), format_number(r.train_graph_break_sites),
             format_number(r.train_step_ms, 1), format_number(r.compiled_train_step_ms, 1),
             format_number(r.compiled_vs_eager, 3)] for r in rows if r.compiled_vs_eager is not None]
    return markdown_table(header, body)


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """ A markdown table, the first column left-aligned and the others right-aligned. """
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(['---'] + ['---:'] * (len(header) - 1)) + '|']
    lines += ['| ' + ' | '.join(c.replace('|', '\\|') for c in line) + ' |' for line in body]
    return '\n'.join(lines)


def _settings_lines(meta: Mapping[str, Any]) -> List[str]:
    lines = [f"Command: `{meta['command']}`  ", f"Date: {meta['date']}  ", f"Machine: {meta['machine']}  "]
    if not str(meta.get('device', '')).startswith('cuda') and 'host_allocator' in meta:
        lines.append('Host allocator: ' + (
            'malloc keeps freed memory (as CUDA\'s caching allocator does): timings measure computation  '
            if meta['host_allocator'] == 'keep' else
            'glibc\'s default (large buffers returned on free and page-faulted in again every step)  '))
    return lines


def markdown_report(
        rows: Sequence[BenchmarkRow],
        meta: Mapping[str, Any],
        sections: Optional[Mapping[str, str]] = None,
) -> str:
    """ results.md: how the figures were made and the table, then `sections` (title -> markdown) in order. """
    ref_batch, budget = meta['ref_batch'], meta['mem_budget_gib']
    header, body = _table_cells(rows, ref_batch, budget)
    lines = [
        '# timm-reversible benchmark', '', *_settings_lines(meta),
        f"Settings: device {meta['device']}, {meta['precision']}, timing batch {meta['batch_size']} "
        f"({meta['warmup']} warm-up + {meta['repeats']} timed rounds, medians), memory fitted at batches "
        f"{meta['memory_batch_sizes'][0]} and {meta['memory_batch_sizes'][1]}, reported at batch {ref_batch}, "
        f"budget {budget:g} GiB.", '',
        markdown_table(header, body), '',
        f'- act MiB/img: activation memory per image (DESIGN.md: peak of live tensors during forward + backward '
        f'minus what was held before, over the batch) at batch {ref_batch}, from the linear fit through the two '
        f"measured batches; {meta['memory_method']}.",
        f'- act x / step x {BASELINE}: ratio to {BASELINE} at the same depth; step = zero_grad + forward + backward '
        f'+ AdamW step, all models timed round-robin in one loop.',
        f'- peak MiB @{ref_batch}: whole training step (parameters, gradients, AdamW state, batch, activations); '
        '`*` = predicted from the fit (exact at the fitted batches on CPU), otherwise measured.',
        f'- max batch @{budget:g} GiB: largest batch whose training peak fits the budget, from the per-image and '
        'fixed costs; `ok` = confirmed by one real step at that batch, `*` = computed only.',
        '- train / infer img/s: throughput at the timing batch, warm-up excluded, device synchronised.', '',
    ]
    for title, text in (sections or {}).items():
        lines += [f'## {title}', '', text, '']
    return '\n'.join(lines)


def profile_tables(rows: Sequence[ProfileRow]) -> str:
    """ Markdown: per depth, every model's share of its step by category, then one table per model in ms. """
    lines = []
    for depth in dict.fromkeys(r.depth for r in rows):
        at_depth = [r for r in rows if r.depth == depth]
        header = ['% of the step'] + [r.model for r in at_depth]
        body = [[category] + [format_number(r.profile.percent(category), 1) for r in at_depth]
                for category in [*PROFILE_CATEGORIES, 'unattributed']]
        body.append(['step ms'] + [format_number(r.profile.step_ms, 1) for r in at_depth])
        lines += [f'### Depth {depth}', '', markdown_table(header, body), '']
        for r in at_depth:
            p = r.profile
            body = [[category, format_number(p.times_ms[category], 1), format_number(p.percent(category), 1)]
                    for category in PROFILE_CATEGORIES]
            body += [['unattributed', format_number(p.unattributed_ms, 1), format_number(p.percent('unattributed'), 1)],
                     ['step', format_number(p.step_ms, 1), '100.0']]
            lines += [f'#### {r.model}, depth {depth}', '', markdown_table(['category', 'ms', '% of step'], body), '']
    return '\n'.join(lines)


def profile_report(rows: Sequence[ProfileRow], meta: Mapping[str, Any]) -> str:
    """ profile.md: how the profile was taken, what each category counts, the tables. """
    kind = 'device time of the kernels each op launched' if meta['device'].startswith('cuda') \
        else 'self CPU time of each op'
    return '\n'.join([
        '# timm-reversible: where a training step\'s time goes', '', *_settings_lines(meta),
        f"Settings: device {meta['device']}, {meta['precision']}, batch {meta['batch_size']}, "
        f"{meta['warmup']} warm-up step(s), then {meta['repeats']} profiled step(s) per model, round-robin "
        'between the models; the step of median length is shown.', '',
        f'torch.profiler over one training step (zero_grad, forward, backward, AdamW step); {kind}, counted '
        'under the innermost labelled range around the op:', '',
        *[f'- **{category}**: {text}.' for category, text in PROFILE_CATEGORIES.items()],
        '- **unattributed**: time inside the step but in no op (Python between ops; on CUDA, the device idle).',
        '', profile_tables(rows)])


def write_profile_report(rows: Sequence[ProfileRow], meta: Mapping[str, Any], out_dir: os.PathLike) -> Dict[str, Path]:
    """ profile.json and profile.md in `out_dir`. """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {'json': out / 'profile.json', 'markdown': out / 'profile.md'}
    payload = {
        'meta': dict(meta), 'categories': PROFILE_CATEGORIES,
        'rows': [dict(model=r.model, depth=r.depth, **asdict(r.profile)) for r in rows]}
    paths['json'].write_text(json.dumps(payload, indent=2, default=str) + '\n')
    paths['markdown'].write_text(profile_report(rows, meta))
    return paths


# ---------------------------------------------------------------------------------------------------------
# Plots

def _by_model(rows: Sequence[BenchmarkRow]) -> Dict[str, List[BenchmarkRow]]:
    out: Dict[str, List[BenchmarkRow]] = {}
    for r in rows:
        if r.error is None:
            out.setdefault(r.model, []).append(r)
    return {k: sorted(v, key=lambda r: r.depth) for k, v in out.items()}


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')  # files only: works without a display
    import matplotlib.pyplot as plt
    return plt


def plot_memory_vs_depth(rows: Sequence[BenchmarkRow], path: os.PathLike, title_suffix: str = '') -> Path:
    """ Activation memory per image against depth, one line per model; the right panel leaves out the plain
    baseline so that the memory-saving models, crowded near zero on the left, can be told apart. """
    plt = _pyplot()
    series = _by_model(rows)
    colours = {label: f'C{i}' for i, label in enumerate(series)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    panels = [(axes[0], 'all models'), (axes[1], f'without plain {BASELINE}')]
    for i, (ax, subtitle) in enumerate(panels):
        for label, model_rows in series.items():
            if i == 1 and label == BASELINE:
                continue
            ax.plot([r.depth for r in model_rows], [r.act_mib_per_image for r in model_rows], marker='o',
                    color=colours[label], label=label)
        ax.set_xticks(sorted({r.depth for r in rows}))
        ax.set_xlabel('depth (blocks)')
        ax.set_ylim(bottom=0)
        ax.set_title(subtitle)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('activation memory per image (MiB)')
    axes[0].legend(fontsize=8)
    fig.suptitle('Activation memory per image vs depth' + title_suffix)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_memory_vs_throughput(rows: Sequence[BenchmarkRow], path: os.PathLike, title_suffix: str = '') -> Path:
    """ Activation memory per image against training throughput, one panel per depth, one colour per model.

    One panel per depth because throughput falls with depth for every model: in a single panel the depth,
    not the model, would set the x position.
    """
    plt = _pyplot()
    series = _by_model(rows)
    depths = sorted({r.depth for r in rows if r.error is None})
    fig, axes = plt.subplots(1, max(len(depths), 1), figsize=(3.6 * max(len(depths), 1) + 1.5, 4.2), dpi=120,
                             squeeze=False)
    colours = {label: f'C{i}' for i, label in enumerate(series)}
    for ax, depth in zip(axes[0], depths):
        for label, model_rows in series.items():
            for r in model_rows:
                if r.depth == depth and r.train_img_s is not None:
                    ax.scatter(r.train_img_s, r.act_mib_per_image, color=colours[label], s=40, label=label)
        ax.set_title(f'depth {depth}')
        ax.set_xlabel('training throughput (img/s)')
        ax.set_xlim(0, 1.12 * max([r.train_img_s for r in rows if r.depth == depth and r.train_img_s] or [1]))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel('activation memory per image (MiB)')
    handles = [plt.Line2D([], [], marker='o', linestyle='', color=c, label=label) for label, c in colours.items()]
    fig.legend(handles=handles, loc='center right', fontsize=8)
    fig.suptitle('Memory vs training speed (lower right is better)' + title_suffix)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# Output

def machine_info(device: str) -> str:
    """ A one-line description of where the figures were measured. """
    dev = torch.device(device)
    if dev.type == 'cuda':
        where = torch.cuda.get_device_name(dev)
    else:
        where = platform.processor() or platform.machine()
        try:
            with open('/proc/cpuinfo') as f:
                where = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), where)
        except OSError:
            pass
        threads = torch.get_num_threads()
        where += f', {threads} thread' + ('s' if threads != 1 else '')
    return f'{where}; torch {torch.__version__}, timm {timm.__version__}'


def write_report(
        rows: Sequence[BenchmarkRow],
        meta: Mapping[str, Any],
        out_dir: os.PathLike,
        sections: Optional[Mapping[str, str]] = None,
        extra: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Path]:
    """ results.json, results.md, memory_vs_depth.png and memory_vs_throughput.png in `out_dir`.

    `sections` (title -> markdown) go after the table in results.md, `extra` (key -> JSON-able value) beside
    'meta' and 'rows' in results.json: figures to compare with that are not measured here.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        'json': out / 'results.json',
        'markdown': out / 'results.md',
        'memory_vs_depth': plot_memory_vs_depth(
            rows, out / 'memory_vs_depth.png', f" ({meta['device']}, batch {meta['ref_batch']})"),
        'memory_vs_throughput': plot_memory_vs_throughput(
            rows, out / 'memory_vs_throughput.png',
            f"\n({meta['device']}; memory at batch {meta['ref_batch']}, speed at batch {meta['batch_size']})"),
    }
    payload = {'meta': dict(meta), 'rows': [asdict(r) for r in rows], **(extra or {})}
    paths['json'].write_text(json.dumps(payload, indent=2, default=str) + '\n')
    paths['markdown'].write_text(markdown_report(rows, meta, sections))
    return paths
