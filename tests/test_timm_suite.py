""" timm's own model tests (`tests/test_models.py` of the installed timm's source distribution) on every model
this package registers.

The sdist matching `timm.__version__` is fetched with pip once and kept in `~/.cache/timm-reversible/`
(`$XDG_CACHE_HOME` if set); without the registry the test is skipped, saying so. Its `tests/test_models.py`
(with the folder's `__init__.py` and `conftest.py`, any module of that folder it imports, and the
`pyproject.toml` that registers its markers) is extracted into a temporary folder and run by pytest in a
subprocess, offline (HF_HUB_OFFLINE=1), with the package loaded as a plugin (`-p timm_reversible`) and the
selection made by tests/timm_suite_plugin.py:

- only the tests whose `model_name` parameter is a model of `timm_suite_plugin.suite_models()` run (every
  registered model but the base and large timm ViTs; `TIMM_SUITE_MODELS=all` runs those too);
- the tests that need the Hub are skipped with that reason: `test_model_load_pretrained` and
  `test_model_features_pretrained` load published weights (the list comes from the models' `hf_hub_id`),
  `test_model_inference` compares with reference outputs published for timm's `test_*` models (none here);
- timm picks some checks by model name or module, and the package's own contract tests
  (tests/test_timm_contract.py) run those checks on every model:
  * NON_STD_FILTERS ('vit_*', ...) sort models between `test_model_default_cfgs` (NCHW feature maps) and
    `test_model_default_cfgs_non_std`: the former is skipped for all the package's models (token features,
    and the reversible models' names match no filter), the latter is `test_timm_non_std_cfg_checks`;
  * `test_model_forward_features` excludes 'vit_*': `test_features_only_default`;
  * FEAT_INTER_FILTERS (by module) select `test_model_forward_intermediates(_features)` and
    `test_prune_intermediate_layers_contract`: `test_forward_intermediates_matches_forward_features`,
    `test_forward_intermediates_with_grad_checkpointing`, `test_features_only_getter` and
    `test_prune_intermediate_layers_contract`;
  * the pretrained tests above: `test_pretrained_file_with_other_in_chans_and_classes`;
- failures caused by the reversible models' own files are expected (xfail, strict) with the cause named,
  so that each flips to a failure once fixed.

The test fails on any failure or unexpected pass and prints each test's outcome per model. It takes about
40 s on 2 cores (about 15 s of it collecting timm's ~17,900 test ids).
"""
import ast
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Dict

import pytest
import timm

import timm_reversible

