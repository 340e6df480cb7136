""" Nothing silently wrong: the faults a new user meets, each reproduced as a user meets it, each ending in an
exact result or a clear error. Models: settings out of range, inputs of another dtype, NaN inputs and diverged
weights, empty batches. Training and publishing: resumes with flags that cannot change mid-run, damaged training
states, random states that cannot be restored, non-finite activations of the exact models, publishing into a
used folder, what a run records (dataset, tag, normalisation), file permissions and epoch numbering.

The sweeps over every accepted setting, and the rejection of every other value, are in tests/test_settings.py
(bdia_gamma 2^-9 and below, non-integer quant_level, momentum fractions) and tests/test_timm_contract.py
(depth=0, drop_path_rate=1.5 and the base model's other settings). The library tests save training
states in-process (fast); the scripts' own behaviour is tested on a real digits run in a subprocess (slow).
"""
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import timm
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from timm.models import save_for_hf

from timm_reversible import GridRangeError, NonFiniteActivationError
from timm_reversible.training import (
    MANIFEST, ResumeArgsError, TrainingStateError, TrainProgress, check_resume_args, dataset_tag, latest_checkpoint,
    load_checkpoint, resolve_resume, run_changes_note, save_best, save_checkpoint, verify_checkpoint, write_manifest)

from conftest import SMALL, images, package_models, run_train_script, trained_summary
from test_publish import RESULTS, publish_cli
from test_reversible import EXACT

TINY = dict(embed_dim=32, depth=1, num_heads=2, img_size=16)
MODEL_TINY = dict(embed_dim=32, num_heads=2)
DATA_CONFIG = dict(input_size=(3, 16, 16), interpolation='bilinear', mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                   crop_pct=1.0, crop_mode='center')


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _file_modes(folder: Path) -> Dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in folder.rglob('*') if p.is_file()}


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
    model = timm.create_model(name, depth=2, **MODEL_TINY).eval()
    with torch.no_grad():
        out = model(_nan_in_sample_1())
    assert out[1].isnan().all()
    assert torch.isfinite(out[[0, 2]]).all()
    assert torch.equal(out[[0, 2]], model(images(3)[[0, 2]]).detach())


@pytest.mark.parametrize('name', package_models())
def test_nan_input_in_a_no_grad_train_forward_gives_a_nan_row(name):
    model = timm.create_model(name, depth=2, **MODEL_TINY).train()
    with torch.no_grad():
        out = model(_nan_in_sample_1())
    assert out[1].isnan().all() and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize('reversible', [True, False])
@pytest.mark.parametrize('name', EXACT)
def test_nan_input_in_training_names_the_input_not_the_grid(name, reversible):
    model = timm.create_model(name, depth=3, **MODEL_TINY, reversible=reversible).train()
    with pytest.raises(NonFiniteActivationError) as error:
        model(_nan_in_sample_1()).sum().backward()
    message = str(error.value)
    assert 'block 0' in message and 'NaN' in message and 'sample(s) [1]' in message and 'input' in message
    assert 'quant_level' not in message


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
@pytest.mark.parametrize('name', EXACT)
def test_diverged_weights_are_named(name, value):
    model = timm.create_model(name, depth=3, **MODEL_TINY).train()
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
    model = timm.create_model(name, depth=3, **MODEL_TINY).train()
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
    model = timm.create_model(name, depth=2, **MODEL_TINY).train(train)
    out = model(images(2)[:0])
    assert out.shape == (0, model.num_classes)
    if train:
        out.sum().backward()
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


# ---- training states, in-process ----

@pytest.fixture
def accelerator():
    accelerator = Accelerator(cpu=True)
    yield accelerator
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def progress(accelerator):
    progress = TrainProgress()
    accelerator.register_for_checkpointing(progress)
    return progress


@pytest.fixture
def states(tmp_path, accelerator, progress):
    """ An experiment with the training states of epochs 0 and 1 of a tiny model, as the train script saves them. """
    exp = tmp_path / 'exp'
    exp.mkdir()
    model = timm.create_model('vit_small_cifar', **TINY)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    for epoch in (0, 1):
        model(torch.randn(2, 3, 16, 16)).sum().backward()
        optimizer.step()
        progress.epoch = epoch
        save_best(accelerator.unwrap_model(model), str(exp), TINY, DATA_CONFIG, pretrained_tag='digits')
        save_checkpoint(accelerator, str(exp), epoch, keep=2)
    return exp


