""" The benchmark script end to end on tiny configs, as a user runs it (slow: a fresh interpreter each), and the
library's model specs and report pieces. """
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from timm_reversible.benchmarking import (
    BASELINE, BenchmarkRow, ModelSpec, ProfileRow, default_model_specs, find_row, format_table, markdown_report,
    parse_model_spec, profile_report, write_profile_report)
from timm_reversible.profiling import PROFILE_CATEGORIES, StepProfile

from conftest import package_models, script_env

BENCHMARK_SCRIPT = Path(__file__).resolve().parents[1] / 'scripts' / 'benchmark.py'
TINY = ['--model-kwargs', 'embed_dim=32', 'num_heads=2', '--batch-size', '2', '--repeats', '1', '--warmup', '0',
        '--no-progress']


def run_benchmark_script(args, cwd, returncode=0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCHMARK_SCRIPT), *args], capture_output=True, text=True,
                          env=script_env(), cwd=cwd, timeout=600)
    assert proc.returncode == returncode, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_script_end_to_end_on_a_tiny_config(tmp_path):
    # the baseline row is added by the script because the ratios need it
    out = tmp_path / 'bench'
    proc = run_benchmark_script(
        ['--models', 'vit_small_cifar:grad_checkpointing=1', 'revvit_small_cifar', '--depths', '1', '6',
         '--memory-batch-sizes', '1', '2', '--out', str(out)] + TINY, tmp_path)
    for name in ('results.json', 'results.md', 'memory_vs_depth.png', 'memory_vs_throughput.png'):
        assert (out / name).stat().st_size > 0, name
    assert (out / 'memory_vs_depth.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    result = json.loads((out / 'results.json').read_text())
    rows = result['rows']
    models = ('vit_small_cifar', 'vit_small_cifar + grad ckpt', 'revvit_small_cifar')
    assert [(r['model'], r['depth']) for r in rows] == [(model, depth) for depth in (1, 6) for model in models]
    for r in rows:
        assert r['error'] is None
        for key in ('params_m', 'gflops', 'act_mib_per_image', 'state_mib', 'peak_train_mib', 'train_img_s',
                    'infer_img_s', 'train_step_vs_baseline', 'act_vs_baseline'):
            assert r[key] > 0, key
        assert r['max_batch'] > 0
    base = [r for r in rows if r['model'] == BASELINE]
    assert all(r['act_vs_baseline'] == 1 and r['train_step_vs_baseline'] == 1 for r in base)
    assert base[1]['params_m'] > base[0]['params_m']  # the depth sweep reached the models
    assert result['meta']['model_kwargs'] == {'embed_dim': 32, 'num_heads': 2}
    # glibc keeps freed memory for the timings (Linux runners), and the report says so
    assert result['meta']['host_allocator'] == ('keep' if platform.libc_ver()[0] == 'glibc' else 'default')
    assert 'Host allocator:' in (out / 'results.md').read_text()

    # the script's targets, evaluated on the rows it measured
    at6 = {r['model']: r for r in rows if r['depth'] == 6}
    revvit, ckpt = at6['revvit_small_cifar'], at6['vit_small_cifar + grad ckpt']
    checks = {c['target']: c for c in result['targets']}
    expected = {
        'revvit / vanilla activation memory, depth 6': (revvit['act_vs_baseline'], 0.25),
        'revvit activation memory below vanilla + grad ckpt, depth 6 (MiB/img)': (
            revvit['act_mib_per_image'], ckpt['act_mib_per_image']),
        'revvit_small_cifar / vanilla train-step time, depth 6 (floor 4/3)': (revvit['train_step_vs_baseline'], 1.33),
        'revvit activation memory below vanilla + grad ckpt, depth 1 (MiB/img)': (
            rows[2]['act_mib_per_image'], rows[1]['act_mib_per_image']),
        'revvit_small_cifar / vanilla train-step time, depth 1 (floor 4/3)': (rows[2]['train_step_vs_baseline'], 1.33),
    }
    assert set(checks) == set(expected)
    for target, (value, limit) in expected.items():
        check = checks[target]
        assert (check['value'], check['limit']) == (round(value, 4), round(limit, 4)), target
        assert check['met'] == (value < limit if 'below' in target else value <= limit), target
    assert result['reference_study']['models'][BASELINE]['peak_mib'] == 1508

    md = (out / 'results.md').read_text()
    assert 'python scripts/benchmark.py --models vit_small_cifar:grad_checkpointing=1' in md
    assert "reference study's published figures" in md and '| ViT (vit_small_cifar) | 1,508 |' in md
    assert '## Targets' in md and '| revvit / vanilla activation memory, depth 6 |' in md
    assert 'vit_small_cifar + grad ckpt' in proc.stdout  # the terminal table
    assert 'revvit / vanilla activation memory, depth 6' in proc.stdout


@pytest.mark.slow
def test_script_profile_on_a_tiny_config(tmp_path):
    out = tmp_path / 'profile'
    proc = run_benchmark_script(
        ['--profile', '--models', 'vit_small_cifar', 'bdia_vit_small_cifar', '--depths', '1', '--out', str(out)]
        + TINY, tmp_path)
    result = json.loads((out / 'profile.json').read_text())
    assert [(r['model'], r['depth']) for r in result['rows']] == [('vit_small_cifar', 1), ('bdia_vit_small_cifar', 1)]
    assert result['categories'] == PROFILE_CATEGORIES and result['meta']['batch_size'] == 2
    for row in result['rows']:
        assert list(row['times_ms']) == list(PROFILE_CATEGORIES)
        assert sum(row['times_ms'].values()) + row['unattributed_ms'] == pytest.approx(row['step_ms'], rel=1e-9)
    assert result['rows'][1]['times_ms']['side information'] > 0 == result['rows'][0]['times_ms']['side information']
    md = (out / 'profile.md').read_text()
    assert '--profile --models vit_small_cifar bdia_vit_small_cifar' in md
    assert '#### bdia_vit_small_cifar, depth 1' in md
    assert '| % of the step | vit_small_cifar | bdia_vit_small_cifar |' in proc.stdout
    assert not (out / 'results.json').exists()  # the profile instead of the benchmark


@pytest.mark.slow
def test_script_compile_counts_graphs_and_times_the_compiled_step(tmp_path):
    out = tmp_path / 'bench'
    proc = run_benchmark_script(
        ['--compile', '--models', 'bdia_vit_small_cifar', '--depths', '1', '--memory-batch-sizes', '1', '2',
         '--out', str(out)] + TINY + ['--warmup', '1'], tmp_path)  # the warm-up round compiles
    rows = {r['model']: r for r in json.loads((out / 'results.json').read_text())['rows']}
    # the plain ViT's training forward is one graph; a reversible one breaks once, around the engine
    assert (rows['vit_small_cifar']['train_graphs'], rows['vit_small_cifar']['train_graph_break_sites']) == (1, 0)
    assert (rows['bdia_vit_small_cifar']['train_graphs'], rows['bdia_vit_small_cifar']['train_graph_break_sites']) \
        == (3, 1)
    for r in rows.values():
        assert r['compiled_train_step_ms'] > 0
        assert r['compiled_vs_eager'] == pytest.approx(r['compiled_train_step_ms'] / r['train_step_ms'], rel=1e-12)
    assert '| bdia_vit_small_cifar | 1 | 3 | 1 |' in proc.stdout
    assert '## torch.compile' in (out / 'results.md').read_text()


@pytest.mark.slow
def test_script_help_and_unknown_models(tmp_path):
    text = run_benchmark_script(['--help'], tmp_path).stdout
    flags = ('--models', '--depths', '--mem-budget', '--amp', '--profile', '--compile', '--out')
    assert all(flag in text for flag in flags)
    proc = run_benchmark_script(['--models', 'no_such_model', '--out', str(tmp_path)], tmp_path, returncode=1)
    assert "Unknown model 'no_such_model'" in proc.stderr


def test_model_specs():
    spec = parse_model_spec('vit_small_cifar:drop_path_rate=0.1,global_pool=avg')
    assert spec.kwargs == {'drop_path_rate': 0.1, 'global_pool': 'avg'} and not spec.grad_checkpointing
    assert spec.label == 'vit_small_cifar [drop_path_rate=0.1,global_pool=avg]'
    ckpt = parse_model_spec('vit_small_cifar:grad_checkpointing=1')
    assert ckpt == ModelSpec('vit_small_cifar', {}, True) and ckpt.label == 'vit_small_cifar + grad ckpt'
    assert parse_model_spec('vit_small_cifar:grad_checkpointing=True').grad_checkpointing
    assert not parse_model_spec('vit_small_cifar:grad_ckpt=0').grad_checkpointing
    # values read as --model-kwargs reads them (timm's ParseKwargs): Python literals, else strings
    assert parse_model_spec('bdia_vit_small_cifar:split_backward=False,bdia_gamma=0.25,act=gelu').kwargs == {
        'split_backward': False, 'bdia_gamma': 0.25, 'act': 'gelu'}
    with pytest.raises(ValueError, match='takes 1 or 0'):
        parse_model_spec('vit_small_cifar:grad_checkpointing=yes')
    with pytest.raises(ValueError, match='depth'):
        parse_model_spec('vit_small_cifar:depth=3')
    with pytest.raises(ValueError, match='key=value'):
        parse_model_spec('vit_small_cifar:embed_dim')
    with pytest.raises(ValueError, match="Unknown model 'no_such_model'"):
        parse_model_spec('no_such_model')

    defaults = default_model_specs()
    assert defaults[0] == ModelSpec(BASELINE) and defaults[1] == ModelSpec(BASELINE, {}, True)
    assert sorted(s.name for s in defaults if not s.grad_checkpointing) == package_models()
    model = ckpt.create(depth=1, embed_dim=32, num_heads=2)
    assert model.grad_checkpointing and len(model.blocks) == 1


def test_tables_and_report_from_rows():
    rows = [
        BenchmarkRow(model=BASELINE, name=BASELINE, depth=6, act_mib_per_image=8.0, peak_train_mib=1287.4),
        BenchmarkRow(model='revvit_small_cifar [split_backward=1]', name='revvit_small_cifar', depth=6,
                     kwargs={'split_backward': 1}, act_mib_per_image=1.9),
        BenchmarkRow(model='revvit_small_cifar', name='revvit_small_cifar', depth=6, act_mib_per_image=2.0),
        BenchmarkRow(model='broken', name='broken', depth=24, error='RuntimeError: boom'),
    ]
    assert find_row(rows, 'revvit_small_cifar', 6) is rows[2]  # the model as registered, not a variant
    assert find_row(rows, BASELINE, 6, grad_checkpointing=True) is None
    assert find_row(rows, 'broken', 24) is None
    text = format_table(rows)
    assert 'error: RuntimeError: boom' in text and '1,287*' in text
    meta = dict(command='python scripts/benchmark.py', date='today', machine='m', device='cpu', precision='fp32',
                batch_size=2, warmup=0, repeats=1, memory_batch_sizes=[1, 2], ref_batch=128, mem_budget_gib=8.0,
                memory_method='MemTracker')
    md = markdown_report(rows, meta, {'Reference study': 'their figures', 'Targets': 'our goals'})
    assert md.index('| revvit_small_cifar | 6 |') < md.index('## Reference study\n\ntheir figures\n') \
        < md.index('## Targets\n\nour goals\n')
    assert '## ' not in markdown_report(rows, meta)  # no sections unless given


def _step_profile(step_ms, **times_ms):
    times = dict.fromkeys(PROFILE_CATEGORIES, 0.)
    times.update({category.replace('_', ' '): t for category, t in times_ms.items()})
    return StepProfile(step_ms, times, step_ms - sum(times.values()), 'cpu')


def test_profile_report(tmp_path):
    rows = [
        ProfileRow('vit_small_cifar', 6, _step_profile(200., residual_functions=80., backward=100., optimizer=10.)),
        ProfileRow('bdia_vit_small_cifar', 6, _step_profile(
            250., residual_functions=60., recomputation=150., side_information=25., optimizer=10.)),
    ]
    meta = dict(command='python scripts/benchmark.py --profile', date='today', machine='m', device='cpu',
                precision='fp32', batch_size=32, warmup=1, repeats=3)
    paths = write_profile_report(rows, meta, tmp_path)
    md = paths['markdown'].read_text()
    assert md == profile_report(rows, meta)
    assert '| % of the step | vit_small_cifar | bdia_vit_small_cifar |' in md
    assert '| side information | 0.0 | 10.0 |' in md and '| unattributed | 5.0 | 2.0 |' in md
    assert '| step ms | 200.0 | 250.0 |' in md
    assert '#### bdia_vit_small_cifar, depth 6' in md and '| recomputation | 150.0 | 60.0 |' in md
    assert '| step | 250.0 | 100.0 |' in md
    assert all(f'- **{category}**: ' in md for category in PROFILE_CATEGORIES)
    result = json.loads(paths['json'].read_text())
    assert result['rows'][1] == dict(
        model='bdia_vit_small_cifar', depth=6, step_ms=250., times_ms=rows[1].profile.times_ms, unattributed_ms=5.,
        device_type='cpu')
