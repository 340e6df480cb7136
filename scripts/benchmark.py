#!/usr/bin/env python3
""" Compare the package's models on this machine: size, FLOPs, memory, speed, and the largest batch in a budget.

    python scripts/benchmark.py                                  # all registered models + grad-ckpt baseline
    python scripts/benchmark.py --device cuda --amp --mem-budget 8
    python scripts/benchmark.py --models vit_small_cifar revvit_small_cifar \\
        bdia_vit_small_cifar:bdia_split_backward=1 --depths 6 12 24
    python scripts/benchmark.py --models vit_small_cifar --depths 1 2 --model-kwargs embed_dim=32 num_heads=2

A model spec is `name[:key=value,...]`: keys go to `timm.create_model`, except `grad_checkpointing=1`, which
turns on timm's per-block gradient checkpointing. vit_small_cifar is always measured, as every ratio is
against it at the same depth. Writes results.json, results.md, memory_vs_depth.png and
memory_vs_throughput.png to --out. Definitions of the figures: timm_reversible/benchmarking.py.
"""
import argparse
import shlex
import sys
from datetime import datetime, timezone
from typing import List, Optional

import torch

import timm_reversible  # noqa: F401  registers the package's models with timm
from timm_reversible.benchmarking import (
    BenchmarkConfig, default_model_specs, format_table, machine_info, parse_kwargs, parse_model_spec,
    run_benchmark, target_checks, write_report)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', metavar='SPEC',
                        help='model specs name[:key=value,...] (default: every model the package registers, '
                             'plus vit_small_cifar:grad_checkpointing=1)')
    parser.add_argument('--depths', nargs='+', type=int, default=[6, 12, 24], help='depths to sweep (default: 6 12 24)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cpu, cuda or cuda:N (default: cuda if available)')
    parser.add_argument('--batch-size', type=int, help='timing batch (default: 16 on CPU, 128 on CUDA)')
    parser.add_argument('--memory-batch-sizes', nargs=2, type=int, metavar=('B1', 'B2'),
                        help='the two batches the memory fit is measured at (default: 8 16 on CPU, 64 128 on CUDA)')
    parser.add_argument('--ref-batch', type=int, default=128,
                        help='batch the per-image and peak memory are reported at (default: 128)')
    parser.add_argument('--repeats', type=int, help='timed rounds (default: 3 on CPU, 20 on CUDA)')
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
    parser.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                        help='kwargs for every model, e.g. embed_dim=32 num_heads=2 for a quick run')
    parser.add_argument('--out', default='benchmark_results', help='output folder (default: benchmark_results)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [parse_model_spec(s) for s in args.models] if args.models else default_model_specs()
    config = BenchmarkConfig(
        depths=args.depths, device=args.device, batch_size=args.batch_size,
        memory_batch_sizes=args.memory_batch_sizes, ref_batch=args.ref_batch, repeats=args.repeats,
        warmup=args.warmup, amp=args.amp, mem_budget_gib=args.mem_budget,
        model_kwargs=parse_kwargs(args.model_kwargs), check_max_batch=False if args.no_check else None,
    ).resolved()
    date = datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')

    rows = run_benchmark(specs, config, progress=not args.no_progress)

    device = torch.device(config.device)
    meta = dict(
        command=shlex.join(['python', 'scripts/benchmark.py'] + argv), date=date, machine=machine_info(config.device),
        device=config.device, precision=f'autocast {config.amp}' if config.amp else 'fp32',
        batch_size=config.batch_size, memory_batch_sizes=list(config.memory_batch_sizes), ref_batch=config.ref_batch,
        repeats=config.repeats, warmup=config.warmup, mem_budget_gib=config.mem_budget_gib,
        model_kwargs=config.model_kwargs, depths=list(config.depths), threads=torch.get_num_threads(),
        memory_method='CUDA allocator statistics' if device.type == 'cuda' else "torch's MemTracker (tensor accounting)",
    )
    print(format_table(rows, config.ref_batch, config.mem_budget_gib))
    print('* predicted from the memory fit / computed, not confirmed by a real step; ok = confirmed')
    for check in target_checks(rows):
        print(f"target {'met ' if check['met'] else 'MISSED'}: {check['target']}: {check['value']:.3f} "
              f"(limit {check['limit']:.3f})")
    paths = write_report(rows, meta, args.out)
    print('wrote ' + ', '.join(str(p) for p in paths.values()))
    failed = [r for r in rows if r.error is not None or r.timing_error is not None]
    for r in failed:
        print(f'error: {r.model} at depth {r.depth}: {r.error or r.timing_error}', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
