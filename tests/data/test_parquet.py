import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from equiray.data import SourceOptions, load_source, prepare, read_meta, read_split, split_files, write_parquet
from equiray.data.parquet import LEGACY_META_FILE, META_FILE, decode_images, iter_batches
from equiray.errors import DataError


@pytest.fixture
def digits_dir(tmp_path):
    out = tmp_path / "digits"
    prepare("digits", out, rows_per_shard=500)
    return out


def test_shards_are_readable_with_pyarrow_alone(digits_dir):
    meta = json.loads((digits_dir / META_FILE).read_text())
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
    stamp = (digits_dir / META_FILE).stat().st_mtime_ns
    prepare("digits", digits_dir)  # same source and options: nothing to do
    assert (digits_dir / META_FILE).stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="--overwrite"):
        prepare("digits", digits_dir, options=SourceOptions(val_fraction=0.3))
    meta = prepare("digits", digits_dir, options=SourceOptions(val_fraction=0.3), overwrite=True)
    assert meta["rows"]["val"] == round(0.3 * 1797)


def test_not_a_dataset_and_bad_split(tmp_path, digits_dir):
    with pytest.raises(DataError, match="equiray data prepare"):
        read_meta(tmp_path)
    with pytest.raises(DataError, match="unknown split"):
        split_files(digits_dir, "holdout")


def test_the_prepared_root_is_one_parquet_dataset_for_any_reader(digits_dir):
    """The metadata file starts with "_", which Parquet readers skip: pyarrow (as DuckDB, Spark and Ray Data do)
    reads the root as one dataset with every row of every split."""
    import pyarrow.dataset as pads

    meta = read_meta(digits_dir)
    table = pads.dataset(digits_dir, format="parquet").to_table(columns=["split", "label"])
    assert table.num_rows == sum(meta["rows"].values()) == 1797
    splits = table.column("split").to_pylist()
    assert {s: splits.count(s) for s in set(splits)} == meta["rows"]


def test_a_dataset_prepared_before_the_rename_still_reads(digits_dir):
    (digits_dir / META_FILE).rename(digits_dir / LEGACY_META_FILE)
    assert read_meta(digits_dir)["num_classes"] == 10
    assert read_split(digits_dir, "val")[0].shape[0] == read_meta(digits_dir)["rows"]["val"]


def test_folders_follow_the_users_umask(tmp_path):
    """Shared cluster storage: other users can read a prepared dataset when the umask lets them (mkdtemp alone
    would leave the root 0700)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        prepare("digits", tmp_path / "d", options=SourceOptions(max_per_split=50))
    finally:
        os.umask(old)
    for path in [tmp_path / "d", tmp_path / "d" / "train", tmp_path / "d" / META_FILE,
                 *sorted((tmp_path / "d" / "train").iterdir())]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044, (path, oct(mode))  # group and others may read
        assert mode & 0o022 == 0, (path, oct(mode))  # and not write


def test_a_truncated_shard_is_named(digits_dir):
    shard = sorted((digits_dir / "train").iterdir())[1]
    shard.write_bytes(shard.read_bytes()[:-100])  # the footer is gone, as after a copy cut short
    for read in (lambda: split_files(digits_dir, "train"), lambda: read_split(digits_dir, "train")):
        with pytest.raises(DataError, match=f"{shard}.*--overwrite"):
            read()
    assert read_split(digits_dir, "test")[0].shape[0] == 270  # the other splits are fine


def test_a_missing_shard_is_noticed(digits_dir):
    sorted((digits_dir / "train").iterdir())[2].unlink()
    with pytest.raises(DataError, match=r"1000 rows in 2 shards.*says 1347"):
        split_files(digits_dir, "train")


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
