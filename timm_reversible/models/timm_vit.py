""" Any timm ViT, reversible: timm's own `VisionTransformer` with its pre-norm blocks run as invertible steps.

`make_reversible(model, method=...)` converts a timm `VisionTransformer` in place: the same modules, the
same parameters and the same `state_dict` keys (`blocks.N.attn.qkv.weight`, ...), so weights saved after
fine-tuning load into the plain timm model and pretrained timm weights load into the converted one. Only
how the blocks are chained changes. A pre-norm block computes x + F(x), then + G(...), with

    F(x) = drop_path1(ls1(attn(norm1(x))))        G(x) = drop_path2(ls2(mlp(norm2(x))))

and the methods re-wire F and G (docs/DESIGN.md):

- 'bdia': x_{k+1} = gamma_k (x_{k-1} + s_k 2^-l) + Q((1 - gamma_k) x_k + (1 + gamma_k) h_k(x_k)) with
  h = F + G(x + F), random gamma_k = +-bdia_gamma in training, 0 at evaluation, where the model is the
  ordinary ViT on activations rounded to the grid 2^-l: the one method that keeps a pretrained ViT's
  function, and so the one to fine-tune pretrained weights with.
- 'two_stream': (X1, X2) -> (X1 + F(X2), X2 + G(X1 + F(X2))), streams fused by their mean (Rev-ViT);
  another function than the plain ViT's: for training from scratch.
- 'momentum': a velocity stream on the grid, v <- gamma v + (1 - gamma) h(x), x <- x + v; also another
  function, for training from scratch.

The registered `bdia_vit_{tiny,small,base,large}_patch16_{224,384}` carry timm's `vit_*` pretrained cfgs
(read from timm's registry), so `timm.create_model('bdia_vit_base_patch16_224.augreg2_in21k_ft_in1k',
pretrained=True)` loads timm's ImageNet weights; `revvit_{small,base}_patch16_224` are the two-stream
Rev-ViT-S/B (CVPR 2022), without weights.
"""
import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers._fx import register_notrace_function
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models._registry import split_model_name_tag
from timm.models.vision_transformer import Block, VisionTransformer, _cfg, checkpoint_filter_fn

from ..reversible import (
    BDIACoupling, BDIAFirstStep, GridRangeGuard, MomentumCoupling, ReversibleStep, State, Tape, TwoStreamCoupling,
    bdia_side_bits, check_quant_level, momentum_as_fraction, quantize, reconstruct, reversible_forward, stream_dtype)
from .reversible_vit import (
    check_flag, check_scripted_inference, momentum_decay, round_to_grid, scripted_stream_dtype)

__all__ = [
    'REVERSIBLE_METHODS', 'DEFAULT_QUANT_LEVEL', 'TimmBlockResiduals', 'ReversibleTimmVisionTransformer',
    'make_reversible', 'largest_exact_quant_level',
]

REVERSIBLE_METHODS = ('bdia', 'two_stream', 'momentum')
# The grid 2^-9 is exact while |x| < 2^(24 - 9) = 32768 in float32. Pretrained ViTs carry a few channels of large
# activations, reported in the hundreds (<= 2^9) for some checkpoints (not measured here: no weights can be
# downloaded on the development machine); 2^15 leaves a factor 64 above that for fine-tuning to grow them, while
# the rounding (at most 2^-10 per element and block) stays far below the LayerNorm-scaled signal. A checkpoint
# beyond it stops the first training step with the level to use (`_quant_level_remedy`).
DEFAULT_QUANT_LEVEL = 9
# The options each method takes, with their defaults; any other option is rejected.
_METHOD_OPTIONS: Dict[str, Dict[str, Any]] = {
    'bdia': dict(quant_level=DEFAULT_QUANT_LEVEL, bdia_gamma=0.5, split_backward=False, verify_reconstruction=True),
    'two_stream': {},
    'momentum': dict(quant_level=DEFAULT_QUANT_LEVEL, momentum=0.875, split_backward=False, verify_reconstruction=True),
}


