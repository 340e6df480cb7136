""" pytest plugin that runs timm's own `tests/test_models.py` on this package's models only (loaded with
`-p timm_suite_plugin` next to `-p timm_reversible` by tests/test_timm_suite.py).

Selection: a test is kept where its `model_name` parameter is one of `suite_models()`; timm's tests with
fixed model lists name none of them. Of those kept, some are skipped with the reason, and the failures that
come from the reversible models' own files are expected (xfail, strict: they flip to a failure once fixed,
and the entry is then removed here).
"""
from typing import Dict, List, Optional, Tuple

import os

import pytest

from timm_reversible.utils import package_models, timm_vit_models


def suite_models() -> List[str]:
    """ The models timm's tests run on. `$TIMM_SUITE_MODELS`: 'all' for every model the package registers, or
    names separated by commas. By default every model but the base and large reversible timm ViTs: those are
    the tiny and small ones' class at another width and depth, and would add about 100 s to the suite on 2 cores.
    """
    chosen = os.environ.get('TIMM_SUITE_MODELS', '')
    every = package_models() + timm_vit_models()
    if chosen == 'all':
        return every
    if chosen:
        return chosen.split(',')
    return [m for m in every if not any(size in m for size in ('_base_', '_large_'))]

# timm's tests that need the Hugging Face Hub: the package's published weights, or reference inputs and
# outputs of timm's `test_*` models. The runs are offline (HF_HUB_OFFLINE=1).
HUB_WEIGHTS = 'needs the model\'s published weights from the Hugging Face Hub (covered offline by ' \
              'test_timm_contract.py::test_pretrained_file_with_other_in_chans_and_classes)'
HUB_TESTS = {
    'test_model_inference': 'needs reference inputs and outputs published on the Hugging Face Hub',
    'test_model_load_pretrained': HUB_WEIGHTS,
    'test_model_features_pretrained': HUB_WEIGHTS,
}

# timm sorts models by name: NON_STD_FILTERS ('vit_*', 'deit*', ...) go to test_model_default_cfgs_non_std
# (token features), all others to test_model_default_cfgs, which expects NCHW feature maps of `pool_size`.
# Every model of the package has token features; the reversible ones match no filter by their names.
NAME_SORTED_TESTS = {
    'test_model_default_cfgs': (
        'timm sorts models into this NCHW-feature test by name (NON_STD_FILTERS); the package\'s models have '
        'token features like timm\'s ViT: the non-standard checks run on all of them in '
        'test_timm_contract.py::test_timm_non_std_cfg_checks'),
}

# Failures caused by the package's own files, expected (xfail, strict) until fixed there: none at present.
KNOWN_FAILURES: Dict[Tuple[str, str], str] = {}
REVERSIBLE = ('revvit_small_cifar', 'bdia_vit_small_cifar', 'momentum_revvit_small')


def _model_name(item: pytest.Item) -> Optional[str]:
    """ The model a timm test item runs on, without its pretrained tag, or None. """
    callspec = getattr(item, 'callspec', None)
    name = callspec.params.get('model_name') if callspec is not None else None
    return name.split('.')[0] if isinstance(name, str) else None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line('markers', 'timeout(seconds): pytest-timeout\'s marker (the plugin is not needed here)')


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    models = set(suite_models())
    selected, deselected = [], []
    for item in items:
        (selected if _model_name(item) in models else deselected).append(item)
    for item in selected:
        test = item.originalname
        reason = HUB_TESTS.get(test) or NAME_SORTED_TESTS.get(test)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
        elif (test, _model_name(item)) in KNOWN_FAILURES:
            item.add_marker(pytest.mark.xfail(reason=KNOWN_FAILURES[test, _model_name(item)], strict=True))
    items[:] = selected
    config.hook.pytest_deselected(items=deselected)
