""" torch.compile: the eval forward of every model is one graph; a compiled training step of every model
equals the eager one, the reversible engine being the only graph break.
"""
import pytest
import timm
import torch
import torch._dynamo as dynamo
import torch._inductor.config as inductor_config

from conftest import SMALL, images, package_models
from test_reversible import DROPS

# the reversible timm ViTs (models/timm_vit.py), small: each method
TIMM_VITS = {'bdia_vit_tiny_patch16_224': dict(embed_dim=64, depth=2, num_heads=2, img_size=32, patch_size=8),
             'revvit_small_patch16_224': dict(embed_dim=64, depth=2, num_heads=2, img_size=32, patch_size=8)}
CASES = [(name, SMALL) for name in package_models()] + list(TIMM_VITS.items()) + [
    ('bdia_vit_tiny_patch16_224', dict(TIMM_VITS['bdia_vit_tiny_patch16_224'], method='momentum'))]
REVERSIBLE_CASES = [(name, kwargs) for name, kwargs in CASES if name != 'vit_small_cifar']


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize('name, kwargs', CASES)
def test_eval_forward_compiles_to_one_graph(name, kwargs):
    model = timm.create_model(name, **kwargs).eval()
    x = images(2)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)(x)
        eager = model(x)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize('name, kwargs', REVERSIBLE_CASES)
def test_training_forward_breaks_only_around_the_reversible_engine(name, kwargs):
    model = timm.create_model(name, **kwargs).train()
    explanation = dynamo.explain(model)(images(2))
    reasons = {r.reason.splitlines()[0] for r in explanation.break_reasons}
    print(f'{name}: {explanation.graph_count} graphs, break sites: {reasons}')
    assert reasons == {'Skip inlining `torch.compiler.disable()`d function'}
    assert all('_forward_reversible' in r.reason for r in explanation.break_reasons)


@pytest.mark.slow
@pytest.mark.parametrize('name, kwargs', CASES)
def test_compiled_training_step_equals_eager(name, kwargs):
    """ Inductor draws dropout masks its own way unless `fallback_random`; with it, the compiled step
    computes the eager step's function: the same loss and gradients to float32 rounding.
    """
    model = timm.create_model(name, **kwargs, **DROPS).train()
    x = images(4)
    compiled = torch.compile(model)
    results = []
    for run in (model, compiled):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with inductor_config.patch(fallback_random=True):
            loss = run(x).logsumexp(dim=1).mean()
            loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss)
    for n in eager_grads:
        torch.testing.assert_close(compiled_grads[n], eager_grads[n], msg=n)
