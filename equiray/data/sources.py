"""Image data sources, each loaded into memory as uint8 ``(N, H, W, C)`` arrays per split.

Sources: ``fashion-mnist`` (torchvision's ``FashionMNIST`` over Debian's ``dataset-fashion-mnist`` files, or a
download), ``mnist``, ``cifar10`` (torchvision; download where the network allows), ``digits`` (scikit-learn's
8x8 digits, shipped with it) and ``folder:PATH`` (an image folder, one sub-folder per class, optionally under
``train/``, ``val/``, ``test/``). Splits are ``train``, ``val`` and ``test``; where a source has no validation
(or no test) split, one is carved off deterministically with a seeded permutation.
"""
from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from equiray.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")


@dataclasses.dataclass
class ImageDataset:
    """Images per split as uint8 ``(N, H, W, C)`` with int64 labels, plus the class names."""

    source: str
    classes: list[str]
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    indices: dict[str, np.ndarray]  # each row's index in the source's own split (train/test), for provenance

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(next(iter(self.images.values())).shape[1:])  # (H, W, C)

    def counts(self) -> dict[str, int]:
        return {s: int(len(v)) for s, v in self.labels.items()}


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """How to load a source. ``cache_dir`` holds torchvision's raw files; ``download`` allows fetching them."""

    cache_dir: Path = Path(".cache/equiray")
    download: bool = False
    val_fraction: float = 0.1
    test_fraction: float = 0.15  # only for sources without a test split
    seed: int = 0
    size: int | None = None  # folder sources: resize to size x size
    channels: int | None = None  # folder sources: 1 (grayscale) or 3 (RGB); default from the first image
    max_per_split: int | None = None  # keep only the first N of each split (small runs)


_SOURCES: dict[str, Callable[[SourceOptions], tuple[dict, list[str]]]] = {}


def _register(name: str):
    def wrap(fn):
        _SOURCES[name] = fn
        return fn

    return wrap


def list_sources() -> list[str]:
    return sorted(_SOURCES) + ["folder:PATH"]


def load_source(spec: str, options: SourceOptions = SourceOptions()) -> ImageDataset:
    """Load a source by name (``fashion-mnist``, ``digits``, ``mnist``, ``cifar10``, ``folder:PATH``)."""
    if spec.startswith("folder:"):
        raw, classes = _load_folder(Path(spec[len("folder:"):]), options)
    elif spec in _SOURCES:
        raw, classes = _SOURCES[spec](options)
    else:
        raise DataError(f"unknown data source {spec!r}; choose one of {', '.join(list_sources())}")
    return _split(spec, raw, classes, options)


# ------------------------------------------------------------------------------------------- splitting
def _split(source: str, raw: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str],
           opt: SourceOptions) -> ImageDataset:
    """``raw`` holds 'train' and maybe 'val'/'test'; carve the missing ones off 'train' deterministically."""
    images, labels, indices = {}, {}, {}
    rng = np.random.default_rng(opt.seed)
    x, y = raw["train"]
    idx = np.arange(len(y))
    perm = rng.permutation(len(y))
    taken = 0
    carve = {}
    for split, frac in (("test", opt.test_fraction), ("val", opt.val_fraction)):
        if split not in raw:
            n = int(round(frac * len(y)))
            if n < 1:
                raise DataError(f"{source}: {split} fraction {frac} leaves no {split} images out of {len(y)}")
            carve[split] = np.sort(perm[taken:taken + n])
            taken += n
    keep = np.sort(perm[taken:])
    for split in SPLITS:
        if split in carve:
            sel = carve[split]
            images[split], labels[split], indices[split] = x[sel], y[sel], idx[sel]
        elif split == "train":
            images[split], labels[split], indices[split] = x[keep], y[keep], idx[keep]
        else:
            xs, ys = raw[split]
            images[split], labels[split], indices[split] = xs, ys, np.arange(len(ys))
    if opt.max_per_split:
        for split in SPLITS:
            images[split] = images[split][: opt.max_per_split]
            labels[split] = labels[split][: opt.max_per_split]
            indices[split] = indices[split][: opt.max_per_split]
    for split in SPLITS:
        images[split] = np.ascontiguousarray(images[split], dtype=np.uint8)
        labels[split] = labels[split].astype(np.int64)
        if images[split].ndim == 3:
            images[split] = images[split][..., None]  # (N, H, W) -> (N, H, W, 1)
    return ImageDataset(source, classes, images, labels, indices)


