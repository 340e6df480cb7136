""" Datasets and transforms for training the package's models with timm's data pipeline.

- `digits`: scikit-learn's bundled 8x8 handwritten digits as an image dataset, so training, tests and
  demos run offline (no download, no Hub).
- `create_image_dataset`: `digits` or any timm `create_dataset` name, with an error that says how to
  get a dataset that is missing instead of the library's generic one.
- `create_train_transform`: timm's training transform, plus the pad-and-crop augmentation that CIFAR
  recipes use (timm's own crop modes are random-resized crops).
"""
import random
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from torchvision import transforms

from timm.data import create_dataset, create_transform
from timm.data.transforms import str_to_interp_mode, str_to_pil_interp

__all__ = [
    'DIGITS', 'DigitsDataset', 'DatasetNotFoundError', 'create_image_dataset', 'create_train_transform',
    'dataset_num_classes', 'seed_worker', 'TRAIN_CROP_MODES',
]

DIGITS = 'digits'
_TRAIN_SPLITS = ('train', 'training')
_EVAL_SPLITS = ('validation', 'val', 'test', 'eval', 'evaluation')
# timm's crop modes plus 'pad': zero-pad by `crop_padding` pixels, then a random crop back to size
TRAIN_CROP_MODES = ('rrc', 'rkrc', 'rkrr', 'pad')


class DatasetNotFoundError(FileNotFoundError):
    """ The requested dataset is not on disk and downloading was not allowed. """


class DigitsDataset(torch.utils.data.Dataset):
    """ scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) as PIL images.

    Pixel values 0..16 are scaled to 0..255, images are resized to `img_size` and repeated to
    `in_chans` channels, so the models see the same kind of input as a CIFAR image. The split is
    fixed and deterministic, with no random draw: within each class, every fifth image (in file
    order) is held out for testing, which keeps the classes balanced in both splits.
    """
    num_classes = 10
    classes = tuple(str(i) for i in range(10))

    def __init__(
            self,
            split: str = 'train',
            img_size: Union[int, Tuple[int, int]] = 32,
            in_chans: int = 3,
            interpolation: str = 'bilinear',
            transform: Optional[Any] = None,
            target_transform: Optional[Any] = None,
    ):
        """
        Args:
            split: 'train' or one of 'validation' / 'val' / 'test' (the same held-out images).
            img_size: Output size (an int for square images, or (height, width)).
            in_chans: Output channels: 1 (grayscale), 3 (RGB, the gray value repeated).
            interpolation: PIL resampling used to enlarge the 8x8 images.
            transform: Applied to each PIL image.
            target_transform: Applied to each label.
        """
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError(
                "The 'digits' dataset comes with scikit-learn: pip install scikit-learn") from e
        split = split.lower()
        if split in _TRAIN_SPLITS:
            is_train = True
        elif split in _EVAL_SPLITS:
            is_train = False
        else:
            raise ValueError(f"Unknown split {split!r} for 'digits': use 'train' or 'validation'/'test'.")
        if in_chans not in (1, 3):
            raise ValueError(f"'digits' images have 1 or 3 channels, not {in_chans}.")
        digits = load_digits()
        # rank of each sample among those of its class, in file order: every fifth of each class is held out
        rank = np.zeros(len(digits.target), dtype=np.int64)
        for c in range(self.num_classes):
            rank[digits.target == c] = np.arange(int((digits.target == c).sum()))
        keep = (rank % 5 != 4) if is_train else (rank % 5 == 4)
        pixels = np.clip(np.round(digits.images[keep] * (255. / 16.)), 0, 255).astype(np.uint8)
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        resample = str_to_pil_interp(interpolation)
        mode = 'RGB' if in_chans == 3 else 'L'
        # PIL takes (width, height); images are small enough to keep all of them resized in memory
        self.images = [Image.fromarray(p, mode='L').resize(size[::-1], resample).convert(mode) for p in pixels]
        self.targets = [int(t) for t in digits.target[keep]]
        self.split = 'train' if is_train else 'test'
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Any, Any]:
        img, target = self.images[index], self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def create_image_dataset(
        name: str,
        root: Optional[str] = None,
        split: str = 'train',
        is_training: bool = False,
        download: bool = False,
        img_size: Union[int, Tuple[int, int]] = 32,
        in_chans: int = 3,
        interpolation: str = 'bilinear',
        **kwargs: Any,
) -> torch.utils.data.Dataset:
    """ `digits`, or any dataset timm's `create_dataset` knows (`torch/cifar10`, `torch/cifar100`, a folder, ...).

    Args:
        name: 'digits', or a timm dataset name ('' for an image folder under `root`).
        root: Data directory (ignored by 'digits').
        split: Split name, as timm's train.py passes it ('train', 'validation').
        is_training: Passed to timm (shuffling of iterable datasets).
        download: Allow timm/torchvision to download the dataset.
        img_size: Image size of the 'digits' images (other datasets are resized by the transforms).
        in_chans: Channels of the 'digits' images.
        interpolation: Resampling used to resize the 'digits' images.
        **kwargs: Passed to timm's `create_dataset`.

    Raises:
        DatasetNotFoundError: the dataset is not under `root` and `download` is off; the message says
            how to get it.
    """
    if name.lower() == DIGITS:
        return DigitsDataset(split, img_size=img_size, in_chans=in_chans, interpolation=interpolation)
    if root is None:
        raise DatasetNotFoundError(
            f'Dataset {name or "image folder"!r} needs a data directory: pass --data-dir (where it is, or where '
            f'--dataset-download should put it).')
    try:
        return create_dataset(name, root=root, split=split, is_training=is_training, download=download, **kwargs)
    except (RuntimeError, AssertionError, FileNotFoundError) as e:
        # torchvision says 'Dataset not found ... download=True', timm's folder datasets assert on a missing dir
        missing = isinstance(e, (AssertionError, FileNotFoundError)) or 'not found' in str(e).lower()
        if download or not missing:
            raise
        if name.startswith(('torch/', 'tfds/', 'hfds/', 'hfids/', 'wds/')):
            hint = (f'Run again with --dataset-download to download it into {root!r}, or place its files '
                    f'there (for torch/ datasets, the layout torchvision downloads).')
        else:
            hint = (f'Put the images under {root!r} as <split>/<class>/<image> folders, or pick a dataset that '
                    f'can be downloaded (e.g. --dataset torch/cifar10 --dataset-download), or --dataset digits '
                    f'for an offline run.')
        raise DatasetNotFoundError(f'Dataset {name or "image folder"!r} ({split} split) was not found in {root!r}. {hint}') from e