class TimmBlockResiduals:
    """ F and G of timm's pre-norm `Block`, for the couplings (`attn_residual`, `mlp_residual`).

    `Block.forward(x)` is exactly x + F(x), then + G(...), with LayerScale and drop-path inside F and G. This
    holds a reference to the block and registers nothing, so the block stays where it is in the model.
    """

    def __init__(self, block: Block):
        self.block = block

    def attn_residual(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        return b.drop_path1(b.ls1(b.attn(b.norm1(x))))

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        return b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


def _check_blocks(blocks: nn.Sequential) -> None:
    if len(blocks) == 0:
        raise ValueError('A reversible ViT needs at least one block (depth >= 1).')
    for i, block in enumerate(blocks):
        if type(block) is not Block:
            kind = type(block)
            raise TypeError(
                f'blocks.{i} is a {kind.__module__}.{kind.__qualname__}: only timm\'s pre-norm '
                f'timm.models.vision_transformer.Block (x + F(x), then + G(x), F and G each normalising their own '
                f'input) can run as invertible steps. Post-norm (ResPostBlock), parallel and other block types '
                f'compute another function of x, which the couplings would not reproduce.')


def _add_feature_taps(blocks: nn.Sequential) -> None:
    """ The steps call a block's residual functions, never the block: under fx tracing they pass its output
    through `block.feature_tap`, where fx feature extraction looks for it (no parameters, same state_dict).
    """
    for block in blocks:
        block.feature_tap = nn.Identity()


def largest_exact_quant_level(max_abs: float, significand_bits: int = 24, headroom: float = 2.) -> int:
    """ The largest grid level l that keeps activations up to `headroom` * `max_abs` exact: `headroom` * |x| *
    2^l < 2^significand_bits (24 for float32), i.e. l = ceil(bits - log2(headroom |x|)) - 1; -1 if none does.
    """
    if not 0 < max_abs < math.inf:
        raise ValueError(f'max_abs must be a positive finite magnitude, got {max_abs!r}.')
    return max(math.ceil(significand_bits - math.log2(headroom * max_abs)) - 1, -1)


def _quant_level_remedy(max_abs: float, significand_bits: int) -> str:
    """ The out-of-range error's advice: the grid level to pick from the largest |x| the guard reported. """
    level = largest_exact_quant_level(max_abs, significand_bits)
    if level < 0:
        return ('No grid level keeps activations this large exact: the weights diverged. Lower the learning rate '
                'or clip gradients, or train with ordinary autograd (model.set_reversible(False)).')
    return (f'Pick the grid from the largest |x|: quant_level <= {significand_bits} - 1 - log2(|x|) keeps a '
            f'factor 2 of headroom, here quant_level={level} (make_reversible(model, quant_level={level}) or '
            f'timm.create_model(..., quant_level={level})); each level lower doubles the exact range and the grid '
            f'step. Pretrained ViTs carry a few channels of large activations; if |x| grew during training '
            f'instead, lower the learning rate or clip gradients.')


def _reversible_settings(method: str, reversible: bool, options: Dict[str, Any]) -> Dict[str, Any]:
    """ The validated attributes of a reversible ViT with `method` and its `options`. """
    if method not in REVERSIBLE_METHODS:
        raise ValueError(f'method must be one of {", ".join(map(repr, REVERSIBLE_METHODS))}, got {method!r}.')
    allowed = _METHOD_OPTIONS[method]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f'method={method!r} takes no option {", ".join(unknown)}; its options are: '
            f'{", ".join(allowed) or "none"}.')
    settings = dict(allowed, **options, reversible_method=method, reversible=check_flag('reversible', reversible))
    settings.update(momentum_numerator=0, momentum_bits=0)  # momentum = numerator / 2^bits, read by TorchScript
    if method == 'two_stream':
        return dict(settings, quant_level=None, range_guard=None, split_backward=False, verify_reconstruction=False)
    if method == 'bdia':
        bdia_side_bits(settings['bdia_gamma'])
    else:
        settings['momentum_numerator'], settings['momentum_bits'] = momentum_as_fraction(settings['momentum'])
    level = check_quant_level(settings['quant_level'])
    for flag in ('split_backward', 'verify_reconstruction'):
        check_flag(flag, settings[flag])
    guard = GridRangeGuard(level, f'{ReversibleTimmVisionTransformer.__name__} ({method})', _quant_level_remedy)
    return dict(settings, quant_level=level, range_guard=guard)


