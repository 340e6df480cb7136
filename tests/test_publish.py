""" Publishing a run: files, card, local-dir loading and the upload, all offline. """
import contextlib
import copy
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file
from timm.models import save_for_hf

import timm_reversible  # noqa: F401  registers the models
from huggingface_hub import constants as hf_constants
from timm_reversible import publish as pub
from timm_reversible._hub import HUB_NAMESPACE_ENV
from timm_reversible.profiling import activation_memory_per_image, count_flops, count_params

from conftest import package_models, run_train_script

MODELS = package_models()

REPO = Path(__file__).resolve().parent.parent

# A real short digits run: scripts/train.py writes the run directory that is published.
TRAIN_ARGS = [
    '--model', 'vit_small_cifar', '--dataset', 'digits', '--img-size', '16', '--epochs', '1', '--train-num-samples', '256',
    '-b', '32', '--opt', 'adamw', '--lr', '3e-3', '--warmup-epochs', '0', '--workers', '0', '--log-interval', '1000',
    '--model-kwargs', 'embed_dim=32', 'depth=1', 'num_heads=2', 'drop_path_rate=0.1',
]

# results.json of a hand-made full-size run (training one is too slow for a test)
RESULTS = dict(
    model='vit_small_cifar', model_args={}, dataset='torch/cifar10', num_classes=10, img_size=32,
    best_top1=0., best_top5=0., best_epoch=0, epochs=1, train_loss=0., wall_time_s=4.2,
    peak_memory_mib=None, device='cpu', num_processes=1, mixed_precision='no', recipe=dict(opt='adamw'), weights='model')


def train_run(output: Path, experiment: str = 'digits_run') -> Path:
    """ `python scripts/train.py TRAIN_ARGS...`, as a user runs it. """
    run_train_script(TRAIN_ARGS + ['--output', str(output), '--experiment', experiment], output)
    return output / experiment


def trained_model(run_dir: Path) -> torch.nn.Module:
    """ The run's model as training left it: its create_model kwargs and its best weights, loaded strictly. """
    results = json.loads((run_dir / 'results.json').read_text())
    model = timm.create_model(results['model'], **results['model_args'])
    model.load_state_dict(load_file(run_dir / 'model.safetensors'))
    return model.eval()


def images(run_dir: Path, n: int = 4) -> torch.Tensor:
    size = json.loads((run_dir / 'results.json').read_text())['img_size']
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    run_dir = train_run(tmp_path_factory.mktemp('output'))
    return run_dir, trained_model(run_dir)


def publish_cli(*argv: str) -> Tuple[int, str, str]:
    """ The command line of `scripts/publish.py` (`timm_reversible.publish.cli`), in this process. """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = pub.cli([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope='module')
def published(run, tmp_path_factory):
    """ `scripts/publish.py RUN --repo-id ... --dry-run --local-dir DIR`, as a user runs it. """
    run_dir, _ = run
    folder = tmp_path_factory.mktemp('published') / 'vit_small_cifar-digits'
    code, out, err = publish_cli(
        run_dir, '--repo-id', 'tester/vit_small_cifar-digits', '--dry-run', '--local-dir', folder, '--act-batch-size', 4)
    assert code == 0, out + err
    return folder, out


def test_dry_run_writes_exactly_the_published_files(published, run):
    folder, stdout = published
    assert sorted(p.name for p in folder.iterdir()) == sorted(pub.PUBLISHED_FILES)
    assert (folder / 'model.safetensors').read_bytes() == (run[0] / 'model.safetensors').read_bytes()
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'vit_small_cifar'
    assert config['model_args']['embed_dim'] == 32 and config['model_args']['depth'] == 1
    assert str(folder) in stdout


def test_local_dir_model_equals_trained_model(published, run):
    folder, _ = published
    run_dir, trained = run
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert isinstance(model, type(trained))
    x = images(run_dir)
    with torch.no_grad():
        assert torch.equal(model(x), trained.eval()(x))
    trained_state = trained.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained_state[key]), key


def _front_matter(readme: str) -> dict:
    assert readme.startswith('---\n')
    return yaml.safe_load(readme.split('---\n')[1])


def _python_blocks(readme: str) -> list:
    return [block.split('```')[0] for block in readme.split('```python\n')[1:]]


