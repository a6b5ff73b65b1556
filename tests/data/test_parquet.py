import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from equiray.data import (SourceOptions, check_dataset, find_damaged_shard, load_source, prepare, read_meta,
                          read_split, split_files, write_parquet)
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


def damage(shard, *, where: str = "page", column: int = 0) -> None:
    """Flip 16 bytes of a column of ``shard`` (the first: a dataset's images), its footer left intact: ``page`` in
    the middle of the column's pages (only a checksum notices), ``header`` in its first page's header (any reader
    fails)."""
    chunk = pq.ParquetFile(shard).metadata.row_group(0).column(column)
    first = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    start = first + (chunk.total_compressed_size // 2 if where == "page" else 4)
    assert start + 16 < shard.stat().st_size - pq.ParquetFile(shard).metadata.serialized_size
    blob = bytearray(shard.read_bytes())
    blob[start:start + 16] = bytes(b ^ 0x5A for b in blob[start:start + 16])
    shard.write_bytes(bytes(blob))


def test_every_page_carries_a_checksum_that_catches_flipped_bytes(digits_dir):
    """A flipped page behind an intact footer: the footer and row checks pass it, every page read (the pipelines'
    check before they start, read_split, iter_batches) names the shard."""
    check_dataset(digits_dir, verify="full")  # an intact dataset passes
    find_damaged_shard(digits_dir)
    shard = sorted((digits_dir / "train").iterdir())[1]
    damage(shard)
    check_dataset(digits_dir, verify="footers")  # the footers are intact: only the pages tell
    assert split_files(digits_dir, "train")
    for read in (lambda: check_dataset(digits_dir, verify="full"), lambda: check_dataset(digits_dir),
                 lambda: find_damaged_shard(digits_dir, splits=["train"]), lambda: read_split(digits_dir, "train"),
                 lambda: list(iter_batches(digits_dir, "train", 64))):
        with pytest.raises(DataError, match=f"{shard} is not a readable Parquet shard.*--overwrite"):
            read()
    find_damaged_shard(digits_dir, splits=["val", "test"])  # the other splits are fine


def test_only_the_checksum_notices_flipped_pixels_that_still_decode(tmp_path):
    """Noise images do not compress: Snappy stores them as they are, so flipped bytes decode without an error, as
    other pixels. A reader that skips the checksums trains on them; equiray's reads refuse the shard."""
    from equiray.data import ImageDataset

    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (200, 28, 28, 1), dtype=np.uint8) for s in ("train", "val", "test")}
    ds = ImageDataset("noise", ["a", "b"], images, {s: rng.integers(0, 2, 200) for s in images},
                      {s: np.arange(200) for s in images})
    write_parquet(ds, tmp_path / "noise")
    shard = tmp_path / "noise" / "train" / "part-00000.parquet"
    damage(shard)
    unchecked = pq.read_table(shard).column("image").to_pylist()  # no error...
    assert unchecked != [row.tobytes() for row in images["train"].reshape(200, -1)]  # ...and other pixels
    for read in (lambda: check_dataset(tmp_path / "noise"), lambda: read_split(tmp_path / "noise", "train")):
        with pytest.raises(DataError, match=f"{shard} is not a readable Parquet shard.*CRC"):
            read()


def test_a_damaged_page_header_is_named_too(digits_dir):
    shard = sorted((digits_dir / "test").iterdir())[0]
    damage(shard, where="header")
    with pytest.raises(DataError, match=f"{shard} is not a readable Parquet shard"):
        check_dataset(digits_dir)


def test_auto_reads_every_page_only_of_a_dataset_up_to_the_limit(digits_dir, monkeypatch):
    from equiray.data import parquet

    damage(sorted((digits_dir / "train").iterdir())[0])
    monkeypatch.setattr(parquet, "FULL_CHECK_BYTES", 1000)  # the digits' shards hold more: footers only
    check_dataset(digits_dir)
    with pytest.raises(DataError, match="not a readable Parquet shard"):
        check_dataset(digits_dir, verify="full")
    with pytest.raises(DataError, match="data.verify: choose one of auto, full, footers, not 'pages'"):
        check_dataset(digits_dir, verify="pages")


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