class ReversibleTimmVisionTransformer(VisionTransformer):
    """ timm's `VisionTransformer` whose blocks run as the invertible steps of `method`.

    Same modules, parameters and `state_dict` keys as the plain model. With `reversible=True` (default) a forward
    with grad enabled runs the steps on the reversible engine (BDIA: in training only), storing no per-block
    activations; otherwise, and after `set_reversible(False)`, the same steps run under ordinary autograd
    (checkpointed per block after `set_grad_checkpointing()`). Both compute the same function.
    """
    __jit_unused_properties__ = ['param_dtype', 'stream_dtype']  # eager only
    quant_level: Optional[int]  # None for two_stream; the annotation types it for TorchScript

    def __init__(
            self,
            *args,
            method: str = 'bdia',
            reversible: bool = True,
            quant_level: Optional[int] = None,
            bdia_gamma: Optional[float] = None,
            momentum: Optional[float] = None,
            split_backward: Optional[bool] = None,
            verify_reconstruction: Optional[bool] = None,
            **kwargs,
    ):
        """
        Args:
            method: 'bdia', 'two_stream' or 'momentum'.
            reversible: Use the reversible backward (activations reconstructed, not stored).
            quant_level: bdia / momentum: l, an integer in [0, 24): the stream lives on the grid 2^-l, exact while
                |x| < 2^(24 - l) in float32 (9 by default).
            bdia_gamma: bdia: magnitude of the random coefficient, 2^-k with 1 <= k <= 8 (0.5 by default; k side
                bits per element per block).
            momentum: momentum: a / 2^m with a odd and 1 <= m <= 7 (0.875 by default).
            split_backward: bdia / momentum: recompute each block's residual in two halves in the backward (less
                memory, one more attention forward per block; off by default).
            verify_reconstruction: bdia / momentum: check each reconstructed block input against a 16-byte
                fingerprint per sample (on by default).
            *args, **kwargs: As for timm's VisionTransformer.
        """
        given = dict(quant_level=quant_level, bdia_gamma=bdia_gamma, momentum=momentum,
                     split_backward=split_backward, verify_reconstruction=verify_reconstruction)
        options = {k: v for k, v in given.items() if v is not None}
        settings = _reversible_settings(method, reversible, options)
        super().__init__(*args, **kwargs)
        _check_blocks(self.blocks)
        _add_feature_taps(self.blocks)
        self.__dict__.update(settings)

    @torch.jit.ignore
    def set_reversible(self, enable: bool = True) -> None:
        """ Switch between the reversible backward and ordinary autograd (same weights, same function). """
        self.reversible = check_flag('enable', enable)

    @property
    def param_dtype(self) -> torch.dtype:
        """ The dtype of the blocks' weights (they run in it, or under autocast). """
        return next(self.blocks.parameters()).dtype

    @property
    def stream_dtype(self) -> torch.dtype:
        """ The dtype of the quantized residual stream: float32, or float64 for a float64 model. """
        return stream_dtype(self.param_dtype)

    def initial_state(self, tokens: torch.Tensor) -> State:
        if self.reversible_method == 'two_stream':
            return tokens, tokens
        x0 = quantize(tokens.to(self.stream_dtype), self.quant_level)
        return (x0, x0) if self.reversible_method == 'bdia' else (x0, torch.zeros_like(x0))

    def make_steps(self, blocks: Sequence[Block]) -> List[ReversibleStep]:
        residuals = [TimmBlockResiduals(block) for block in blocks]
        if self.reversible_method == 'two_stream':
            return [TwoStreamCoupling(r) for r in residuals]
        common = dict(level=self.quant_level, guard=self.range_guard, dtype=self.param_dtype, split=self.split_backward)
        if self.reversible_method == 'momentum':
            return [MomentumCoupling(r, index=i, momentum=self.momentum, **common) for i, r in enumerate(residuals)]
        return [
            BDIAFirstStep(r, index=0, **common) if i == 0 else
            BDIACoupling(r, index=i, gamma=self.bdia_gamma, training=self.training, **common)
            for i, r in enumerate(residuals)]

    def state_features(self, state: State) -> torch.Tensor:
        if self.reversible_method == 'two_stream':
            return (state[0] + state[1]) / 2
        return state[1 if self.reversible_method == 'bdia' else 0].to(self.param_dtype)

    def uses_reversible_backward(self) -> bool:
        """ Forwards without grad take the plain steps (nothing would be stored anyway), and so does BDIA at
        evaluation, where gamma = 0 is not invertible.
        """
        return self.reversible and torch.is_grad_enabled() and (self.training or self.reversible_method != 'bdia') \
            and not torch.fx._symbolic_trace.is_fx_symbolic_tracing()  # fx records the steps' function

    def _watch_steps(self, watch: bool) -> None:
        if self.range_guard is not None:
            self.range_guard.start(watch)

    def _check_steps(self) -> None:
        if self.range_guard is not None:
            self.range_guard.check(lambda: (
                'Check the input images for NaN / inf, and the weights: a diverged fine-tuning run holds NaN / inf '
                'weights; resume from an earlier checkpoint with a lower learning rate or gradient clipping.'))

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """ Images -> the blocks' input tokens: timm's patch embedding, prefix tokens, position embedding,
        patch dropout and pre-norm.
        """
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """ Tokens through all blocks as steps, on the reversible engine or under ordinary autograd. """
        if torch.jit.is_scripting():
            return self.scripted_inference_blocks(x)
        return self._forward_blocks_eager(x)

    @torch.jit.unused
    def _forward_blocks_eager(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_reversible_backward():
            return self._forward_reversible(x)
        *_, features = self.block_outputs(x, len(self.blocks), every_block=False)
        return features

    def scripted_inference_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """ The eval-mode function of the steps in code TorchScript compiles (the steps and the engine are Python
        objects it cannot): the same bits as the steps give at evaluation.
        """
        check_scripted_inference(self.training)
        if self.reversible_method == 'two_stream':
            x1, x2 = x, x
            for block in self.blocks:
                x1 = x1 + block.drop_path1(block.ls1(block.attn(block.norm1(x2))))
                x2 = x2 + block.drop_path2(block.ls2(block.mlp(block.norm2(x1))))
            return (x1 + x2) / 2
        level = self.quant_level
        assert level is not None
        param_dtype = self.patch_embed.proj.weight.dtype
        x = round_to_grid(x.to(scripted_stream_dtype(param_dtype)), level)
        v = torch.zeros_like(x)
        for i, block in enumerate(self.blocks):
            u = x.to(param_dtype)
            f = block.drop_path1(block.ls1(block.attn(block.norm1(u))))
            h = (f + block.drop_path2(block.ls2(block.mlp(block.norm2(u + f))))).to(x.dtype)
            if self.reversible_method == 'bdia':
                x = x + round_to_grid(h, level) if i == 0 else round_to_grid(x + h, level)
            else:
                v = momentum_decay(v, level, self.momentum_numerator, self.momentum_bits) \
                    + round_to_grid((1. - self.momentum_numerator / 2 ** self.momentum_bits) * h, level)
                x = x + v
        return x.to(param_dtype)

    @torch._dynamo.disable
    def _forward_reversible(self, x: torch.Tensor) -> torch.Tensor:
        """ The engine and its range check, run eagerly: under torch.compile one graph break between the
        compiled stem and head (the engine's backward recomputes with grad inside).
        """
        self._watch_steps(True)
        state = reversible_forward(self.make_steps(self.blocks), self.initial_state(x), self.verify_reconstruction)
        self._check_steps()
        return self.state_features(state)

    def block_outputs(self, x: torch.Tensor, num_blocks: int, every_block: bool = True) -> Iterator[torch.Tensor]:
        """ Tokens -> the token features after each of the first `num_blocks` blocks (only after the last one
        without `every_block`), under ordinary autograd, checkpointed per block with gradient checkpointing on.
        """
        tracing = torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        self._watch_steps(self.training and torch.is_grad_enabled() and not tracing)  # fx has no values to check
        state = self.initial_state(x)
        steps = self.make_steps(list(self.blocks)[:num_blocks])
        for i, step in enumerate(steps):
            if self.grad_checkpointing and torch.is_grad_enabled():
                state = checkpoint(_run_step, step, *state)
            else:
                state = step.forward(state, Tape())
            if tracing:
                # fx feature extraction takes the last node in a block's scope as the block's output
                self.blocks[i].feature_tap(self.state_features(state))
            if every_block or i == len(steps) - 1:
                yield self.state_features(state)
        self._check_steps()

    def forward_features(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        _reject_masks(attn_mask, is_causal)
        return self.norm(self.forward_blocks(self.embed_tokens(x)))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """ timm's `forward_intermediates` (same arguments and outputs) through the steps, under ordinary
        autograd: the features after each requested block, then the final normed features unless
        `intermediates_only`.
        """
        _reject_masks(attn_mask, is_causal)
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}.")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        grid_size = self.patch_embed.dynamic_feat_size(x.shape[-2:])
        num_blocks = max_index + 1 if stop_early or intermediates_only else len(self.blocks)
        taken, features = [], None
        for i, features in enumerate(self.block_outputs(self.embed_tokens(x), num_blocks)):
            if i in take_indices:
                taken.append(self.norm(features) if norm else features)
        prefix = [t[:, :self.num_prefix_tokens] for t in taken] if self.num_prefix_tokens else None
        spatial = [t[:, self.num_prefix_tokens:] for t in taken]
        if output_fmt == 'NCHW':
            spatial = [t.reshape(t.shape[0], *grid_size, -1).permute(0, 3, 1, 2).contiguous() for t in spatial]
        if output_dict:
            out: Dict[str, Any] = dict(image_intermediates=spatial)
            if prefix is not None and return_prefix_tokens:
                out['image_intermediates_prefix'] = prefix
            if not intermediates_only:
                out['image_features'] = self.norm(features)
            return out
        if return_prefix_tokens and prefix is not None:
            spatial = list(zip(spatial, prefix))
        return spatial if intermediates_only else (self.norm(features), spatial)

    @torch.no_grad()
    def reconstruct_block_inputs(self, x: torch.Tensor) -> Tuple[List[State], List[State]]:
        """ Each block's input state as the forward computed it and as the inverses reconstruct it. """
        if self.reversible_method == 'bdia' and not self.training:
            raise RuntimeError(
                'BDIA is reversible in training mode only: at evaluation gamma = 0 and x_{k-1} cannot be '
                'recovered. Call model.train() first.')
        self._watch_steps(True)
        inputs, reconstructed = reconstruct(self.make_steps(self.blocks), self.initial_state(self.embed_tokens(x)))
        self._check_steps()
        return inputs, reconstructed


def _run_step(step: ReversibleStep, *state: torch.Tensor) -> State:
    return step.forward(state, Tape())


@torch.fx.wrap  # a leaf under fx: the traced model checks the mask it is given, not the trace's placeholder
@register_notrace_function
def _reject_masks(attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise NotImplementedError(
            'The reversible steps run the blocks without attention masks; use the plain timm model for '
            'attn_mask / is_causal.')


def make_reversible(
        model: VisionTransformer,
        method: str = 'bdia',
        *,
        reversible: bool = True,
        **options: Any,
) -> ReversibleTimmVisionTransformer:
    """ Turn a timm `VisionTransformer` into a reversible one, in place, and return it.

    The model keeps its modules, parameters and `state_dict` keys: weights saved after fine-tuning load into
    the plain timm model with `strict=True`. Only timm's pre-norm `Block`s are accepted; anything else, and any
    option `method` does not take, is rejected before the model is touched.

    Args:
        model: A timm `VisionTransformer` (class token or not, register tokens, any `global_pool`,
            `dynamic_img_size`).
        method: 'bdia' (keeps the pretrained function: at evaluation the ordinary ViT on the grid 2^-quant_level),
            'two_stream' or 'momentum' (other functions, for training from scratch).
        reversible: Use the reversible backward; `model.set_reversible(False)` switches later.
        **options: bdia: quant_level, bdia_gamma, split_backward, verify_reconstruction; momentum: quant_level,
            momentum, split_backward, verify_reconstruction; two_stream: none (see ReversibleTimmVisionTransformer).
    """
    if isinstance(model, ReversibleTimmVisionTransformer):
        raise TypeError(f'The model is already reversible (method={model.reversible_method!r}).')
    if type(model) is not VisionTransformer:
        kind = type(model)
        raise TypeError(
            f'make_reversible converts timm.models.vision_transformer.VisionTransformer, got '
            f'{kind.__module__}.{kind.__qualname__}.')
    settings = _reversible_settings(method, reversible, options)
    _check_blocks(model.blocks)
    _add_feature_taps(model.blocks)
    model.__class__ = ReversibleTimmVisionTransformer
    model.__dict__.update(settings)
    return model


def _create(variant: str, pretrained: bool = False, **kwargs) -> ReversibleTimmVisionTransformer:
    """ timm's builder with timm's ViT checkpoint filter (position embedding resizing, foreign layouts). """
    return build_model_with_cfg(
        ReversibleTimmVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=kwargs.pop('out_indices', 3), feature_cls='getter'),
        **kwargs,
    )


def _timm_vit_cfgs(prefix: str, vit_names: Sequence[str]) -> Dict[str, Any]:
    """ timm's pretrained cfgs of `vit_names`, every tag, renamed '<prefix><vit name>.<tag>': the same weights
    (`hf_hub_id`, url), input config and head; timm's default tag stays the default.
    """
    cfgs = {}
    for vit_name in vit_names:
        default_tag = get_pretrained_cfg(vit_name).tag
        for name in timm.list_models(vit_name, include_tags=True):
            tag = split_model_name_tag(name)[1]
            cfgs[f'{prefix}{name}' + ('*' if tag == default_tag else '')] = get_pretrained_cfg(name)
    return cfgs


_VIT_SIZES = dict(
    tiny=dict(embed_dim=192, depth=12, num_heads=3),
    small=dict(embed_dim=384, depth=12, num_heads=6),
    base=dict(embed_dim=768, depth=12, num_heads=12),
    large=dict(embed_dim=1024, depth=24, num_heads=16),
)

default_cfgs = generate_default_cfgs({
    **_timm_vit_cfgs('bdia_', [f'vit_{size}_patch16_{res}' for size in _VIT_SIZES for res in (224, 384)]),
    # Rev-ViT trains with the DeiT recipe and its ImageNet normalisation
    'revvit_small_patch16_224': _cfg(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
    'revvit_base_patch16_224': _cfg(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
})


def _bdia_vit(variant: str, size: str, pretrained: bool, kwargs: Dict[str, Any]) -> ReversibleTimmVisionTransformer:
    # the input size comes from the pretrained cfg, as for timm's vit_* models
    model_args = dict(patch_size=16, **_VIT_SIZES[size], method='bdia')
    return _create(variant, pretrained, **dict(model_args, **kwargs))


@register_model
def bdia_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> ReversibleTimmVisionTransformer:
    """ ViT-Ti/16 at 224x224 as a BDIA integrator; timm's vit_tiny_patch16_224 weights. """
    return _bdia_vit('bdia_vit_tiny_patch16_224', 'tiny', pretrained, kwargs)


@register_model
def bdia_vit_tiny_patch16_384(pretrained: bool = False, **kwargs) -> ReversibleTimmVisionTransformer:
    """ ViT-Ti/16 at 384x384 as a BDIA integrator; timm's vit_tiny_patch16_384 weights. """
    return _bdia_vit('bdia_vit_tiny_patch16_384', 'tiny', pretrained, kwargs)


@register_model
def bdia_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> ReversibleTimmVisionTransformer:
    """ ViT-S/16 at 224x224 as a BDIA integrator; timm's vit_small_patch16_224 weights. """
    return _bdia_vit('bdia_vit_small_patch16_224', 'small', pretrained, kwargs)


@register_model
def bdia_vit_small_patch16_384(pretrained: bool = False, **kwargs) -> ReversibleTimmVisionTransformer:
    """ ViT-S/16 at 384x384 as a BDIA integrator; timm's vit_small_patch16_384 weights. """
    return _bdia_vit('bdia_vit_small_patch16_384', 'small', pretrained, kwargs)


@register_model
def bdia_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> ReversibleTimmVisionTransformer:
    """ ViT-B/16 at 224x224 as a BDIA integrator; timm's vit_base_patch16_224 weights. """
    return _bdia_vit('bdia_vit_base_patch16_224', 'base', pretrained, kwargs)


@register_model
def bdia_vit_base_patch16_384(pretrained: bool = False, **kwargs) -> ReversibleTimmVisionTransformer:
    """ ViT-B/16 at 384x384 as a BDIA integrator; timm's vit_base_patch16_384 weights. """
    return _bdia_vit('bdia_vit_base_patch16_384', 'base', pretrained, kwargs)


@register_model
def bdia_vit_large_patch16_224(pretrained: bool = False, **kwargs) -> ReversibleTimmVisionTransformer:
    """ ViT-L/16 at 224x224 as a BDIA integrator; timm's vit_large_patch16_224 weights. """
    return _bdia_vit('bdia_vit_large_patch16_224', 'large', pretrained, kwargs)


@register_model
def bdia_vit_large_patch16_384(pretrained: bool = False, **kwargs) -> ReversibleTimmVisionTransformer:
    """ ViT-L/16 at 384x384 as a BDIA integrator; timm's vit_large_patch16_384 weights. """
    return _bdia_vit('bdia_vit_large_patch16_384', 'large', pretrained, kwargs)


@register_model
def revvit_small_patch16_224(pretrained: bool = False, **kwargs) -> ReversibleTimmVisionTransformer:
    """ Rev-ViT-S (two-stream, CVPR 2022): ViT-S/16's blocks as additive couplings, 224x224; no weights. """
    model_args = dict(patch_size=16, **_VIT_SIZES['small'], method='two_stream')
    return _create('revvit_small_patch16_224', pretrained, **dict(model_args, **kwargs))


@register_model
def revvit_base_patch16_224(pretrained: bool = False, **kwargs) -> ReversibleTimmVisionTransformer:
    """ Rev-ViT-B (two-stream, CVPR 2022): ViT-B/16's blocks as additive couplings, 224x224; no weights. """
    model_args = dict(patch_size=16, **_VIT_SIZES['base'], method='two_stream')
    return _create('revvit_base_patch16_224', pretrained, **dict(model_args, **kwargs))
