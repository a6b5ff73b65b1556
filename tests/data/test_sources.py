"""The real loaders, on the real Fashion-MNIST files where installed and on small files the tests write."""
import gzip
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from equiray.data import SourceOptions, load_source, prepare
from equiray.data.sources import DEBIAN_FASHION_MNIST
from equiray.errors import DataError

HAS_FMNIST = (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file()


def write_idx(folder, prefix, images, labels, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    img = struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes()
    lab = struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes()
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(folder / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(img)
    with opener(folder / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(lab)


@pytest.fixture
def tiny_idx(tmp_path):
    rng = np.random.default_rng(0)
    data = {}
    for prefix, n in (("train", 50), ("t10k", 20)):
        x = rng.integers(0, 256, (n, 6, 6), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        data[prefix] = (x, y)
    return data


def test_digits_splits_are_disjoint_and_complete():
    ds = load_source("digits", SourceOptions(val_fraction=0.1, test_fraction=0.2))
    counts = ds.counts()
    assert sum(counts.values()) == 1797 and counts["test"] == round(0.2 * 1797)
    all_idx = np.concatenate([ds.indices[s] for s in ("train", "val", "test")])
    assert len(np.unique(all_idx)) == 1797
    assert ds.shape == (8, 8, 1) and ds.images["train"].dtype == np.uint8 and ds.images["train"].max() == 255


def test_mnist_loader_reads_idx_files(tmp_path, tiny_idx):
    write_idx(tmp_path / "MNIST" / "raw", "train", *tiny_idx["train"])
    write_idx(tmp_path / "MNIST" / "raw", "t10k", *tiny_idx["t10k"])
    ds = load_source("mnist", SourceOptions(cache_dir=tmp_path, val_fraction=0.2))
    assert ds.counts() == {"train": 40, "val": 10, "test": 20}
    np.testing.assert_array_equal(ds.images["test"][..., 0], tiny_idx["t10k"][0])
    np.testing.assert_array_equal(ds.labels["test"], tiny_idx["t10k"][1])
    # rows of train and val are the source's own train rows, by index
    np.testing.assert_array_equal(ds.images["val"][..., 0], tiny_idx["train"][0][ds.indices["val"]])


def test_fashion_mnist_stages_gz_files_from_a_source_dir(tmp_path, tiny_idx, monkeypatch):
    src = tmp_path / "debian"
    write_idx(src, "train", *tiny_idx["train"], gz=True)
    write_idx(src, "t10k", *tiny_idx["t10k"], gz=True)
    monkeypatch.setenv("EQUIRAY_FASHION_MNIST_DIR", str(src))
    ds = load_source("fashion-mnist", SourceOptions(cache_dir=tmp_path / "cache"))
    assert ds.counts()["test"] == 20 and ds.classes[0] == "T-shirt/top"


def test_corrupt_fashion_mnist_gives_a_clear_error_and_no_output(tmp_path, tiny_idx, monkeypatch):
    src = tmp_path / "debian"
    write_idx(src, "train", *tiny_idx["train"], gz=True)
    write_idx(src, "t10k", *tiny_idx["t10k"], gz=True)
    blob = (src / "train-images-idx3-ubyte.gz").read_bytes()
    (src / "train-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])  # truncated download
    monkeypatch.setenv("EQUIRAY_FASHION_MNIST_DIR", str(src))
    out = tmp_path / "out"
    with pytest.raises(DataError, match="corrupt"):
        prepare("fashion-mnist", out, options=SourceOptions(cache_dir=tmp_path / "cache"))
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EQUIRAY_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_source("fashion-mnist", SourceOptions(cache_dir=tmp_path / "cache"))


def test_cifar10_loader_reads_python_batches(tmp_path, monkeypatch):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, 4).tolist()}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    # torchvision checks the md5 of the real release files; these are small stand-ins written above
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    ds = load_source("cifar10", SourceOptions(cache_dir=tmp_path, val_fraction=0.25))
    assert ds.shape == (32, 32, 3) and ds.counts() == {"train": 15, "val": 5, "test": 4}
    assert ds.classes == [f"c{i}" for i in range(10)]


def make_folder(root, classes=("cat", "dog"), per_class=3, size=(10, 10), mode="L"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(root / c / f"{i}.png")


def test_folder_source_with_and_without_split_folders(tmp_path):
    make_folder(tmp_path / "flat", per_class=10)
    ds = load_source(f"folder:{tmp_path / 'flat'}", SourceOptions(val_fraction=0.2, test_fraction=0.2))
    assert ds.classes == ["cat", "dog"] and ds.counts() == {"train": 12, "val": 4, "test": 4}
    make_folder(tmp_path / "split" / "train", per_class=5, mode="RGB")
    make_folder(tmp_path / "split" / "test", per_class=2, mode="RGB")
    ds = load_source(f"folder:{tmp_path / 'split'}", SourceOptions(val_fraction=0.2, size=8))
    assert ds.shape == (8, 8, 3) and ds.counts() == {"train": 8, "val": 2, "test": 4}


def test_folder_errors_are_clear_and_leave_nothing(tmp_path):
    make_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="broken.png"):
        prepare(f"folder:{tmp_path / 'imgs'}", out)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    with pytest.raises(DataError, match="does not exist"):
        load_source(f"folder:{tmp_path / 'missing'}")
    make_folder(tmp_path / "wide", size=(12, 8))
    with pytest.raises(DataError, match="--size"):
        load_source(f"folder:{tmp_path / 'wide'}")
    with pytest.raises(DataError, match="unknown data source"):
        load_source("imagenet-22k")


@pytest.mark.skipif(not HAS_FMNIST, reason="Debian's dataset-fashion-mnist is not installed (make installs it)")
def test_real_fashion_mnist(tmp_path):
    ds = load_source("fashion-mnist", SourceOptions(cache_dir=tmp_path))
    assert ds.counts() == {"train": 54000, "val": 6000, "test": 10000}
    assert ds.shape == (28, 28, 1) and len(ds.classes) == 10
    assert np.bincount(ds.labels["test"]).tolist() == [1000] * 10
