""" The training state of `scripts/train.py`: atomic, verified checkpoints, resuming, and the outputs of a run.

A run's folder `<output>/<experiment>` holds `args.yaml`, `summary.csv` (timm's columns), the best weights as
`model.safetensors` + `config.json` (timm's `save_for_hf`), `results.json` and `checkpoints/`: one folder per
epoch (`epoch-NNNN`, Accelerate's `save_state` plus the best weights of that moment and a `manifest.json` of
every file's size and SHA-256) and `latest`, naming the newest. Every write goes to a temporary name first and is
renamed into place, so a run killed at any moment leaves the previous state usable; every state is verified
before it is used, and a damaged one is reported by name and passed over for the newest intact one.
"""
import csv
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import random
import shutil
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

try:
    import resource  # not on Windows
except ImportError:  # pragma: no cover
    resource = None

import numpy as np
import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator
from safetensors import safe_open
from timm.models import save_for_hf

__all__ = [
    'CHECKPOINTS', 'LATEST', 'MANIFEST', 'BEST_FILES', 'NonFiniteLossError', 'TrainingStateError',
    'ResumeArgsError', 'TrainProgress', 'write_atomic', 'write_manifest', 'verify_checkpoint', 'latest_checkpoint',
    'save_checkpoint', 'resolve_resume', 'load_checkpoint', 'restore_outputs', 'save_best', 'read_summary',
    'RESUME_FREE_ARGS', 'STATE_RESTORED_ARGS', 'resume_arg_changes', 'check_resume_args', 'yaml_safe',
    'read_args_yaml', 'run_changes_note', 'dataset_tag', 'RESULTS_FILE', 'RESULTS_KEYS', 'REQUIRED_RESULTS_KEYS',
    'run_results', 'MEASURED_SUMMARY_COLUMNS',
    'TRACKER_EXTRAS', 'MissingTrackerError', 'check_trackers', 'peak_memory_mib', 'memory_source',
]

_logger = logging.getLogger(__name__)

CHECKPOINTS = 'checkpoints'
LATEST = 'latest'
MANIFEST = 'manifest.json'
BEST_FILES = ('model.safetensors', 'config.json')
RESULTS_FILE = 'results.json'
# what results.json holds, the record of a finished run that publishing reads
# what publishing needs (runs made before the study figures were recorded have only these)
REQUIRED_RESULTS_KEYS = (
    'model', 'model_args', 'dataset', 'num_classes', 'img_size', 'best_top1', 'best_top5', 'best_epoch', 'epochs',
    'train_loss', 'wall_time_s', 'peak_memory_mib', 'device', 'num_processes', 'mixed_precision', 'recipe', 'weights',
)
RESULTS_KEYS = REQUIRED_RESULTS_KEYS + (
    'batch_size', 'params', 'gflops', 'time_per_epoch_s', 'train_img_s', 'peak_memory_reserved_mib', 'peak_rss_mib',
    'memory_source',
)
# summary.csv's columns that measure the machine, not the training: they differ between two runs of the same training
MEASURED_SUMMARY_COLUMNS = ('train_img_s', 'train_time_s', 'train_epoch_time_s', 'train_peak_mem_mib',
                            'train_peak_reserved_mib', 'train_peak_rss_mib')
# Accelerate's trackers that need a package of their own, and the extra that installs it
TRACKER_EXTRAS = {'tensorboard': 'tensorboard', 'wandb': 'wandb', 'comet_ml': 'comet_ml', 'aim': 'aim',
                  'mlflow': 'mlflow', 'clearml': 'clearml', 'dvclive': 'dvclive', 'swanlab': 'swanlab',
                  'trackio': 'trackio'}
_STATE_PREFIX = 'epoch-'


class NonFiniteLossError(RuntimeError):
    """ The training loss or the activations became NaN or infinite. """


class TrainingStateError(RuntimeError):
    """ A training state cannot be used: damaged, incomplete, or not restorable in this setting. """


class MissingTrackerError(ModuleNotFoundError):
    """ `--log-with` names a tracker whose package is not installed. """


class ResumeArgsError(ValueError):
    """ A resumed run was given flags that cannot change in the middle of a run. """