def test_card_renders_the_measured_figures(published, run):
    folder, _ = published
    run_dir, trained = run
    readme = (folder / 'README.md').read_text()
    results = json.loads((run_dir / 'results.json').read_text())
    meta = _front_matter(readme)
    assert {'image-classification', 'timm', 'timm-reversible'} <= set(meta['tags'])
    assert meta['library_name'] == 'timm' and meta['license'] == 'apache-2.0' and meta['datasets'] == ['digits']
    assert '# Model card for vit_small_cifar-digits' in readme
    # figures measured from the model and read from results.json, not typed
    size = (3, results['img_size'], results['img_size'])
    assert f'Params (M): {pub._sig(count_params(trained) / 1e6)}\n' in readme
    assert f'GMACs: {pub._sig(count_flops(trained, input_size=size) / 2 / 1e9)}\n' in readme
    act = activation_memory_per_image(copy.deepcopy(trained), batch_size=4, input_size=size) / 2 ** 20
    assert f'(MiB, training step): {act:.2f}, measured on the CPU' in readme
    assert f"Image size: {results['img_size']} x {results['img_size']}\n" in readme
    assert f"top-1 {results['best_top1']:.2f} %, top-5 {results['best_top5']:.2f} % (best epoch 1 of 1)" in readme
    assert f"final train loss {results['train_loss']:.4f}" in readme
    assert f"| **vit_small_cifar** (this run) | 1 | vanilla | {pub._sig(count_params(trained) / 1e6)} |" in readme
    model_args = readme.split('**Model arguments:** `')[1].split('`')[0]
    assert model_args == ', '.join(f'{k}={v!r}' for k, v in json.loads((folder / 'config.json').read_text())['model_args'].items())
    assert 'embed_dim=32' in model_args and 'drop_path_rate=0.1' in model_args
    # the recipe, without local paths and unset values
    assert 'lr: 0.003' in readme and 'opt: adamw' in readme and 'train_num_samples: 256' in readme
    assert str(run_dir.parent) not in readme and 'output:' not in readme and 'aa:' not in readme
    assert '$' not in readme
    blocks = _python_blocks(readme)
    assert blocks and all(b.startswith('import timm_reversible') for b in blocks)
    assert all("create_model('hf-hub:tester/vit_small_cifar-digits'" in b for b in blocks)
    assert 'Vision Transformer for Small-Size Datasets' in readme.split('## Citation')[1]


PAPERS = {
    'vit_small_cifar': ['2112.13492'],
    'revvit_small_cifar': ['2112.13492', 'Reversible Vision Transformers'],
    'bdia_vit_small_cifar': ['2112.13492', '2407.09093'],
    'momentum_revvit_small': ['2112.13492', 'Momentum Residual Neural Networks'],
}


@pytest.mark.parametrize('name', sorted(set(MODELS) | set(PAPERS)))
def test_every_model_has_card_fields(name):
    """ One template for every model, rendered with that model's fields and placeholders for the run's. """
    template = pub.card_template(name)
    run_fields = {k: f'<{k}>' for k in pub.CARD_FIELDS}
    model = template.model
    readme = pub.render_card(template.text, dict(
        run_fields, description=model['description'].replace('${dataset}', '<dataset>'),
        papers='\n'.join(f'  - {p}' for p in model['papers']),
        memory_saving=pub.render_card(template.memory_saving, run_fields) if model['memory_saving'] else '',
        citations='\n'.join(f'```bibtex\n{c}```' for c in model['citations'])))
    assert '$' not in readme
    meta = _front_matter(readme.replace('<datasets_yaml>', '- cifar10'))
    assert {'image-classification', 'timm', 'timm-reversible'} <= set(meta['tags'])
    assert meta['library_name'] == 'timm' and meta['license'] == '<license>'
    sections = [line for line in readme.splitlines() if line.startswith('## ')]
    assert sections == ['## Model Details', '## Model Usage', '## Model Comparison', '## Citation']
    for field in ('params_m', 'gmacs', 'act_mib', 'img_size', 'comparison_table'):
        assert f'<{field}>' in readme
    assert all(b.startswith('import timm_reversible') for b in _python_blocks(readme))
    assert ('### Memory-saving training' in readme) == (name != 'vit_small_cifar')
    citation = readme.split('## Citation')[1]
    for paper in PAPERS.get(name, ['2112.13492']):
        assert paper in citation and paper in readme.split('## Model Usage')[0]
    assert citation.count('@') == len(PAPERS.get(name, [0]))


def test_a_model_without_card_fields_is_an_error():
    with pytest.raises(pub.PublishError, match='No model card fields'):
        pub.card_template('resnet18')


def test_unknown_placeholder_is_an_error():
    with pytest.raises(pub.PublishError, match='placeholder'):
        pub.render_card('params: ${params_typed_by_hand}', {k: '' for k in pub.CARD_FIELDS})


