""" Layers of the ViT for small datasets: Shifted Patch Tokenization and Locality Self-Attention.

"Vision Transformer for Small-Size Datasets", 2021 (arXiv 2112.13492).
The transformer block exposes its two residual branches, F (attention) and G (MLP), so that the
reversible models can re-wire the same weights into invertible couplings.

Layers take timm's factory kwargs (`device`, `dtype`), script with TorchScript and trace with torch.fx.
"""
import math
import numbers
from typing import Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from timm.layers._fx import register_notrace_function

__all__ = ['ShiftedPatchTokenization', 'LocalitySelfAttention', 'Block', 'check_image_batch', 'init_weights_vit']


def _autocast_takes(dtype: torch.dtype, weight_dtype: torch.dtype, device_type: str) -> bool:
    """ Whether autocast runs a float32 model on input of `dtype`: its low-precision dtype. """
    if not torch.jit.is_scripting() and weight_dtype == torch.float32:
        # devices without autocast (meta) cannot be asked
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            return dtype == torch.get_autocast_dtype(device_type)
    return False


@torch.fx.wrap
@register_notrace_function
def check_image_batch(x: torch.Tensor, weight: torch.Tensor, in_chans: int, img_size: Tuple[int, int]) -> None:
    """ Raise a clear error for an input the patch embedding cannot take.

    A leaf function under torch.fx (timm's tracer and `symbolic_trace` alike), so a traced model checks its
    real input when it runs, with these messages. TorchScript compiles it.
    """
    if x.dim() != 4:
        raise ValueError(f'Expected a batch of images (B, C, H, W), got a tensor of shape {list(x.shape)}.')
    if not x.is_floating_point() or (
            x.dtype != weight.dtype and not _autocast_takes(x.dtype, weight.dtype, x.device.type)):
        raise TypeError(
            f'Expected a floating-point image batch of the model\'s dtype {weight.dtype} (a float32 model under '
            f'torch.autocast also takes the autocast dtype), got {x.dtype}: convert it (e.g. x.to({weight.dtype}) '
            f'after scaling uint8 pixels to [0, 1] and normalising), or cast the model.')
    if x.shape[1] != in_chans:
        raise ValueError(f'Input has {x.shape[1]} channels but the model was created with in_chans={in_chans}.')
    height, width = x.shape[2], x.shape[3]
    if height != img_size[0] or width != img_size[1]:
        raise ValueError(
            f'Input size ({height}, {width}) does not match the model\'s fixed img_size {img_size}; resize the '
            f'input or create the model with img_size=({height}, {width}).')


class ShiftedPatchTokenization(nn.Module):
    """ Shifted Patch Tokenization (SPT).

    The image is concatenated with four copies shifted by half a patch in the four diagonal directions,
    cut into non-overlapping patches, each patch flattened, layer-normalised and linearly projected.

    The projection is stored as a conv kernel of shape (embed_dim, in_chans, 5 * patch, patch) that
    spans the five copies of a patch, and applied as a matrix product. Keeping the input channels in
    dim 1 lets timm's `first_conv` handling adapt pretrained weights to another `in_chans`.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 32,
            patch_size: Union[int, Tuple[int, int]] = 4,
            in_chans: int = 3,
            embed_dim: int = 512,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: Fixed input image size, a multiple of patch_size.
            patch_size: Patch size, at least 2 so that the half-patch shifts move the image.
            in_chans: Number of image channels.
            embed_dim: Token width.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        if len(self.patch_size) != 2 or not all(_is_int(p) and p >= 2 for p in self.patch_size):
            raise ValueError(
                f'patch_size must be an integer >= 2 (or a pair of them): the shifted copies move by half a patch; '
                f'got {patch_size!r}.')
        if len(self.img_size) != 2 or not all(
                _is_int(s) and s > 0 and s % p == 0 for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(
                f'img_size must be a positive multiple of patch_size {self.patch_size} (or a pair of them), '
                f'got {img_size!r}.')
        if not _is_int(in_chans) or in_chans < 1:
            raise ValueError(f'in_chans must be an integer >= 1, got {in_chans!r}.')
        self.in_chans = in_chans
        self.num_shifts = 5  # the image and its four diagonal shifts
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        ph, pw = self.patch_size
        self.patch_dim = in_chans * self.num_shifts * ph * pw
        self.norm = nn.LayerNorm(self.patch_dim, **dd)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=(self.num_shifts * ph, pw), **dd)

    def feat_ratio(self) -> int:
        return self.patch_size[0]

    def shifted_images(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 5, C, H, W): the image and its four diagonal half-patch shifts, zero filled."""
        sh, sw = self.patch_size[0] // 2, self.patch_size[1] // 2
        padded = F.pad(x, (sw, sw, sh, sh))
        H, W = self.img_size  # the input's size, as checked
        crops = [x]
        for dy, dx in ((-1, -1), (-1, 1), (1, -1), (1, 1)):
            top, left = sh + dy * sh, sw + dx * sw
            crops.append(padded[:, :, top:top + H, left:left + W])
        return torch.stack(crops, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.proj.weight, self.in_chans, self.img_size)
        B = x.shape[0]
        gh, gw = self.grid_size
        ph, pw = self.patch_size
        x = self.shifted_images(x).reshape(B, self.num_shifts, self.in_chans, gh, ph, gw, pw)
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
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if not _is_int(num_heads) or num_heads < 1 or dim % num_heads:
            raise ValueError(f'num_heads must be an integer >= 1 that divides dim {dim}, got {num_heads!r}.')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False, **dd)
        self.log_temperature = nn.Parameter(torch.empty((), **dd))
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.init_weights()

    def init_weights(self) -> None:
        """ The temperature at 1/sqrt(head_dim); the linear layers are initialised by the model. """
        nn.init.constant_(self.log_temperature, math.log(self.head_dim ** -0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape[0], x.shape[1], x.shape[2]
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
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = norm_layer(dim, **dd)
        self.attn = LocalitySelfAttention(dim, num_heads=num_heads, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(in_features=dim, hidden_features=mlp_hidden_dim, act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        # the reversible models run a block through its residual functions; under fx tracing they pass the
        # block's output through this tap, so that feature extraction finds it in the block's scope
        self.feature_tap = nn.Identity()

    def attn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path1(self.attn(self.norm1(x)))

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_residual(x)
        return x + self.mlp_residual(x)


def init_weights_vit(module: nn.Module, name: str = '', needs_reset: bool = True) -> None:
    """ timm's ViT init (truncated normal linear layers, zero biases), the patch projection included; layers
    with their own `init_weights` use it, others (norms) are reset only when `needs_reset` (after `to_empty`).
    """
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif hasattr(module, 'init_weights'):
        module.init_weights()
    elif needs_reset and hasattr(module, 'reset_parameters'):
        module.reset_parameters()


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
