""" The benchmark script end to end on a tiny config, and its model specs and report pieces. """
import json
import sys
from pathlib import Path

import pytest

from timm_reversible.benchmarking import (
    BASELINE, REFERENCE_STUDY, BenchmarkRow, ModelSpec, default_model_specs, format_table, markdown_report,
    package_models, parse_kwargs, parse_model_spec, target_checks)

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--depths', '1', '2', '--model-kwargs', 'embed_dim=32', 'num_heads=2', '--batch-size', '2',
        '--repeats', '1', '--warmup', '0', '--memory-batch-sizes', '1', '2', '--no-progress']


def _script():
    sys.path.insert(0, str(ROOT / 'scripts'))
    try:
        import benchmark
    finally:
        sys.path.pop(0)
    return benchmark


def test_script_end_to_end_on_a_tiny_config(tmp_path, capsys):
    # in-process (a second interpreter would spend most of the test importing torch); the baseline row is
    # added by the script because the ratios need it
    out = tmp_path / 'bench'
    assert _script().main(['--models', 'vit_small_cifar:grad_checkpointing=1', '--out', str(out)] + TINY) == 0
    for name in ('results.json', 'results.md', 'memory_vs_depth.png', 'memory_vs_throughput.png'):
        assert (out / name).stat().st_size > 0, name
    assert (out / 'memory_vs_depth.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    result = json.loads((out / 'results.json').read_text())
    rows = result['rows']
    assert [(r['model'], r['depth']) for r in rows] == [
        ('vit_small_cifar', 1), ('vit_small_cifar + grad ckpt', 1),
        ('vit_small_cifar', 2), ('vit_small_cifar + grad ckpt', 2)]
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
    assert result['reference_study'] == REFERENCE_STUDY

    md = (out / 'results.md').read_text()
    assert 'python scripts/benchmark.py --models vit_small_cifar:grad_checkpointing=1' in md
    assert "reference study's published figures" in md and '1,508' in md
    assert 'vit_small_cifar + grad ckpt' in capsys.readouterr().out  # the terminal table


def test_script_rejects_unknown_models(tmp_path):
    with pytest.raises(ValueError, match='Unknown model'):
        _script().main(['--models', 'no_such_model', '--out', str(tmp_path)])


def test_script_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _script().parse_args(['--help'])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ('--models', '--depths', '--mem-budget', '--amp', '--out'))


def test_model_specs():
    spec = parse_model_spec('vit_small_cifar:drop_path_rate=0.1,global_pool=avg')
    assert spec.kwargs == {'drop_path_rate': 0.1, 'global_pool': 'avg'} and not spec.grad_checkpointing
    assert spec.label == 'vit_small_cifar [drop_path_rate=0.1,global_pool=avg]'
    ckpt = parse_model_spec('vit_small_cifar:grad_checkpointing=1')
    assert ckpt == ModelSpec('vit_small_cifar', {}, True) and ckpt.label == 'vit_small_cifar + grad ckpt'
    assert parse_model_spec('vit_small_cifar:grad_checkpointing=true').grad_checkpointing
    assert parse_kwargs(['embed_dim=32', 'act=gelu', 'flag=false']) == {'embed_dim': 32, 'act': 'gelu', 'flag': False}
    with pytest.raises(ValueError, match='depth'):
        parse_model_spec('vit_small_cifar:depth=3')
    with pytest.raises(ValueError):
        parse_kwargs(['embed_dim'])

    defaults = default_model_specs()
    assert defaults[0] == ModelSpec(BASELINE) and defaults[1] == ModelSpec(BASELINE, {}, True)
    assert sorted(s.name for s in defaults if not s.grad_checkpointing) == package_models()
    model = ckpt.create(depth=1, embed_dim=32, num_heads=2)
    assert model.grad_checkpointing and len(model.blocks) == 1


def _row(name, depth, act, step=1.0, ckpt=False, reversible=False, **kw):
    return BenchmarkRow(model=name + (' + grad ckpt' if ckpt else ''), name=name, depth=depth, grad_checkpointing=ckpt,
                        reversible=reversible, act_mib_per_image=act, act_vs_baseline=act / (8.0 * depth / 6),
                        train_step_vs_baseline=step, peak_train_mib=100.0, **kw)


def test_targets_and_tables_from_rows():
    rows = [
        _row(BASELINE, 6, 8.0), _row(BASELINE, 6, 3.0, ckpt=True), _row('revvit_small_cifar', 6, 1.9, 1.4, reversible=True),
        _row(BASELINE, 24, 32.0), _row(BASELINE, 24, 3.5, ckpt=True), _row('revvit_small_cifar', 24, 2.5, reversible=True),
        _row('bdia_vit_small_cifar', 24, 2.2, reversible=True),
        _row('momentum_revvit_small', 24, 2.6, reversible=True, split_backward=True),
        BenchmarkRow(model='broken', name='broken', depth=24, error='RuntimeError: boom'),
    ]
    checks = {c['target']: c for c in target_checks(rows)}
    assert checks['revvit / vanilla activation memory, depth 6']['met']  # 1.9 / 8 = 0.2375
    assert not checks['revvit / vanilla activation memory, depth 24']['met']  # 2.5 / 32 = 0.078
    assert not checks['revvit_small_cifar / vanilla train-step time, depth 6 (floor 4/3)']['met']
    assert checks['bdia_vit_small_cifar / revvit activation memory, depth 24']['limit'] == 1.25
    split = checks['momentum_revvit_small / revvit activation memory, depth 24 (split recomputation)']
    assert split['limit'] == 1.10 and split['met']  # 2.6 / 2.5 = 1.04
    assert checks['revvit activation memory below vanilla + grad ckpt, depth 24 (MiB/img)']['met']
    text = format_table(rows)
    assert 'error: RuntimeError: boom' in text and 'revvit_small_cifar' in text
    meta = dict(command='python scripts/benchmark.py', date='today', machine='m', device='cpu', precision='fp32',
                batch_size=2, warmup=0, repeats=1, memory_batch_sizes=[1, 2], ref_batch=128, mem_budget_gib=8.0,
                memory_method='MemTracker')
    md = markdown_report(rows, meta)
    assert '| ViT (vit_small_cifar) | 1,508 |' in md and '## Targets' in md