def _copy_run(run_dir: Path, dest: Path, drop=(), **results) -> Path:
    shutil.copytree(run_dir, dest)
    for name in drop:
        (dest / name).unlink()
    if results:
        data = json.loads((dest / 'results.json').read_text())
        (dest / 'results.json').write_text(json.dumps(dict(data, **results)))
    return dest


def test_refuses_a_run_without_results(run, tmp_path):
    unfinished = _copy_run(run[0], tmp_path / 'unfinished', drop=['results.json'])
    code, out, err = publish_cli(unfinished, '--repo-id', 'tester/x', '--dry-run', '--local-dir', tmp_path / 'out')
    assert code == 1
    assert 'has no results.json' in err and 'Traceback' not in err
    assert not (tmp_path / 'out').exists()


def test_refuses_a_run_without_safetensors(run, tmp_path):
    pickled = _copy_run(run[0], tmp_path / 'pickled', drop=['model.safetensors'])
    torch.save(load_file(run[0] / 'model.safetensors'), pickled / 'pytorch_model.bin')
    with pytest.raises(pub.PublishError, match='only safetensors weights are published.*pytorch_model.bin'):
        pub.publish(pickled, 'tester/x', dry_run=True, local_dir=tmp_path / 'out')


def test_dry_run_needs_local_dir(run):
    code, _, err = publish_cli(run[0], '--repo-id', 'tester/x', '--dry-run')
    assert code == 2 and '--dry-run needs --local-dir' in err


def test_missing_token_is_reported_before_any_work(run, fake_hub, monkeypatch, tmp_path):
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.delenv('HUGGING_FACE_HUB_TOKEN', raising=False)
    monkeypatch.setattr(hf_constants, 'HF_TOKEN_PATH', str(tmp_path / 'no_token'))
    monkeypatch.setattr(hf_constants, 'HF_STORED_TOKENS_PATH', str(tmp_path / 'no_tokens'))
    code, out, err = publish_cli(run[0], '--repo-id', 'tester/x')
    assert code == 1
    assert 'No Hugging Face token' in err and 'hf auth login' in err and 'HF_TOKEN' in err
    assert fake_hub.requests == []


def test_upload_sends_the_files_to_the_repo(run, published, fake_hub, monkeypatch):
    run_dir, trained = run
    monkeypatch.setenv('HF_TOKEN', 'hf_test_token')
    result = pub.publish(run_dir, 'tester/vit_small_cifar-digits', private=True, act_batch_size=4)

    assert len(fake_hub.created) == 1
    created = fake_hub.created[0]
    assert (created['organization'], created['name'], created['visibility']) == ('tester', 'vit_small_cifar-digits', 'private')
    assert len(fake_hub.commits) == 1
    commit = fake_hub.commits[0]
    assert commit['repo_id'] == 'tester/vit_small_cifar-digits'
    assert sorted(commit['files']) == sorted(pub.PUBLISHED_FILES)
    assert commit['files']['model.safetensors'] == (run_dir / 'model.safetensors').read_bytes()
    assert commit['files']['config.json'] == (run_dir / 'config.json').read_bytes()
    # the same card as the dry run: every figure is measured deterministically
    assert commit['files']['README.md'] == (published[0] / 'README.md').read_bytes()
    assert commit['files']['README.md'].decode() == result.readme
    assert all(r.headers['authorization'] == 'Bearer hf_test_token' for r in fake_hub.requests
               if r.url.path.startswith('/api/repos') or '/commit/' in r.url.path)
    assert result.commit.commit_url.startswith('https://huggingface.co/tester/vit_small_cifar-digits/commit/')

    # and back: the published repository creates the trained model (config.json's architecture and model_args)
    model = timm.create_model('hf-hub:tester/vit_small_cifar-digits', pretrained=True).eval()
    x = images(run_dir)
    with torch.no_grad():
        assert torch.equal(model(x), trained.eval()(x))


def test_upload_refused_by_the_hub_is_a_clear_error(run, fake_hub, monkeypatch, tmp_path):
    monkeypatch.setenv('HF_TOKEN', 'hf_read_only')
    fake_hub.create_status = 403
    code, out, err = publish_cli(run[0], '--repo-id', 'someone-else/x', '--local-dir', tmp_path / 'out',
                                 '--act-batch-size', 4)
    assert code == 1 and "Uploading to 'someone-else/x' failed" in err and 'write access' in err
    assert 'Traceback' not in err and fake_hub.commits == []


