""" Publishing a finished training run: safetensors weights, timm's config.json and a model card, to the Hub.

    publish(run_dir, repo_id)                        # upload to the Hugging Face Hub
    publish(run_dir, repo_id, local_dir=folder)      # write the same files to a folder only (dry run)

A run directory is what `scripts/train.py` writes: `results.json`, `model.safetensors`, `config.json`
(`timm.models.save_for_hf`: `architecture`, `model_args`, `pretrained_cfg`), `args.yaml`, `summary.csv`.
The published folder holds exactly `model.safetensors` (copied byte for byte; never a pickle),
`config.json` (copied; timm's format, so `hf-hub:<repo>` and `local-dir:<folder>` create the model) and
`README.md`, rendered from the package's card template (`timm_reversible/cards/model_card.md`) with the
model's own fields (`cards/models.yaml`: description, papers, citations).

Every figure on the card is computed, never typed: accuracy and training figures from the run's
`results.json`; parameters and GMACs (FLOPs / 2) from the model itself (`timm_reversible.profiling`);
activation memory per image from a benchmark results file when one is given (matched by model name,
depth and mode), else measured on the CPU with `activation_memory_per_image`.

The template uses `string.Template` placeholders (`${name}`); `CARD_FIELDS` lists them. A template that
names an unknown placeholder fails loudly. The template ships inside the package (found with
importlib.resources), so publishing works from an installed wheel.

Checks, all before anything is written or sent: the run has finished (results.json) and has safetensors
weights; the Hub token exists (`hf auth login` or HF_TOKEN) unless it is a dry run; a repository named
`<model>.<tag>`, which `timm.create_model('<model>.<tag>', pretrained=True)` resolves to, receives only a
run on the tag's dataset that the registered model with its default arguments reproduces exactly.
"""
import argparse
import importlib.resources
import json
import math
import shutil
import string
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import yaml

import timm

from ._hub import HUB_NAMESPACE_ENV, TAG_DATASETS, hub_namespace
from .profiling import activation_memory_per_image, count_flops, count_params
from .training import REQUIRED_RESULTS_KEYS, RESULTS_FILE
from .utils import MiB, model_input_size

__all__ = [
    'PublishError', 'Run', 'load_run', 'load_run_model', 'Benchmark', 'PUBLISHED_FILES', 'CARD_FIELDS',
    'CardTemplate', 'card_template', 'model_figures', 'read_benchmark', 'benchmark_row', 'card_fields', 'render_card',
    'build_card', 'cli', 'check_repo_id', 'check_registry_name', 'check_folder', 'stage', 'hub_token', 'upload', 'PublishResult', 'publish',
]

PUBLISHED_FILES = ('model.safetensors', 'config.json', 'README.md')
DEFAULT_ACT_BATCH_SIZE = 128

# Hugging Face Hub dataset ids for the card's front matter; other datasets keep their own name.
HUB_DATASETS = {'cifar10': 'uoft-cs/cifar10', 'cifar100': 'uoft-cs/cifar100'}

CARD_FIELDS = {
    'repo_id': 'Hub repository, NAMESPACE/NAME',
    'repo_name': 'NAME part of the repository id',
    'model_name': 'timm architecture name',
    'load_name': "what to pass to timm.create_model: 'hf-hub:<repo_id>'",
    'registry_note': 'a sentence when the repository is the one `<model>.<tag>` resolves to, else empty',
    'license': "license from the pretrained_cfg (e.g. 'apache-2.0')",
    'datasets_yaml': 'YAML list of the dataset for the front matter',
    'dataset': 'dataset name as trained (results.json)',
    'num_classes': 'classes of the head',
    'img_size': 'input image size (square)',
    'params_m': 'parameters in millions (counted from the model)',
    'gmacs': 'multiply-adds per image in billions, FLOPs / 2 (counted from the model)',
    'act_mib': 'activation memory of a training step, MiB per image',
    'act_source': 'where the activation memory comes from (benchmark file or CPU measurement, batch, precision)',
    'depth': 'number of blocks',
    'model_args': 'create_model kwargs of the run, as Python keyword arguments',
    'top1': 'best top-1 accuracy (%)',
    'top5': 'best top-5 accuracy (%)',
    'best_epoch': 'epoch of the best top-1, counted from 1',
    'epochs': 'epochs trained',
    'train_loss': 'final training loss',
    'wall_time': 'training wall time, h:mm:ss',
    'peak_memory': 'peak accelerator memory of training',
    'device': 'device of the training run',
    'num_processes': 'number of training processes',
    'mixed_precision': 'mixed precision mode of training',
    'weights': "which weights are published: the model's or their EMA",
    'recipe_yaml': 'training recipe (results.json) without local paths and unset values, YAML',
    'comparison_table': 'Markdown table: this model and the benchmark rows',
    'description': "the model's paragraph (cards/models.yaml), with its dataset",
    'papers': "the model's papers as a Markdown list",
    'memory_saving': 'the memory-saving usage section (cards/memory_saving.md) for the reversible models, else empty',
    'citations': "the model's BibTeX entries",
}