def _state(exp: Path, epoch: int) -> Path:
    return exp / 'checkpoints' / f'epoch-{epoch:04d}'


def test_a_state_lists_every_file_with_its_size_and_hash(states):
    for epoch in (0, 1):
        state = _state(states, epoch)
        manifest = json.loads((state / MANIFEST).read_text())['files']
        on_disk = sorted(str(p.relative_to(state)) for p in state.rglob('*') if p.is_file() and p.name != MANIFEST)
        assert sorted(manifest) == on_disk
        assert {'model.safetensors', 'optimizer.bin', 'random_states_0.pkl', 'custom_checkpoint_0.pkl',
                'best/model.safetensors', 'best/config.json'} <= set(manifest)
        for rel, entry in manifest.items():
            data = (state / rel).read_bytes()
            assert entry == dict(size=len(data), sha256=hashlib.sha256(data).hexdigest()), rel
        assert verify_checkpoint(str(state)) == []
    assert (states / 'checkpoints' / 'latest').read_text() == 'epoch-0001\n'


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    'truncated weights': (lambda s: _truncate(s / 'model.safetensors'), r'model\.safetensors has 100 bytes, \d+ were written'),
    'corrupt pickle': (lambda s: _flip_a_byte(s / 'random_states_0.pkl'),
                       r'random_states_0\.pkl has changed since it was written \(SHA-256 differs\)'),
    'missing optimizer': (lambda s: (s / 'optimizer.bin').unlink(), r'optimizer\.bin is missing'),
    'best weights damaged': (lambda s: _flip_a_byte(s / 'best' / 'model.safetensors'), r'best/model\.safetensors has changed since it was written \(SHA-256 differs\)'),
    'no manifest': (lambda s: (s / MANIFEST).unlink(), r'manifest\.json is missing \(the state was not completely written\)'),
}


@pytest.mark.parametrize('damage', DAMAGES)
def test_a_damaged_state_is_named_and_passed_over_for_the_newest_intact_one(states, damage, caplog):
    damage_fn, problem = DAMAGES[damage]
    newest = _state(states, 1)
    if damage == 'best weights damaged':
        # a hard link shares the run's own best weights: damage a copy, as a disk error would
        shutil.copy(newest / 'best' / 'model.safetensors', newest / 'best' / 'copy')
        os.replace(newest / 'best' / 'copy', newest / 'best' / 'model.safetensors')
    damage_fn(newest)
    problems = verify_checkpoint(str(newest))
    assert len(problems) == 1 and re.fullmatch(problem, problems[0]), problems
    with caplog.at_level(logging.WARNING, logger='timm_reversible.training'):
        assert latest_checkpoint(str(states)) == str(_state(states, 0))
    assert f'Training state {newest} is damaged and is passed over: {problems[0]}' in caplog.text
    assert f'Resuming from {_state(states, 0)}, the newest intact training state.' in caplog.text
    # resuming the experiment goes back to epoch 0; resuming the damaged state by name is refused, naming the file
    assert resolve_resume(str(states)) == (str(_state(states, 0)), str(states))
    with pytest.raises(TrainingStateError, match=f'--resume {newest}: the training state is damaged: {problem}'):
        resolve_resume(str(newest))


def test_a_safetensors_file_whose_header_does_not_parse_is_reported(states):
    # written so (the manifest agrees with it): only parsing the header finds it
    state = _state(states, 1)
    (state / 'model.safetensors').write_bytes(b'\xff' * 64)
    write_manifest(str(state))
    problems = verify_checkpoint(str(state))
    assert len(problems) == 1 and problems[0].startswith('model.safetensors is not a readable safetensors file ('), problems


# ---- random states ----

def test_a_verified_state_restores_the_random_states(states, accelerator, progress):
    saved = torch.load(_state(states, 1) / 'random_states_0.pkl', weights_only=False)
    random.random(), np.random.rand(), torch.rand(1)  # the generators move on, as training does
    progress.epoch = -1
    load_checkpoint(accelerator, str(_state(states, 1)))
    assert progress.epoch == 1
    assert torch.equal(torch.get_rng_state(), saved['torch_manual_seed'])
    assert random.getstate() == saved['random_state']
    assert np.array_equal(np.random.get_state()[1], saved['numpy_random_seed'][1])


