""" Two-stream reversible ViT on the small-dataset ViT (SPT + LSA).

"Reversible Vision Transformers", CVPR 2022. The state is two token streams, both starting as the
token embedding; each block is an additive coupling of its attention (F) and MLP (G) residuals:

    Y1 = X1 + F(X2)        X2 = Y2 - G(Y1)
    Y2 = X2 + G(Y1)        X1 = Y1 - F(X2)

The streams are fused once, at the end, by their mean, so the model has exactly the parameters of
`vit_small_cifar`; the final LayerNorm and the head follow as in the ordinary ViT.
"""
from typing import List, Sequence, Tuple

import torch

from timm.models import generate_default_cfgs, register_model

from .._hub import hub_id
from ..layers import Block
from ..reversible import ReplayTape, ReversibleStep, State, Tape
from .reversible_vit import ReversibleVisionTransformer
from .vit_small_cifar import _cfg, _create_model

__all__ = ['TwoStreamCoupling', 'RevVisionTransformer']


class TwoStreamCoupling(ReversibleStep):
    """ (X1, X2) -> (X1 + F(X2), X2 + G(X1 + F(X2))) with F, G a block's attention and MLP residuals. """

    def __init__(self, block: Block):
        self.f = block.attn_residual
        self.g = block.mlp_residual

    def forward(self, state: State, tape: Tape) -> State:
        x1, x2 = state
        y1 = x1 + tape.run('f', self.f, x2)
        y2 = x2 + tape.run('g', self.g, y1)
        return y1, y2

    def inverse(self, state: State, tape: Tape) -> State:
        y1, y2 = state
        x2 = y2 - tape.run('g', self.g, y1)
        x1 = y1 - tape.run('f', self.f, x2)
        return x1, x2

    def backward(self, state: State, grads: State, tape: ReplayTape) -> Tuple[State, State]:
        y1, y2 = state
        dy1, dy2 = grads
        # G's graph first: it gives Y1's share of the gradient and, by subtraction, X2
        g, dy1_from_g = tape.vjp('g', self.g, y1, dy2)
        x2 = y2.sub_(g)
        dy1.add_(dy1_from_g)
        del g, dy1_from_g
        f, dx2_from_f = tape.vjp('f', self.f, x2, dy1)
        x1 = y1.sub_(f)
        dy2.add_(dx2_from_f)
        return (x1, x2), (dy1, dy2)


class RevVisionTransformer(ReversibleVisionTransformer):
    """ Two-stream reversible ViT (additive coupling of each block's attention and MLP). """

    def initial_state(self, x: torch.Tensor) -> State:
        return x, x

    def make_steps(self, blocks: Sequence[Block]) -> List[ReversibleStep]:
        return [TwoStreamCoupling(block) for block in blocks]

    def state_features(self, state: State) -> torch.Tensor:
        return (state[0] + state[1]) / 2


default_cfgs = generate_default_cfgs({
    'revvit_small_cifar.c10': _cfg(hf_hub_id=hub_id('revvit_small_cifar.c10')),
})


@register_model
def revvit_small_cifar(pretrained: bool = False, **kwargs) -> RevVisionTransformer:
    """ Two-stream reversible ViT for small datasets, dim 512, depth 6, 8 heads, MLP 512, patch 4, 32x32. """
    model_args = dict(img_size=32, patch_size=4, embed_dim=512, depth=6, num_heads=8, mlp_ratio=1.)
    return _create_model(RevVisionTransformer, 'revvit_small_cifar', pretrained, **dict(model_args, **kwargs))
