""" scripts/train.py: real training on the offline digits data, data parallel over gloo, exact resume.

Training runs in this process (calling the script's `main`) where a subprocess would only add its
start-up time; the data-parallel run is a real `torchrun` with two gloo processes.
"""
import csv
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import timm
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config

from conftest import SMALL, package_models
from timm_reversible.data import DigitsDataset

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / 'scripts' / 'train.py'
RECIPES = REPO / 'recipes'


def _load_script() -> Any:
    spec = importlib.util.spec_from_file_location('timm_reversible_train_script', TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load_script()

SUMMARY_COLUMNS = ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr']
RESULT_KEYS = {
    'model', 'model_args', 'dataset', 'num_classes', 'img_size', 'best_top1', 'best_top5', 'best_epoch', 'epochs',
    'train_loss', 'wall_time_s', 'peak_memory_mib', 'device', 'num_processes', 'mixed_precision', 'recipe', 'weights'}

# small models on 16x16 digits: a few seconds an epoch on one CPU thread
DIGITS = ['--dataset', 'digits', '--img-size', '16', '--workers', '0', '--log-interval', '1000',
          '--model-kwargs', *[f'{k}={v}' for k, v in SMALL.items()]]
FAST = ['--opt', 'adamw', '--lr', '2e-3', '--weight-decay', '0.05', '--sched', 'cosine', '--warmup-epochs', '0',
        '-b', '32', '--epochs', '4', '--no-aug', '--hflip', '0', '--smoothing', '0']


@pytest.fixture(autouse=True)
def _one_thread_and_fresh_accelerate():
    # One thread: float sums are the same from run to run, and a shared 2-core machine is not
    # oversubscribed by spinning threads. Accelerate keeps process-wide state: reset it after.
    threads = torch.get_num_threads()
    level = logging.getLogger().level
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    logging.getLogger().setLevel(level)
    AcceleratorState._reset_state(reset_partial_state=True)


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


@torch.no_grad()
def _digits_top1(model: torch.nn.Module, batch_size: int) -> float:
    """ Accuracy on the digits test split, preprocessed as the model's own pretrained_cfg says. """
    cfg = resolve_data_config({}, model=model)
    ds = DigitsDataset('test', img_size=cfg['input_size'][1:], interpolation=cfg['interpolation'],
                       transform=create_transform(**cfg))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size)
    model.eval()
    correct = sum((model(x).argmax(-1) == y).sum().item() for x, y in loader)
    return 100. * correct / len(ds)


@pytest.mark.parametrize('model_name', package_models())
def test_digits_training_far_above_chance(model_name: str, tmp_path: Path):
    """ A real run on the offline digits: far above chance (10%), outputs as agreed, weights reloadable. """
    results = train.main(DIGITS + FAST + ['--model', model_name, '--output', str(tmp_path), '--experiment', 'run'])
    exp = tmp_path / 'run'
    print(f"{model_name}: digits best top-1 {results['best_top1']:.2f}% after {results['epochs']} epochs")
    assert results['best_top1'] >= 70., results

    # the output contract scripts/publish.py reads
    assert set(json.loads((exp / 'results.json').read_text())) == RESULT_KEYS
    assert results['model'] == model_name and results['num_classes'] == 10 and results['img_size'] == 16
    assert results['epochs'] == 4 and results['num_processes'] == 1 and results['weights'] == 'model'
    assert results['model_args'] == dict(SMALL, num_classes=10, in_chans=3, img_size=16, drop_rate=0.)
    assert results['recipe']['model'] == model_name and results['recipe']['lr'] == 2e-3
    assert (exp / 'args.yaml').is_file()
    rows = _summary(exp)
    assert list(rows[0].keys()) == SUMMARY_COLUMNS
    assert [int(r['epoch']) for r in rows] == [0, 1, 2, 3]
    assert max(float(r['eval_top1']) for r in rows) == pytest.approx(results['best_top1'])
    assert _latest(exp) == 'epoch-0003'

    config = json.loads((exp / 'config.json').read_text())
    assert config['architecture'] == model_name and config['num_classes'] == 10
    for k, v in SMALL.items():
        assert config['model_args'][k] == v
    assert config['model_args']['in_chans'] == 3 and config['model_args']['drop_rate'] == 0.
    assert list(config['pretrained_cfg']['input_size']) == [3, 16, 16]

    # timm rebuilds the best model from the folder alone and scores what training reported
    model = timm.create_model(f'local-dir:{exp}', pretrained=True)
    _assert_same_tensors(model.state_dict(), load_file(exp / 'model.safetensors'))
    assert abs(_digits_top1(model, batch_size=32) - results['best_top1']) <= 100. / 355 + 1e-6