class PublishError(RuntimeError):
    """ A run cannot be published as asked; the message says why and what to do. """


@dataclass
class Run:
    """ A finished training run directory. """
    path: Path
    results: Dict[str, Any]
    config: Dict[str, Any]

    @property
    def architecture(self) -> str:
        return self.config['architecture']

    @property
    def weights(self) -> Path:
        return self.path / 'model.safetensors'


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PublishError(f'Cannot read {path}: {e}') from e


def load_run(run_dir: Union[str, Path]) -> Run:
    """ Check that `run_dir` is a finished run that can be published, and read it. """
    path = Path(run_dir)
    if not path.is_dir():
        raise PublishError(f'Run directory {str(path)!r} does not exist.')
    if not (path / RESULTS_FILE).is_file():
        raise PublishError(
            f'{path} has no results.json: the run has not finished (scripts/train.py writes results.json at its end), '
            f'so there are no results to publish. Train to the end first, or pick the run\'s directory '
            f'(<output>/<experiment>).')
    if not (path / 'model.safetensors').is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in ('.bin', '.pth', '.pt', '.tar'))
        raise PublishError(
            f'{path} has no model.safetensors; only safetensors weights are published'
            + (f' (found {", ".join(pickles)}, which are not)' if pickles else '') + '.')
    if not (path / 'config.json').is_file():
        raise PublishError(f'{path} has no config.json (timm.models.save_for_hf writes it next to model.safetensors).')
    results = _read_json(path / RESULTS_FILE)
    if not isinstance(results, dict):
        raise PublishError(f'{path / "results.json"} holds no results object.')
    missing = [k for k in REQUIRED_RESULTS_KEYS if k not in results]
    if missing:
        raise PublishError(f'{path / "results.json"} lacks {", ".join(missing)}; it was not written by a finished run.')
    config = _read_json(path / 'config.json')
    for key in ('architecture', 'pretrained_cfg'):
        if key not in config:
            raise PublishError(f'{path / "config.json"} has no {key!r}; it is not timm\'s save_for_hf format.')
    if results['model'] != config['architecture']:
        raise PublishError(
            f"results.json is for {results['model']!r} but config.json for {config['architecture']!r}.")
    return Run(path=path, results=results, config=config)


def load_run_model(run: Run) -> torch.nn.Module:
    """ The run's model with its weights, built as a user would: `local-dir:` with pretrained=True. """
    return timm.create_model(f'local-dir:{run.path}', pretrained=True).eval()


@dataclass
class CardTemplate:
    """ The model card template and one model's fields for it. """
    text: str
    memory_saving: str
    model: Dict[str, Any]


def _card_file(name: str, template_dir: Optional[Union[str, Path]]) -> str:
    if template_dir is not None:
        return (Path(template_dir) / name).read_text(encoding='utf-8')
    return importlib.resources.files('timm_reversible').joinpath('cards', name).read_text(encoding='utf-8')


def card_template(model_name: str, template_dir: Optional[Union[str, Path]] = None) -> CardTemplate:
    """ The card template (the package's, or `model_card.md`, `memory_saving.md`, `models.yaml` in `template_dir`)
    with the fields of `model_name`; a model without fields there is an error.
    """
    try:
        models = yaml.safe_load(_card_file('models.yaml', template_dir))
        template = CardTemplate(_card_file('model_card.md', template_dir), _card_file('memory_saving.md', template_dir),
                                models.get(model_name))
    except FileNotFoundError as e:
        raise PublishError(f'Model card template file missing: {e.filename}.') from e
    if template.model is None:
        raise PublishError(f'No model card fields for {model_name!r} in models.yaml (known: {", ".join(models)}).')
    return template


