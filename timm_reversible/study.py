""" The comparison study from the runs themselves: read finished runs of scripts/train.py, group them by model,
and write the training curves (validation top-1 and training loss per epoch, mean over a model's runs with its
min-max band) and the table of the reference study's Table I (top-1 mean, std and best, peak memory, MiB per
image, GFLOPs, params, time per epoch and in total, img/s, number of runs).

Every figure comes from a run's own files: `results.json` (what it reached, its size, its peak memory and where
that figure comes from) and `summary.csv` (one row per epoch). scripts/compare.py and scripts/study.py are the
command lines over this module.
"""
import json
import math
import os
import statistics
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .training import RESULTS_FILE, read_summary

__all__ = [
    'NotARunError', 'Run', 'Skipped', 'ModelGroup', 'read_run', 'collect_runs', 'group_runs', 'table_rows',
    'TABLE_COLUMNS', 'format_table', 'write_table', 'plot_curves', 'compare',
]

SUMMARY_FILE = 'summary.csv'
ARGS_FILE = 'args.yaml'
# The reference study's Table I, from the runs: (key in a table row, column title)
TABLE_COLUMNS = (
    ('model', 'model'), ('runs', 'runs'), ('top1_mean', 'top-1 mean %'), ('top1_std', 'top-1 std'),
    ('top1_best', 'top-1 best %'), ('peak_memory_mib', 'peak memory MiB'), ('mib_per_image', 'MiB / image'),
    ('gflops', 'GFLOPs'), ('params_m', 'params M'), ('time_per_epoch_s', 's / epoch'), ('total_time_s', 'total s'),
    ('img_s', 'img/s'),
)


class NotARunError(ValueError):
    """ A folder given as a run holds no run of scripts/train.py. """


@dataclass
class Run:
    path: Path
    results: Dict[str, Any]
    epochs: List[Dict[str, float]]  # summary.csv, one row per epoch, as numbers

    @property
    def model(self) -> str:
        return self.results['model']

    @property
    def dataset(self) -> str:
        return self.results['dataset']


@dataclass
class Skipped:
    path: Path
    reason: str


@dataclass
class ModelGroup:
    model: str
    runs: List[Run] = field(default_factory=list)


def read_run(path: os.PathLike) -> Run:
    """ A finished run of scripts/train.py: `NotARunError` for a folder that holds no run at all, `Skipped`'s
    reason (raised as `RuntimeError`) for one that has not finished.
    """
    path = Path(path)
    if not path.is_dir() or not any((path / f).exists() for f in (ARGS_FILE, SUMMARY_FILE, RESULTS_FILE)):
        raise NotARunError(f'{path} is not a run of scripts/train.py: it has none of {ARGS_FILE}, {SUMMARY_FILE}, '
                           f'{RESULTS_FILE}.')
    if not (path / RESULTS_FILE).exists():
        done = len(read_summary(str(path / SUMMARY_FILE)))
        raise RuntimeError(f'unfinished ({done} epoch(s) in {SUMMARY_FILE}, no {RESULTS_FILE}): resume it with '
                           f'scripts/train.py --resume {path}')
    results = json.loads((path / RESULTS_FILE).read_text())
    rows = [{k: float(v) for k, v in row.items() if v not in ('', None)}
            for row in read_summary(str(path / SUMMARY_FILE))]
    if not rows:
        raise RuntimeError(f'no epochs in {SUMMARY_FILE}')
    return Run(path, results, rows)


def collect_runs(paths: Sequence[os.PathLike]) -> Tuple[List[Run], List[Skipped]]:
    """ The finished runs among `paths`, on one dataset (the first run's), and the others with the reason.
    A folder that is not a run raises `NotARunError`.
    """
    runs, skipped = [], []
    for path in paths:
        try:
            runs.append(read_run(path))
        except NotARunError:
            raise
        except RuntimeError as e:
            skipped.append(Skipped(Path(path), str(e)))
    if runs:
        dataset = runs[0].dataset
        for run in [r for r in runs if r.dataset != dataset]:
            runs.remove(run)
            skipped.append(Skipped(run.path, f'another dataset ({run.dataset}, not {dataset})'))
    return runs, skipped


def group_runs(runs: Sequence[Run]) -> List[ModelGroup]:
    """ One group per model, in the order the models first appear. """
    groups: Dict[str, ModelGroup] = OrderedDict()
    for run in runs:
        groups.setdefault(run.model, ModelGroup(run.model)).runs.append(run)
    return list(groups.values())


