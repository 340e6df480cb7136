""" Nothing silently wrong: the faults a new user meets (bad settings, bad data, interrupted or changed runs,
publishing into a used folder), each reproduced, each ending in exact results or a clear error.

The sweeps over every accepted setting, and the rejection of every other value (bdia_gamma 2^-9 and below,
non-integer quant_level, momentum fractions), are in tests/test_settings.py.
"""
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from timm_reversible import GridRangeError, NonFiniteActivationError
from timm_reversible import publish as pub
from timm_reversible.training import MANIFEST, TrainingStateError, load_checkpoint, verify_checkpoint

from conftest import SMALL, images, package_models, run_train_script
from test_reversible import EXACT

TINY = dict(embed_dim=32, num_heads=2)


# ---- settings the base model used to accept ----

@pytest.mark.parametrize('kwargs, message', [
    (dict(depth=0), r'depth must be an integer >= 1'),
    (dict(depth=-2), r'depth must be an integer >= 1'),
    (dict(drop_path_rate=1.5), r'drop_path_rate must be in \[0, 1\)'),
    (dict(drop_path_rate=1.0), r'drop_path_rate must be in \[0, 1\)'),
    (dict(attn_drop_rate=-0.1), r'attn_drop_rate must be in \[0, 1\)'),
    (dict(drop_rate=1.0), r'drop_rate must be in \[0, 1\)'),
    (dict(mlp_ratio=0.), r'mlp_ratio must be > 0'),
])
@pytest.mark.parametrize('name', package_models())
def test_settings_outside_their_range_are_rejected_at_creation(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model(name, **dict(SMALL, **kwargs))


# ---- inputs ----

@pytest.mark.parametrize('dtype', [torch.uint8, torch.float64, torch.int64])
@pytest.mark.parametrize('name', package_models())
def test_input_of_another_dtype_gets_a_clear_error(name, dtype):
    model = timm.create_model(name, **SMALL).eval()
    with pytest.raises(TypeError, match=r'floating-point image batch of the model\'s dtype torch.float32'):
        model((images(2) * 100).to(dtype))


@pytest.mark.parametrize('name', package_models())
def test_float64_model_takes_float64_input(name):
    model = timm.create_model(name, **SMALL).double().eval()
    assert model(images(2, dtype=torch.float64)).dtype == torch.float64


# ---- activations that are not finite ----

def _nan_in_sample_1() -> torch.Tensor:
    x = images(3)
    x[1, 0, 5, 7] = float('nan')
    return x


@pytest.mark.parametrize('name', package_models())
def test_nan_input_in_eval_gives_a_nan_row_for_that_sample_only(name):
    model = timm.create_model(name, depth=2, **TINY).eval()
    with torch.no_grad():
        out = model(_nan_in_sample_1())
    assert out[1].isnan().all()
    assert torch.isfinite(out[[0, 2]]).all()
    assert torch.equal(out[[0, 2]], model(images(3)[[0, 2]]).detach())


@pytest.mark.parametrize('name', package_models())
def test_nan_input_in_a_no_grad_train_forward_gives_a_nan_row(name):
    model = timm.create_model(name, depth=2, **TINY).train()
    with torch.no_grad():
        out = model(_nan_in_sample_1())
    assert out[1].isnan().all() and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize('reversible', [True, False])
@pytest.mark.parametrize('name', EXACT)
def test_nan_input_in_training_names_the_input_not_the_grid(name, reversible):
    model = timm.create_model(name, depth=3, **TINY, reversible=reversible).train()
    with pytest.raises(NonFiniteActivationError) as error:
        model(_nan_in_sample_1()).sum().backward()
    message = str(error.value)
    assert 'block 0' in message and 'NaN' in message and 'sample(s) [1]' in message and 'input' in message
    assert 'quant_level' not in message


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
@pytest.mark.parametrize('name', EXACT)
def test_diverged_weights_are_named(name, value):
    model = timm.create_model(name, depth=3, **TINY).train()
    with torch.no_grad():
        model.blocks[2].mlp.fc1.weight[0, 0] = value
    with pytest.raises(NonFiniteActivationError) as error:
        model(images(2)).sum().backward()
    message = str(error.value)
    assert 'block 2' in message and 'blocks.2.mlp.fc1.weight' in message and 'diverged' in message
    assert 'produced NaN activations' in message or 'produced infinite activations' in message
    assert 'quant_level' not in message


@pytest.mark.parametrize('name', EXACT)
def test_grid_range_error_still_gives_the_quant_level_advice(name):
    model = timm.create_model(name, depth=3, **TINY).train()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.bias.fill_(3e5)
    with pytest.raises(GridRangeError, match=r'block 1\b.*quant_level=7'):
        model(images(2)).sum().backward()
    with torch.no_grad():  # no reversible backward to protect: like the plain ViT
        assert torch.isfinite(model.eval()(images(2))).all()


# ---- empty batches ----

@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('name', package_models())
def test_an_empty_batch_gives_an_empty_output(name, train):
    model = timm.create_model(name, depth=2, **TINY).train(train)
    out = model(images(2)[:0])
    assert out.shape == (0, model.num_classes)
    if train:
        out.sum().backward()
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


# ---- training: interrupted, damaged, changed, diverged ----

RUN_ARGS = [
    '--dataset', 'digits', '--img-size', '16', '--workers', '0', '--log-interval', '1000',
    '--model-kwargs', *[f'{k}={v}' for k, v in SMALL.items()], '--model', 'vit_small_cifar',
    '--train-num-samples', '128', '--epochs', '3', '-b', '32', '--opt', 'adamw', '--lr', '2e-3',
    '--warmup-epochs', '0', '--no-aug', '--hflip', '0', '--smoothing', '0', '--checkpoint-hist', '3']


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('finished')
    run_train_script(RUN_ARGS + ['--output', str(out), '--experiment', 'run'], out)
    return out / 'run'


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / 'run'))


