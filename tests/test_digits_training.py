""" A short real training run of every model on scikit-learn's bundled handwritten digits (CPU, seconds):
the loss falls, test accuracy is far above chance (10%), and the momentum model evaluates as it trains.
"""
import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF

from timm_reversible.data import DigitsDataset

from conftest import package_models

pytestmark = pytest.mark.slow  # each test trains models or starts processes

CONFIG = dict(embed_dim=64, depth=2, num_heads=2, img_size=16)


def _tensors(split: str):
    ds = DigitsDataset(split, img_size=CONFIG['img_size'])
    x = torch.stack([TF.to_tensor(img) for img in ds.images])
    return (x - 0.5) / 0.5, torch.tensor(ds.targets)


@pytest.fixture(scope='module')
def digits():
    return _tensors('train'), _tensors('test')


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


@pytest.mark.parametrize('name', package_models())
def test_digits_training(name, digits):
    (x_train, y_train), (x_test, y_test) = digits
    torch.manual_seed(0)
    model = timm.create_model(name, **CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    epoch_losses = []
    for epoch in range(6):
        model.train()
        order = torch.randperm(len(y_train))
        losses = []
        for idx in order.split(32):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
    test_acc = _accuracy(model.eval(), x_test, y_test)
    print(f'{name}: loss {epoch_losses[0]:.3f} -> {epoch_losses[-1]:.3f}, test top-1 {test_acc:.3f}')
    assert epoch_losses[-1] < 0.5 * epoch_losses[0]
    assert test_acc > 0.7

    if name == 'momentum_revvit_small':
        # the same update in training and evaluation: with no dropout, train-mode predictions are the eval ones
        train_mode_acc = _accuracy(model.train(), x_test, y_test)
        assert train_mode_acc == test_acc
        with torch.no_grad():
            assert torch.equal(model.train()(x_test[:64]), model.eval()(x_test[:64]))