@dataclass
class TrainProgress:
    """ Where training stands; checkpointed with the training state so a resumed run carries on from it. """
    epoch: int = -1  # last completed epoch
    num_updates: int = 0
    train_loss: Optional[float] = None
    best_top1: Optional[float] = None
    best_top5: Optional[float] = None
    best_epoch: Optional[int] = None
    best_weights: Optional[str] = None
    wall_time_s: float = 0.
    peak_memory_mib: Optional[float] = None  # CUDA: max_memory_allocated over the run
    peak_memory_reserved_mib: Optional[float] = None  # CUDA: max_memory_reserved
    peak_rss_mib: Optional[float] = None  # the process's peak resident set (CPU runs: the best figure there is)
    train_seconds: float = 0.  # in train_one_epoch only: what img/s is measured over
    train_images: int = 0
    epochs_run: int = 0

    def state_dict(self) -> Dict[str, Any]:
        """ For Accelerate's `register_for_checkpointing`. """
        return asdict(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


# ---- files ----

def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), 'rb') as f:
                os.fsync(f.fileno())


def _chmod_tree(path: str, mode: int) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            os.chmod(os.path.join(root, name), mode)


def write_atomic(path: str, text: str) -> None:
    """ Write `text` to `path` through a temporary file renamed into place. """
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # the best weights are immutable once written: a hard link costs no space
    except OSError:
        shutil.copy2(src, dst)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _state_files(ckpt_dir: str) -> List[str]:
    return sorted(
        os.path.relpath(os.path.join(root, name), ckpt_dir)
        for root, _, names in os.walk(ckpt_dir) for name in names if name != MANIFEST)


def write_manifest(ckpt_dir: str) -> None:
    """ Record the size and SHA-256 of every file of a training state in its manifest.json. """
    files = {
        rel: dict(size=os.path.getsize(os.path.join(ckpt_dir, rel)), sha256=_sha256(os.path.join(ckpt_dir, rel)))
        for rel in _state_files(ckpt_dir)}
    write_atomic(os.path.join(ckpt_dir, MANIFEST), json.dumps(dict(files=files), indent=1) + '\n')


def verify_checkpoint(ckpt_dir: str) -> List[str]:
    """ What is wrong with a training state folder (an empty list when it is intact): files missing, of another
    size or hash than its manifest says, safetensors whose header does not parse, pickles that do not load.
    """
    manifest_path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(manifest_path):
        return [f'{MANIFEST} is missing (the state was not completely written)']
    try:
        with open(manifest_path) as f:
            expected = json.load(f)['files']
    except (OSError, ValueError, KeyError) as e:
        return [f'{MANIFEST} is unreadable ({e})']
    problems = []
    for rel, entry in sorted(expected.items()):
        path = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(path):
            problems.append(f'{rel} is missing')
        elif os.path.getsize(path) != entry['size']:
            problems.append(f'{rel} has {os.path.getsize(path)} bytes, {entry["size"]} were written')
        elif _sha256(path) != entry['sha256']:
            problems.append(f'{rel} has changed since it was written (SHA-256 differs)')
        elif rel.endswith('.safetensors'):
            try:
                with safe_open(path, framework='pt') as f:
                    f.keys()
            except Exception as e:  # the library raises several types for a bad header
                problems.append(f'{rel} is not a readable safetensors file ({e})')
    return problems


def _states(ckpt_root: str) -> List[str]:
    if not os.path.isdir(ckpt_root):
        return []
    return sorted(d for d in os.listdir(ckpt_root) if d.startswith(_STATE_PREFIX))


def latest_checkpoint(exp_dir: str) -> Optional[str]:
    """ The newest intact training state of an experiment, or None. A damaged one is logged and passed over. """
    ckpt_root = os.path.join(exp_dir, CHECKPOINTS)
    pointer = os.path.join(ckpt_root, LATEST)
    named = None
    if os.path.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip()
    # newest first: the one 'latest' names, then every epoch-* folder (each renamed into place once written)
    candidates = ([named] if named else []) + [d for d in reversed(_states(ckpt_root)) if d != named]
    for name in candidates:
        path = os.path.join(ckpt_root, name)
        if not os.path.isdir(path):
            continue
        problems = verify_checkpoint(path)
        if not problems:
            if name != named and named:
                _logger.warning(f'Resuming from {path}, the newest intact training state.')
            return path
        _logger.warning(f'Training state {path} is damaged and is passed over: {"; ".join(problems)}.')
    return None