# ---- figures ----

def _model_depth(model: torch.nn.Module) -> Optional[int]:
    blocks = getattr(model, 'blocks', None)
    return len(blocks) if blocks is not None else None


def _model_mode(model: torch.nn.Module) -> str:
    """ How the model runs its blocks by default: 'reversible' or 'vanilla'. """
    return 'reversible' if getattr(model, 'reversible', False) else 'vanilla'


_MODE_LABELS = {'vanilla': 'vanilla', 'checkpoint': 'grad ckpt', 'reversible': 'reversible'}


@dataclass
class Benchmark:
    """ The results of `scripts/benchmark.py`: {'meta': {...}, 'rows': [one dict per model and depth]}.

    A row names the registered model (`name`; `model` is its label), `depth`, `kwargs`, `grad_checkpointing`,
    `reversible`, `params_m`, `gflops` (forward, per image), `act_mib_per_image` (DESIGN.md's activation memory
    per image at the reference batch) and `error` (None when measured).
    """
    rows: List[Dict[str, Any]]
    meta: Dict[str, Any]
    name: str


def read_benchmark(path: Union[str, Path]) -> Benchmark:
    """ Read a benchmark `results.json`. """
    path = Path(path)
    data = _read_json(path)
    rows = data.get('rows') if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and 'depth' in r and ('name' in r or 'model' in r)
                                             for r in rows):
        raise PublishError(f'{path} is not the results.json of scripts/benchmark.py (no "rows" of models and depths).')
    return Benchmark(rows=rows, meta=dict(data.get('meta') or {}), name=path.name)


def _row_name(row: Dict[str, Any]) -> str:
    return row.get('name') or row['model']


def _row_mode(row: Dict[str, Any]) -> str:
    if row.get('grad_checkpointing'):
        return 'checkpoint'
    return 'reversible' if row.get('reversible') else 'vanilla'


def _row_act_bytes(row: Dict[str, Any]) -> Optional[float]:
    act = row.get('act_mib_per_image')
    return None if act is None or row.get('error') else float(act) * MiB


def benchmark_row(bench: Benchmark, model_name: str, depth: Optional[int], mode: str, params: int) -> Dict[str, Any]:
    """ The row measured for `model_name` at `depth` in `mode`, checked to be a model of the same size. """
    found = [
        r for r in bench.rows
        if _row_name(r) == model_name and r['depth'] == depth and _row_mode(r) == mode
        and _row_act_bytes(r) is not None]
    found.sort(key=lambda r: bool(r.get('kwargs')))  # the plain model first
    measured = sorted({f'{_row_name(r)} depth {r["depth"]} ({_row_mode(r)})' for r in bench.rows if _row_act_bytes(r)})
    if not found:
        raise PublishError(
            f'The benchmark {bench.name} has no activation memory for {model_name} at depth {depth} ({mode}); '
            f'it measured: {"; ".join(measured) or "nothing"}. Run the benchmark for it, or leave out --benchmark '
            f'to measure on the CPU.')
    row = found[0]
    if row.get('params_m') is not None and abs(row['params_m'] * 1e6 - params) > 0.5:
        raise PublishError(
            f'The benchmark {bench.name} measured {model_name} at depth {depth} with {row["params_m"]:.4f}M '
            f'parameters, the run\'s model has {params / 1e6:.4f}M: another width (benchmark model kwargs '
            f'{bench.meta.get("model_kwargs", {})}). Benchmark the run\'s size, or leave out --benchmark.')
    return row