def test_two_process_data_parallel_matches_single_process(tmp_path: Path):
    """ torchrun, 2 gloo processes x batch 8 == 1 process x batch 16: same weights, and every line logged once. """
    common = DIGITS + [
        '--model', 'vit_small_cifar', '--train-num-samples', '64', '--epochs', '2', '--opt', 'sgd', '--lr', '0.05',
        '--warmup-epochs', '0', '--no-aug', '--hflip', '0', '--smoothing', '0', '--output', str(tmp_path),
        '--log-interval', '2']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.pop('ACCELERATE_MIXED_PRECISION', None)
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone', str(TRAIN_SCRIPT),
         *common, '-b', '8', '--experiment', 'ddp'],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    single = train.main(common + ['-b', '16', '--experiment', 'single'])

    ddp = json.loads((tmp_path / 'ddp' / 'results.json').read_text())
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
    for epoch in (0, 1):
        assert out.count(f'Epoch {epoch}/1:') == 1, out
    assert out.count('Train: 0 [') == 1, out
    assert out.count('Done: best top1') == 1, out


class _Killed(Exception):
    """ Stands in for the process dying. """


def test_resume_after_interruption_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """ Killed while writing epoch 1's state, then --resume: the same weights, EMA, best model and
    summary as an uninterrupted run, with every source of randomness on (augmentation, mixup/cutmix,
    random erasing, drop-path). """
    args = DIGITS + [
        '--model', 'vit_small_cifar', '--train-num-samples', '256', '--epochs', '3', '-b', '32', '--opt', 'adamw',
        '--lr', '2e-3', '--warmup-epochs', '1', '--train-crop-mode', 'pad', '--crop-padding', '2', '--hflip', '0.5',
        '--aa', 'rand-m5-n1', '--reprob', '0.25', '--mixup', '0.2', '--cutmix', '1.0', '--smoothing', '0.1',
        '--drop-path', '0.1', '--model-ema', '--model-ema-decay', '0.9', '--output', str(tmp_path)]
    train.main(args + ['--experiment', 'straight'])

    save_state = Accelerator.save_state

    def dies_during_epoch_1(self, output_dir=None, **kwargs):
        if 'epoch-0001' in str(output_dir):
            os.makedirs(output_dir, exist_ok=True)
            Path(output_dir, 'model.safetensors').write_bytes(b'half a file')
            raise _Killed
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, 'save_state', dies_during_epoch_1)
    with pytest.raises(_Killed):
        train.main(args + ['--experiment', 'interrupted'])
    monkeypatch.setattr(Accelerator, 'save_state', save_state)
    interrupted = tmp_path / 'interrupted'
    # the broken write is left under a temporary name: 'latest' still names the last complete state
    assert _latest(interrupted) == 'epoch-0000'
    assert not (interrupted / 'checkpoints' / 'epoch-0001').exists()
    assert [int(r['epoch']) for r in _summary(interrupted)] == [0, 1]  # epoch 1 ran, its state was lost

    resumed = train.main(args + ['--resume', str(interrupted)])
    straight = tmp_path / 'straight'
    assert _latest(interrupted) == _latest(straight) == 'epoch-0002'
    _assert_same_tensors(load_file(interrupted / 'checkpoints' / 'epoch-0002' / 'model.safetensors'),
                         load_file(straight / 'checkpoints' / 'epoch-0002' / 'model.safetensors'))
    # custom_checkpoint_0: progress (wall time differs), 1: LR scheduler, 2: EMA
    for name in ('custom_checkpoint_1.pkl', 'custom_checkpoint_2.pkl', 'optimizer.bin'):
        a, b = [torch.load(e / 'checkpoints' / 'epoch-0002' / name, weights_only=False) for e in (interrupted, straight)]
        assert _flat(a) == _flat(b), name
    _assert_same_tensors(load_file(interrupted / 'model.safetensors'), load_file(straight / 'model.safetensors'))
    assert _summary(interrupted) == _summary(straight)
    done = json.loads((straight / 'results.json').read_text())
    for k in ('best_top1', 'best_top5', 'best_epoch', 'train_loss', 'weights'):
        assert resumed[k] == done[k], k