def save_checkpoint(accelerator: Accelerator, exp_dir: str, epoch: int, keep: int) -> str:
    """ Save the full training state after `epoch` atomically; returns its directory.

    Every process writes into a temporary directory (Accelerate saves each process's RNG state); the main
    process then adds a link to the current best weights and the manifest, renames the directory into place
    and only then moves the 'latest' pointer, so a kill at any point leaves the previous state usable.
    """
    ckpt_root = os.path.join(exp_dir, CHECKPOINTS)
    name = f'{_STATE_PREFIX}{epoch:04d}'
    tmp = os.path.join(ckpt_root, f'.tmp-{name}')
    final = os.path.join(ckpt_root, name)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(ckpt_root, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # the best weights belong to the state: resuming from it restores them with the best score
        os.makedirs(os.path.join(tmp, 'best'), exist_ok=True)
        for fname in BEST_FILES:
            src = os.path.join(exp_dir, fname)
            if os.path.isfile(src):
                _link_or_copy(src, os.path.join(tmp, 'best', fname))
        _chmod_tree(tmp, _default_file_mode())  # Accelerate's safetensors are written 0600, its pickles 0644
        write_manifest(tmp)
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_atomic(os.path.join(ckpt_root, LATEST), name + '\n')
        states = _states(ckpt_root)
        for old in states[:max(0, len(states) - max(1, keep))]:
            if old != name:
                shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(path: str) -> Tuple[Optional[str], str]:
    """ --resume PATH -> (checkpoint dir or None, experiment dir it belongs to).

    PATH may be an experiment dir (its newest intact state; none yet starts from scratch there, so a job that
    always passes --resume works from its first launch on), its checkpoints/ dir, or one checkpoint dir, which
    must then be intact.
    """
    path = os.path.normpath(path)
    if os.path.basename(path) == CHECKPOINTS and os.path.isdir(path):
        exp_dir = os.path.dirname(path)
        return latest_checkpoint(exp_dir), exp_dir
    if os.path.basename(os.path.dirname(path)) == CHECKPOINTS and os.path.isdir(path):  # <exp>/checkpoints/<state>
        problems = verify_checkpoint(path)
        if problems:
            raise TrainingStateError(f'--resume {path}: the training state is damaged: {"; ".join(problems)}.')
        return path, os.path.dirname(os.path.dirname(path))
    if os.path.isdir(path):
        return latest_checkpoint(path), path
    raise FileNotFoundError(f'--resume {path!r}: no such experiment or checkpoint directory.')


def load_checkpoint(accelerator: Accelerator, ckpt_dir: str, allow_changes: bool = False) -> None:
    """ Restore a verified training state, random states included.

    A state whose random states cannot be restored here stops the resume, since the run would no longer be the one
    it continues: written by another number of processes (each has its own random streams and the global batch
    differs; `allow_changes` lets fewer processes go on), unreadable, or not restored by Accelerate, which catches
    any error there and only logs it at INFO, so the generators are compared with the saved states afterwards.
    """
    written_by = sum(1 for f in os.listdir(ckpt_dir) if f.startswith('random_states_'))
    process = accelerator.process_index
    if written_by != accelerator.num_processes and not (allow_changes and written_by > accelerator.num_processes):
        raise TrainingStateError(
            f'{ckpt_dir} was written by {written_by} process(es), this run has {accelerator.num_processes}: the '
            f'global batch and the random streams of the processes would differ. Resume with {written_by} '
            f'process(es), or pass --resume-allow-changes to go on with fewer.')
    random_states = os.path.join(ckpt_dir, f'random_states_{process}.pkl')
    try:
        with open(random_states, 'rb') as f:
            saved = torch.load(f, weights_only=False)
        if not isinstance(saved, dict) or 'torch_manual_seed' not in saved:
            raise KeyError('torch_manual_seed')
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, RuntimeError, TypeError) as e:
        raise TrainingStateError(
            f'The random states of process {process} cannot be restored from {random_states} '
            f'({type(e).__name__}: {e}).') from e
    accelerator.load_state(ckpt_dir)
    unrestored = _unrestored_random_states(saved)
    if unrestored:
        raise TrainingStateError(
            f'The random states of process {process} in {random_states} were not restored ({", ".join(unrestored)}): '
            f'the resumed run would not be the one it continues. Resume on a machine like the one that wrote the '
            f'state, or start anew.')