def model_figures(
        model: torch.nn.Module,
        benchmark: Optional[Benchmark] = None,
        act_batch_size: int = DEFAULT_ACT_BATCH_SIZE,
) -> Dict[str, Any]:
    """ Params, GMACs and activation memory per image of `model` (all measured, none typed). """
    name = model.pretrained_cfg['architecture']
    depth, mode = _model_depth(model), _model_mode(model)
    input_size = model_input_size(model)
    figures = dict(
        params=count_params(model),
        gmacs=count_flops(model, input_size=input_size) / 2 / 1e9,
        depth=depth,
        mode=mode,
    )
    if benchmark is not None:
        row = benchmark_row(benchmark, name, depth, mode, figures['params'])
        figures['act_bytes'] = _row_act_bytes(row)
        meta = benchmark.meta
        details = [str(meta[k]) for k in ('device', 'precision') if meta.get(k)]
        if meta.get('ref_batch'):
            details.append(f"batch {meta['ref_batch']}")
        if meta.get('machine'):
            details.append(str(meta['machine']))
        figures['act_source'] = f'from the benchmark ({benchmark.name}' + ''.join(f', {d}' for d in details) + ')'
    else:
        figures['act_bytes'] = activation_memory_per_image(model, batch_size=act_batch_size, input_size=input_size)
        model.eval()
        figures['act_source'] = f'measured on the CPU (torch MemTracker), fp32, batch {act_batch_size}'
    return figures


# ---- the card ----

def _sig(x: float, digits: int = 3) -> str:
    """ `digits` significant digits, positional notation (1.29, 0.00123). """
    if x == 0 or not math.isfinite(x):
        return str(x)
    decimals = max(digits - 1 - math.floor(math.log10(abs(x))), 0)
    return f'{x:.{decimals}f}'


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def _dataset_key(dataset: str) -> str:
    return dataset.rsplit('/', 1)[-1].lower().replace('-', '').replace('_', '')


def _tag_of(repo_name: str, architecture: str) -> Optional[str]:
    prefix = f'{architecture}.'
    return repo_name[len(prefix):] if repo_name.startswith(prefix) else None


def _registry_note(repo_id: str, architecture: str) -> str:
    namespace, repo_name = repo_id.split('/', 1)
    tag = _tag_of(repo_name, architecture)
    if tag is None:
        return ''
    model_tag = f'{architecture}.{tag}'
    env = '' if namespace == hub_namespace() else f' with `{HUB_NAMESPACE_ENV}={namespace}` set'
    return (f'The registered name loads the same weights{env}: '
            f'`timm.create_model("{model_tag}", pretrained=True)`.\n')


def _comparison_table(run: Run, figures: Dict[str, Any], benchmark: Optional[Benchmark]) -> str:
    header = ('| model | depth | mode | params (M) | GMACs | activation memory (MiB/img) | top-1 (%) |\n'
              '|---|---|---|---|---|---|---|\n')
    this = (f"| **{run.architecture}** (this run) | {figures['depth']} | {_MODE_LABELS[figures['mode']]} | "
            f"{_sig(figures['params'] / 1e6)} | {_sig(figures['gmacs'])} | {figures['act_bytes'] / MiB:.2f} | "
            f"{run.results['best_top1']:.2f} |\n")
    if benchmark is None:
        return header + this + '\nThe other timm-reversible models are compared by the benchmark of the repository.\n'
    rows = []
    for r in benchmark.rows:
        act = _row_act_bytes(r)
        if act is None or r['depth'] != figures['depth'] or (
                _row_name(r) == run.architecture and _row_mode(r) == figures['mode'] and not r.get('kwargs')):
            continue
        params = _sig(r['params_m']) if r.get('params_m') is not None else '-'
        gmacs = _sig(r['gflops'] / 2) if r.get('gflops') is not None else '-'
        rows.append(f"| {r['model']} | {r['depth']} | {_MODE_LABELS[_row_mode(r)]} | {params} | {gmacs} | "
                    f"{act / MiB:.2f} | - |\n")
    return (header + this + ''.join(rows) + f'\nOther rows: the benchmark of the repository ({benchmark.name}), '
            f'same depth and measurement; it does not train, so no accuracy.\n')


# Arguments of a training run that describe the machine it ran on, not the recipe; kept off the card.
LOCAL_RECIPE_KEYS = (
    'output', 'experiment', 'data_dir', 'resume', 'initial_checkpoint', 'config', 'workers', 'log_interval',
    'checkpoint_hist', 'dataset_download',
)