def dataset_num_classes(dataset: torch.utils.data.Dataset) -> Optional[int]:
    """ Number of classes a dataset declares (torchvision's `classes`, timm's reader), or None. """
    for obj in (dataset, getattr(dataset, 'dataset', None), getattr(dataset, 'reader', None)):
        if obj is None:
            continue
        if isinstance(getattr(obj, 'num_classes', None), int):
            return obj.num_classes
        classes = getattr(obj, 'classes', None)
        if classes is not None and not callable(classes):
            return len(classes)
        class_to_idx = getattr(obj, 'class_to_idx', None)
        if class_to_idx:
            return len(class_to_idx)
    return None


def create_train_transform(
        input_size: Sequence[int],
        train_crop_mode: Optional[str] = None,
        crop_padding: int = 4,
        hflip: float = 0.5,
        **kwargs: Any,
) -> Any:
    """ timm's training transform (`create_transform(is_training=True)`), with the crop chosen by `train_crop_mode`.

    Args:
        input_size: (channels, height, width).
        train_crop_mode: One of timm's crop modes ('rrc' random-resized crop, the default, 'rkrc', 'rkrr'),
            or 'pad': resize to the input size, zero-pad by `crop_padding` pixels and crop a random
            window of the input size, the usual CIFAR augmentation.
        crop_padding: Padding of the 'pad' crop mode, in pixels.
        hflip: Horizontal flip probability.
        **kwargs: Passed to timm's `create_transform` (auto_augment, re_prob, color_jitter, mean, std, ...).
    """
    if train_crop_mode is not None and train_crop_mode not in TRAIN_CROP_MODES:
        raise ValueError(f'train_crop_mode must be one of {TRAIN_CROP_MODES}, got {train_crop_mode!r}.')
    if train_crop_mode != 'pad' or kwargs.get('no_aug'):
        return create_transform(input_size, is_training=True, train_crop_mode=train_crop_mode, hflip=hflip, **kwargs)
    # Reuse timm's secondary (RandAugment / color jitter) and final (tensor, normalize, random
    # erasing) stages; only the crop differs.
    _, secondary, final = create_transform(input_size, is_training=True, hflip=hflip, separate=True, **kwargs)
    size = tuple(input_size[-2:])
    interpolation = kwargs.get('interpolation', 'bilinear')
    interpolation = 'bilinear' if interpolation == 'random' else interpolation
    primary = [transforms.Resize(size, interpolation=str_to_interp_mode(interpolation)),
               transforms.RandomCrop(size, padding=crop_padding, fill=0, padding_mode='constant')]
    if hflip > 0.:
        primary.append(transforms.RandomHorizontalFlip(p=hflip))
    if kwargs.get('vflip', 0.) > 0.:
        primary.append(transforms.RandomVerticalFlip(p=kwargs['vflip']))
    return transforms.Compose(primary + list(secondary.transforms) + list(final.transforms))


def seed_worker(worker_id: int) -> None:
    """ DataLoader `worker_init_fn`: seed Python's and NumPy's RNGs from the worker's torch seed.

    torch seeds only its own RNG and Python's per worker; NumPy's state is copied from the parent,
    so without this every worker would draw the same NumPy augmentations (RandAugment uses NumPy).
    The torch seed derives from the loader's base seed, so a resumed run repeats the same draws.
    """
    seed = torch.initial_seed() % (2 ** 32)
    random.seed(seed)
    np.random.seed(seed)
