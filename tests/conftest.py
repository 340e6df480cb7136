import timm
import pytest
import torch

import timm_reversible  # noqa: F401  registers the models
from timm_reversible.utils import package_models  # noqa: F401  used by the test modules

# Small configs keep the suite fast; the full-size configs appear only where size is what is tested.
SMALL = dict(embed_dim=64, depth=2, num_heads=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def images(batch_size: int = 2, in_chans: int = 3, size: int = 32, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch_size, in_chans, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)