def test_random_states_of_another_process_count_stop_the_resume(states, accelerator):
    state = _state(states, 1)
    shutil.copy(state / 'random_states_0.pkl', state / 'random_states_1.pkl')  # as two processes write it
    write_manifest(str(state))
    with pytest.raises(TrainingStateError, match=r'written by 2 process\(es\), this run has 1'):
        load_checkpoint(accelerator, str(state))
    (state / 'random_states_0.pkl').unlink()
    (state / 'random_states_1.pkl').rename(state / 'random_states_2.pkl')
    write_manifest(str(state))
    with pytest.raises(TrainingStateError, match=r'random_states_0\.pkl'):
        load_checkpoint(accelerator, str(state))


def test_random_states_that_do_not_load_stop_the_resume(states, accelerator):
    state = _state(states, 1)
    torch.save(dict(step=0), state / 'random_states_0.pkl')  # loads, but holds no generator state
    write_manifest(str(state))
    with pytest.raises(TrainingStateError, match=r'random states of process 0 cannot be restored from .*random_states_0'):
        load_checkpoint(accelerator, str(state))


def test_random_states_that_accelerate_fails_to_restore_stop_the_resume(states, accelerator, monkeypatch):
    """ Accelerate catches any error while restoring the random states and logs it at INFO only: the generators
    are compared with the saved states afterwards. """
    def fail(*args, **kwargs):
        raise RuntimeError('Invalid mt19937 state')
    monkeypatch.setattr(torch, 'set_rng_state', fail)
    torch.rand(1)
    with pytest.raises(TrainingStateError, match=r'random states .* were not restored \(torch\)'):
        load_checkpoint(accelerator, str(_state(states, 1)))


# ---- resuming with other flags ----

RECORDED = dict(
    model='bdia_vit_small_cifar', model_kwargs=dict(embed_dim=64, depth=2), dataset='digits', lr=2e-3, sched='cosine',
    warmup_epochs=1, warmup_lr=1e-5, min_lr=0., epochs=4, batch_size=32, grad_accum_steps=1, opt='adamw',
    clip_grad=None, output='out', workers=4, log_interval=50, experiment='run', resume='', resume_allow_changes=False)
CHANGES = dict(
    model='vit_small_cifar', model_kwargs=dict(embed_dim=64, depth=3), dataset='torch/cifar10', lr=0.01, sched='step',
    warmup_epochs=0, warmup_lr=1e-4, min_lr=1e-6, epochs=8, batch_size=64, grad_accum_steps=2)


@pytest.mark.parametrize('flag', CHANGES)
def test_resume_with_a_flag_that_cannot_change_is_refused(flag):
    now = dict(RECORDED, **{flag: CHANGES[flag]})
    with pytest.raises(ResumeArgsError, match=re.escape(f'{flag}: {RECORDED[flag]!r} -> {CHANGES[flag]!r}')):
        check_resume_args(RECORDED, now, allow_changes=False)


def test_the_refusal_lists_every_difference():
    with pytest.raises(ResumeArgsError) as info:
        check_resume_args(RECORDED, dict(RECORDED, **CHANGES), allow_changes=False)
    listing = str(info.value).split('middle of a run: ')[1].split('. Resume with')[0]
    assert listing == '; '.join(f'{k}: {RECORDED[k]!r} -> {CHANGES[k]!r}' for k in sorted(CHANGES))
    assert '--resume-allow-changes' in str(info.value)


def test_flags_of_the_machine_may_change():
    now = dict(RECORDED, output='elsewhere', workers=0, log_interval=1, experiment='other', resume='out/run')
    assert check_resume_args(RECORDED, now, allow_changes=False) == now


def test_allowed_changes_take_effect_except_those_the_state_restores(caplog):
    now = dict(RECORDED, lr=0.5, epochs=10, clip_grad=1.0)
    with caplog.at_level(logging.WARNING, logger='timm_reversible.training'):
        goes_on_with = check_resume_args(RECORDED, now, allow_changes=True)
    # the optimizer and schedule come from the saved state: their recorded values are what runs
    assert goes_on_with == dict(RECORDED, clip_grad=1.0)
    assert 'keep their recorded values: epochs=4, lr=0.002' in caplog.text
    assert 'clip_grad: None -> 1.0' in caplog.text


