#!/usr/bin/env python3
""" The comparison study in one command: a recipe trained for every model and seed, then compared.

    python scripts/study.py -c recipes/digits_demo.yaml --seeds 2
    accelerate launch --num_processes 4 scripts/study.py -c recipes/cifar10_reference.yaml --seeds 3

Each run goes to <output>/<model>-seed<seed> (scripts/train.py with the recipe, --model and --seed; any other
flag is passed on to it), one after another. Run again, the study skips the finished runs and resumes an
unfinished one. Then scripts/compare.py's plots and table go to <output>/compare. Under `accelerate launch`
or torchrun every training runs on all the launched processes, each with a rendezvous of its own.
"""
import argparse
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from timm_reversible.study import compare, format_table
from timm_reversible.training import CHECKPOINTS, RESULTS_FILE
from timm_reversible.utils import package_models

TRAIN = Path(__file__).resolve().parent / 'train.py'


def run_dir(output: Path, model: str, seed: int) -> Path:
    return output / f'{model}-seed{seed}'


def train_command(recipe: str, model: str, seed: int, output: Path, extra: List[str]) -> Optional[List[str]]:
    """ The train.py command of one run: None if it has finished, a resume if it has started. """
    folder = run_dir(output, model, seed)
    if (folder / RESULTS_FILE).exists():
        return None
    command = [sys.executable, str(TRAIN), '-c', recipe, '--model', model, '--seed', str(seed)]
    if (folder / 'summary.csv').exists() or (folder / CHECKPOINTS).exists():
        return command + ['--resume', str(folder)] + extra
    return command + ['--output', str(output), '--experiment', folder.name] + extra


def training_env(run_key: str) -> Dict[str, str]:
    """ The environment of one training: the launcher's, with a rendezvous of its own where the launcher's
    would be reused.

    torchrun (and `accelerate launch` over several processes) hosts one store for all its workers; a second
    training in the same workers would find the first one's addresses there and fail to connect. So each
    training gets a fresh store on a free port of the first process's machine, which that process picks and
    tells the others through the launcher's store.
    """
    env = dict(os.environ)
    if int(env.get('WORLD_SIZE', '1')) <= 1 or env.get('TORCHELASTIC_USE_AGENT_STORE') != 'True':
        return env
    from torch.distributed import TCPStore
    launcher_store = TCPStore(env['MASTER_ADDR'], int(env['MASTER_PORT']), is_master=False,
                              timeout=timedelta(minutes=30))
    key = f'timm_reversible_study/{env.get("TORCHELASTIC_RESTART_COUNT", "0")}/{run_key}'
    if int(env['RANK']) == 0:
        with socket.socket() as probe:
            probe.bind(('', 0))
            launcher_store.set(key, str(probe.getsockname()[1]))
    env.update(MASTER_PORT=launcher_store.get(key).decode(), TORCHELASTIC_USE_AGENT_STORE='False')
    return env


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-c', '--config', required=True, metavar='RECIPE', help='a recipe of scripts/train.py')
    parser.add_argument('--models', nargs='+', default=package_models(), help='default: the four models')
    parser.add_argument('--seeds', type=int, default=3, help='runs per model, seeds 0..N-1 (default: 3)')
    parser.add_argument('--output', default=None, help="default: the recipe's output + '-study'")
    args, extra = parser.parse_known_args(argv)
    recipe = yaml.safe_load(Path(args.config).read_text()) or {}
    output = Path(args.output or (recipe.get('output') or 'output/train') + '-study')
    rank = int(os.environ.get('RANK', '0'))
    for model in args.models:
        for seed in range(args.seeds):
            command = train_command(args.config, model, seed, output, extra)
            if command is None:
                if rank == 0:
                    print(f'{run_dir(output, model, seed)}: finished, skipped', flush=True)
                continue
            if rank == 0:
                print(f'{run_dir(output, model, seed)}: ' + ' '.join(command[1:]), flush=True)
            code = subprocess.call(command, env=training_env(f'{model}-seed{seed}'))
            if code != 0:
                print(f'ERROR: {model} seed {seed} stopped (exit {code}); run the study again to resume it.',
                      file=sys.stderr)
                return code
    if rank == 0:
        rows, skipped = compare([run_dir(output, m, s) for m in args.models for s in range(args.seeds)],
                                output / 'compare')
        for s in skipped:
            print(f'skipped {s.path}: {s.reason}')
        print(format_table(rows))
        print(f'wrote {output / "compare"}: val_top1.png, train_loss.png, table.md, table.json')
    return 0


if __name__ == '__main__':
    sys.exit(main())
