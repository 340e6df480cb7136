""" The comparison study: scripts/compare.py's table and plots from runs' own files, scripts/study.py's runs
(skip the finished, resume the interrupted, flags forwarded), and train.py's live logging through Accelerate's
trackers. The fast tests use fabricated run folders; the slow one trains two small models on the digits.
"""
import csv
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib.image
import numpy as np
import pytest

from conftest import TRAIN_SCRIPT, script_env
from timm_reversible import study
from timm_reversible.study import NotARunError, collect_runs, compare, format_table, group_runs, table_rows
from timm_reversible.training import RESULTS_KEYS, MissingTrackerError, check_trackers

SCRIPTS = TRAIN_SCRIPT.parent
RECIPE = SCRIPTS.parent / 'recipes' / 'digits_demo.yaml'
COLUMNS = ['epoch', 'train_loss', 'train_img_s', 'train_time_s', 'train_epoch_time_s', 'train_peak_rss_mib',
           'eval_loss', 'eval_top1', 'eval_top5', 'lr']


def _fake_run(folder: Path, model: str, top1: Sequence[float], dataset: str = 'digits', finished: bool = True,
              batch_size: int = 32, peak_mib: float = 10., seconds: float = 2.) -> Path:
    """ A run folder as scripts/train.py leaves it: args.yaml, summary.csv (one row per epoch of `top1`) and,
    when finished, results.json. """
    folder.mkdir(parents=True)
    (folder / 'args.yaml').write_text(f'model: {model}\ndataset: {dataset}\n')
    with open(folder / 'summary.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for epoch, acc in enumerate(top1):
            writer.writerow(dict(epoch=epoch, train_loss=2. / (epoch + 1), train_img_s=100. + epoch,
                                 train_time_s=seconds, train_epoch_time_s=seconds + 0.5, train_peak_rss_mib=900.,
                                 eval_loss=1. / (epoch + 1), eval_top1=acc, eval_top5=100., lr=1e-3))
    if finished:
        results = {k: None for k in RESULTS_KEYS}
        results.update(
            model=model, dataset=dataset, best_top1=max(top1), epochs=len(top1), wall_time_s=(seconds + 0.5) * len(top1),
            peak_memory_mib=peak_mib, batch_size=batch_size, params=68_000, gflops=0.0023,
            time_per_epoch_s=seconds + 0.5, train_img_s=100. + len(top1) / 2, peak_rss_mib=900.,
            memory_source="torch's MemTracker")
        (folder / 'results.json').write_text(json.dumps(results))
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> Dict[str, Path]:
    return dict(
        a0=_fake_run(tmp_path / 'a0', 'bdia_vit_small_cifar', [70., 80., 78.], peak_mib=10.),
        a1=_fake_run(tmp_path / 'a1', 'bdia_vit_small_cifar', [60., 75., 84.], peak_mib=12., seconds=3.),
        b0=_fake_run(tmp_path / 'b0', 'vit_small_cifar', [72., 90.], peak_mib=16., batch_size=64),
        unfinished=_fake_run(tmp_path / 'unfinished', 'vit_small_cifar', [50.], finished=False),
        cifar=_fake_run(tmp_path / 'cifar', 'vit_small_cifar', [30., 40.], dataset='torch/cifar10'),
    )


def test_table_figures_come_from_the_runs_files(runs: Dict[str, Path], tmp_path: Path):
    rows, skipped = compare(list(runs.values()), tmp_path / 'out')
    assert [r['model'] for r in rows] == ['bdia_vit_small_cifar', 'vit_small_cifar']
    bdia, vit = rows
    # the figures written by hand above
    assert bdia['runs'] == 2 and bdia['top1_mean'] == pytest.approx(82.) and bdia['top1_best'] == 84.
    assert bdia['top1_std'] == pytest.approx(2 ** 1.5) and vit['top1_std'] == 0. and vit['runs'] == 1
    assert bdia['peak_memory_mib'] == 12. and bdia['mib_per_image'] == pytest.approx(12. / 32)
    assert vit['mib_per_image'] == pytest.approx(16. / 64)
    # and every figure against the runs' results.json
    for row, names in ((bdia, ('a0', 'a1')), (vit, ('b0',))):
        results = [json.loads((runs[n] / 'results.json').read_text()) for n in names]
        assert row['top1_mean'] == pytest.approx(statistics.fmean(r['best_top1'] for r in results))
        assert row['time_per_epoch_s'] == pytest.approx(statistics.fmean(r['time_per_epoch_s'] for r in results))
        assert row['total_time_s'] == pytest.approx(statistics.fmean(r['wall_time_s'] for r in results))
        assert row['img_s'] == pytest.approx(statistics.fmean(r['train_img_s'] for r in results))
        assert row['params_m'] == pytest.approx(0.068) and row['gflops'] == pytest.approx(0.0023)
        assert row['memory_source'] == ["torch's MemTracker"]

    assert sorted((s.path.name, s.reason.split(' ')[0]) for s in skipped) == [('cifar', 'another'),
                                                                              ('unfinished', 'unfinished')]
    unfinished = next(s for s in skipped if s.path.name == 'unfinished')
    assert f'--resume {runs["unfinished"]}' in unfinished.reason and '1 epoch(s)' in unfinished.reason

    written = json.loads((tmp_path / 'out' / 'table.json').read_text())
    assert written['rows'] == json.loads(json.dumps(rows))
    assert {s['path'] for s in written['skipped']} == {str(runs['unfinished']), str(runs['cifar'])}
    table = (tmp_path / 'out' / 'table.md').read_text()
    assert table.strip() == format_table(rows)
    assert '| bdia_vit_small_cifar | 2 | 82 | 2.828 | 84 | 12 | 0.375 |' in table


def test_curves_are_the_mean_and_band_of_each_models_runs(runs: Dict[str, Path], tmp_path: Path):
    runs_read, _ = collect_runs([runs['a0'], runs['a1'], runs['b0']])
    bdia, vit = group_runs(runs_read)
    assert study._curve(bdia, 'eval_top1') == ([1, 2, 3], [65., 77.5, 81.], [60., 75., 78.], [70., 80., 84.])
    assert study._curve(vit, 'train_loss') == ([1, 2], [2., 1.], [2., 1.], [2., 1.])

    paths = study.plot_curves([bdia, vit], tmp_path / 'plots')
    assert sorted(p.name for p in paths.values()) == ['train_loss.png', 'val_top1.png']
    for path in paths.values():
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 500
        colored = np.ptp(image[..., :3], axis=-1) > 0.2  # the curves are the only saturated pixels
        assert colored.sum() > 500, path


def test_folders_that_are_not_runs_are_refused(runs: Dict[str, Path], tmp_path: Path):
    stray = tmp_path / 'notes'
    stray.mkdir()
    (stray / 'readme.txt').write_text('not a run')
    with pytest.raises(NotARunError, match='notes is not a run of scripts/train.py'):
        compare([runs['a0'], stray], tmp_path / 'out')
    with pytest.raises(NotARunError, match='not a run'):
        compare([tmp_path / 'missing'], tmp_path / 'out')
    with pytest.raises(NotARunError, match='No finished run to compare: .*unfinished'):
        compare([runs['unfinished']], tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_compare_command(runs: Dict[str, Path], tmp_path: Path):
    proc = subprocess.run([sys.executable, str(SCRIPTS / 'compare.py'), *map(str, runs.values()), '--out',
                           str(tmp_path / 'out')], capture_output=True, text=True, env=script_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f'skipped {runs["unfinished"]}: unfinished' in proc.stdout
    assert f'skipped {runs["cifar"]}: another dataset (torch/cifar10, not digits)' in proc.stdout
    assert (tmp_path / 'out' / 'table.md').read_text().strip() in proc.stdout
    proc = subprocess.run([sys.executable, str(SCRIPTS / 'compare.py'), str(tmp_path), '--out', str(tmp_path / 'x')],
                          capture_output=True, text=True, env=script_env(), timeout=300)
    assert proc.returncode == 1 and f'ERROR: {tmp_path} is not a run' in proc.stderr, proc.stderr


def _study_script():
    spec = importlib.util.spec_from_file_location('study_script', SCRIPTS / 'study.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_skips_finished_runs_and_resumes_started_ones(tmp_path: Path):
    script = _study_script()
    extra = ['--epochs', '2']
    fresh = script.train_command('r.yaml', 'vit_small_cifar', 1, tmp_path, extra)
    assert fresh[1:] == [str(SCRIPTS / 'train.py'), '-c', 'r.yaml', '--model', 'vit_small_cifar', '--seed', '1',
                         '--output', str(tmp_path), '--experiment', 'vit_small_cifar-seed1', '--epochs', '2']
    _fake_run(tmp_path / 'vit_small_cifar-seed1', 'vit_small_cifar', [50.], finished=False)
    assert script.train_command('r.yaml', 'vit_small_cifar', 1, tmp_path, extra)[-4:] == [
        '--resume', str(tmp_path / 'vit_small_cifar-seed1'), '--epochs', '2']
    _fake_run(tmp_path / 'vit_small_cifar-seed0', 'vit_small_cifar', [50.])
    assert script.train_command('r.yaml', 'vit_small_cifar', 0, tmp_path, extra) is None


def test_missing_tracker_names_what_to_install(monkeypatch):
    check_trackers([])
    check_trackers(['all'])
    with pytest.raises(ValueError, match='--log-with tensorbord: not a tracker Accelerate supports'):
        check_trackers(['tensorbord'])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name in ('tensorboard', 'tensorboardX', 'wandb') else
                        real_find_spec(name, *a))
    with pytest.raises(MissingTrackerError, match=r'pip install "timm-reversible\[tensorboard\]"'):
        check_trackers(['tensorboard'])
    with pytest.raises(MissingTrackerError, match='needs the wandb package.*pip install wandb'):
        check_trackers(['wandb'])


def _tensorboard_scalars(folder: Path) -> Dict[str, List[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder)).Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()['scalars']}


def _study(args: List[str], cwd: Path, popen: bool = False) -> Optional[subprocess.CompletedProcess]:
    command = [sys.executable, str(SCRIPTS / 'study.py'), *args]
    if popen:  # its own session, so the whole study (it and its train.py) can be killed at once
        return subprocess.Popen(command, env=script_env(), cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    proc = subprocess.run(command, capture_output=True, text=True, env=script_env(), cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_study_on_digits_interrupted_and_resumed(tmp_path: Path):
    """ Two models, one seed, two epochs on the digits, logged live to tensorboard; the study is killed
    (SIGKILL, with its training) after the first run's first epoch, then run again: it resumes that run, trains
    the other, and compares them; a third call trains nothing. """
    models = ['revvit_small_cifar', 'vit_small_cifar']
    args = ['-c', str(RECIPE), '--models', *models, '--seeds', '1', '--output', str(tmp_path / 'study'),
            '--epochs', '2', '--log-with', 'tensorboard']
    first = tmp_path / 'study' / 'revvit_small_cifar-seed0'
    proc = _study(args, tmp_path, popen=True)
    deadline = time.monotonic() + 300
    while not (first / 'checkpoints' / 'latest').is_file():
        assert proc.poll() is None and time.monotonic() < deadline, 'the study ended before it could be killed'
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (first / 'results.json').exists()

    out = _study(args, tmp_path).stdout
    assert f'{first}: ' in out and f'--resume {first}' in out
    folders = [tmp_path / 'study' / f'{m}-seed0' for m in models]
    results = [json.loads((f / 'results.json').read_text()) for f in folders]
    rows = json.loads((tmp_path / 'study' / 'compare' / 'table.json').read_text())['rows']
    assert [r['model'] for r in rows] == models and all(r['runs'] == 1 for r in rows)
    for row, result, folder in zip(rows, results, folders):
        with open(folder / 'summary.csv', newline='') as f:
            summary = list(csv.DictReader(f))
        assert [int(r['epoch']) for r in summary] == [0, 1]  # the resumed run has each epoch once
        assert row['top1_mean'] == row['top1_best'] == result['best_top1'] == max(
            float(r['eval_top1']) for r in summary)
        assert row['peak_memory_mib'] == result['peak_memory_mib'] > 0
        assert row['mib_per_image'] == pytest.approx(result['peak_memory_mib'] / 32)
        assert row['params_m'] == result['params'] / 1e6 and row['gflops'] == result['gflops'] > 0
        assert row['img_s'] == result['train_img_s'] > 0
        assert row['total_time_s'] == result['wall_time_s'] and row['time_per_epoch_s'] == result['time_per_epoch_s']
        # the live log, in the run folder: the per-epoch figures of summary.csv (the killed run may have died
        # between saving its epoch and logging it: the resumed run logs from the next epoch on)
        scalars = _tensorboard_scalars(folder)
        logged = len(scalars['eval/top1'])
        assert logged == 2 or (folder == first and logged == 1)
        for tag, column in (('eval/top1', 'eval_top1'), ('train/img_s', 'train_img_s'),
                            ('train/peak_rss_mib', 'train_peak_rss_mib'), ('eval/loss', 'eval_loss')):
            assert scalars[tag] == pytest.approx([float(r[column]) for r in summary[-logged:]]), tag
        assert {'train/loss', 'train/lr', 'eval/top5', 'epoch'} <= set(scalars)
    for name in ('val_top1.png', 'train_loss.png'):
        assert (tmp_path / 'study' / 'compare' / name).stat().st_size > 10_000

    out = _study(args, tmp_path).stdout
    assert all(f'{f}: finished, skipped' in out for f in folders) and 'train.py' not in out
    assert (tmp_path / 'study' / 'compare' / 'table.md').read_text().strip() in out


@pytest.mark.slow
def test_study_under_torchrun_trains_each_run_on_all_processes(tmp_path: Path):
    """ Two trainings one after another in the same two torchrun workers: each gets a rendezvous of its own
    (the launcher's store would hand the second one the first one's addresses). """
    models = ['vit_small_cifar', 'bdia_vit_small_cifar']
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone',
               str(SCRIPTS / 'study.py'), '-c', str(RECIPE), '--models', *models, '--seeds', '1', '--epochs', '1',
               '--output', str(tmp_path / 'study')]
    proc = subprocess.run(command, capture_output=True, text=True, env=script_env(), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for model in models:
        results = json.loads((tmp_path / 'study' / f'{model}-seed0' / 'results.json').read_text())
        assert results['num_processes'] == 2 and results['epochs'] == 1
    rows = json.loads((tmp_path / 'study' / 'compare' / 'table.json').read_text())['rows']
    assert [r['model'] for r in rows] == models
    assert proc.stdout.count('| vit_small_cifar | 1 |') == 1  # the table is printed by the first process only
