""" The device self-check: the command line at the small config on CPU, lines that fail when what they check is
broken, and the float64 reference's replay of the random draws.
"""
import json
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

from timm_reversible import selfcheck
from timm_reversible.layers import Block
from timm_reversible.reversible import BDIACoupling, TwoStreamCoupling
from timm_reversible.selfcheck import (
    FLOAT32_ERROR_MULTIPLE, SIZES, baseline_of, default_models, gradient_error_report, main, reversible_models,
    run_selfcheck)
from timm_reversible.utils import timm_vit_models

from conftest import images, script_env

SMALL = SIZES['small'].kwargs
DROPS = dict(drop_rate=0.1, pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.2)


@pytest.fixture(autouse=True)
def one_thread():
    """ In-process checks on one thread: two threads on two shared cores can be many times slower. """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lines(report: dict, model: str) -> dict:
    return {r['check']: r for r in report['results'] if r['model'] == model}


def test_command_line_small_config_on_cpu(tmp_path):
    out = tmp_path / 'selfcheck.json'
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_reversible.selfcheck', '--device', 'cpu', '--size', 'small', '--json', str(out)],
        capture_output=True, text=True, env=script_env(), cwd=tmp_path, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'PASSED' in proc.stdout and 'SDPA' in proc.stdout
    report = json.loads(out.read_text())
    assert report['passed'] is True
    assert report['options'] == dict(device='cpu', amp='none', models=default_models(), size='small')
    env = report['environment']
    assert env['torch'] == torch.__version__ and env['deterministic_algorithms'] is False
    assert env['sdpa_choice']['float32']['dropout'].keys() == {'no grad', 'grad'}
    assert set(report['options']['models']) == {
        'revvit_small_cifar', 'bdia_vit_small_cifar', 'momentum_revvit_small', 'bdia_vit_base_patch16_224',
        'revvit_base_patch16_224'}
    for model in report['options']['models']:
        lines = _lines(report, model)
        expected = {'gradients fp32', 'caller RNG fp32', 'activation memory depth 6', 'activation memory depth 24',
                    'train step time'}
        # each against its own plain model: vit_small_cifar, or timm's ViT of the same size
        baseline = 'vit_base_patch16_224' if model.endswith('patch16_224') else 'vit_small_cifar'
        assert baseline in lines['activation memory depth 6']['detail'] and baseline in lines['train step time']['detail']
        if not model.startswith('revvit_'):
            expected |= {'reconstruction fp32, inverse', 'reconstruction fp32, backward'}
            assert lines['reconstruction fp32, inverse']['values']['error'] == 0.0
        assert set(lines) == expected
        assert all(r['size'] == 'small' for r in lines.values())
        assert lines['train step time']['status'] == 'info'  # a CPU's speed is never a failure
        assert all(r['status'] == 'pass' for c, r in lines.items() if c != 'train step time')
        gradients = lines['gradients fp32']['values']
        assert gradients['reversible_error'] <= FLOAT32_ERROR_MULTIPLE * gradients['autograd_error']
        memory = lines['activation memory depth 24']['values']
        assert memory['mib_per_image'] < min(memory['vanilla'], memory['checkpointed'])


def test_broken_reconstruction_fails_its_lines_and_the_exit_code(tmp_path, monkeypatch, capsys):
    """ The inverse of BDIA's step off by one grid step, and a recomputation with grad that differs from the
    forward by 2^-12 (as another GPU kernel might): their lines fail, and the command exits 1.
    """
    inverse = BDIACoupling.inverse

    def inverse_off_by_one_step(self, state, tape):
        x_prev, x = inverse(self, state, tape)
        return x_prev + 2. ** -self.level, x
    monkeypatch.setattr(BDIACoupling, 'inverse', inverse_off_by_one_step)
    mlp_residual = Block.mlp_residual
    monkeypatch.setattr(
        Block, 'mlp_residual', lambda self, x: mlp_residual(self, x) + (2. ** -12 if torch.is_grad_enabled() else 0.))

    rng = torch.get_rng_state()
    out = tmp_path / 'report.json'
    assert main(['--device', 'cpu', '--models', 'bdia_vit_small_cifar', '--json', str(out)]) == 1
    assert torch.equal(torch.get_rng_state(), rng), 'the self-check moved the caller\'s random stream'
    lines = _lines(json.loads(out.read_text()), 'bdia_vit_small_cifar')
    assert lines['reconstruction fp32, inverse']['status'] == 'fail'
    assert lines['reconstruction fp32, inverse']['values']['error'] >= 2. ** -9
    backward = lines['reconstruction fp32, backward']
    assert backward['status'] == 'fail' and backward['detail'].startswith('ReconstructionError: ')
    assert 'set_reversible(False)' in backward['values']['error']  # the whole message, with the remedies
    assert lines['gradients fp32']['status'] == 'fail'
    printed = capsys.readouterr().out
    assert 'FAILED' in printed and 'reconstruction fp32, backward' in printed


def test_a_backward_that_draws_from_the_callers_stream_fails(monkeypatch):
    backward = TwoStreamCoupling.backward

    def drawing_backward(self, state, grads, tape):
        torch.rand(1)
        return backward(self, state, grads, tape)
    monkeypatch.setattr(TwoStreamCoupling, 'backward', drawing_backward)
    model = timm.create_model('revvit_small_cifar', **SMALL, **DROPS).train()
    errors = gradient_error_report(model, images(4))
    assert not errors.rng_equal and not errors.passed
    assert 'random streams' in ' '.join(errors.problems())


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_a_wrong_gradient_fails_the_criterion(dtype, monkeypatch):
    """ One part in 10^5 on the gradient each block passes down: beyond float64 and float32 rounding both. """
    backward = TwoStreamCoupling.backward

    def slightly_wrong_backward(self, state, grads, tape):
        state, grads = backward(self, state, grads, tape)
        return state, (grads[0] * (1 + 1e-5), grads[1])
    model = timm.create_model('revvit_small_cifar', **SMALL, **DROPS).to(dtype).train()
    x = images(4, dtype=dtype)
    assert gradient_error_report(model, x).passed
    monkeypatch.setattr(TwoStreamCoupling, 'backward', slightly_wrong_backward)
    errors = gradient_error_report(model, x)
    assert errors.outputs_equal and errors.rng_equal and errors.reference_matches
    assert not errors.within_limit and not errors.passed, str(errors)