# ------------------------------------------------------------------------------------------- torchvision
def _torchvision(cls_name: str, root: Path, download: bool):
    """Load train and test of a torchvision dataset, mapping its failures to clear errors."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    out = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as exc:  # "Dataset not found. You can use download=True to download it"
            raise DataError(f"{cls_name} not found under {root}: {exc}. Allow downloading (--download) or "
                            "place the files there.") from None
        except (OSError, ValueError, EOFError) as exc:  # truncated or corrupt files
            raise DataError(f"{cls_name} files under {root} are unreadable ({exc}); delete them and prepare "
                            "again") from None
        x = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
        y = ds.targets.numpy() if hasattr(ds.targets, "numpy") else np.asarray(ds.targets)
        out[split] = (x, y)
    return out, list(ds.classes)


def stage_idx_files(src_dir: Path, raw_dir: Path) -> bool:
    """Decompress the four IDX files (``*.gz`` or plain) from ``src_dir`` into torchvision's ``raw/`` folder.

    Returns False when ``src_dir`` does not hold them. Already-staged files are kept.
    """
    if not src_dir.is_dir():
        return False
    found = {}
    for name in _IDX_FILES:
        for cand in (src_dir / name, src_dir / (name + ".gz")):
            if cand.is_file():
                found[name] = cand
                break
    if len(found) < len(_IDX_FILES):
        return False
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name, path in found.items():
        dest = raw_dir / name
        if dest.is_file() and dest.stat().st_size > 0:
            continue
        tmp = dest.with_suffix(".partial")
        try:
            if path.suffix == ".gz":
                with gzip.open(path, "rb") as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(fin, fout)
            else:
                shutil.copyfile(path, tmp)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            tmp.unlink(missing_ok=True)
            raise DataError(f"{path} is corrupt ({exc}); reinstall it (e.g. `apt-get install --reinstall "
                            "dataset-fashion-mnist`)") from None
        os.replace(tmp, dest)
    return True


@_register("fashion-mnist")
def _fashion_mnist(opt: SourceOptions):
    root = Path(opt.cache_dir)
    src = Path(os.environ.get("EQUIRAY_FASHION_MNIST_DIR", DEBIAN_FASHION_MNIST))
    staged = stage_idx_files(src, root / "FashionMNIST" / "raw")
    if not staged and not opt.download and not (root / "FashionMNIST" / "raw" / _IDX_FILES[0]).is_file():
        raise DataError(f"Fashion-MNIST not found in {src} (Debian: `apt-get install dataset-fashion-mnist`) "
                        f"nor under {root}; or allow downloading with --download")
    return _torchvision("FashionMNIST", root, download=opt.download and not staged)


@_register("mnist")
def _mnist(opt: SourceOptions):
    return _torchvision("MNIST", Path(opt.cache_dir), opt.download)


@_register("cifar10")
def _cifar10(opt: SourceOptions):
    return _torchvision("CIFAR10", Path(opt.cache_dir), opt.download)


@_register("digits")
def _digits(opt: SourceOptions):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (1797, 8, 8), values 0..16
    return {"train": (x, d.target.astype(np.int64))}, [str(c) for c in d.target_names]


# ------------------------------------------------------------------------------------------- image folders
_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _load_folder(path: Path, opt: SourceOptions):
    if not path.is_dir():
        raise DataError(f"image folder {str(path)!r} does not exist")
    split_dirs = {s: path / s for s in SPLITS if (path / s).is_dir()}
    if split_dirs and "train" not in split_dirs:
        raise DataError(f"{path} has {sorted(split_dirs)} but no train/ folder")
    roots = split_dirs or {"train": path}
    classes = sorted(d.name for d in roots["train"].iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{roots['train']} has no class sub-folders (expected {roots['train']}/CLASS/image.png)")
    size, channels = opt.size, opt.channels
    out = {}
    for split, root in roots.items():
        xs, ys = [], []
        for label, cls in enumerate(classes):
            cdir = root / cls
            files = sorted(p for p in cdir.iterdir() if p.suffix.lower() in _IMAGE_EXT) if cdir.is_dir() else []
            for f in files:
                img, size, channels = _read_image(f, size, channels)
                xs.append(img)
                ys.append(label)
        if not xs:
            raise DataError(f"no images found under {root} (extensions: {', '.join(sorted(_IMAGE_EXT))})")
        out[split] = (np.stack(xs), np.asarray(ys, dtype=np.int64))
    return out, classes


def _read_image(path: Path, size: int | None, channels: int | None):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if channels is None:
                channels = 1 if im.mode in ("L", "1", "I", "I;16", "F") else 3
            im = im.convert("L" if channels == 1 else "RGB")
            if size is None:
                if im.width != im.height:
                    raise DataError(f"{path} is {im.width}x{im.height}; pass --size N to resize images to NxN")
                size = im.width
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}. Remove or replace the file.") from None
    return (arr if arr.ndim == 3 else arr[..., None]), size, channels