def public_recipe(recipe: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """ The training recipe for the card: without local paths and machine settings, without unset (None) values. """
    return {k: v for k, v in (recipe or {}).items() if k not in LOCAL_RECIPE_KEYS and v is not None}


def card_fields(
        run: Run,
        repo_id: str,
        figures: Dict[str, Any],
        template: CardTemplate,
        benchmark: Optional[Benchmark] = None,
) -> Dict[str, str]:
    """ The values of every `CARD_FIELDS` placeholder. """
    results = run.results
    dataset = str(results['dataset'])
    key = _dataset_key(dataset)
    model_args = run.config.get('model_args', results.get('model_args') or {})
    peak = results['peak_memory_mib']
    fields = dict(
        repo_id=repo_id,
        repo_name=repo_id.split('/', 1)[1],
        model_name=run.architecture,
        load_name=f'hf-hub:{repo_id}',
        registry_note=_registry_note(repo_id, run.architecture),
        license=run.config['pretrained_cfg'].get('license', 'apache-2.0'),
        datasets_yaml=f'- {HUB_DATASETS.get(key, dataset.rsplit("/", 1)[-1])}',
        dataset=dataset,
        num_classes=str(results['num_classes']),
        img_size=str(results['img_size']),
        params_m=_sig(figures['params'] / 1e6),
        gmacs=_sig(figures['gmacs']),
        act_mib=f"{figures['act_bytes'] / MiB:.2f}",
        act_source=figures['act_source'],
        depth=str(figures['depth']),
        model_args=', '.join(f'{k}={v!r}' for k, v in model_args.items()),
        top1=f"{results['best_top1']:.2f}",
        top5=f"{results['best_top5']:.2f}",
        best_epoch=str(results['best_epoch'] + 1),  # results.json counts from 0, as timm's summary.csv
        epochs=str(results['epochs']),
        train_loss=f"{results['train_loss']:.4f}",
        wall_time=_duration(results['wall_time_s']),
        peak_memory='not measured (CPU)' if peak is None else f'{peak:.0f} MiB',
        device=str(results['device']),
        num_processes=str(results['num_processes']),
        mixed_precision=str(results['mixed_precision']),
        weights='EMA of the model weights' if results['weights'] == 'ema' else 'model weights (no EMA)',
        recipe_yaml=yaml.safe_dump(public_recipe(results['recipe']), sort_keys=True, default_flow_style=False).rstrip(),
        comparison_table=_comparison_table(run, figures, benchmark),
    )
    model = template.model
    fields.update(
        description=string.Template(model['description']).safe_substitute(dataset=dataset).rstrip(),
        papers='\n'.join(f'  - {paper}' for paper in model['papers']),
        memory_saving=render_card(template.memory_saving, fields) if model['memory_saving'] else '',
        citations='\n'.join(f'```bibtex\n{entry.rstrip()}\n```' for entry in model['citations']),
    )
    assert set(fields) == set(CARD_FIELDS)
    return fields


def render_card(template: str, fields: Dict[str, str]) -> str:
    """ Fill the `${name}` placeholders of a card template; an unknown placeholder is an error. """
    try:
        return string.Template(template).substitute(fields)
    except (KeyError, ValueError) as e:
        raise PublishError(f'Model card template has a bad placeholder: {e}; known: {", ".join(CARD_FIELDS)}') from e


def build_card(
        run: Run,
        repo_id: str,
        figures: Dict[str, Any],
        benchmark: Optional[Benchmark] = None,
        template_dir: Optional[Union[str, Path]] = None,
) -> str:
    """ README.md of the run, from the card template and its architecture's fields. """
    template = card_template(run.architecture, template_dir)
    return render_card(template.text, card_fields(run, repo_id, figures, template, benchmark))


# ---- checks, staging, upload ----

def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PublishError(f'Invalid --repo-id {repo_id!r}: {e}') from e
    if repo_id.count('/') != 1:
        raise PublishError(f'--repo-id must be NAMESPACE/NAME (your user or organisation), got {repo_id!r}.')


def check_registry_name(run: Run, repo_id: str, model: torch.nn.Module) -> None:
    """ A repository named `<model>.<tag>` is what `create_model('<model>.<tag>', pretrained=True)` loads:
    the registered model with default arguments must then reproduce the run, on the tag's dataset. """
    tag = _tag_of(repo_id.split('/', 1)[1], run.architecture)
    if tag is None:
        return
    model_tag = f'{run.architecture}.{tag}'
    if model_tag not in timm.list_pretrained(model_tag):
        raise PublishError(
            f'{model_tag!r} is not a registered pretrained tag '
            f'(known: {", ".join(timm.list_pretrained(run.architecture + ".*"))}); '
            f'name the repository differently, e.g. {run.architecture}-{tag}.')
    expected = TAG_DATASETS.get(tag)
    if expected and _dataset_key(expected[0]) != _dataset_key(str(run.results['dataset'])):
        raise PublishError(
            f'The tag .{tag} stands for {expected[1]}, but this run trained on {run.results["dataset"]!r}; '
            f'publish it under another name (e.g. {run.architecture}-{_dataset_key(str(run.results["dataset"]))}).')
    reason = ''
    try:
        registered = timm.create_model(
            model_tag, pretrained=True, pretrained_cfg_overlay=dict(file=str(run.weights))).eval()
        x = torch.randn(2, *model_input_size(model), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            if not torch.equal(registered(x), model(x)):
                reason = 'its outputs differ from the run\'s'
    except RuntimeError as e:
        reason = f'its weights do not fit ({str(e).splitlines()[0]})'
    if reason:
        raise PublishError(
            f'The run was trained with model_args {run.config.get("model_args")}; '
            f'timm.create_model({model_tag!r}, pretrained=True) builds the default architecture and {reason}. '
            f'Publish it under another name and load it with timm.create_model("hf-hub:<repo>", pretrained=True).')


def check_folder(folder: Union[str, Path], overwrite: bool = False) -> None:
    """ `folder` may receive the published files: it is new or empty, or, with `overwrite`, holds only files of
    the names it would write (which are then replaced). Nothing it did not write is ever replaced unasked.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PublishError(f'{folder} is not a folder.')
    present = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    others = [name for name in present if name not in PUBLISHED_FILES]
    if others:
        raise PublishError(f'{folder} holds other files ({", ".join(others)}); give an empty or new folder.')
    if present and not overwrite:
        raise PublishError(
            f'{folder} already holds {", ".join(present)}; publishing would replace them. Give an empty or new '
            f'folder, or pass --overwrite (overwrite=True) to replace them.')


def stage(run: Run, readme: str, folder: Union[str, Path], overwrite: bool = False) -> Path:
    """ Write the published files (and nothing else) into `folder`, all with the same (umask) permissions. """
    check_folder(folder, overwrite)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run.weights, folder / 'model.safetensors')
    shutil.copyfile(run.path / 'config.json', folder / 'config.json')
    (folder / 'README.md').write_text(readme, encoding='utf-8')
    return folder


def hub_token() -> str:
    """ The Hugging Face token (HF_TOKEN or `hf auth login`), or a clear error. """
    from huggingface_hub import get_token
    token = get_token()
    if not token:
        raise PublishError(
            'No Hugging Face token found, so nothing can be uploaded. Log in with `hf auth login` '
            '(a token with write access) or set HF_TOKEN; or write the files locally with --dry-run --local-dir DIR.')
    return token


def upload(folder: Union[str, Path], repo_id: str, private: bool = False, token: Optional[str] = None,
           commit_message: Optional[str] = None) -> Any:
    """ Create the repository if needed and upload the files of `folder` in one commit. """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from . import __version__
    api = HfApi(token=token or hub_token(), library_name='timm-reversible', library_version=__version__)
    try:
        repo = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        return api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=str(folder),
            allow_patterns=list(PUBLISHED_FILES),
            commit_message=commit_message or f'Publish {repo_id.split("/", 1)[1]} (timm-reversible)',
        )
    except HfHubHTTPError as e:
        status = getattr(getattr(e, 'response', None), 'status_code', None)
        hint = (' The token lacks write access to this namespace: log in with `hf auth login` using a token '
                'that has it, or set HF_TOKEN.' if status in (401, 403) else '')
        raise PublishError(f'Uploading to {repo_id!r} failed: {str(e).splitlines()[0]}.{hint}') from e


@dataclass
class PublishResult:
    """ What `publish` did: the folder written (None for a temporary one), the card, the figures, the commit. """
    repo_id: str
    folder: Optional[Path]
    readme: str
    figures: Dict[str, Any]
    commit: Any = None


def publish(
        run_dir: Union[str, Path],
        repo_id: str,
        private: bool = False,
        dry_run: bool = False,
        local_dir: Optional[Union[str, Path]] = None,
        benchmark: Optional[Union[str, Path]] = None,
        act_batch_size: int = DEFAULT_ACT_BATCH_SIZE,
        template_dir: Optional[Union[str, Path]] = None,
        overwrite: bool = False,
) -> PublishResult:
    """ Publish a finished run: write the files to `local_dir` and, unless `dry_run`, upload them to `repo_id`. """
    if dry_run and local_dir is None:
        raise PublishError('--dry-run writes the files to --local-dir DIR; give one.')
    check_repo_id(repo_id)
    run = load_run(run_dir)
    card_template(run.architecture, template_dir)
    if local_dir is not None:
        check_folder(local_dir, overwrite)
    token = None if dry_run else hub_token()  # before the slow part
    bench_rows = read_benchmark(benchmark) if benchmark else None

    model = load_run_model(run)
    check_registry_name(run, repo_id, model)
    figures = model_figures(model, bench_rows, act_batch_size)
    readme = build_card(run, repo_id, figures, bench_rows, template_dir)

    if local_dir is not None:
        folder = stage(run, readme, local_dir, overwrite)
        commit = None if dry_run else upload(folder, repo_id, private, token)
        return PublishResult(repo_id, folder, readme, figures, commit)
    with tempfile.TemporaryDirectory(prefix='timm_reversible_publish_') as tmp:
        folder = stage(run, readme, tmp)
        commit = upload(folder, repo_id, private, token)
    return PublishResult(repo_id, None, readme, figures, commit)


_CLI_DESCRIPTION = """Publish a finished training run to the Hugging Face Hub: model.safetensors, config.json, README.md.

    python scripts/publish.py output/vit_small_cifar.c10 --repo-id timm-reversible/vit_small_cifar.c10
    python scripts/publish.py output/digits_run --repo-id me/vit_small_cifar-digits --dry-run --local-dir published/
"""


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """ The command line of `scripts/publish.py`; returns its exit code. """
    parser = argparse.ArgumentParser(
        prog='publish.py', description=_CLI_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('run_dir', metavar='RUN_DIR', help='finished run: <output>/<experiment> of scripts/train.py')
    parser.add_argument('--repo-id', required=True,
                        help='Hub repository NAMESPACE/NAME; NAME <model>.<tag> (e.g. vit_small_cifar.c10) is what '
                             'timm.create_model("<model>.<tag>", pretrained=True) loads')
    parser.add_argument('--private', action='store_true', help='create the repository as private (if it is new)')
    parser.add_argument('--dry-run', action='store_true', help='write the files to --local-dir, upload nothing')
    parser.add_argument('--local-dir', metavar='DIR', help='folder to write the published files to (and keep)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace model.safetensors, config.json and README.md already in --local-dir')
    parser.add_argument('--benchmark', metavar='PATH',
                        help='results.json of scripts/benchmark.py: activation memory and the comparison table')
    parser.add_argument('--act-batch-size', type=int, default=DEFAULT_ACT_BATCH_SIZE,
                        help='batch of the CPU activation-memory measurement without --benchmark (default %(default)s)')
    parser.add_argument('--card-dir', metavar='DIR', help='folder with model_card.md, memory_saving.md and models.yaml (default: the package\'s)')
    args = parser.parse_args(argv)
    if args.dry_run and not args.local_dir:
        parser.error('--dry-run needs --local-dir DIR')

    try:
        result = publish(
            args.run_dir, args.repo_id, private=args.private, dry_run=args.dry_run, local_dir=args.local_dir,
            benchmark=args.benchmark, act_batch_size=args.act_batch_size, template_dir=args.card_dir,
            overwrite=args.overwrite)
    except PublishError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    f = result.figures
    print(f"{args.repo_id}: {f['params'] / 1e6:.2f}M params, {f['gmacs']:.4g} GMACs, "
          f"{f['act_bytes'] / MiB:.2f} MiB/img activations ({f['act_source']})")
    if result.folder is not None:
        print(f'wrote {", ".join(PUBLISHED_FILES)} to {result.folder}')
        print(f'load: timm.create_model("local-dir:{result.folder}", pretrained=True)')
    if result.commit is not None:
        print(f'uploaded: {getattr(result.commit, "commit_url", result.commit)}')
        print(f'load: timm.create_model("hf-hub:{args.repo_id}", pretrained=True)')
    return 0