def test_registered_name_needs_the_tag_dataset_and_default_architecture(run, tmp_path):
    run_dir, _ = run
    with pytest.raises(pub.PublishError, match=r'\.c10 stands for CIFAR-10.*digits'):
        pub.publish(run_dir, 'tester/vit_small_cifar.c10', dry_run=True, local_dir=tmp_path / 'a')
    cifar = _copy_run(run_dir, tmp_path / 'cifar', dataset='torch/cifar10')
    with pytest.raises(pub.PublishError, match='builds the default architecture and its weights do not fit'):
        pub.publish(cifar, 'tester/vit_small_cifar.c10', dry_run=True, local_dir=tmp_path / 'b')
    with pytest.raises(pub.PublishError, match='not a registered pretrained tag'):
        pub.publish(cifar, 'tester/vit_small_cifar.in1k', dry_run=True, local_dir=tmp_path / 'c')


def benchmark_file(path: Path, *rows: dict, **model_kwargs) -> Path:
    """ A results.json as scripts/benchmark.py writes it (its meta and BenchmarkRow fields), figures made up. """
    from timm_reversible.benchmarking import BenchmarkRow, ModelSpec

    def row(name, depth, act, params_m, gflops=None, grad_checkpointing=False, reversible=False):
        label = ModelSpec(name, grad_checkpointing=grad_checkpointing).label
        return dataclasses.asdict(BenchmarkRow(
            model=label, name=name, depth=depth, grad_checkpointing=grad_checkpointing, reversible=reversible,
            params_m=params_m, gflops=gflops, act_mib_per_image=act))
    meta = dict(device='cpu', precision='fp32', ref_batch=128, model_kwargs=model_kwargs)
    path.write_text(json.dumps(dict(meta=meta, rows=[row(**r) for r in rows], targets=[])))
    return path


def test_activation_memory_from_benchmark(run, tmp_path):
    run_dir, trained = run
    params_m = count_params(trained) / 1e6
    bench = pub.read_benchmark(benchmark_file(
        tmp_path / 'results.json',
        dict(name='vit_small_cifar', depth=6, act=9.0, params_m=params_m),
        dict(name='vit_small_cifar', depth=1, act=0.01, params_m=params_m, grad_checkpointing=True),
        dict(name='vit_small_cifar', depth=1, act=0.5, params_m=params_m, gflops=0.002),
        dict(name='revvit_small_cifar', depth=1, act=0.25, params_m=params_m, gflops=0.002, reversible=True),
        embed_dim=32))
    figures = pub.model_figures(trained, bench)
    assert figures['act_bytes'] == 0.5 * 2 ** 20
    assert figures['act_source'] == 'from the benchmark (results.json, cpu, fp32, batch 128)'
    readme = pub.build_card(pub.load_run(run_dir), 'tester/x', figures, bench)
    assert '(MiB, training step): 0.50, from the benchmark (results.json, cpu, fp32, batch 128)' in readme
    table = readme.split('## Model Comparison')[1]
    assert '| **vit_small_cifar** (this run) | 1 | vanilla | ' in table
    assert f'| vit_small_cifar + grad ckpt | 1 | grad ckpt | {pub._sig(params_m)} | - | 0.01 | - |' in table
    assert f'| revvit_small_cifar | 1 | reversible | {pub._sig(params_m)} | 0.00100 | 0.25 | - |' in table
    assert '| 6 |' not in table and table.count('| vit_small_cifar |') == 0

    other_depth = pub.read_benchmark(benchmark_file(
        tmp_path / 'b.json', dict(name='vit_small_cifar', depth=6, act=9.0, params_m=params_m)))
    with pytest.raises(pub.PublishError, match='no activation memory for vit_small_cifar at depth 1 .*measured: '
                                               'vit_small_cifar depth 6'):
        pub.model_figures(trained, other_depth)
    other_width = pub.read_benchmark(benchmark_file(
        tmp_path / 'c.json', dict(name='vit_small_cifar', depth=1, act=9.0, params_m=1.5)))
    with pytest.raises(pub.PublishError, match='another width'):
        pub.model_figures(trained, other_width)


def test_local_dir_with_other_files_is_refused(run, tmp_path):
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'pytorch_model.bin').write_bytes(b'')
    with pytest.raises(pub.PublishError, match='holds other files'):
        pub.publish(run[0], 'tester/x', dry_run=True, local_dir=tmp_path / 'out', act_batch_size=4)


