""" Layers of the ViT for small datasets: Shifted Patch Tokenization and Locality Self-Attention.

"Vision Transformer for Small-Size Datasets", 2021 (arXiv 2112.13492).
The transformer block exposes its two residual branches, F (attention) and G (MLP), so that the
reversible models can re-wire the same weights into invertible couplings.
"""
import math
from typing import Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_

__all__ = ['ShiftedPatchTokenization', 'LocalitySelfAttention', 'Block']


class ShiftedPatchTokenization(nn.Module):
    """ Shifted Patch Tokenization (SPT).

    The image is concatenated with four copies shifted by half a patch in the four diagonal directions,
    cut into non-overlapping patches, each patch flattened, layer-normalised and linearly projected.

    The projection is stored as a conv kernel of shape (embed_dim, in_chans, 5 * patch, patch) that
    spans the five copies of a patch, and applied as a matrix product. Keeping the input channels in
    dim 1 lets timm's `first_conv` handling adapt pretrained weights to another `in_chans`.
    """
    num_shifts = 5  # the image and its four diagonal shifts

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 32,
            patch_size: int = 4,
            in_chans: int = 3,
            embed_dim: int = 512,
    ):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.in_chans = in_chans
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f'img_size {self.img_size} must be divisible by patch_size {self.patch_size}.')
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        ph, pw = self.patch_size
        self.patch_dim = in_chans * self.num_shifts * ph * pw
        self.norm = nn.LayerNorm(self.patch_dim)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=(self.num_shifts * ph, pw))

    def feat_ratio(self) -> int:
        return self.patch_size[0]

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f'Expected a batch of images (B, C, H, W), got a tensor of shape {tuple(x.shape)}.')
        weight_dtype = self.proj.weight.dtype
        if not x.is_floating_point() or (x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(
                f'Expected a floating-point image batch of the model\'s dtype {weight_dtype}, got {x.dtype}: convert '
                f'it (e.g. x.to({weight_dtype}) after scaling uint8 pixels to [0, 1] and normalising), or cast the '
                f'model, or run under torch.autocast.')
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f'Input has {x.shape[1]} channels but the model was created with in_chans={self.in_chans}.')
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f'Input size {tuple(x.shape[-2:])} does not match the model\'s fixed img_size {self.img_size}; '
                f'resize the input or create the model with img_size={tuple(x.shape[-2:])}.')

    def shifted_images(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 5, C, H, W): the image and its four diagonal half-patch shifts, zero filled."""
        sh, sw = self.patch_size[0] // 2, self.patch_size[1] // 2
        padded = F.pad(x, (sw, sw, sh, sh))
        H, W = x.shape[-2:]
        crops = [x]
        for dy, dx in ((-1, -1), (-1, 1), (1, -1), (1, 1)):
            top, left = sh + dy * sh, sw + dx * sw
            crops.append(padded[..., top:top + H, left:left + W])
        return torch.stack(crops, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        B, C = x.shape[:2]
        gh, gw = self.grid_size
        ph, pw = self.patch_size
        x = self.shifted_images(x).reshape(B, self.num_shifts, C, gh, ph, gw, pw)
        # per patch, flatten as (C, shift, ph, pw): the layout of the projection kernel
        x = x.permute(0, 3, 5, 2, 1, 4, 6).reshape(B, gh * gw, self.patch_dim)
        x = self.norm(x)
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)


class LocalitySelfAttention(nn.Module):
    """ Locality Self-Attention (LSA): learnable softmax temperature and diagonal masking.

    The temperature is kept as its logarithm so it stays positive; it starts at the usual 1/sqrt(head_dim).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} must be divisible by num_heads {num_heads}.')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(self.head_dim ** -0.5)))
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = q * self.log_temperature.exp().to(q.dtype)
        # True = may attend: every token but itself
        not_self = ~torch.eye(N, dtype=torch.bool, device=x.device)
        x = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=not_self,
            dropout_p=self.attn_drop if self.training else 0.,
            scale=1.0,
        )
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)


class Block(nn.Module):
    """ Pre-norm transformer block: x + F(x), then x + G(x).

    F(x) = drop_path(LSA(LN(x))) and G(x) = drop_path(MLP(LN(x))) are exposed as `attn_residual` and
    `mlp_residual` so that reversible couplings can use them without skip connections.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_hidden_dim: int,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = LocalitySelfAttention(dim, num_heads=num_heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=mlp_hidden_dim, act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def attn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path1(self.attn(self.norm1(x)))

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_residual(x)
        return x + self.mlp_residual(x)


def init_weights_vit(module: nn.Module) -> None:
    """ Truncated-normal init of linear layers (timm's ViT default), zero biases. """
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