def _mean(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def table_rows(groups: Sequence[ModelGroup]) -> List[Dict[str, Any]]:
    """ Table I's figures per model, from its runs' results.json: means over the runs, except the best top-1,
    the peak memory (the largest) and the number of runs. MiB per image = peak memory / batch size.
    """
    rows = []
    for group in groups:
        results = [r.results for r in group.runs]
        top1 = [r['best_top1'] for r in results]
        peaks = [r.get('peak_memory_mib') or r.get('peak_rss_mib') for r in results]
        peaks = [p for p in peaks if p is not None]
        per_image = [p / r['batch_size'] for p, r in zip(peaks, results) if r.get('batch_size')]
        rows.append(OrderedDict(
            model=group.model,
            runs=len(results),
            top1_mean=statistics.fmean(top1),
            top1_std=statistics.stdev(top1) if len(top1) > 1 else 0.,
            top1_best=max(top1),
            peak_memory_mib=max(peaks) if peaks else None,
            mib_per_image=max(per_image) if per_image else None,
            gflops=_mean([r.get('gflops') for r in results]),
            params_m=_mean([r['params'] / 1e6 if r.get('params') else None for r in results]),
            time_per_epoch_s=_mean([r.get('time_per_epoch_s') for r in results]),
            total_time_s=_mean([r['wall_time_s'] for r in results]),
            img_s=_mean([r.get('train_img_s') for r in results]),
            memory_source=sorted({r.get('memory_source') or 'not recorded' for r in results}),
        ))
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return '-'
    if isinstance(value, float):
        return f'{value:,.4g}' if abs(value) < 100 else f'{value:,.1f}'
    return str(value)


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """ Markdown, with where the memory figures come from under it. """
    lines = ['| ' + ' | '.join(title for _, title in TABLE_COLUMNS) + ' |',
             '|' + '|'.join('---' if key == 'model' else '---:' for key, _ in TABLE_COLUMNS) + '|']
    lines += ['| ' + ' | '.join(_cell(row[key]) for key, _ in TABLE_COLUMNS) + ' |' for row in rows]
    sources = sorted({s for row in rows for s in row['memory_source']})
    lines += ['', 'Peak memory: ' + '; '.join(sources) + '. Means over the runs, except best top-1, peak memory '
              '(the largest) and runs; MiB / image = peak memory / batch size.']
    return '\n'.join(lines)


def write_table(rows: Sequence[Dict[str, Any]], out: Path, skipped: Sequence[Skipped] = ()) -> Tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / 'table.md', out / 'table.json'
    md.write_text(format_table(rows) + '\n')
    js.write_text(json.dumps(dict(rows=list(rows), skipped=[dict(path=str(s.path), reason=s.reason)
                                                            for s in skipped]), indent=2) + '\n')
    return md, js


def _curve(group: ModelGroup, column: str) -> Tuple[List[int], List[float], List[float], List[float]]:
    """ Epochs (from 1) and the mean, min and max of `column` over the runs that reached each epoch. """
    by_epoch: Dict[int, List[float]] = {}
    for run in group.runs:
        for row in run.epochs:
            if column in row and math.isfinite(row[column]):
                by_epoch.setdefault(int(row['epoch']) + 1, []).append(row[column])
    epochs = sorted(by_epoch)
    return (epochs, [statistics.fmean(by_epoch[e]) for e in epochs], [min(by_epoch[e]) for e in epochs],
            [max(by_epoch[e]) for e in epochs])


def plot_curves(groups: Sequence[ModelGroup], out: Path) -> Dict[str, Path]:
    """ val_top1.png and train_loss.png: per model the mean over its runs, its min-max band shaded. """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for column, name, label in (('eval_top1', 'val_top1.png', 'validation top-1 (%)'),
                                ('train_loss', 'train_loss.png', 'training loss')):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, group in enumerate(groups):
            epochs, mean, low, high = _curve(group, column)
            color = f'C{i}'
            ax.plot(epochs, mean, color=color, label=f'{group.model} ({len(group.runs)} runs)')
            ax.fill_between(epochs, low, high, color=color, alpha=0.2, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel('epoch')
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths[column] = out / name
        fig.savefig(paths[column], dpi=120)
        plt.close(fig)
    return paths


def compare(paths: Sequence[os.PathLike], out: os.PathLike) -> Tuple[List[Dict[str, Any]], List[Skipped]]:
    """ Read the runs, write the plots and the table to `out`; returns the table's rows and the skipped runs. """
    runs, skipped = collect_runs(paths)
    if not runs:
        raise NotARunError('No finished run to compare: ' + '; '.join(f'{s.path}: {s.reason}' for s in skipped))
    groups = group_runs(runs)
    rows = table_rows(groups)
    out = Path(out)
    plot_curves(groups, out)
    write_table(rows, out, skipped)
    return rows, skipped