def test_the_record_of_changes_accumulates_over_resumes(tmp_path):
    assert run_changes_note(str(tmp_path), 2, {'clip_grad': (None, 1.0)}) == [
        dict(epoch=2, changes=dict(clip_grad=[None, 1.0]))]
    (tmp_path / 'args.yaml').write_text(yaml.safe_dump(dict(
        RECORDED, resumed_with_changes=[dict(epoch=2, changes=dict(clip_grad=[None, 1.0]))])))
    assert run_changes_note(str(tmp_path), 5, {'workers': (4, 0)})[1] == dict(epoch=5, changes=dict(workers=[4, 0]))


# ---- what a run records ----

@pytest.mark.parametrize('dataset, tag', [
    ('torch/cifar10', 'c10'), ('TORCH/CIFAR10', 'c10'), ('digits', 'digits'), ('torch/cifar100', 'cifar100'),
    ('hfds/org/my-data', 'my_data'), ('', 'custom')])
def test_a_run_is_tagged_with_its_dataset(dataset, tag):
    assert dataset_tag(dataset) == tag


def test_best_weights_carry_the_runs_tag_and_normalisation(tmp_path):
    model = timm.create_model('vit_small_cifar', **TINY)
    registered = dict(model.pretrained_cfg)
    save_best(model, str(tmp_path), TINY, DATA_CONFIG, pretrained_tag='digits')
    cfg = json.loads((tmp_path / 'config.json').read_text())['pretrained_cfg']
    assert cfg['tag'] == 'digits' and cfg['mean'] == [0.5] * 3 and cfg['std'] == [0.25] * 3
    assert cfg['input_size'] == [3, 16, 16] and cfg['interpolation'] == 'bilinear'
    assert not {'hf_hub_id', 'url', 'file'} & set(cfg)
    assert model.pretrained_cfg == registered  # the model itself is left as it was
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True)
    data_config = timm.data.resolve_model_data_config(loaded)
    assert (list(data_config['mean']), list(data_config['std'])) == ([0.5] * 3, [0.25] * 3)


def test_every_file_of_a_run_follows_the_umask(tmp_path):
    """ safetensors writes 0600 whatever the umask; every file of the run and of its states gets the mode of the
    run's other files. """
    old = os.umask(0o027)
    try:
        accelerator = Accelerator(cpu=True)
        model = accelerator.prepare(timm.create_model('vit_small_cifar', **TINY))
        save_best(model, str(tmp_path), TINY, DATA_CONFIG, pretrained_tag='digits')
        save_checkpoint(accelerator, str(tmp_path), 0, keep=1)
        (tmp_path / 'summary.csv').write_text('epoch\n0\n')  # as timm's update_summary writes it
    finally:
        os.umask(old)
        AcceleratorState._reset_state(True)
    modes = _file_modes(tmp_path)
    assert 'checkpoints/epoch-0000/model.safetensors' in modes and 'model.safetensors' in modes
    assert set(modes.values()) == {0o640}, {k: oct(v) for k, v in modes.items()}


# ---- publishing into a used folder ----

@pytest.fixture
def small_run(tmp_path) -> Path:
    """ A finished run as scripts/train.py leaves it (its best weights and results.json), of a tiny model. """
    run_dir = tmp_path / 'run'
    save_for_hf(timm.create_model('vit_small_cifar', **TINY), run_dir, model_config=dict(model_args=TINY),
                safe_serialization=True)
    (run_dir / 'results.json').write_text(json.dumps(dict(RESULTS, model_args=TINY, dataset='digits', img_size=16)))
    return run_dir


def test_publish_does_not_replace_files_it_did_not_write(small_run, tmp_path):
    folder = tmp_path / 'published'
    folder.mkdir()
    (folder / 'model.safetensors').write_bytes(b'weights of another model')
    (folder / 'README.md').write_text('my notes\n')
    args = [small_run, '--repo-id', 'tester/x', '--dry-run', '--local-dir', folder, '--act-batch-size', 2]
    code, out, err = publish_cli(*args)
    assert code == 1 and 'Traceback' not in err
    assert f'{folder} already holds README.md, model.safetensors; publishing would replace them' in err
    assert '--overwrite' in err
    assert (folder / 'model.safetensors').read_bytes() == b'weights of another model'
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'model.safetensors']

    code, out, err = publish_cli(*args, '--overwrite')
    assert code == 0, err
    assert (folder / 'model.safetensors').read_bytes() == (small_run / 'model.safetensors').read_bytes()
    assert (folder / 'README.md').read_text().startswith('---\n')
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']