def test_published_weights_load_with_the_registered_name(fake_hub, monkeypatch, tmp_path):
    """ Full size: publish under `<namespace>/vit_small_cifar.c10`, then `pretrained=True` downloads them. """
    monkeypatch.setenv('HF_TOKEN', 'hf_test_token')
    monkeypatch.setenv(HUB_NAMESPACE_ENV, 'tester')
    trained = timm.create_model('vit_small_cifar').eval()
    run_dir = tmp_path / 'run'
    save_for_hf(trained, run_dir, safe_serialization=True)
    results = json.loads(json.dumps(RESULTS))
    results.update(model_args={}, dataset='torch/cifar10')
    (run_dir / 'results.json').write_text(json.dumps(results))
    bench = benchmark_file(tmp_path / 'benchmark.json', dict(name='vit_small_cifar', depth=6, act=8.9, params_m=9.622512))

    result = pub.publish(run_dir, 'tester/vit_small_cifar.c10', benchmark=bench)
    assert fake_hub.commits[-1]['repo_id'] == 'tester/vit_small_cifar.c10'
    assert 'timm.create_model("vit_small_cifar.c10", pretrained=True)' in result.readme
    assert 'Params (M): 9.62\n' in result.readme and 'training step): 8.90, from the benchmark (benchmark.json, cpu' in result.readme

    model = timm.create_model('vit_small_cifar.c10', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
    downloads = [u for u in fake_hub.urls() if '/resolve/' in u]
    assert not [u for u in downloads if u.endswith('.bin')]


def _run_card_code(readme: str, folder: Path, workdir: Path, monkeypatch) -> None:
    """ Run every Python block of a card against the published folder, on a made-up image. """
    from PIL import Image
    size = json.loads((folder / 'config.json').read_text())['pretrained_cfg']['input_size'][-1]
    Image.fromarray(torch.randint(0, 255, (size, size, 3), dtype=torch.uint8).numpy()).save(workdir / 'image.png')
    monkeypatch.chdir(workdir)
    load_name = readme.split("timm.create_model('")[1].split("'")[0]
    blocks = _python_blocks(readme)
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block.replace(load_name, f'local-dir:{folder}'), 'card', 'exec'), {})


@pytest.mark.parametrize('name', [m for m in MODELS if m != 'vit_small_cifar'])  # vit: the trained run, below
def test_card_usage_code_runs(name, tmp_path, monkeypatch):
    """ Each model's card, published from a small run of that model: its usage code works as written. """
    model_args = dict(embed_dim=32, depth=2, num_heads=2, img_size=16)
    run_dir = tmp_path / 'run'
    save_for_hf(timm.create_model(name, **model_args), run_dir, model_config=dict(model_args=model_args),
                safe_serialization=True)
    results = dict(RESULTS, model=name, model_args=model_args, dataset='digits', img_size=16)
    (run_dir / 'results.json').write_text(json.dumps(results))
    result = pub.publish(run_dir, f'tester/{name}-tiny', dry_run=True, local_dir=tmp_path / 'pub', act_batch_size=2)
    assert '### Memory-saving training' in result.readme
    _run_card_code(result.readme, tmp_path / 'pub', tmp_path, monkeypatch)


def test_vit_card_usage_code_runs(published, tmp_path, monkeypatch):
    folder, _ = published
    _run_card_code((folder / 'README.md').read_text(), folder, tmp_path, monkeypatch)


@pytest.mark.slow
def test_publish_from_an_installed_wheel(run, tmp_path):
    """ The card template ships in the wheel: a publish from an installed copy, far from the repository. """
    # built from a copy of what the wheel is made of: a build/ folder left in the repository by an earlier
    # build could otherwise slip stale modules into it
    source, wheels, site = tmp_path / 'source', tmp_path / 'wheels', tmp_path / 'site'
    shutil.copytree(REPO / 'timm_reversible', source / 'timm_reversible',
                    ignore=shutil.ignore_patterns('__pycache__'))
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q']
    subprocess.run(pip + ['wheel', '--no-deps', '--no-build-isolation', '-w', str(wheels), str(source)],
                   check=True, capture_output=True, cwd=tmp_path)
    wheel, = wheels.glob('timm_reversible-*.whl')
    subprocess.run(pip + ['install', '--no-deps', '--target', str(site), str(wheel)], check=True, capture_output=True)
    code = ('import sys, timm_reversible\n'
            'from timm_reversible.publish import cli\n'
            'print(timm_reversible.__file__)\n'
            'sys.exit(cli(sys.argv[1:]))\n')
    folder = tmp_path / 'published'
    proc = subprocess.run(
        [sys.executable, '-c', code, str(run[0]), '--repo-id', 'tester/vit_small_cifar-digits', '--dry-run',
         '--local-dir', str(folder), '--act-batch-size', '2'],
        capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0].startswith(str(site))
    assert sorted(p.name for p in folder.iterdir()) == sorted(pub.PUBLISHED_FILES)
    assert 'Vision Transformer for Small-Size Datasets' in (folder / 'README.md').read_text().split('## Citation')[1]
