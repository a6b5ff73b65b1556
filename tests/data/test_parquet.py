import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from equiray.data import SourceOptions, load_source, prepare, read_meta, read_split, split_files, write_parquet
from equiray.data.parquet import decode_images, iter_batches
from equiray.errors import DataError


@pytest.fixture
def digits_dir(tmp_path):
    out = tmp_path / "digits"
    prepare("digits", out, rows_per_shard=500)
    return out


def test_shards_are_readable_with_pyarrow_alone(digits_dir):
    meta = json.loads((digits_dir / "dataset.json").read_text())
    assert meta["shape"] == [8, 8, 1] and meta["num_classes"] == 10
    files = split_files(digits_dir, "train")
    assert len(files) == 3  # 1347 rows at 500 per shard
    table = pq.read_table(files)
    assert table.num_rows == meta["rows"]["train"]
    assert table.schema.names == ["image", "label", "split", "index", "height", "width", "channels"]
    assert set(table.column("split").to_pylist()) == {"train"}
    first = np.frombuffer(table.column("image")[0].as_py(), dtype=np.uint8).reshape(8, 8, 1)
    ds = load_source("digits")
    np.testing.assert_array_equal(first, ds.images["train"][0])


def test_read_split_and_streaming_agree(digits_dir):
    x, y = read_split(digits_dir, "test")
    assert x.shape == (270, 1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    xs, ys = zip(*iter_batches(digits_dir, "test", batch_size=64))
    assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)
    xl, yl = read_split(digits_dir, "test", limit=10)
    assert torch.equal(xl, x[:10]) and torch.equal(yl, y[:10])


def test_prepare_twice_skips_and_refuses_to_clobber(digits_dir):
    stamp = (digits_dir / "dataset.json").stat().st_mtime_ns
    prepare("digits", digits_dir)  # same source and options: nothing to do
    assert (digits_dir / "dataset.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="--overwrite"):
        prepare("digits", digits_dir, options=SourceOptions(val_fraction=0.3))
    meta = prepare("digits", digits_dir, options=SourceOptions(val_fraction=0.3), overwrite=True)
    assert meta["rows"]["val"] == round(0.3 * 1797)


def test_not_a_dataset_and_bad_split(tmp_path, digits_dir):
    with pytest.raises(DataError, match="equiray data prepare"):
        read_meta(tmp_path)
    with pytest.raises(DataError, match="unknown split"):
        split_files(digits_dir, "holdout")


def test_write_failure_leaves_no_partial_directory(tmp_path):
    ds = load_source("digits")
    ds.images["test"] = ds.images["test"][:, :4]  # a broken dataset: reshape fails halfway through writing
    ds.images["test"] = "not an array"
    with pytest.raises(Exception):
        write_parquet(ds, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_decode_checks_sizes():
    with pytest.raises(DataError, match="do not match"):
        decode_images([b"\x00" * 10], 4, 4, 1)


def test_resize_averages_down_and_leaves_the_same_size_alone():
    import torch

    from equiray.data import resize

    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert resize(x, None) is x and resize(x, 4) is x
    down = resize(x, 2)
    assert down.shape == (1, 1, 2, 2) and down[0, 0, 0, 0] == (0 + 1 + 4 + 5) / 4
    assert resize(x, 8).shape == (1, 1, 8, 8)