@pytest.mark.parametrize('name', ['revvit_small_cifar', 'bdia_vit_small_cifar'])
def test_gradients_without_attention_dropout(name):
    """ The GPU line's configuration: a fused attention kernel without dropout draws nothing to replay. """
    model = timm.create_model(name, **SMALL, **dict(DROPS, attn_drop_rate=0.)).train()
    errors = gradient_error_report(model, images(4))
    print(errors)
    assert errors.passed, errors.problems()


def test_the_reference_replays_the_draws_of_another_dtype():
    """ The float64 reference sees the float32 run's dropout masks and random integers even where its generator
    would draw others (here: another seed).
    """
    draws = selfcheck._RandomDraws()
    x = torch.randn(64, 64)

    def random_ops(t):
        # CPU dropout fills a mask with bernoulli_; CUDA dropout is native_dropout (its mask redone in float64)
        return (F.dropout(t, 0.5), torch.native_dropout(t, 0.5, True)[0], torch.empty_like(t).bernoulli_(0.3),
                torch.randint(0, 2, (8,)))

    torch.manual_seed(0)
    with draws.record():
        recorded = random_ops(x)
    torch.manual_seed(1)
    with draws.replay():
        replayed = random_ops(x.double())
    assert all(torch.equal(a.double(), b.double()) for a, b in zip(recorded, replayed))
    with pytest.raises(RuntimeError, match='draws aten::rand where the run it replays drew nothing'):
        with draws.replay():
            random_ops(x.double())
            torch.rand(1)
    with pytest.raises(RuntimeError, match='drew 1 times, the run it replays 4'), draws.replay():
        F.dropout(x.double(), 0.5)


def test_memory_line_fails_unless_below_vanilla_and_checkpointing(monkeypatch):
    fake = {'vit_small_cifar': 4.0, 'vit_small_cifar+ckpt': 1.0, 'revvit_small_cifar': 0.5,
            'bdia_vit_small_cifar': 1.5}

    def measure(model, batch_size, autocast_dtype=None):
        name = model.pretrained_cfg['architecture'] + ('+ckpt' if model.grad_checkpointing else '')
        return fake[name] * 2 ** 20 * len(model.blocks) / 6
    monkeypatch.setattr(selfcheck, 'activation_memory_per_image', measure)
    checker = selfcheck._Checker(torch.device('cpu'), None, None)
    checker.memory(['revvit_small_cifar', 'bdia_vit_small_cifar'], 'small')
    status = {(r.model, r.check): r.status for r in checker.results}
    assert status == {
        ('revvit_small_cifar', 'activation memory depth 6'): 'pass',
        ('bdia_vit_small_cifar', 'activation memory depth 6'): 'fail',  # above checkpointing, below vanilla
        ('revvit_small_cifar', 'activation memory depth 24'): 'pass',
        ('bdia_vit_small_cifar', 'activation memory depth 24'): 'fail',
    }


def test_train_step_time_is_judged_on_cuda_only():
    assert selfcheck._time_status(1.55, 'cuda') == 'pass'
    assert selfcheck._time_status(1.65, 'cuda') == 'fail'
    assert selfcheck._time_status(5.0, 'cpu') == 'info'


def test_fp16_grad_scaler_lines():
    """ --amp fp16 adds the scaled step through the reversible backward and the skipped overflowing step. """
    checker = selfcheck._Checker(torch.device('cpu'), torch.float16, None)
    checker.exactness('momentum_revvit_small', 'small')
    status = {r.check: r.status for r in checker.results}
    print('\n'.join(selfcheck.format_result(r) for r in checker.results))
    assert {'GradScaler fp16 scaled step', 'GradScaler fp16 skips inf', 'gradients fp16',
            'reconstruction fp16, backward'} <= set(status)
    assert set(status.values()) == {'pass'}


def test_every_reversible_timm_vit_can_be_checked_against_its_plain_vit():
    assert set(timm_vit_models()) <= set(reversible_models())
    assert [baseline_of(n) for n in ('bdia_vit_large_patch16_384', 'revvit_small_patch16_224', 'momentum_revvit_small')] \
        == ['vit_large_patch16_384', 'vit_small_patch16_224', 'vit_small_cifar']
    report = run_selfcheck('cpu', models=['bdia_vit_tiny_patch16_384'], size='small')
    assert report.passed and {r.check for r in report.results} >= {
        'gradients fp32', 'reconstruction fp32, inverse', 'reconstruction fp32, backward', 'activation memory depth 24'}
    assert 'vit_tiny_patch16_384' in next(r.detail for r in report.results if r.check == 'activation memory depth 6')


def test_bad_options(capsys):
    with pytest.raises(ValueError, match='vit_small_cifar'):
        run_selfcheck('cpu', models=['vit_small_cifar'])
    with pytest.raises(ValueError, match='amp'):
        run_selfcheck('cpu', amp='fp8')
    assert main(['--device', 'cpu', '--models', 'resnet50']) == 2
    if not torch.cuda.is_available():
        assert main(['--device', 'cuda']) == 2
    assert 'Not a reversible model' in capsys.readouterr().err
