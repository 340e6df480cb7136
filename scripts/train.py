#!/usr/bin/env python3
""" Train any timm model, this package's included, with timm's training recipe through Accelerate.

    accelerate launch scripts/train.py -c recipes/cifar10_vit_small.yaml --model bdia_vit_small_cifar \\
        --data-dir data --dataset-download
    python scripts/train.py -c recipes/digits_demo.yaml --model revvit_small_cifar     # offline, CPU, ~1 min
    torchrun --nproc_per_node 2 scripts/train.py ...                                  # CPU data parallel (gloo)

The flags keep the names and meanings of timm's train.py; `-c/--config` takes a YAML file of the same
keys (underscores for dashes) as defaults that the command line overrides. The pieces are timm's
(datasets, transforms, mixup, optimizers, schedulers, losses, EMA, metrics, `save_for_hf`) and
Accelerate's (devices, processes, mixed precision, gradient accumulation, checkpointing); this file
wires them together. Mixed precision is Accelerate's: `accelerate launch --mixed_precision bf16`,
or `ACCELERATE_MIXED_PRECISION=bf16` with torchrun.

Outputs in <output>/<experiment>/: args.yaml, summary.csv (timm's columns, and per epoch the training
throughput, time and peak memory), checkpoints/ (a resumable training state per epoch, the newest named by
checkpoints/latest), the best weights as model.safetensors + config.json (timm's `save_for_hf`, loadable
with `timm.create_model('local-dir:<dir>', pretrained=True)`) and results.json (what the run reached and
cost, what scripts/compare.py tabulates). `--log-with tensorboard` (or any Accelerate tracker) logs the
same figures live.
"""
import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list, set_seed
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from timm.data import Mixup
from timm.data import create_transform
from timm.data.model_config import resolve_input_data_config  # timm's resolve_data_config, checked against the model
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model, get_pretrained_cfg, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import PlateauLRScheduler, create_scheduler_v2, scheduler_kwargs
from timm.utils import AverageMeter, ModelEmaV3, ParseKwargs, accuracy, update_summary

import timm_reversible  # noqa: F401  registers the package's models with timm
from timm_reversible.data import (
    DIGITS, TRAIN_CROP_MODES, DatasetNotFoundError, DigitsDataset, create_image_dataset, create_train_transform,
    dataset_num_classes, seed_worker)
from timm_reversible.training import (
    CHECKPOINTS, RESULTS_FILE, MissingTrackerError, NonFiniteLossError, ResumeArgsError, TrainingStateError,
    TrainProgress, check_resume_args, check_trackers, dataset_tag, latest_checkpoint, load_checkpoint,
    memory_source, peak_memory_mib, read_args_yaml, restore_outputs, resolve_resume, resume_arg_changes,
    run_changes_note, run_results, save_best, save_checkpoint, write_atomic, yaml_safe)
from timm_reversible.profiling import count_flops, count_params, peak_training_memory

_logger = logging.getLogger('train')