def test_published_files_follow_the_umask(small_run, tmp_path):
    os.chmod(small_run / 'model.safetensors', 0o600)  # as safetensors writes it
    code, out, err = publish_cli(small_run, '--repo-id', 'tester/x', '--dry-run', '--local-dir', tmp_path / 'published',
                                 '--act-batch-size', 2)
    assert code == 0, err
    assert set(_file_modes(tmp_path / 'published').values()) == {_umask_mode()}


# ---- the train script on a real run ----

RUN_ARGS = [
    '--dataset', 'digits', '--img-size', '16', '--workers', '0', '--log-interval', '1', '--model', 'bdia_vit_small_cifar',
    '--model-kwargs', 'embed_dim=32', 'depth=2', 'num_heads=2', '--train-num-samples', '64', '-b', '32', '--epochs', '2',
    '--opt', 'adamw', '--lr', '2e-3', '--warmup-epochs', '0',
    '--sched', 'plateau',  # stepped per epoch: the script sets sched_on_updates itself, which a resume must accept
    # every random augmentation on, so that a resume is exact only if the random states are restored
    '--train-crop-mode', 'pad', '--hflip', '0.5', '--color-jitter', '0.4', '--reprob', '0.25',
    '--mean', '0.5', '0.5', '0.5', '--std', '0.25', '0.25', '0.25']


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """ A 2-epoch digits run of an exact reversible model, and what it logged. """
    out = tmp_path_factory.mktemp('finished')
    proc = run_train_script(RUN_ARGS + ['--output', str(out), '--experiment', 'run'], out)
    return out / 'run', proc.stdout + proc.stderr


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / 'run'))


def _resume(run: Path, resume: Path, *extra: str, returncode: int = 0) -> str:
    proc = run_train_script(RUN_ARGS + ['--output', str(run.parent), '--resume', str(resume), *extra], run.parent,
                            returncode=returncode)
    return proc.stdout + proc.stderr


def _assert_same_run(a: Path, b: Path) -> None:
    """ The same weights and optimizer state after the last epoch, the same best weights and summary. """
    last = Path('checkpoints') / 'epoch-0001'
    for name in (last / 'model.safetensors', 'model.safetensors'):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    x, y = (torch.load(r / last / 'optimizer.bin', weights_only=False)['state'] for r in (a, b))
    assert all(torch.equal(x[i][k], y[i][k]) for i in x for k in x[i])
    assert trained_summary(a) == trained_summary(b)


@pytest.mark.slow
def test_a_run_counts_epochs_from_1_and_records_what_it_trained(finished_run):
    exp, log = finished_run
    for epoch in (1, 2):
        assert log.count(f'Epoch {epoch}/2:') == 1 and log.count(f'Train: {epoch}/2 [   1/2]') == 1, log
    assert 'Epoch 0' not in log and 'Train: 0' not in log and 'epoch 0' not in log, log
    results = json.loads((exp / 'results.json').read_text())
    assert f'Done: best top1 {results["best_top1"]:.2f} (epoch {results["best_epoch"] + 1},' in log
    # the run's tag and normalisation, not those of the registered CIFAR-10 weights
    cfg = json.loads((exp / 'config.json').read_text())['pretrained_cfg']
    assert cfg['tag'] == 'digits' and cfg['mean'] == [0.5] * 3 and cfg['std'] == [0.25] * 3
    assert not {'hf_hub_id', 'url', 'file'} & set(cfg)
    assert set(_file_modes(exp).values()) == {_umask_mode()}, _file_modes(exp)
    assert all(verify_checkpoint(str(exp / 'checkpoints' / s)) == [] for s in ('epoch-0000', 'epoch-0001'))
    # the plateau scheduler's counters are part of the state (timm's own state_dict keeps only the best metric)
    custom = [torch.load(p, weights_only=False) for p in (exp / 'checkpoints' / 'epoch-0001').glob('custom_*.pkl')]
    assert sum('num_bad_epochs' in c for c in custom) == 1


