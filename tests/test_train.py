""" scripts/train.py end to end, as a user runs it: real training on the offline digits in a subprocess, data
parallel over gloo with torchrun, exact resume after the process is killed, clean stops. The training state
code itself (timm_reversible.training) is tested in tests/test_faults.py.
"""
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config

from conftest import SMALL, TRAIN_SCRIPT, package_models, run_train_script as train, script_env, trained_summary
from timm_reversible.data import DigitsDataset
from timm_reversible.profiling import count_params
from timm_reversible.training import RESULTS_KEYS, resume_arg_changes

pytestmark = pytest.mark.slow  # each test trains models or starts processes

RECIPES = TRAIN_SCRIPT.parents[1] / 'recipes'

# on CUDA train_peak_mem_mib and train_peak_reserved_mib come before train_peak_rss_mib
SUMMARY_COLUMNS = ['epoch', 'train_loss', 'train_img_s', 'train_time_s', 'train_epoch_time_s', 'train_peak_rss_mib',
                   'eval_loss', 'eval_top1', 'eval_top5', 'lr']
RESULT_KEYS = {
    'model', 'model_args', 'dataset', 'num_classes', 'img_size', 'best_top1', 'best_top5', 'best_epoch', 'epochs',
    'train_loss', 'wall_time_s', 'peak_memory_mib', 'device', 'num_processes', 'mixed_precision', 'recipe', 'weights',
    'batch_size', 'params', 'gflops', 'time_per_epoch_s', 'train_img_s', 'peak_memory_reserved_mib', 'peak_rss_mib',
    'memory_source'}

# small models on 16x16 digits: a few seconds an epoch on one CPU thread
DIGITS = ['--dataset', 'digits', '--img-size', '16', '--workers', '0', '--log-interval', '1000',
          '--model-kwargs', *[f'{k}={v}' for k, v in SMALL.items()]]
FAST = ['--opt', 'adamw', '--lr', '2e-3', '--weight-decay', '0.05', '--sched', 'cosine', '--warmup-epochs', '0',
        '-b', '32', '--epochs', '4', '--no-aug', '--hflip', '0', '--smoothing', '0']


def _results(exp: Path) -> Dict[str, Any]:
    return json.loads((exp / 'results.json').read_text())


