""" Vision Transformer for small datasets (SPT + LSA), as a timm model.

"Vision Transformer for Small-Size Datasets", 2021 (arXiv 2112.13492).
`vit_small_cifar`: dim 512, depth 6, 8 heads of 64, MLP 512, patch 4, 32x32, class token.

`SmallDataVisionTransformer` is also the base of the reversible models: they share the stem, the
blocks' weights, the head and the timm model contract, and only re-wire how blocks are chained.
"""
import math
import numbers
from functools import partial
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn

from timm.layers import calculate_drop_path_rates, get_device_dtype, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq, named_apply

from .._hub import hub_id
from ..layers import Block, ShiftedPatchTokenization, init_weights_vit

__all__ = ['SmallDataVisionTransformer']

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
GLOBAL_POOL_TYPES = ('', 'avg', 'token')


def _check_global_pool(global_pool: str) -> None:
    # AssertionError, as timm's models raise for a pooling they do not support (its tests expect it)
    if global_pool not in GLOBAL_POOL_TYPES:
        raise AssertionError(f"global_pool must be '', 'avg' or 'token', got {global_pool!r}.")


def _check_settings(num_classes: int, embed_dim: int, depth: int, mlp_ratio: float, **drop_rates: float) -> None:
    """ Reject at creation what would build a broken model or fail later inside torch. """
    for name, value, low in (('num_classes', num_classes, 0), ('embed_dim', embed_dim, 1), ('depth', depth, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f'{name} must be an integer >= {low}, got {value!r}.')
    if not (math.isfinite(mlp_ratio) and int(embed_dim * mlp_ratio) >= 1):
        raise ValueError(
            f'mlp_ratio must be > 0 and finite, with an MLP at least 1 wide (int(embed_dim * mlp_ratio) >= 1), '
            f'got {mlp_ratio!r} for embed_dim {embed_dim}.')
    for name, rate in drop_rates.items():
        if not 0 <= rate < 1:
            raise ValueError(f'{name} must be in [0, 1), got {rate!r}.')


class SmallDataVisionTransformer(nn.Module):
    """ ViT with Shifted Patch Tokenization and Locality Self-Attention, class-token pooling. """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 32,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 10,
            global_pool: str = 'token',
            embed_dim: int = 512,
            depth: int = 6,
            num_heads: int = 8,
            mlp_ratio: float = 1.,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: Fixed input image size.
            patch_size: Patch size (the shifted copies move by half of it).
            in_chans: Number of image channels.
            num_classes: Number of classes of the head (0 for pre-logits features).
            global_pool: 'token' (class token) or 'avg' (mean of patch tokens) or '' (no pooling).
            embed_dim: Token width.
            depth: Number of blocks.
            num_heads: Attention heads.
            mlp_ratio: MLP hidden width as a multiple of embed_dim.
            drop_rate: Dropout before the head.
            pos_drop_rate: Dropout after the position embedding.
            proj_drop_rate: Dropout after the attention projection and in the MLP.
            attn_drop_rate: Dropout of the attention weights.
            drop_path_rate: Stochastic depth rate, linearly increasing over the blocks.
            device: Device the parameters are created on (timm's factory kwarg; 'meta' creates no storage).
            dtype: dtype of the parameters.

        Settings outside their range raise ValueError at creation, an unsupported global_pool AssertionError
        as in timm's models.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        _check_global_pool(global_pool)
        _check_settings(
            num_classes=num_classes, embed_dim=embed_dim, depth=depth, mlp_ratio=mlp_ratio, drop_rate=drop_rate,
            pos_drop_rate=pos_drop_rate, proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        self.patch_embed = ShiftedPatchTokenization(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **dd)
        num_patches = self.patch_embed.num_patches
        reduction = self.patch_embed.feat_ratio()
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.empty(1, num_patches + self.num_prefix_tokens, embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_hidden_dim=int(embed_dim * mlp_ratio),
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                **dd,
            )
            for i in range(depth)])
        self.feature_info = [
            dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.init_weights(needs_reset=False)

    def init_weights(self, needs_reset: bool = True) -> None:
        """ Initialise every weight as at creation, e.g. after `model.to_empty(device=...)` of a model created
        on the meta device. `needs_reset=False` leaves the norm layers as they are (creation has set them).
        """
        trunc_normal_(self.pos_embed, std=.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        named_apply(partial(init_weights_vit, needs_reset=needs_reset), self)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^cls_token|pos_embed|patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """ A new head for `num_classes` (0: none), on the model's device and dtype and in its mode. """
        if global_pool is not None:
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """ Images -> tokens (class token + patches) with position embedding. """
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """ Tokens through all blocks. The reversible models override this. """
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def block_outputs(self, x: torch.Tensor, num_blocks: int) -> Iterator[torch.Tensor]:
        """ Tokens -> the token features after each of the first `num_blocks` blocks (ordinary autograd). """
        for blk in self.blocks[:num_blocks]:
            x = checkpoint(blk, x) if self.grad_checkpointing and torch.is_grad_enabled() else blk(x)
            yield x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """ Forward features that also returns intermediates, as timm's ViT does.

        Args:
            x: Input images.
            indices: Take last n blocks if int, all if None, select matching indices if sequence.
            return_prefix_tokens: Return (spatial, class token) pairs.
            norm: Apply the final norm to every intermediate.
            stop_early: Stop after the last requested block (ignored when the final output is needed).
            output_fmt: 'NCHW' or 'NLC'.
            intermediates_only: Return only the intermediates.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError("output_fmt must be 'NCHW' or 'NLC'.")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x = self.embed(x)
        num_blocks = max_index + 1 if stop_early or intermediates_only else len(self.blocks)
        intermediates = []
        last = x
        for i, feat in enumerate(self.block_outputs(x, num_blocks)):
            last = feat
            if i in take_indices:
                intermediates.append(self.norm(feat) if norm else feat)

        prefix_tokens = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == 'NCHW':
            H, W = self.patch_embed.grid_size
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(last), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """ Drop the blocks (and optionally norm and head) not needed for the given intermediates. """
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = self.forward_blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'token':
            x = x[:, 0]
        elif self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.forward_head(x)


def checkpoint_filter_fn(
        state_dict: Dict[str, torch.Tensor],
        model: SmallDataVisionTransformer,
) -> Dict[str, torch.Tensor]:
    """ Adapt a checkpoint to `model`: unwrap training wrappers and fit the patch norm to `in_chans`.

    timm adapts the projection kernel (`first_conv`) to another channel count itself; the patch
    LayerNorm before it has one weight per input value, laid out channels first, so it is averaged
    (one channel) or cycled (more channels) here to match.
    """
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    out = {}
    in_chans = model.patch_embed.in_chans
    for k, v in state_dict.items():
        k = k.removeprefix('module.').removeprefix('_orig_mod.')
        if k in ('patch_embed.norm.weight', 'patch_embed.norm.bias'):
            per_chan = v.reshape(-1, model.patch_embed.patch_dim // in_chans)
            if per_chan.shape[0] != in_chans:
                if in_chans == 1:
                    per_chan = per_chan.mean(dim=0, keepdim=True)
                else:
                    per_chan = per_chan.repeat((in_chans + per_chan.shape[0] - 1) // per_chan.shape[0], 1)[:in_chans]
                v = per_chan.flatten()
        out[k] = v
    return out


def _create_model(
        model_cls: type,
        variant: str,
        pretrained: bool = False,
        **kwargs,
) -> nn.Module:
    """ Shared builder of the package's models: timm's `build_model_with_cfg` with the getter feature API. """
    from .._hub import build_with_pretrained_hint
    return build_with_pretrained_hint(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=kwargs.pop('out_indices', min(3, kwargs.get('depth', 3))), feature_cls='getter'),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 10,
        'input_size': (3, 32, 32),
        'pool_size': None,
        'crop_pct': 1.0,
        'interpolation': 'bilinear',
        'fixed_input_size': True,
        'mean': CIFAR10_MEAN,
        'std': CIFAR10_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'vit_small_cifar.c10': _cfg(hf_hub_id=hub_id('vit_small_cifar.c10')),
})


@register_model
def vit_small_cifar(pretrained: bool = False, **kwargs) -> SmallDataVisionTransformer:
    """ ViT for small datasets (SPT + LSA), dim 512, depth 6, 8 heads, MLP 512, patch 4, 32x32. """
    model_args = dict(img_size=32, patch_size=4, embed_dim=512, depth=6, num_heads=8, mlp_ratio=1.)
    return _create_model(SmallDataVisionTransformer, 'vit_small_cifar', pretrained, **dict(model_args, **kwargs))