def _unrestored_random_states(saved: Mapping[str, Any]) -> List[str]:
    """ The generators whose state differs from `saved` (Accelerate's random_states_N.pkl). """
    unrestored = []
    if random.getstate() != saved.get('random_state'):
        unrestored.append('python')
    numpy_saved, numpy_now = saved.get('numpy_random_seed'), np.random.get_state()
    if numpy_saved is None or not (numpy_now[0] == numpy_saved[0] and np.array_equal(numpy_now[1], numpy_saved[1])
                                   and tuple(numpy_now[2:]) == tuple(numpy_saved[2:])):
        unrestored.append('numpy')
    if not torch.equal(torch.get_rng_state(), saved['torch_manual_seed']):
        unrestored.append('torch')
    if torch.cuda.is_available():
        cuda_saved = saved.get('torch_cuda_manual_seed')
        cuda_now = torch.cuda.get_rng_state_all()
        if cuda_saved is None or len(cuda_saved) != len(cuda_now) or not all(
                torch.equal(a, b) for a, b in zip(cuda_now, cuda_saved)):
            unrestored.append('cuda')
    return unrestored


def read_summary(path: str) -> List[Dict[str, str]]:
    """ The rows of a summary.csv (timm's `update_summary` format); none when it does not exist yet. """
    if not os.path.isfile(path):
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def restore_outputs(ckpt_dir: str, src_exp: str, exp_dir: str, last_epoch: int) -> None:
    """ Make the experiment's best weights and summary agree with a state being resumed.

    A run killed after epoch N+1 wrote its row or best weights but before its state was saved would otherwise
    keep them; epoch N+1 runs again and writes them anew.
    """
    # states after the one resumed belong to the abandoned continuation: training rewrites them
    ckpt_root = os.path.join(exp_dir, CHECKPOINTS)
    for d in _states(ckpt_root):
        if int(d[len(_STATE_PREFIX):]) > last_epoch:
            shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)
    for fname in BEST_FILES:
        src, dst = os.path.join(ckpt_dir, 'best', fname), os.path.join(exp_dir, fname)
        if os.path.isfile(src):
            if not (os.path.exists(dst) and os.path.samefile(src, dst)):
                shutil.copy2(src, dst + '.tmp')
                os.replace(dst + '.tmp', dst)
        elif os.path.exists(dst):
            os.remove(dst)
    rows = [r for r in read_summary(os.path.join(src_exp, 'summary.csv')) if int(r['epoch']) <= last_epoch]
    summary = os.path.join(exp_dir, 'summary.csv')
    if rows:
        tmp = summary + '.tmp'
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, summary)
    elif os.path.exists(summary):
        os.remove(summary)


def save_best(
        model: nn.Module,
        exp_dir: str,
        model_args: Mapping[str, Any],
        data_config: Mapping[str, Any],
        pretrained_tag: Optional[str] = None,
) -> None:
    """ Best weights with timm's `save_for_hf` (model.safetensors + config.json), replaced atomically.

    The config's pretrained_cfg says what this run is: its tag (the dataset it trained on) and the input
    normalisation it trained with, not those of the model's registered weights.
    """
    tmp = os.path.join(exp_dir, '.best-tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    pretrained_cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    pretrained_cfg.update(
        {k: data_config[k] for k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
         if k in data_config})
    if pretrained_tag is not None:
        pretrained_cfg['tag'] = pretrained_tag
        for source in ('hf_hub_id', 'url', 'file'):
            pretrained_cfg.pop(source, None)  # this run's weights live with it, not where the registry points
    original_cfg = getattr(model, 'pretrained_cfg', None)
    model.pretrained_cfg = pretrained_cfg
    try:
        save_for_hf(model, tmp, model_config=dict(model_args=dict(model_args)), safe_serialization=True,
                    data_config=dict(data_config))
    finally:
        model.pretrained_cfg = original_cfg
    _chmod_tree(tmp, _default_file_mode())  # safetensors writes 0600; the run's other files follow the umask
    _fsync_tree(tmp)
    # config.json is the same for every epoch of a run, so the two renames never pair mismatched files
    for fname in BEST_FILES:
        os.replace(os.path.join(tmp, fname), os.path.join(exp_dir, fname))
    shutil.rmtree(tmp, ignore_errors=True)