def _resume(run: Path, *extra: str, returncode: int = 0):
    return run_train_script(RUN_ARGS + ['--output', str(run.parent), '--resume', str(run), *extra], run.parent,
                            returncode=returncode)


def test_a_finished_run_has_intact_states(finished_run: Path):
    states = sorted(p.name for p in (finished_run / 'checkpoints').iterdir() if p.is_dir())
    assert states == ['epoch-0000', 'epoch-0001', 'epoch-0002']
    for state in states:
        assert verify_checkpoint(str(finished_run / 'checkpoints' / state)) == []
    manifest = json.loads((finished_run / 'checkpoints' / 'epoch-0002' / MANIFEST).read_text())['files']
    assert {'model.safetensors', 'optimizer.bin', 'random_states_0.pkl', 'best/model.safetensors'} <= set(manifest)


@pytest.mark.parametrize('damage', ['truncate_weights', 'corrupt_random_states'])
def test_a_damaged_state_is_named_and_the_run_resumes_from_the_newest_intact_one(finished_run, tmp_path, damage):
    run = _copy(finished_run, tmp_path)
    latest = run / 'checkpoints' / 'epoch-0002'
    if damage == 'truncate_weights':
        path = latest / 'model.safetensors'
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path = latest / 'random_states_0.pkl'
        path.write_bytes(b'not a pickle' + path.read_bytes()[12:])
    problems = verify_checkpoint(str(latest))
    assert len(problems) == 1 and path.name in problems[0]
    log = _resume(run).stderr
    assert f'{latest} is damaged' in log and path.name in log, log
    assert 'Resumed from' in log and 'epoch-0001' in log, log
    # epoch 2 ran again from the intact state: the same weights as the uninterrupted run
    for name in ('model.safetensors',):
        a, b = load_file(run / 'checkpoints' / 'epoch-0002' / name), load_file(finished_run / 'checkpoints' / 'epoch-0002' / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert verify_checkpoint(str(latest)) == []


def test_a_named_damaged_state_stops_the_resume(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    state = run / 'checkpoints' / 'epoch-0001'
    (state / 'optimizer.bin').write_bytes(b'')
    err = run_train_script(RUN_ARGS + ['--output', str(tmp_path), '--resume', str(state)], tmp_path, returncode=1).stderr
    assert 'optimizer.bin' in err and 'damaged' in err and 'Traceback' not in err, err


def test_random_states_that_cannot_be_restored_stop_the_resume(finished_run, tmp_path):
    """ A state written by two processes has no random states for a third: restoring it must not skip them. """
    run = _copy(finished_run, tmp_path)
    state = run / 'checkpoints' / 'epoch-0001'
    (state / 'random_states_0.pkl').rename(state / 'random_states_1.pkl')
    accelerator = Accelerator(cpu=True)
    try:
        with pytest.raises(TrainingStateError, match=r'random states of process 0 cannot be restored'):
            load_checkpoint(accelerator, str(state))
        states = torch.load(state / 'random_states_1.pkl', weights_only=False)
        del states['torch_manual_seed']
        torch.save(states, state / 'random_states_0.pkl')
        with pytest.raises(TrainingStateError, match='torch_manual_seed'):
            load_checkpoint(accelerator, str(state))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize('change, shown', [
    (['--lr', '5e-3'], "lr: 0.002 -> 0.005"),
    (['--model', 'revvit_small_cifar'], "model: 'vit_small_cifar' -> 'revvit_small_cifar'"),
    (['-b', '16'], 'batch_size: 32 -> 16'),
])
def test_resume_with_other_flags_is_refused_with_the_differences(finished_run, tmp_path, change, shown):
    run = _copy(finished_run, tmp_path)
    recorded = (run / 'args.yaml').read_text()
    err = _resume(run, *change, returncode=1).stderr
    assert shown in err and '--resume-allow-changes' in err and 'Traceback' not in err, err
    assert (run / 'args.yaml').read_text() == recorded


def test_resume_allowed_to_change_records_what_ran(finished_run, tmp_path):
    """ --lr comes from the saved optimizer and schedule: the recorded lr stays the one that runs. A flag that
    does take effect (the augmentation's flip probability) is recorded with the epoch it started at. """
    run = _copy(finished_run, tmp_path)
    shutil.rmtree(run / 'checkpoints' / 'epoch-0002')
    (run / 'checkpoints' / 'latest').write_text('epoch-0001\n')
    log = _resume(run, '--lr', '5e-3', '--hflip', '0.5', '--resume-allow-changes').stderr
    assert 'keep their recorded values: lr=0.002' in log and "hflip: 0.0 -> 0.5" in log, log
    args = yaml.safe_load((run / 'args.yaml').read_text())
    assert args['lr'] == 2e-3 and args['hflip'] == 0.5
    assert args['resumed_with_changes'] == [dict(epoch=2, changes=dict(hflip=[0.0, 0.5]))]
    results = json.loads((run / 'results.json').read_text())
    assert results['recipe']['lr'] == 2e-3 and results['recipe']['hflip'] == 0.5


@pytest.mark.slow
@pytest.mark.parametrize('name', EXACT)
def test_an_activation_error_stops_training_like_a_nan_loss(name, tmp_path):
    """ Inputs that are all inf: the exact models' forward reports non-finite activations; the run stops cleanly. """
    args = RUN_ARGS + ['--model', name, '--mean', 'inf', '--train-num-samples', '64', '--output', str(tmp_path),
                       '--experiment', 'nan']
    err = run_train_script(args, tmp_path, returncode=1).stderr
    assert 'NaN activations' in err and 'no training state' in err and 'Traceback' not in err, err
    assert 'quant_level' not in err


# ---- publishing ----

def test_publish_does_not_replace_files_it_did_not_write(finished_run, tmp_path):
    folder = tmp_path / 'mine'
    folder.mkdir()
    (folder / 'README.md').write_text('my own notes')
    (folder / 'model.safetensors').write_bytes(b'my own weights')
    with pytest.raises(pub.PublishError, match=r'already holds README.md, model.safetensors.*--overwrite'):
        pub.publish(finished_run, 'tester/x', dry_run=True, local_dir=folder, act_batch_size=2)
    assert (folder / 'README.md').read_text() == 'my own notes'
    pub.publish(finished_run, 'tester/x', dry_run=True, local_dir=folder, act_batch_size=2, overwrite=True)
    assert (folder / 'README.md').read_text() != 'my own notes'


def test_a_digits_run_is_published_as_a_digits_run(finished_run, tmp_path):
    folder = tmp_path / 'pub'
    result = pub.publish(finished_run, 'tester/vit_small_cifar-digits', dry_run=True, local_dir=folder,
                         act_batch_size=2)
    config = json.loads((folder / 'config.json').read_text())
    assert config['pretrained_cfg']['tag'] == 'digits' and 'CIFAR' not in result.readme.split('## Model Usage')[0]
    assert 'from scratch on digits' in result.readme
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert len(set(modes.values())) == 1, modes