from conftest import script_env
from timm_suite_plugin import suite_models

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = Path(timm_reversible.__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'timm-reversible' / 'timm-sdist'


def timm_sdist(version: str) -> Path:
    """ timm's source distribution of `version`, fetched with pip into the cache once; skip if pip can't. """
    path = CACHE_DIR / f'timm-{version}.tar.gz'
    if path.exists():
        return path
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as download_dir:  # a complete file or none, for parallel runs
        proc = subprocess.run(
            [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:', f'timm=={version}',
             '-d', download_dir], capture_output=True, text=True, timeout=600)
        downloaded = Path(download_dir) / path.name
        if proc.returncode != 0 or not downloaded.exists():
            reason = (proc.stderr.strip().splitlines() or ['no sdist'])[-1]
            pytest.skip(f'pip could not fetch the sdist of timm {version} from the package registry: {reason}')
        os.replace(downloaded, path)
    return path


def extract_model_tests(sdist: Path, dest: Path) -> Path:
    """ tests/test_models.py, the modules of its folder it imports, the folder's __init__ / conftest and the
    pyproject.toml with its markers, into `dest`; returns the path of test_models.py.
    """
    with tarfile.open(sdist) as tar:
        root = tar.getnames()[0].split('/')[0]
        files = {m.name[len(root) + 1:]: m for m in tar.getmembers() if m.isfile()}

        def read(name: str) -> bytes:
            return tar.extractfile(files[name]).read()

        test_modules = {Path(n).stem for n in files if n.startswith('tests/') and n.count('/') == 1}
        imported = set()
        for node in ast.walk(ast.parse(read('tests/test_models.py'))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ''] if isinstance(node, ast.ImportFrom) else []
            imported |= {n.removeprefix('tests.').split('.')[0] for n in names}
        wanted = {'pyproject.toml', 'tests/test_models.py'} | {
            f'tests/{m}.py' for m in (imported & test_modules) | {'__init__', 'conftest'}}
        for name in sorted(wanted & files.keys()):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(read(name))
    return dest / 'tests' / 'test_models.py'


def outcomes_by_test_and_model(junit_xml: Path) -> Dict[str, Dict[str, str]]:
    """ {timm test: {model: passed / failed / skipped / too large / xfailed}} from pytest's JUnit report ('too
    large': timm skips a fixed input size beyond the test's limit, e.g. 384 > MAX_BWD_SIZE for the backward).
    """
    table = defaultdict(dict)
    models = suite_models()
    for case in ET.parse(junit_xml).iter('testcase'):
        test, _, params = case.get('name').partition('[')
        model = next(m for m in sorted(models, key=len, reverse=True) if m in params)
        skipped = case.find('skipped')
        if case.find('failure') is not None or case.find('error') is not None:
            table[test][model] = 'failed'
        elif skipped is not None:
            table[test][model] = 'xfailed' if skipped.get('type') == 'pytest.xfail' else \
                'too large' if 'Fixed input size model > limit' in skipped.get('message', '') else 'skipped'
        else:
            table[test][model] = 'passed'
    return table


@pytest.mark.slow
def test_timm_test_models_passes_on_every_package_model(tmp_path):
    test_file = extract_model_tests(timm_sdist(timm.__version__), tmp_path)
    junit_xml = tmp_path / 'junit.xml'
    env = dict(script_env(), HF_HUB_OFFLINE='1', PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), str(TESTS_DIR), os.environ.get('PYTHONPATH', '')]))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, '-m', 'pytest', str(test_file), '-p', 'timm_reversible', '-p', 'timm_suite_plugin',
         '-p', 'no:cacheprovider', '-q', '-rfEX', '--tb=short', f'--junitxml={junit_xml}'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    seconds = time.perf_counter() - start
    assert junit_xml.exists(), proc.stdout[-20000:] + proc.stderr[-5000:]

    table = outcomes_by_test_and_model(junit_xml)
    models = suite_models()
    print(f'timm {timm.__version__} tests/test_models.py on {len(models)} models: {seconds:.0f} s')
    width = max(map(len, models)) + 2
    print(f'{"":36}' + ''.join(f'{m:>{width}}' for m in models))
    for test, by_model in sorted(table.items()):
        print(f'{test:36}' + ''.join(f'{by_model.get(m, "-"):>{width}}' for m in models))
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
    assert {m for by_model in table.values() for m in by_model} == set(models), 'a model was never selected'
    # the checks timm runs on every model ran on each of ours (within timm's input size limits), not only skipped
    for test in ('test_model_forward', 'test_model_backward'):
        assert all(table[test].get(m) in ('passed', 'too large') for m in models), (test, table[test])
    assert all(table['test_model_forward'].get(m) == 'passed' for m in models)


def test_without_the_registry_the_suite_is_skipped_saying_so(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), 'CACHE_DIR', tmp_path / 'cache')
    monkeypatch.setenv('PIP_NO_INDEX', '1')  # as where the registry cannot be reached
    with pytest.raises(pytest.skip.Exception, match=r'pip could not fetch the sdist of timm 1\.0\.31 from the package'):
        timm_sdist('1.0.31')
    assert not any((tmp_path / 'cache').iterdir())  # no partial download left behind


def test_extraction_takes_the_model_tests_and_what_they_import(tmp_path):
    files = {
        'pyproject.toml': '', 'README.md': '', 'tests/__init__.py': '', 'tests/conftest.py': '',
        'tests/test_models.py': 'import torch\nfrom tests.model_helpers import helper\nimport shared_cases\n',
        'tests/model_helpers.py': '', 'tests/shared_cases.py': '', 'tests/test_optim.py': '', 'timm/__init__.py': '',
    }
    sdist = tmp_path / 'timm-0.0.0.tar.gz'
    with tarfile.open(sdist, 'w:gz') as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(f'timm-0.0.0/{name}')
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    dest = tmp_path / 'extracted'
    assert extract_model_tests(sdist, dest) == dest / 'tests' / 'test_models.py'
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob('*') if p.is_file()) == [
        'pyproject.toml', 'tests/__init__.py', 'tests/conftest.py', 'tests/model_helpers.py', 'tests/shared_cases.py',
        'tests/test_models.py']