def _summary(exp: Path) -> List[Dict[str, str]]:
    with open(exp / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def _latest(exp: Path) -> str:
    return (exp / 'checkpoints' / 'latest').read_text().strip()


def _assert_same_tensors(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _flat(obj: Any) -> Any:
    # comparable form of a nested state: tensors as exact lists of their values
    if isinstance(obj, torch.Tensor):
        return (str(obj.dtype), obj.tolist())
    if isinstance(obj, dict):
        return {k: _flat(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flat(v) for v in obj]
    return obj


def _digits_loader(model: torch.nn.Module, batch_size: int) -> torch.utils.data.DataLoader:
    """ The digits test split, preprocessed as the model's own pretrained_cfg says. """
    cfg = resolve_data_config({}, model=model)
    ds = DigitsDataset('test', img_size=cfg['input_size'][1:], interpolation=cfg['interpolation'],
                       transform=create_transform(**cfg))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size)


@torch.no_grad()
def _digits_top1(model: torch.nn.Module, batch_size: int) -> float:
    """ Accuracy on the digits test split in the model's current mode (train or eval). """
    loader = _digits_loader(model, batch_size)
    correct = sum((model(x).argmax(-1) == y).sum().item() for x, y in loader)
    return 100. * correct / len(loader.dataset)


@pytest.mark.parametrize('model_name', package_models())
def test_digits_run_writes_the_output_contract(model_name: str, tmp_path: Path):
    """ A real run of every model on the offline digits: the training loss falls, far above chance (10%),
    outputs as agreed, weights reloadable by timm from the folder alone, a log line per epoch; the momentum
    model evaluates as it trains. (The suite's only training of the four models on the digits.)
    """
    proc = train(DIGITS + FAST + ['--model', model_name, '--output', str(tmp_path), '--experiment', 'run'], tmp_path)
    exp = tmp_path / 'run'
    results = _results(exp)
    rows = _summary(exp)
    losses = [float(r['train_loss']) for r in rows]
    print(f"{model_name}: digits train loss {losses[0]:.3f} -> {losses[-1]:.3f}, best top-1 "
          f"{results['best_top1']:.2f}% after {results['epochs']} epochs")
    assert results['best_top1'] > 70., results
    assert losses[-1] < 0.5 * losses[0], losses
    out = proc.stdout + proc.stderr
    assert [out.count(f'Epoch {e}/4:') for e in (1, 2, 3, 4)] == [1, 1, 1, 1], out
    assert 'Epoch 0/' not in out

    # the output contract scripts/publish.py reads
    assert set(results) == RESULT_KEYS == set(RESULTS_KEYS)
    assert results['model'] == model_name and results['num_classes'] == 10 and results['img_size'] == 16
    assert results['epochs'] == 4 and results['num_processes'] == 1 and results['weights'] == 'model'
    assert results['model_args'] == dict(SMALL, num_classes=10, in_chans=3, img_size=16, drop_rate=0.)
    assert results['recipe']['model'] == model_name and results['recipe']['lr'] == 2e-3
    assert yaml.safe_load((exp / 'args.yaml').read_text()) == results['recipe']
    assert list(rows[0].keys()) == SUMMARY_COLUMNS
    assert [int(r['epoch']) for r in rows] == [0, 1, 2, 3]
    # the study's figures in results.json are those of the epochs in summary.csv
    seconds = [float(r['train_time_s']) for r in rows]
    images = sum(float(r['train_img_s']) * t for r, t in zip(rows, seconds))
    assert results['train_img_s'] == pytest.approx(images / sum(seconds), rel=1e-3)
    epoch_seconds = [float(r['train_epoch_time_s']) for r in rows]
    assert all(e >= t > 0 for e, t in zip(epoch_seconds, seconds))
    assert results['time_per_epoch_s'] == pytest.approx(sum(epoch_seconds) / 4, abs=2e-3)
    assert results['peak_rss_mib'] == pytest.approx(max(float(r['train_peak_rss_mib']) for r in rows))
    assert results['batch_size'] == 32 and results['params'] == count_params(timm.create_model(
        model_name, **results['model_args'])) and results['gflops'] > 0
    assert 'MemTracker' in results['memory_source'] and results['peak_memory_reserved_mib'] is None
    assert 0 < results['peak_memory_mib'] < results['peak_rss_mib']
    assert max(float(r['eval_top1']) for r in rows) == pytest.approx(results['best_top1'])
    assert _latest(exp) == 'epoch-0003'

    config = json.loads((exp / 'config.json').read_text())
    assert config['architecture'] == model_name and config['num_classes'] == 10
    for k, v in SMALL.items():
        assert config['model_args'][k] == v
    assert config['model_args']['in_chans'] == 3 and config['model_args']['drop_rate'] == 0.
    cfg = config['pretrained_cfg']
    assert list(cfg['input_size']) == [3, 16, 16]
    # the run's own tag and normalisation, not those of the registered CIFAR-10 weights
    assert cfg['tag'] == 'digits' and 'hf_hub_id' not in cfg
    assert list(cfg['mean']) == list(timm.get_pretrained_cfg(model_name).mean)  # what the transforms used
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in exp.iterdir() if f.is_file()}
    assert len(set(modes.values())) == 1, modes

    # timm rebuilds the best model from the folder alone and scores what training reported
    model = timm.create_model(f'local-dir:{exp}', pretrained=True)
    _assert_same_tensors(model.state_dict(), load_file(exp / 'model.safetensors'))
    assert abs(_digits_top1(model.eval(), batch_size=32) - results['best_top1']) <= 100. / 355 + 1e-6
    if model_name == 'momentum_revvit_small':
        # the same update in training and evaluation: with no dropout, train-mode predictions are the eval ones
        x = next(iter(_digits_loader(model, batch_size=64)))[0]
        with torch.no_grad():
            assert torch.equal(model.train()(x), model.eval()(x))
        assert _digits_top1(model.train(), batch_size=32) == _digits_top1(model.eval(), batch_size=32)


def test_two_process_data_parallel_matches_single_process(tmp_path: Path):
    """ torchrun, 2 gloo processes x batch 8 == 1 process x batch 16: same weights, and every line logged once. """
    common = DIGITS + [
        '--model', 'vit_small_cifar', '--train-num-samples', '64', '--epochs', '2', '--opt', 'sgd', '--lr', '0.05',
        '--warmup-epochs', '0', '--no-aug', '--hflip', '0', '--smoothing', '0', '--output', str(tmp_path),
        '--log-interval', '2']
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone', str(TRAIN_SCRIPT),
         *common, '-b', '8', '--experiment', 'ddp'],
        capture_output=True, text=True, env=script_env(), cwd=tmp_path, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    train(common + ['-b', '16', '--experiment', 'single'], tmp_path)

    ddp, single = _results(tmp_path / 'ddp'), _results(tmp_path / 'single')
    assert ddp['num_processes'] == 2 and single['num_processes'] == 1
    # 8 SGD updates on the same global batches; only the order of the gradient reduction differs
    a = load_file(tmp_path / 'ddp' / 'checkpoints' / 'epoch-0001' / 'model.safetensors')
    b = load_file(tmp_path / 'single' / 'checkpoints' / 'epoch-0001' / 'model.safetensors')
    assert a.keys() == b.keys()
    start = timm.create_model('vit_small_cifar', **SMALL, img_size=16)
    assert any(not torch.allclose(b[k], v) for k, v in start.state_dict().items()), 'weights did not move'
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert abs(ddp['best_top1'] - single['best_top1']) <= 100. / 355 + 1e-6

    assert out.count('Training with 2 process(es)') == 1, out
    for epoch in (1, 2):
        assert out.count(f'Epoch {epoch}/2:') == 1, out
    assert out.count('Train: 1/2 [') == 1, out
    assert out.count('Done: best top1') == 1, out