# The first parser reads only --config: the YAML sets the main parser's defaults, as in timm's train.py.
config_parser = argparse.ArgumentParser(description='Training config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML config file specifying default arguments')


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Train a timm model with Accelerate (timm train.py flags)', parents=[config_parser])

    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('--data-dir', metavar='DIR', default=None,
                       help='path to dataset (root dir); not needed for "digits"')
    group.add_argument('--dataset', '-d', metavar='NAME', default='',
                       help='"digits" (scikit-learn, offline), torch/cifar10, torch/cifar100 or any timm '
                            'create_dataset name ("" = image folder)')
    group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split')
    group.add_argument('--val-split', metavar='NAME', default='validation', help='dataset validation split')
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='allow download of datasets for torch/ and tfds/ datasets that support it')
    group.add_argument('--train-num-samples', type=int, default=None, metavar='N',
                       help='train on the first N training samples only (quick runs)')

    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='vit_small_cifar', type=str, metavar='MODEL',
                       help='name of the timm model to train (default: "vit_small_cifar")')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='start with the pretrained version of the model (if available)')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help='initialize the model from this checkpoint')
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='resume the full training state: an experiment dir, its checkpoints/ dir or one '
                            'checkpoint dir (outputs go on in that experiment unless --experiment is given)')
    group.add_argument('--resume-allow-changes', action='store_true', default=False,
                       help='resume although flags differ from the run\'s args.yaml (the optimizer and schedule '
                            'flags still come from the saved state); the changes are recorded')
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='number of label classes (default: from the dataset, else the model default)')
    group.add_argument('--img-size', type=int, default=None, metavar='N',
                       help='image size (default: the model\'s); fixed-size models are built at this size')
    group.add_argument('--in-chans', type=int, default=None, metavar='N', help='image input channels (default: 3)')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N', help='eval center crop percent')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='override dataset mean')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='override dataset std')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME',
                       help='image resize interpolation (overrides the model\'s)')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N',
                       help='input batch size per process (default: 128)')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                       help='validation batch size per process (default: --batch-size)')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='number of batches to accumulate gradients over before an update')
    group.add_argument('--grad-checkpointing', action='store_true', default=False,
                       help='enable gradient checkpointing through the model blocks')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='key=value pairs passed to create_model (e.g. embed_dim=64 depth=2)')

    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='optimizer (default: "sgd")')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='optimizer epsilon')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='optimizer momentum (default: 0.9)')
    group.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay (default: 2e-5)')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM',
                       help='clip gradient norm (default: None, no clipping)')
    group.add_argument('--clip-mode', type=str, default='norm', choices=('norm', 'value'),
                       help='gradient clipping mode: "norm" or "value"')
    group.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay')

    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                       help='LR scheduler (default: "cosine")')
    group.add_argument('--sched-on-updates', action=argparse.BooleanOptionalAction, default=True,
                       help='step the LR scheduler per optimizer update rather than per epoch (default: on)')
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='learning rate (default: --lr-base scaled by the global batch size)')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                       help='base learning rate: lr = lr_base * global_batch_size / lr_base_size')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV', help='base learning rate batch size')
    group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                       help='base learning rate vs batch size scaling ("linear", "sqrt", default by optimizer)')
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='warmup learning rate')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR', help='lower LR bound of cyclic schedulers')
    group.add_argument('--epochs', type=int, default=300, metavar='N', help='number of epochs to train')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                       help='epochs of LR decay of the multistep scheduler')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval to decay LR')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N', help='epochs to warm up the LR')
    group.add_argument('--warmup-prefix', action='store_true', default=False,
                       help='exclude the warmup from the decay schedule')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N',
                       help='epochs at min_lr after the cyclic schedule ends')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N', help='patience of the plateau scheduler')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='LR decay rate')

    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False,
                       help='disable all training augmentation, override other train aug args')
    group.add_argument('--train-crop-mode', type=str, default=None, choices=TRAIN_CROP_MODES,
                       help='training crop: timm\'s "rrc" (random resized crop, default), "rkrc", "rkrr", or '
                            '"pad" (zero-pad by --crop-padding, random crop: the usual CIFAR augmentation)')
    group.add_argument('--crop-padding', type=int, default=4, metavar='PIX', help='padding of --train-crop-mode pad')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                       help='random resize scale')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='random resize aspect ratio')
    group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip training aug probability')
    group.add_argument('--vflip', type=float, default=0., help='vertical flip training aug probability')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='color jitter factor')
    group.add_argument('--aa', type=str, default=None, metavar='NAME',
                       help='AutoAugment / RandAugment policy, e.g. "rand-m9-mstd0.5-inc1" (default: None)')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erase probability')
    group.add_argument('--remode', type=str, default='pixel', help='random erase mode')
    group.add_argument('--recount', type=int, default=1, help='random erase count')
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, mixup enabled if > 0')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, cutmix enabled if > 0')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                       help='cutmix min/max ratio, overrides alpha and enables cutmix if set')
    group.add_argument('--mixup-prob', type=float, default=1.0,
                       help='probability of performing mixup or cutmix when either/both is enabled')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='probability of switching to cutmix when both mixup and cutmix are enabled')
    group.add_argument('--mixup-mode', type=str, default='batch', help='mixup/cutmix per "batch", "pair" or "elem"')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N',
                       help='turn off mixup after this epoch, disabled if 0')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (default: 0.1)')
    group.add_argument('--train-interpolation', type=str, default='random',
                       help='training interpolation (random, bilinear, bicubic)')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path rate')

    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False,
                       help='keep an exponential moving average of the model weights')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='decay factor of the EMA')
    group.add_argument('--model-ema-warmup', action='store_true', help='warm up the EMA decay')

    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    group.add_argument('--log-interval', type=int, default=50, metavar='N',
                       help='how many updates to wait before logging training status')
    group.add_argument('--checkpoint-hist', type=int, default=2, metavar='N',
                       help='number of epoch training states to keep (default: 2)')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N',
                       help='how many data loading processes per training process (default: 4)')
    group.add_argument('--output', default='', type=str, metavar='PATH',
                       help='path to the output folder (default: ./output/train)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='name of the experiment subfolder (default: <date>-<model>-<img size>)')
    group.add_argument('--log-with', nargs='+', default=[], metavar='TRACKER',
                       help="log loss, top-1, lr, throughput and memory live through Accelerate's trackers: "
                            'tensorboard (pip install "timm-reversible[tensorboard]"), wandb, mlflow, ... or all; '
                            'their files go to the run folder')
    return parser


parser = _build_parser()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """ timm's two-stage parsing: YAML config (if any) as defaults, then the command line. """
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        with open(args_config.config) as f:
            cfg = yaml.safe_load(f) or {}
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - known)
        if unknown:
            # a misspelt key would otherwise be ignored silently and the recipe not be what it says
            parser.error(f'unknown keys in {args_config.config}: {", ".join(unknown)}')
        parser.set_defaults(**cfg)
    args = parser.parse_args(remaining)
    args.config = args_config.config
    return args