def test_nonfinite_loss_stops_with_message_and_keeps_last_good_state(tmp_path: Path):
    """ The lr jumps by 1e30 for the last update of epoch 1: the weights overflow, the run stops before
    saving them and says where to resume from. """
    args = DIGITS + FAST + [
        '--model', 'vit_small_cifar', '--train-num-samples', '128', '--epochs', '3', '--sched', 'multistep',
        '--decay-milestones', '2', '--decay-rate', '1e30', '--log-interval', '1', '--output', str(tmp_path),
        '--experiment', 'diverged']
    with pytest.raises(train.NonFiniteLossError) as e:
        train.main(args)
    exp = tmp_path / 'diverged'
    message = str(e.value)
    assert 'epoch 1' in message and ('nan' in message or 'inf' in message), message
    assert 'last good training state' in message and 'epoch-0000' in message and '--resume' in message, message
    assert _latest(exp) == 'epoch-0000'
    assert [int(r['epoch']) for r in _summary(exp)] == [0]
    assert not (exp / 'results.json').exists()
    state = load_file(exp / 'checkpoints' / 'epoch-0000' / 'model.safetensors')
    assert all(torch.isfinite(v).all() for v in state.values())


def test_missing_dataset_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture):
    argv = ['train.py', '--dataset', 'torch/cifar10', '--data-dir', str(tmp_path / 'data'), '--output', str(tmp_path)]
    monkeypatch.setattr(sys, 'argv', argv)
    assert train.cli() == 1
    err = capsys.readouterr().err
    assert 'torch/cifar10' in err and '--dataset-download' in err, err
    assert 'Traceback' not in err


def test_recipes(tmp_path: Path):
    """ Every recipe parses; the two CIFAR-10 recipes say what their names promise. """
    for path in sorted(RECIPES.glob('*.yaml')):
        train.parse_args(['-c', str(path)])
    strong = train.parse_args(['-c', str(RECIPES / 'cifar10_vit_small.yaml')])
    assert strong.dataset == 'torch/cifar10' and strong.model == 'vit_small_cifar'
    assert strong.opt == 'adamw' and strong.sched == 'cosine' and strong.warmup_epochs > 0
    assert strong.aa.startswith('rand') and strong.mixup > 0 and strong.cutmix > 0
    assert strong.smoothing > 0 and strong.reprob > 0 and strong.drop_path > 0
    ref = train.parse_args(['-c', str(RECIPES / 'cifar10_reference.yaml')])
    assert (ref.opt, ref.lr, ref.batch_size, ref.epochs, ref.sched) == ('adam', 1e-4, 128, 400, 'constant')
    assert ref.train_crop_mode == 'pad' and ref.hflip == 0.5 and ref.color_jitter is None and ref.aa is None
    assert ref.mixup == ref.cutmix == ref.reprob == ref.smoothing == ref.weight_decay == 0
    # the command line overrides the file, as in timm
    assert train.parse_args(['-c', str(RECIPES / 'cifar10_reference.yaml'), '--lr', '3e-4']).lr == 3e-4

    typo = tmp_path / 'typo.yaml'
    typo.write_text('batch_sise: 64\n')
    with pytest.raises(SystemExit):
        train.parse_args(['-c', str(typo)])


def test_nonfinite_training_loss_stops_at_once(tmp_path: Path):
    """ Inputs that are all inf: the first training loss is NaN and the run stops there, saving nothing. """
    args = DIGITS + FAST + ['--model', 'vit_small_cifar', '--train-num-samples', '64', '--mean', 'inf',
                            '--output', str(tmp_path), '--experiment', 'nan']
    with pytest.raises(train.NonFiniteLossError) as e:
        train.main(args)
    message = str(e.value)
    assert 'Loss is nan at epoch 0, batch 0' in message and 'no training state' in message, message
    assert not (tmp_path / 'nan' / 'checkpoints').exists() and not (tmp_path / 'nan' / 'model.safetensors').exists()