RESUME_ARGS = DIGITS + [
    '--model', 'vit_small_cifar', '--train-num-samples', '256', '--epochs', '3', '-b', '32', '--opt', 'adamw',
    '--lr', '2e-3', '--warmup-epochs', '1', '--train-crop-mode', 'pad', '--crop-padding', '2', '--hflip', '0.5',
    '--aa', 'rand-m5-n1', '--reprob', '0.25', '--mixup', '0.2', '--cutmix', '1.0', '--smoothing', '0.1',
    '--drop-path', '0.1', '--model-ema', '--model-ema-decay', '0.9']


def _assert_same_run(a: Path, b: Path) -> None:
    """ The same weights, optimizer, schedule, EMA, best model, summary and results. """
    assert _latest(a) == _latest(b)
    state = Path('checkpoints') / _latest(a)
    _assert_same_tensors(load_file(a / state / 'model.safetensors'), load_file(b / state / 'model.safetensors'))
    # custom_checkpoint_0: progress (wall time differs), 1: LR scheduler, 2: EMA
    for name in ('custom_checkpoint_1.pkl', 'custom_checkpoint_2.pkl', 'optimizer.bin'):
        x, y = [torch.load(e / state / name, weights_only=False) for e in (a, b)]
        assert _flat(x) == _flat(y), name
    _assert_same_tensors(load_file(a / 'model.safetensors'), load_file(b / 'model.safetensors'))
    assert trained_summary(a) == trained_summary(b)
    for k in ('best_top1', 'best_top5', 'best_epoch', 'train_loss', 'weights'):
        assert _results(a)[k] == _results(b)[k], k
    assert not resume_arg_changes(_results(a)['recipe'], _results(b)['recipe'])


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory) -> Path:
    """ An uninterrupted run with every source of randomness on (augmentation, mixup/cutmix, random erasing,
    drop-path), to compare interrupted and damaged runs against.
    """
    out = tmp_path_factory.mktemp('straight')
    train(RESUME_ARGS + ['--output', str(out), '--experiment', 'run'], out)
    return out / 'run'


def test_resume_after_sigkill_is_exact(straight_run: Path, tmp_path: Path):
    """ The process is killed (SIGKILL) once its first epoch's state is saved, then resumed: the same run. """
    args = RESUME_ARGS + ['--output', str(tmp_path), '--experiment', 'killed']
    exp = tmp_path / 'killed'
    proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args], env=script_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not ((exp / 'checkpoints' / 'latest').is_file() and _latest(exp) == 'epoch-0000'):
        assert proc.poll() is None and time.monotonic() < deadline, 'the run ended before it could be killed'
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    train(RESUME_ARGS + ['--output', str(tmp_path), '--resume', str(exp)], tmp_path)
    _assert_same_run(exp, straight_run)