def _model_args(args: argparse.Namespace, num_classes: Optional[int], in_chans: int) -> Dict[str, Any]:
    """ Every keyword create_model gets: recorded so that the saved model is rebuilt the same. """
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=args.drop, drop_path_rate=args.drop_path)
    if args.img_size is not None:
        try:
            cfg = get_pretrained_cfg(args.model)
        except RuntimeError:
            cfg = None  # a hub or local-dir name: no registered cfg to ask
        # fixed-size models (ViTs) take their size at creation; others only see resized data
        if cfg is not None and cfg.fixed_input_size:
            kwargs['img_size'] = args.img_size
    kwargs.update(args.model_kwargs)
    return {k: v for k, v in kwargs.items() if v is not None}


def _resolve_args(args: argparse.Namespace, num_processes: int) -> None:
    """ The flags the script derives from others, set before a resume compares them with the recorded ones. """
    if args.sched == 'plateau':
        args.sched_on_updates = False  # it reacts to the epoch's eval metric only
    # timm's rule: without --lr, scale --lr-base by the global batch size
    if args.lr is None:
        global_batch_size = args.batch_size * num_processes * args.grad_accum_steps
        batch_ratio = global_batch_size / args.lr_base_size
        if not args.lr_base_scale:
            on = args.opt.lower()
            args.lr_base_scale = 'sqrt' if any(o in on for o in ('ada', 'lamb')) else 'linear'
        if args.lr_base_scale == 'sqrt':
            batch_ratio = batch_ratio ** 0.5
        args.lr = args.lr_base * batch_ratio


def _all_finite(model: nn.Module) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def _no_progress_bar(accelerator: Accelerator) -> Optional[bool]:
    # bars on the main process only; None lets tqdm drop them when stderr is no terminal (log files, CI)
    return None if accelerator.is_main_process else True


def _check_finite(bad_batch: torch.Tensor, bad_loss: torch.Tensor, epoch: int, accelerator: Accelerator) -> None:
    # gathered, so that every process reaches the same verdict (the others would hang otherwise)
    batches, losses = accelerator.gather((bad_batch.reshape(1), bad_loss.reshape(1)))
    bad = batches >= 0
    if bad.any():
        i = int(torch.where(bad, batches, batches.max() + 1).argmin())
        raise NonFiniteLossError(f'Loss is {losses[i].item()} at epoch {epoch + 1}, batch {int(batches[i]) + 1}')


