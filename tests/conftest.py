""" Shared test helpers: small configs, images, the train script as a user runs it, and an in-process Hub.

`FakeHub` replaces huggingface_hub's network boundary (its httpx client) with an in-process Hub that
knows no repositories until they are created; the real huggingface_hub and timm code runs on top of it.
"""
import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import httpx2
import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import _http

import timm_reversible  # noqa: F401  registers the models
from timm_reversible.training import MEASURED_SUMMARY_COLUMNS, read_summary
from timm_reversible.utils import package_models  # noqa: F401  used by the test modules

# Under pytest-xdist (`-n 2`, as README's test command runs), each worker and every process it starts computes
# on one thread: two workers then share the cores instead of waiting for each other's threads.
if os.environ.get('PYTEST_XDIST_WORKER'):
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)

# Small configs keep the suite fast; the full-size configs appear only where size is what is tested.
SMALL = dict(embed_dim=64, depth=2, num_heads=2)


# fixtures that run scripts/train.py: every test using one trains a model, so it is a slow test
TRAINING_FIXTURES = {'run', 'published', 'finished_run', 'straight_run'}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, 'fixturenames', ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """ One torch thread for compute-heavy tests: on a CPU shared with other test runs, several threads mostly
    wait for each other (tensor accounting counts the same bytes with any number of threads). """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(batch_size: int = 2, in_chans: int = 3, size: int = 32, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch_size, in_chans, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / 'scripts' / 'train.py'


def script_env() -> Dict[str, str]:
    """ One thread: float sums are the same from run to run, and a shared 2-core machine is not oversubscribed. """
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.pop('ACCELERATE_MIXED_PRECISION', None)
    return env


def run_train_script(args: List[str], cwd: Path, returncode: int = 0) -> subprocess.CompletedProcess:
    """ `python scripts/train.py ARGS...` as a user runs it; its exit code is checked against `returncode`. """
    proc = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *args], capture_output=True, text=True,
                          env=script_env(), cwd=cwd, timeout=600)
    assert proc.returncode == returncode, proc.stdout + proc.stderr
    return proc


def trained_summary(run: Path) -> List[Dict[str, str]]:
    """ A run's summary.csv without the columns that measure the machine (time, throughput, memory). """
    return [{k: v for k, v in row.items() if k not in MEASURED_SUMMARY_COLUMNS}
            for row in read_summary(str(run / 'summary.csv'))]


class FakeHub:
    """ The Hub's HTTP API as far as publishing and downloading use it: repositories are created, commits
    store their files, downloads serve them; everything else is 'not found'. Records every request. """

    def __init__(self):
        self.requests: List[httpx2.Request] = []
        self.created: List[Dict] = []
        self.commits: List[Dict] = []
        self.repos: Dict[str, Dict[str, bytes]] = {}  # repo id -> files, as committed
        self.create_status = 200  # e.g. 403: the token may not write there

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        path = request.url.path
        if request.method == 'POST' and path == '/api/repos/create':
            body = json.loads(request.content)
            if self.create_status != 200:
                return httpx2.Response(self.create_status, json={'error': 'You don\'t have the rights to create a model'})
            self.created.append(body)
            repo_id = f"{body['organization']}/{body['name']}"
            return httpx2.Response(200, json={'url': f'https://huggingface.co/{repo_id}', 'name': repo_id})
        if request.method == 'POST' and path == '/api/validate-yaml':
            content = json.loads(request.content)['content']
            try:
                yaml.safe_load(content.split('---')[1])
            except yaml.YAMLError as e:
                return httpx2.Response(400, json={'errors': [{'message': str(e)}]})
            return httpx2.Response(200, json={'errors': [], 'warnings': []})
        if request.method == 'POST' and '/preupload/' in path:
            files = json.loads(request.content)['files']
            return httpx2.Response(200, json={'files': [
                {'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False} for f in files]})
        if request.method == 'POST' and '/commit/' in path:
            lines = [json.loads(line) for line in request.content.decode().splitlines()]
            repo_id = path.split('/api/models/')[1].split('/commit/')[0]
            files = {l['value']['path']: base64.b64decode(l['value']['content']) for l in lines if l['key'] == 'file'}
            self.commits.append(dict(repo_id=repo_id, summary=lines[0]['value']['summary'], files=files))
            self.repos.setdefault(repo_id, {}).update(files)
            return httpx2.Response(200, json={
                'commitUrl': f'https://huggingface.co/{repo_id}/commit/{"0" * 40}', 'commitOid': '0' * 40})
        if request.method in ('HEAD', 'GET') and '/resolve/main/' in path:
            repo_id, filename = path.lstrip('/').split('/resolve/main/')
            if repo_id in self.repos:
                if filename not in self.repos[repo_id]:
                    return httpx2.Response(404, headers={'X-Error-Code': 'EntryNotFound'}, json={'error': 'Entry not found'})
                data = self.repos[repo_id][filename]
                headers = {'x-repo-commit': '0' * 40, 'etag': f'"{hashlib.sha256(data).hexdigest()}"',
                           'content-length': str(len(data))}
                return httpx2.Response(200, headers=headers, content=b'' if request.method == 'HEAD' else data)
        return httpx2.Response(404, headers={'X-Error-Code': 'RepoNotFound'}, json={'error': 'Repository not found'})

    def urls(self) -> List[str]:
        return [str(r.url) for r in self.requests]


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """ huggingface_hub talks to a `FakeHub`: online mode, an empty cache, no network. """
    hub = FakeHub()
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path / 'hub_cache'))
    huggingface_hub.set_client_factory(lambda: httpx2.Client(
        transport=httpx2.MockTransport(hub), event_hooks={'request': [_http.hf_request_event_hook]},
        follow_redirects=True))
    yield hub
    huggingface_hub.set_client_factory(_http.default_client_factory)