def test_nonfinite_loss_stops_with_message_and_keeps_last_good_state(tmp_path: Path):
    """ The lr jumps by 1e30 for the last update of epoch 1: the weights overflow, the run stops before
    saving them and says where to resume from, without a traceback. """
    args = DIGITS + FAST + [
        '--model', 'vit_small_cifar', '--train-num-samples', '128', '--epochs', '3', '--sched', 'multistep',
        '--decay-milestones', '2', '--decay-rate', '1e30', '--log-interval', '1', '--output', str(tmp_path),
        '--experiment', 'diverged']
    message = train(args, tmp_path, returncode=1).stderr
    exp = tmp_path / 'diverged'
    assert 'epoch 2' in message and ('nan' in message or 'inf' in message), message
    assert 'last good training state' in message and 'epoch-0000' in message and '--resume' in message, message
    assert 'Traceback' not in message
    assert _latest(exp) == 'epoch-0000'
    assert [int(r['epoch']) for r in _summary(exp)] == [0]
    assert not (exp / 'results.json').exists()
    state = load_file(exp / 'checkpoints' / 'epoch-0000' / 'model.safetensors')
    assert all(torch.isfinite(v).all() for v in state.values())


def test_missing_dataset_says_how_to_get_it(tmp_path: Path):
    err = train(['--dataset', 'torch/cifar10', '--data-dir', str(tmp_path / 'data'), '--output', str(tmp_path)],
                tmp_path, returncode=1).stderr
    assert 'torch/cifar10' in err and '--dataset-download' in err, err
    assert 'Traceback' not in err


def test_recipes(tmp_path: Path):
    """ Every recipe parses and trains (one digits batch, one epoch); the two CIFAR-10 recipes say what their
    names promise, and the command line overrides the file, as in timm.
    """
    overrides = DIGITS + ['--train-num-samples', '32', '-b', '32', '--epochs', '1', '--warmup-epochs', '0']
    for path in sorted(RECIPES.glob('*.yaml')):
        train(['-c', str(path), *overrides, '--output', str(tmp_path), '--experiment', path.stem], tmp_path)
    strong = yaml.safe_load((RECIPES / 'cifar10_vit_small.yaml').read_text())
    assert strong['dataset'] == 'torch/cifar10' and strong['model'] == 'vit_small_cifar'
    assert strong['opt'] == 'adamw' and strong['sched'] == 'cosine' and strong['warmup_epochs'] > 0
    assert strong['aa'].startswith('rand') and strong['mixup'] > 0 and strong['cutmix'] > 0
    assert strong['smoothing'] > 0 and strong['reprob'] > 0 and strong['drop_path'] > 0
    ref = yaml.safe_load((RECIPES / 'cifar10_reference.yaml').read_text())
    assert (ref['opt'], ref['lr'], ref['batch_size'], ref['epochs'], ref['sched']) == ('adam', 1e-4, 128, 400, 'constant')
    assert ref['train_crop_mode'] == 'pad' and ref['hflip'] == 0.5 and ref.get('color_jitter') is None
    assert ref.get('aa') is None
    assert ref['mixup'] == ref['cutmix'] == ref['reprob'] == ref['smoothing'] == ref['weight_decay'] == 0
    recorded = yaml.safe_load((tmp_path / 'cifar10_reference' / 'args.yaml').read_text())
    assert recorded['opt'] == 'adam' and recorded['epochs'] == 1 and recorded['dataset'] == 'digits'

    typo = tmp_path / 'typo.yaml'
    typo.write_text('batch_sise: 64\n')
    assert 'batch_sise' in train(['-c', str(typo)], tmp_path, returncode=2).stderr


def test_nonfinite_training_loss_stops_at_once(tmp_path: Path):
    """ Inputs that are all inf: the first training loss is NaN and the run stops there, saving nothing. """
    args = DIGITS + FAST + ['--model', 'vit_small_cifar', '--train-num-samples', '64', '--mean', 'inf',
                            '--output', str(tmp_path), '--experiment', 'nan']
    message = train(args, tmp_path, returncode=1).stderr
    assert 'Loss is nan at epoch 1, batch 1' in message and 'no training state' in message, message
    assert not (tmp_path / 'nan' / 'checkpoints').exists() and not (tmp_path / 'nan' / 'model.safetensors').exists()