def train_one_epoch(
        epoch: int,
        num_epochs: int,
        model: nn.Module,
        loader: torch.utils.data.DataLoader,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        accelerator: Accelerator,
        lr_scheduler: Any,
        progress: TrainProgress,
        args: argparse.Namespace,
        model_ema: Optional[ModelEmaV3] = None,
        mixup_fn: Optional[Mixup] = None,
) -> Dict[str, float]:
    """ One pass over the training data (`epoch` counted from 0, logged from 1); the LR schedule steps per
    optimizer update.
    """
    if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        mixup_fn.mixup_enabled = False
    model.train()
    losses = AverageMeter()
    # first non-finite loss of the epoch, kept on the device and checked at log points: a check per
    # step would stall the GPU every step
    bad_batch = torch.full((), -1, dtype=torch.long, device=accelerator.device)
    bad_loss = torch.zeros((), device=accelerator.device)
    num_batches = len(loader)
    num_images = 0
    start = time.perf_counter()
    pbar = tqdm(loader, desc=f'train {epoch + 1}/{num_epochs}', disable=_no_progress_bar(accelerator), leave=False,
                dynamic_ncols=True)
    for batch_idx, (input, target) in enumerate(pbar):
        if mixup_fn is not None:
            input, target = mixup_fn(input, target)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                output = model(input)
                loss = loss_fn(output, target)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.clip_grad is not None:
                if args.clip_mode == 'value':
                    accelerator.clip_grad_value_(model.parameters(), args.clip_grad)
                else:
                    accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            optimizer.zero_grad()
        loss = loss.detach()
        first_bad = ~torch.isfinite(loss) & (bad_batch < 0)
        bad_batch = torch.where(first_bad, batch_idx, bad_batch)
        bad_loss = torch.where(first_bad, loss.float(), bad_loss)
        losses.update(loss, input.size(0))
        num_images += input.size(0)
        last_batch = batch_idx == num_batches - 1
        if accelerator.sync_gradients:
            progress.num_updates += 1
            if model_ema is not None:
                model_ema.update(accelerator.unwrap_model(model), step=progress.num_updates)
            if lr_scheduler is not None:
                lr_scheduler.step_update(num_updates=progress.num_updates)
        if last_batch or (accelerator.sync_gradients and progress.num_updates % args.log_interval == 0):
            _check_finite(bad_batch, bad_loss, epoch, accelerator)
            lr = optimizer.param_groups[0]['lr']
            pbar.set_postfix(loss=f'{float(losses.avg):.4f}', lr=f'{lr:.3g}')
            if not last_batch:
                _logger.info(f'Train: {epoch + 1}/{num_epochs} [{batch_idx + 1:>4d}/{num_batches}] '
                             f'loss {float(losses.val):.4f} ({float(losses.avg):.4f}) lr {lr:.3e}')
                if args.log_with:
                    accelerator.log({'train/loss': float(losses.val), 'train/lr': lr}, step=progress.num_updates)
    train_loss = accelerator.reduce(torch.as_tensor(float(losses.avg), device=accelerator.device), reduction='mean')
    if accelerator.device.type == 'cuda':
        torch.cuda.synchronize(accelerator.device)
    seconds = time.perf_counter() - start
    images = int(accelerator.reduce(torch.tensor(num_images, device=accelerator.device), reduction='sum'))
    return OrderedDict(loss=float(train_loss), img_s=images / seconds, time_s=seconds, images=images)


@torch.no_grad()
def validate(
        model: nn.Module,
        loader: torch.utils.data.DataLoader,
        accelerator: Accelerator,
        num_classes: int,
        desc: str = 'eval',
) -> Dict[str, float]:
    """ Loss, top-1 and top-5 over the whole evaluation set, gathered from every process exactly once. """
    model.eval()
    loss_fn = nn.CrossEntropyLoss()
    losses, top1, top5 = AverageMeter(), AverageMeter(), AverageMeter()
    for input, target in tqdm(loader, desc=desc, disable=_no_progress_bar(accelerator), leave=False,
                              dynamic_ncols=True):
        with accelerator.autocast():
            output = model(input)
        output, target = accelerator.gather_for_metrics((output.float(), target))
        acc1, acc5 = accuracy(output, target, topk=(1, min(5, num_classes)))
        n = target.size(0)
        losses.update(loss_fn(output, target).item(), n)
        top1.update(acc1.item(), n)
        top5.update(acc5.item(), n)
    return OrderedDict(loss=losses.avg, top1=top1.avg, top5=top5.avg)