@pytest.mark.slow
def test_a_damaged_newest_state_is_passed_over_and_the_run_resumes_exactly(finished_run, tmp_path):
    exp, _ = finished_run
    run = _copy(exp, tmp_path)
    _truncate(run / 'checkpoints' / 'epoch-0001' / 'model.safetensors')
    log = _resume(run, run)
    assert (f'Training state {run}/checkpoints/epoch-0001 is damaged and is passed over: model.safetensors has 100 '
            f'bytes') in log, log
    assert f'Resuming from {run}/checkpoints/epoch-0000, the newest intact training state.' in log
    assert 'Traceback' not in log
    _assert_same_run(run, exp)


@pytest.mark.slow
def test_a_damaged_state_named_by_resume_stops_the_run(finished_run, tmp_path):
    exp, _ = finished_run
    run = _copy(exp, tmp_path)
    state = run / 'checkpoints' / 'epoch-0001'
    _flip_a_byte(state / 'random_states_0.pkl')
    log = _resume(run, state, returncode=1)
    assert (f'ERROR: --resume {state}: the training state is damaged: random_states_0.pkl has changed since it was '
            f'written (SHA-256 differs).') in log, log
    assert 'Traceback' not in log


@pytest.mark.slow
def test_resume_with_changed_flags_is_refused_and_changes_nothing(finished_run, tmp_path):
    exp, _ = finished_run
    run = _copy(exp, tmp_path)
    log = _resume(run, run, '--lr', '0.01', '--model', 'vit_small_cifar', '--epochs', '3', returncode=1)
    assert ("cannot change in the middle of a run: epochs: 2 -> 3; lr: 0.002 -> 0.01; model: 'bdia_vit_small_cifar' "
            "-> 'vit_small_cifar'.") in log, log
    assert '--resume-allow-changes' in log and 'Traceback' not in log
    for name in ('args.yaml', 'results.json', 'summary.csv'):
        assert (run / name).read_bytes() == (exp / name).read_bytes(), name


@pytest.mark.slow
def test_a_resume_allowed_to_change_flags_records_what_ran(finished_run, tmp_path):
    exp, _ = finished_run
    run = _copy(exp, tmp_path)
    # the lr comes from the saved optimizer and schedule; a clipping norm that is never reached changes no bit
    log = _resume(run, run / 'checkpoints' / 'epoch-0000', '--resume-allow-changes', '--lr', '0.5', '--clip-grad', '100')
    assert 'keep their recorded values: lr=0.002' in log and 'clip_grad: None -> 100.0' in log, log
    _assert_same_run(run, exp)
    recorded = yaml.safe_load((run / 'args.yaml').read_text())
    assert recorded['lr'] == 2e-3 and recorded['clip_grad'] == 100.
    note = [dict(epoch=1, changes=dict(clip_grad=[None, 100.]))]
    assert recorded['resumed_with_changes'] == note
    assert json.loads((run / 'results.json').read_text())['recipe'] == recorded
    # a later resume with the flags now recorded keeps the record of the change
    _resume(run, run, '--clip-grad', '100')
    assert yaml.safe_load((run / 'args.yaml').read_text())['resumed_with_changes'] == note


@pytest.mark.slow
def test_an_activation_error_stops_training_like_a_nan_loss(finished_run, tmp_path):
    """ An exact model raises FloatingPointError (NonFiniteActivationError) for NaN / inf activations, here from
    inf input pixels: a clean stop naming the last good state, exit code 1, no traceback. """
    exp, _ = finished_run
    run = _copy(exp, tmp_path)
    log = _resume(run, run / 'checkpoints' / 'epoch-0000', '--resume-allow-changes', '--mean', 'inf',
                  returncode=1)
    assert 'ERROR: BDIAVisionTransformer: block 0 produced NaN activations' in log, log
    assert 'training stopped' in log and 'quant_level' not in log and 'Traceback' not in log
    assert (f'The last good training state is kept: {run}/checkpoints/epoch-0000 (resume with --resume {run}).'
            in log)


@pytest.mark.slow
def test_an_activation_error_before_any_state_says_so(tmp_path):
    args = RUN_ARGS + ['--model', 'momentum_revvit_small', '--mean', 'inf', '--output', str(tmp_path),
                       '--experiment', 'nan']
    log = (lambda p: p.stdout + p.stderr)(run_train_script(args, tmp_path, returncode=1))
    assert 'ERROR: MomentumVisionTransformer: block 0 produced NaN activations' in log, log
    assert 'No epoch had completed, so there is no training state to resume.' in log and 'Traceback' not in log
    assert not (tmp_path / 'nan' / 'checkpoints').exists()
