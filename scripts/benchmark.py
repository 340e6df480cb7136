#!/usr/bin/env python3
""" Compare the package's models on this machine: size, FLOPs, memory, speed, and the largest batch in a budget.

    python scripts/benchmark.py                                  # all registered models + grad-ckpt baseline
    python scripts/benchmark.py --device cuda --amp --mem-budget 8
    python scripts/benchmark.py --models vit_small_cifar revvit_small_cifar \\
        bdia_vit_small_cifar:split_backward=True --depths 6 12 24
    python scripts/benchmark.py --models vit_small_cifar --depths 1 2 --model-kwargs embed_dim=32 num_heads=2
    python scripts/benchmark.py --profile --depths 6 --batch-size 32  # where a training step's time goes

A model spec is `name[:key=value,...]`: keys go to `timm.create_model`, except `grad_checkpointing=1`, which
turns on timm's per-block gradient checkpointing. vit_small_cifar is always measured, as every ratio is
against it at the same depth. Writes results.json, results.md, memory_vs_depth.png and
memory_vs_throughput.png to --out; with --profile, profile.json and profile.md instead (torch.profiler over
one training step per model). Definitions of the figures: timm_reversible/benchmarking.py and profiling.py.
The project's targets and the reference study's published figures are printed and written beside the
measurements; they are this script's, not the library's.
"""
import argparse
import shlex
import sys
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Sequence

import torch
from timm.utils import ParseKwargs

import timm_reversible  # noqa: F401  registers the package's models with timm
from timm_reversible.benchmarking import (
    BASELINE, BenchmarkConfig, BenchmarkRow, compile_markdown, default_model_specs, find_row, format_number,
    format_table, machine_info, markdown_table, parse_model_spec, profile_tables, run_benchmark, run_profile,
    write_profile_report, write_report)
from timm_reversible.profiling import keep_freed_host_memory

# Figures published by the reference study (CIFAR-10, measured on its laptop GPU, batch 128). They are shown
# beside ours for comparison only; nothing here was measured by this package.
REFERENCE_STUDY: Dict[str, Any] = {
    'description': "reference study's published figures (CIFAR-10, its laptop GPU, batch 128), not measured here",
    'batch_size': 128,
    'params_m': 9.59,
    'gflops': 1.237,
    'models': {
        'vit_small_cifar': {'label': 'ViT', 'peak_mib': 1508, 'top1': 88.26},
        'revvit_small_cifar': {'label': 'RevViT', 'peak_mib': 730, 'top1': 86.99},
        'bdia_vit_small_cifar': {'label': 'BDIA', 'peak_mib': 909, 'top1': 88.99},
    },
}

# The project's training-step time goals against vanilla at the same depth: 4/3 is the FLOP floor of one
# recomputation; the exact models may pay a little more for their side information.
STEP_TIME_LIMITS = {'revvit_small_cifar': 1.33, 'bdia_vit_small_cifar': 1.35, 'momentum_revvit_small': 1.40}
EXACT_MODELS = ('bdia_vit_small_cifar', 'momentum_revvit_small')


def target_checks(rows: Sequence[BenchmarkRow]) -> List[Dict[str, Any]]:
    """ The project's memory and speed targets, evaluated on the rows that exist (reported, never asserted). """
    checks = []

    def add(target: str, value: float, limit: float, strict: bool = False) -> None:
        ok = value < limit if strict else value <= limit
        checks.append(dict(target=target, value=round(value, 4), limit=round(limit, 4), met=bool(ok)))

    for depth in sorted({r.depth for r in rows}):
        base = find_row(rows, BASELINE, depth)
        ckpt = find_row(rows, BASELINE, depth, grad_checkpointing=True)
        rev = find_row(rows, 'revvit_small_cifar', depth)
        if rev and base and depth in (6, 24):
            limit = 0.25 if depth == 6 else 0.07
            add(f'revvit / vanilla activation memory, depth {depth}', rev.act_vs_baseline, limit)
        if rev and ckpt:
            add(f'revvit activation memory below vanilla + grad ckpt, depth {depth} (MiB/img)',
                rev.act_mib_per_image, ckpt.act_mib_per_image, strict=True)
        for r in rows:
            if r.depth != depth or r.error is not None or not r.reversible:
                continue
            if rev and r.name in EXACT_MODELS:
                add(f'{r.model} / revvit activation memory, depth {depth}'
                    + (' (split recomputation)' if r.split_backward else ''),
                    r.act_mib_per_image / rev.act_mib_per_image, 1.10 if r.split_backward else 1.25)
            if r.name in STEP_TIME_LIMITS and r.train_step_vs_baseline is not None:
                add(f'{r.model} / vanilla train-step time, depth {depth} (floor 4/3)', r.train_step_vs_baseline,
                    STEP_TIME_LIMITS[r.name])
    return checks