def _device_name(accelerator: Accelerator) -> str:
    if accelerator.device.type == 'cuda':
        return torch.cuda.get_device_name(accelerator.device)
    return accelerator.device.type


def _epoch_peak_memory(accelerator: Accelerator) -> Dict[str, Optional[float]]:
    """ This epoch's peak memory, the largest over the processes (allocated / reserved: CUDA only; rss). """
    figures = peak_memory_mib(accelerator.device)
    known = {k: v for k, v in figures.items() if v is not None}
    peaks = accelerator.gather(torch.tensor(list(known.values()), device=accelerator.device).reshape(1, -1))
    return dict(figures, **dict(zip(known, peaks.max(dim=0).values.tolist())))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """ Train as the command line says; returns the contents of results.json. """
    args = parse_args(argv)
    check_trackers(args.log_with)
    has_accelerator = getattr(torch, 'accelerator', None) is not None and torch.accelerator.is_available()
    accelerator = Accelerator(
        # without a GPU, CPU processes started by torchrun train together over gloo
        cpu=not (has_accelerator or torch.cuda.is_available()),
        gradient_accumulation_steps=args.grad_accum_steps,
        # the data order is a function of (seed, epoch), so a resumed run sees the batches it would have
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        step_scheduler_with_optimizer=False,
        log_with=args.log_with or None,
        # where trackers write is the run folder, known only later (init_trackers below sets it)
        project_config=ProjectConfiguration(logging_dir=args.output),
    )
    # a no-op where logging is already set up (an embedding program); the level is set either way
    logging.basicConfig(format='%(asctime)s %(levelname)s %(name)s: %(message)s', datefmt='%H:%M:%S')
    logging.getLogger().setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    if not accelerator.is_main_process:
        _logger.setLevel(logging.WARNING)  # log once, not once per process
    logging.getLogger('accelerate').setLevel(logging.WARNING)  # its per-file checkpoint lines drown the epochs
    _logger.info(f'Training with {accelerator.num_processes} process(es) on {accelerator.device}, '
                 f'mixed precision: {accelerator.mixed_precision}.')

    # A resumed run goes on with the flags it was started with (checked before anything is built from them).
    _resolve_args(args, accelerator.num_processes)
    ckpt_dir, resume_exp, resume_changes = None, None, {}
    if args.resume:
        ckpt_dir, resume_exp = resolve_resume(args.resume)
        recorded = read_args_yaml(resume_exp)
        if recorded is not None and ckpt_dir is not None:
            now = yaml_safe(vars(args))
            goes_on_with = check_resume_args(recorded, now, args.resume_allow_changes)
            for k, v in goes_on_with.items():
                if hasattr(args, k) and now[k] != v:
                    setattr(args, k, v)  # restored from the state: record what runs
            resume_changes = resume_arg_changes(recorded, goes_on_with)

    # Same seed everywhere for identical initial weights; per-process below for augmentation.
    set_seed(args.seed)

    # Datasets before the model: they say how many classes the model needs.
    is_digits = args.dataset.lower() == DIGITS
    dataset_train = dataset_eval = None
    if not is_digits:
        with accelerator.main_process_first():  # one process downloads, the others then read
            dataset_train = create_image_dataset(
                args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                download=args.dataset_download, batch_size=args.batch_size, seed=args.seed)
            dataset_eval = create_image_dataset(
                args.dataset, root=args.data_dir, split=args.val_split, is_training=False,
                download=args.dataset_download, batch_size=args.validation_batch_size or args.batch_size)
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = DigitsDataset.num_classes if is_digits else dataset_num_classes(dataset_train)
    in_chans = args.in_chans or 3

    model_args = _model_args(args, num_classes, in_chans)
    model = create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.initial_checkpoint or None,
                         **model_args)
    if num_classes is None:
        num_classes = model.num_classes
        model_args['num_classes'] = num_classes
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    _logger.info(f'Model {args.model} created, params: {sum(p.numel() for p in model.parameters()):,}, '
                 f'args: {model_args}')

    data_config = resolve_input_data_config(model, args=dict(
        vars(args), model_kwargs=model_args, interpolation=args.interpolation or None), verbose=False)
    img_size = int(data_config['input_size'][-1])
    if is_digits:
        digits = dict(img_size=tuple(data_config['input_size'][1:]), in_chans=data_config['input_size'][0],
                      interpolation=data_config['interpolation'])
        dataset_train = DigitsDataset(args.train_split, **digits)
        dataset_eval = DigitsDataset(args.val_split, **digits)
    if args.train_num_samples is not None:
        dataset_train = torch.utils.data.Subset(dataset_train, range(min(args.train_num_samples, len(dataset_train))))

    train_interpolation = args.train_interpolation or data_config['interpolation']
    transform_train = create_train_transform(
        data_config['input_size'],
        train_crop_mode=args.train_crop_mode,
        crop_padding=args.crop_padding,
        no_aug=args.no_aug,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        interpolation=train_interpolation,
        mean=data_config['mean'],
        std=data_config['std'],
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
    )
    transform_eval = create_transform(**data_config, is_training=False)
    for ds, tf in ((dataset_train, transform_train), (dataset_eval, transform_eval)):
        (ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds).transform = tf

    loader_kwargs = dict(num_workers=args.workers, pin_memory=accelerator.device.type == 'cuda',
                         worker_init_fn=seed_worker, persistent_workers=False)
    loader_train = torch.utils.data.DataLoader(
        dataset_train, batch_size=args.batch_size, shuffle=True, drop_last=True, **loader_kwargs)
    loader_eval = torch.utils.data.DataLoader(
        dataset_eval, batch_size=args.validation_batch_size or args.batch_size, shuffle=False, **loader_kwargs)

    mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if mixup_active:
        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=num_classes)
    if mixup_active:
        train_loss_fn = SoftTargetCrossEntropy()  # mixup already smoothed the targets
    elif args.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()

    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    model, optimizer, loader_train, loader_eval = accelerator.prepare(model, optimizer, loader_train, loader_eval)
    if len(loader_train) == 0:
        raise ValueError(f'The training set ({len(dataset_train)} images) holds no full batch of '
                         f'{args.batch_size} x {accelerator.num_processes} processes: lower --batch-size.')

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer.optimizer, **scheduler_kwargs(args, decreasing_metric=False), updates_per_epoch=updates_per_epoch)

    # The EMA copies the prepared model, so every process starts from the same (broadcast) weights.
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(accelerator.unwrap_model(model), decay=args.model_ema_decay,
                               use_warmup=args.model_ema_warmup)
    progress = TrainProgress()
    accelerator.register_for_checkpointing(progress)
    if lr_scheduler is not None:  # --sched none leaves the optimizer's lr alone
        accelerator.register_for_checkpointing(lr_scheduler)
        if isinstance(lr_scheduler, PlateauLRScheduler):
            # timm saves only its best metric: its patience and cooldown counters would restart on resume
            accelerator.register_for_checkpointing(lr_scheduler.lr_scheduler)
    if model_ema is not None:
        accelerator.register_for_checkpointing(model_ema)

    # Output directory: the same on every process (save_state writes from all of them).
    if args.experiment:
        exp_dir = os.path.join(args.output or './output/train', args.experiment)
    elif resume_exp is not None:
        exp_dir = resume_exp
    else:
        name = [None]
        if accelerator.is_main_process:
            name[0] = '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(img_size)])
        broadcast_object_list(name)
        exp_dir = os.path.join(args.output or './output/train', name[0])
    # checked by every process (they share the folder), so that none is left waiting for the others
    if not args.resume and (os.path.exists(os.path.join(exp_dir, 'summary.csv'))
                            or os.path.exists(os.path.join(exp_dir, CHECKPOINTS))):
        raise FileExistsError(
            f'{exp_dir} already holds a run: continue it with --resume {exp_dir}, or pick another '
            f'--experiment (or remove the folder).')
    if accelerator.is_main_process:
        os.makedirs(exp_dir, exist_ok=True)
    accelerator.wait_for_everyone()

    if ckpt_dir is not None:
        load_checkpoint(accelerator, ckpt_dir, allow_changes=args.resume_allow_changes)
        if accelerator.is_main_process:
            restore_outputs(ckpt_dir, resume_exp, exp_dir, progress.epoch)
        accelerator.wait_for_everyone()
        _logger.info(f'Resumed from {ckpt_dir} after epoch {progress.epoch + 1} ({progress.num_updates} updates).')
    else:
        if args.resume:
            _logger.warning(f'No training state in {args.resume} yet: starting from scratch.')
        # per-process streams for augmentation (a resumed run has restored each process's own above)
        set_seed(args.seed, device_specific=True)
    start_epoch = progress.epoch + 1

    recorded_args = yaml_safe(vars(args))
    if resume_exp is not None:
        changes_note = run_changes_note(resume_exp, start_epoch, resume_changes)
        if changes_note:
            recorded_args['resumed_with_changes'] = changes_note
    if accelerator.is_main_process:
        write_atomic(os.path.join(exp_dir, 'args.yaml'), yaml.safe_dump(recorded_args, default_flow_style=False))
    _logger.info(f'Output: {exp_dir}. {len(dataset_train)} training, {len(dataset_eval)} evaluation images, '
                 f'input {tuple(data_config["input_size"])}, {updates_per_epoch} updates per epoch, '
                 f'{num_epochs} epochs, lr {args.lr:.3g}.')

    if args.log_with:
        # trackers that write files (tensorboard) write them into the run folder: <output>/<experiment>/
        accelerator.project_configuration.logging_dir = os.path.dirname(exp_dir)
        # no config: the settings are in args.yaml, and tensorboard would put them in a folder of their own
        accelerator.init_trackers(os.path.basename(exp_dir))
    try:
        with logging_redirect_tqdm():
            for epoch in range(start_epoch, num_epochs):
                t0 = time.perf_counter()
                if accelerator.device.type == 'cuda':
                    torch.cuda.reset_peak_memory_stats(accelerator.device)
                loader_train.set_epoch(epoch)
                train_metrics = train_one_epoch(
                    epoch, num_epochs, model, loader_train, optimizer, train_loss_fn, accelerator, lr_scheduler, progress, args,
                    model_ema=model_ema, mixup_fn=mixup_fn)
                eval_metrics = validate(model, loader_eval, accelerator, num_classes)
                # an update can take the weights to inf/NaN after the last finite loss: never save those
                if not math.isfinite(eval_metrics['loss']) or not _all_finite(model):
                    raise NonFiniteLossError(
                        f'Evaluation loss is {eval_metrics["loss"]} after epoch {epoch + 1}, the weights diverged')
                candidates = [('model', eval_metrics)]
                summary_metrics = eval_metrics
                if model_ema is not None:
                    ema_metrics = validate(model_ema.module, loader_eval, accelerator, num_classes, desc='eval ema')
                    candidates.append(('ema', ema_metrics))
                    summary_metrics = ema_metrics  # as timm's train.py: with an EMA, the summary follows it
                weights, metrics = max(candidates, key=lambda c: c[1]['top1'])  # ties keep the model
                if lr_scheduler is not None:
                    lr_scheduler.step(epoch + 1, metrics['top1'])

                progress.epoch = epoch
                progress.train_loss = train_metrics['loss']
                if progress.best_top1 is None or metrics['top1'] > progress.best_top1:
                    progress.best_top1, progress.best_top5 = metrics['top1'], metrics['top5']
                    progress.best_epoch, progress.best_weights = epoch, weights
                    if accelerator.is_main_process:
                        best = accelerator.unwrap_model(model) if weights == 'model' else model_ema.module
                        save_best(best, exp_dir, model_args, data_config, pretrained_tag=dataset_tag(args.dataset))
                lrs = [g['lr'] for g in optimizer.param_groups]
                memory = _epoch_peak_memory(accelerator)
                epoch_seconds = time.perf_counter() - t0
                row = OrderedDict(
                    loss=train_metrics['loss'], img_s=train_metrics['img_s'], time_s=train_metrics['time_s'],
                    # CUDA's allocator figures where there are some; the process's peak resident set always
                    epoch_time_s=epoch_seconds, peak_mem_mib=memory['allocated'], peak_reserved_mib=memory['reserved'],
                    peak_rss_mib=memory['rss'])
                if accelerator.is_main_process:
                    update_summary(epoch, {k: v for k, v in row.items() if v is not None}, summary_metrics,
                                   os.path.join(exp_dir, 'summary.csv'), lr=sum(lrs) / len(lrs))
                if args.log_with:
                    accelerator.log({
                        'train/loss': train_metrics['loss'], 'eval/loss': summary_metrics['loss'],
                        'eval/top1': summary_metrics['top1'], 'eval/top5': summary_metrics['top5'],
                        'train/lr': sum(lrs) / len(lrs), 'train/img_s': train_metrics['img_s'],
                        'epoch': epoch + 1, **{f'train/{k}': v for k, v in row.items()
                                               if k.startswith('peak_') and v is not None},
                    }, step=progress.num_updates)
                for key, field in (('allocated', 'peak_memory_mib'), ('reserved', 'peak_memory_reserved_mib'),
                                   ('rss', 'peak_rss_mib')):
                    if memory[key] is not None:
                        setattr(progress, field, max(getattr(progress, field) or 0., memory[key]))
                progress.train_seconds += train_metrics['time_s']
                progress.train_images += train_metrics['images']
                progress.epochs_run += 1
                progress.wall_time_s += epoch_seconds
                ema_text = f', ema top1 {ema_metrics["top1"]:.2f}' if model_ema is not None else ''
                _logger.info(
                    f'Epoch {epoch + 1}/{num_epochs}: train_loss {train_metrics["loss"]:.4f}, '
                    f'eval_loss {eval_metrics["loss"]:.4f}, top1 {eval_metrics["top1"]:.2f}, '
                    f'top5 {eval_metrics["top5"]:.2f}{ema_text} (best {progress.best_top1:.2f} at epoch '
                    f'{progress.best_epoch + 1}), lr {sum(lrs) / len(lrs):.3e}, {time.perf_counter() - t0:.1f}s')
                # last: the saved RNG state is the one the next epoch starts from
                save_checkpoint(accelerator, exp_dir, epoch, args.checkpoint_hist)
    except (NonFiniteLossError, FloatingPointError) as e:
        # the exact models raise FloatingPointError for NaN / inf or out-of-range activations: the same stop
        latest = latest_checkpoint(exp_dir)
        kept = (f'The last good training state is kept: {latest} (resume with --resume {exp_dir}).'
                if latest else 'No epoch had completed, so there is no training state to resume.')
        raise NonFiniteLossError(
            f'{str(e).rstrip(".")}: training stopped. {kept} Try a lower --lr, --clip-grad, more --warmup-epochs, or bf16 '
            f'instead of fp16 mixed precision.') from None

    if accelerator.device.type != 'cuda':
        # no allocator statistics here: the tensor peak of one training step of this model, optimizer and batch
        replica = copy.deepcopy(accelerator.unwrap_model(model))
        peak = peak_training_memory(replica, create_optimizer_v2(replica, **optimizer_kwargs(cfg=args)),
                                    args.batch_size, input_size=data_config['input_size'])
        progress.peak_memory_mib = peak / 2 ** 20
        del replica
    results = run_results(
        progress, model=args.model, model_args=model_args, dataset=args.dataset, num_classes=num_classes,
        img_size=img_size, epochs=num_epochs, device=_device_name(accelerator), num_processes=accelerator.num_processes,
        mixed_precision=str(accelerator.mixed_precision), recipe=recorded_args,
        batch_size=args.batch_size,  # per process: what each process's peak memory holds
        params=count_params(accelerator.unwrap_model(model)),
        gflops=round(count_flops(accelerator.unwrap_model(model)) / 1e9, 4),
        memory_source=memory_source(accelerator.device))
    if accelerator.is_main_process:
        write_atomic(os.path.join(exp_dir, RESULTS_FILE), json.dumps(results, indent=2) + '\n')
        _logger.info(f'Done: best top1 {progress.best_top1:.2f} (epoch {progress.best_epoch + 1}, {progress.best_weights} '
                     f'weights) in {progress.wall_time_s:.1f}s. Best model: {exp_dir}/model.safetensors')
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def cli() -> int:
    try:
        main()
    except (NonFiniteLossError, DatasetNotFoundError, FileExistsError, ResumeArgsError, TrainingStateError,
            MissingTrackerError) as e:
        # an expected stop: the message says what to do, a traceback would bury it
        if int(os.environ.get('RANK', '0')) == 0:
            print(f'ERROR: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(cli())