# ---- resuming with other flags ----

# flags that may change between a run and its resumption without changing what is trained
RESUME_FREE_ARGS = frozenset({
    'resume', 'resume_allow_changes', 'experiment', 'output', 'workers', 'log_interval', 'checkpoint_hist',
    'config', 'validation_batch_size', 'data_dir', 'dataset_download', 'resumed_with_changes', 'log_with'})
# flags whose values the training state restores (optimizer hyper-parameters, the LR schedule): a new value on
# the command line would be recorded but not used, so the recorded value stays
STATE_RESTORED_ARGS = frozenset({
    'opt', 'opt_eps', 'opt_betas', 'momentum', 'weight_decay', 'layer_decay', 'sched', 'sched_on_updates', 'lr',
    'epochs',
    'lr_base', 'lr_base_size', 'lr_base_scale', 'warmup_lr', 'min_lr', 'decay_milestones', 'decay_epochs',
    'warmup_epochs', 'warmup_prefix', 'cooldown_epochs', 'patience_epochs', 'decay_rate', 'model_ema_decay',
    'model_ema_warmup'})


def resume_arg_changes(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """ {flag: (recorded value, new value)} for every flag that differs and matters to what is trained. """
    return {
        k: (recorded.get(k), now.get(k)) for k in sorted(set(recorded) | set(now))
        if k not in RESUME_FREE_ARGS and recorded.get(k) != now.get(k)}


def check_resume_args(recorded: Mapping[str, Any], now: Dict[str, Any], allow_changes: bool) -> Dict[str, Any]:
    """ The flags a resumed run goes on with, given those its args.yaml recorded.

    Without `allow_changes`, any difference is refused with a list of them. With it, the differences take effect
    and are recorded, except those the training state restores (optimizer, schedule), which keep their recorded
    values: those are what the run actually uses.
    """
    changes = resume_arg_changes(recorded, now)
    if not changes:
        return now
    listing = '; '.join(f'{k}: {old!r} -> {new!r}' for k, (old, new) in changes.items())
    if not allow_changes:
        raise ResumeArgsError(
            f'The resumed run was started with other flags, which cannot change in the middle of a run: {listing}. '
            f'Resume with the flags of its args.yaml, start a new --experiment, or pass --resume-allow-changes to '
            f'go on with the changed flags (the optimizer and schedule flags always come from the saved state).')
    kept = {k: recorded.get(k) for k in changes if k in STATE_RESTORED_ARGS}
    if kept:
        _logger.warning(
            'Resuming with changed flags; these come from the saved state and keep their recorded values: '
            + ', '.join(f'{k}={v!r}' for k, v in kept.items()))
    applied = {k: v for k, v in changes.items() if k not in STATE_RESTORED_ARGS}
    if applied:
        _logger.warning('Resuming with changed flags (--resume-allow-changes): ' + '; '.join(
            f'{k}: {old!r} -> {new!r}' for k, (old, new) in applied.items()))
    return dict(now, **kept)


def yaml_safe(values: Mapping[str, Any]) -> Dict[str, Any]:
    """ The values as plain YAML types (what args.yaml holds and reads back as). """
    return yaml.safe_load(yaml.safe_dump(dict(values), default_flow_style=False))


def read_args_yaml(exp_dir: str) -> Optional[Dict[str, Any]]:
    """ The flags an experiment recorded in its args.yaml, or None when it has none. """
    path = os.path.join(exp_dir, 'args.yaml')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return yaml.safe_load(f) or {}


def dataset_tag(dataset: str) -> str:
    """ The pretrained tag of weights trained on `dataset`: the package's registered tag where there is one
    ('torch/cifar10' -> 'c10'), else the dataset's own name ('digits', 'torch/cifar100' -> 'cifar100').
    """
    from ._hub import TAG_DATASETS
    for tag, (name, *_) in TAG_DATASETS.items():
        if name.lower() == dataset.lower():
            return tag
    name = dataset.rsplit('/', 1)[-1].lower()
    return ''.join(c if c.isalnum() else '_' for c in name) or 'custom'


def run_changes_note(exp_dir: str, epoch: int, changes: Mapping[str, Tuple[Any, Any]]) -> List[Dict[str, Any]]:
    """ The record of the flag changes a run went on with, those of its earlier resumes first:
    [{'epoch': first epoch (from 0) with them, 'changes': {flag: [old, new]}}, ...]; empty when it has none.
    """
    note = list((read_args_yaml(exp_dir) or {}).get('resumed_with_changes') or [])
    if changes:
        note.append(dict(epoch=epoch, changes={k: [old, new] for k, (old, new) in changes.items()}))
    return note


def check_trackers(log_with: Sequence[str]) -> None:
    """ Refuse a tracker whose package is missing before training starts, naming what to install. """
    for name in log_with:
        if name == 'all':
            continue
        if name not in TRACKER_EXTRAS:
            raise ValueError(f'--log-with {name}: not a tracker Accelerate supports ({", ".join(TRACKER_EXTRAS)}).')
        module = 'tensorboard' if name == 'tensorboard' else name
        if importlib.util.find_spec(module) is None and not (
                name == 'tensorboard' and importlib.util.find_spec('tensorboardX') is not None):
            extra = f'pip install "timm-reversible[{name}]"' if name == 'tensorboard' else f'pip install {module}'
            raise MissingTrackerError(f'--log-with {name} needs the {module} package, which is not installed: {extra}')


def peak_memory_mib(device: torch.device) -> Dict[str, Optional[float]]:
    """ Peak memory in MiB: CUDA's allocated and reserved bytes since `torch.cuda.reset_peak_memory_stats`, and
    the process's peak resident set since it started (on a CPU, where it also holds the data and the runtime).
    """
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if resource is not None else None
    figures: Dict[str, Optional[float]] = dict(
        allocated=None, reserved=None, rss=rss_kib / 1024 if rss_kib is not None else None)
    if device.type == 'cuda':
        figures.update(allocated=torch.cuda.max_memory_allocated(device) / 2 ** 20,
                       reserved=torch.cuda.max_memory_reserved(device) / 2 ** 20)
    return figures


def memory_source(device: torch.device) -> str:
    return ('CUDA max_memory_allocated over the run (max_memory_reserved beside it)' if device.type == 'cuda' else
            "torch's MemTracker: live tensors at the peak of one training step at the run's batch (CPU)")


def run_results(
        progress: TrainProgress,
        model: str,
        model_args: Mapping[str, Any],
        dataset: str,
        num_classes: int,
        img_size: int,
        epochs: int,
        device: str,
        num_processes: int,
        mixed_precision: str,
        recipe: Mapping[str, Any],
        batch_size: int = 0,
        params: int = 0,
        gflops: float = 0.,
        memory_source: str = '',
) -> Dict[str, Any]:
    """ The contents of results.json (`RESULTS_KEYS`, in that order): the run's settings and what it reached. """
    return dict(
        model=model,
        model_args=dict(model_args),
        dataset=dataset,
        num_classes=num_classes,
        img_size=img_size,
        best_top1=progress.best_top1,
        best_top5=progress.best_top5,
        best_epoch=progress.best_epoch,
        epochs=epochs,
        train_loss=progress.train_loss,
        wall_time_s=round(progress.wall_time_s, 3),
        peak_memory_mib=progress.peak_memory_mib,
        device=device,
        num_processes=num_processes,
        mixed_precision=mixed_precision,
        recipe=dict(recipe),
        weights=progress.best_weights,
        batch_size=batch_size,
        params=params,
        gflops=gflops,
        time_per_epoch_s=round(progress.wall_time_s / max(progress.epochs_run, 1), 3),
        train_img_s=round(progress.train_images / progress.train_seconds, 3) if progress.train_seconds else None,
        peak_memory_reserved_mib=progress.peak_memory_reserved_mib,
        peak_rss_mib=progress.peak_rss_mib,
        memory_source=memory_source,
    )