def targets_markdown(checks: Sequence[Dict[str, Any]]) -> str:
    return markdown_table(['target', 'value', 'limit', 'met'], [
        [c['target'], f"{c['value']:.3f}", f"{c['limit']:.3f}", 'yes' if c['met'] else 'no'] for c in checks])


def reference_comparison(rows: Sequence[BenchmarkRow], ref_batch: int) -> str:
    """ The reference study's figures beside ours for the models it reports (depth 6, default width). """
    ref = REFERENCE_STUDY
    ours_base = find_row(rows, BASELINE, 6)
    header = ['model', 'reference study: peak MiB', 'reference study: x ViT', f'ours: peak MiB @{ref_batch}',
              'ours: x ViT', 'ours: act MiB/img', 'reference study: top-1 %']
    body = []
    for name, fig in ref['models'].items():
        ours = find_row(rows, name, 6)
        ours_ratio = ours.peak_train_mib / ours_base.peak_train_mib if ours and ours_base else None
        body.append([
            f"{fig['label']} ({name})", format_number(float(fig['peak_mib']), 0),
            format_number(fig['peak_mib'] / ref['models'][BASELINE]['peak_mib'], 3),
            format_number(ours.peak_train_mib, 0) if ours else 'not measured', format_number(ours_ratio, 3),
            format_number(ours.act_mib_per_image) if ours else '-', format_number(fig['top1'])])
    size = (f"Size: the reference study reports {ref['params_m']}M params and {ref['gflops']} GFLOPs; "
            + (f'ours ({BASELINE}, depth 6): {format_number(ours_base.params_m)}M params, '
               f'{format_number(ours_base.gflops, 3)} GFLOPs.'
               if ours_base else f'{BASELINE} at depth 6 was not measured in this run.'))
    return '\n'.join([
        f"Reference figures: {ref['description']}. Ours: this run, depth 6, peak of a whole training step "
        f'(parameters, gradients, AdamW state, batch, activations) at batch {ref_batch}. Accuracy is not '
        'measured by this benchmark.', '', markdown_table(header, body), '', size])


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', metavar='SPEC',
                        help='model specs name[:key=value,...] (default: every model the package registers, '
                             'plus vit_small_cifar:grad_checkpointing=1)')
    parser.add_argument('--depths', nargs='+', type=int, default=[6, 12, 24], help='depths to sweep (default: 6 12 24)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cpu, cuda or cuda:N (default: cuda if available)')
    parser.add_argument('--batch-size', type=int, help='timing and profiling batch (default: 16 on CPU, 128 on CUDA)')
    parser.add_argument('--memory-batch-sizes', nargs=2, type=int, metavar=('B1', 'B2'),
                        help='the two batches the memory fit is measured at (default: 8 16 on CPU, 64 128 on CUDA)')
    parser.add_argument('--ref-batch', type=int, default=128,
                        help='batch the per-image and peak memory are reported at (default: 128)')
    parser.add_argument('--repeats', type=int,
                        help='timed (or profiled) rounds (default: 3 on CPU, 20 on CUDA)')
    parser.add_argument('--warmup', type=int, help='untimed rounds first (default: 1 on CPU, 3 on CUDA)')
    parser.add_argument('--amp', nargs='?', const='bfloat16', choices=['bfloat16', 'float16'],
                        help='autocast in this dtype (bare --amp: bfloat16); fp32 without it')
    parser.add_argument('--mem-budget', type=float, default=8.0, metavar='GIB',
                        help='memory budget in GiB for the largest-batch column (default: 8, a laptop GPU)')
    parser.add_argument('--no-check', action='store_true',
                        help='do not confirm the largest batch with a real step (done by default on CUDA)')
    parser.add_argument('--threads', type=int,
                        help="CPU threads for torch (default: torch's choice); 1 gives steadier timings on a CPU "
                             'shared with other jobs')
    parser.add_argument('--host-allocator', choices=['keep', 'default'], default='keep',
                        help="CPU: 'keep' (default) makes malloc keep freed memory, as CUDA's caching allocator does, "
                             "so that timings measure computation; 'default' leaves glibc returning every large "
                             'buffer to the system, which makes each step page-fault its activations in again')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                        help='kwargs for every model, e.g. embed_dim=32 num_heads=2 for a quick run')
    parser.add_argument('--compile', action='store_true',
                        help="also time each model's training step under torch.compile (in the same loop) and count "
                             'the graphs and graph-break sites of its training forward')
    parser.add_argument('--profile', action='store_true',
                        help='instead of the benchmark: torch.profiler over one training step per model and depth, '
                             'time by category (residual functions, recomputation, side information, ...)')
    parser.add_argument('--out', default='benchmark_results', help='output folder (default: benchmark_results)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    host_allocator = 'keep' if args.host_allocator == 'keep' and keep_freed_host_memory() else 'default'
    specs = [parse_model_spec(s) for s in args.models] if args.models else default_model_specs()
    config = BenchmarkConfig(
        depths=args.depths, device=args.device, batch_size=args.batch_size,
        memory_batch_sizes=args.memory_batch_sizes, ref_batch=args.ref_batch, repeats=args.repeats,
        warmup=args.warmup, amp=args.amp, mem_budget_gib=args.mem_budget,
        model_kwargs=args.model_kwargs, check_max_batch=False if args.no_check else None, compile=args.compile,
    ).resolved()
    meta = dict(
        command=shlex.join(['python', 'scripts/benchmark.py'] + argv),
        date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), machine=machine_info(config.device),
        device=config.device, precision=f'autocast {config.amp}' if config.amp else 'fp32',
        batch_size=config.batch_size, repeats=config.repeats, warmup=config.warmup,
        model_kwargs=config.model_kwargs, depths=list(config.depths), threads=torch.get_num_threads(),
        host_allocator=host_allocator,
    )

    if args.profile:
        profiles = run_profile(specs, config, progress=not args.no_progress)
        print(profile_tables(profiles))
        paths = write_profile_report(profiles, meta, args.out)
        print('wrote ' + ', '.join(str(p) for p in paths.values()))
        return 0

    rows = run_benchmark(specs, config, progress=not args.no_progress)
    meta.update(
        memory_batch_sizes=list(config.memory_batch_sizes), ref_batch=config.ref_batch,
        mem_budget_gib=config.mem_budget_gib,
        memory_method='CUDA allocator statistics' if torch.device(config.device).type == 'cuda'
        else "torch's MemTracker (tensor accounting)")
    checks = target_checks(rows)
    print(format_table(rows, config.ref_batch, config.mem_budget_gib))
    print('* predicted from the memory fit / computed, not confirmed by a real step; ok = confirmed')
    for check in checks:
        print(f"target {'met ' if check['met'] else 'MISSED'}: {check['target']}: {check['value']:.3f} "
              f"(limit {check['limit']:.3f})")
    sections = {'Reference study': reference_comparison(rows, config.ref_batch)}
    if config.compile:
        sections['torch.compile'] = compile_markdown(rows)
        print(sections['torch.compile'])
    if checks:
        sections['Targets'] = targets_markdown(checks)
    paths = write_report(rows, meta, args.out, sections, extra={'reference_study': REFERENCE_STUDY, 'targets': checks})
    print('wrote ' + ', '.join(str(p) for p in paths.values()))
    failed = [r for r in rows if r.error is not None or r.timing_error is not None]
    for r in failed:
        print(f'error: {r.model} at depth {r.depth}: {r.error or r.timing_error}', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
