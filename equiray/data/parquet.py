"""Parquet shards of image datasets, readable with pyarrow alone.

Layout of a prepared dataset directory::

    DIR/_dataset.json            source, classes, image shape (H, W, C), rows per split, schema version
    DIR/train/part-00000.parquet columns: image (binary, raw uint8 H*W*C bytes, row-major HWC), label (int64),
    DIR/val/part-00000.parquet            split (string), index (int64, the row's index in the source's split),
    DIR/test/part-00000.parquet           height, width, channels (int16)

The metadata file's leading underscore makes Parquet readers skip it: pyarrow, Ray Data, DuckDB and Spark read
the root as one dataset (every split; the ``split`` column tells them apart). A directory is written to a
temporary sibling and renamed into place at the end, so a failure never leaves a half-written dataset behind; its
folders and files get the user's umask (readable to others on shared storage when the umask says so).

Every page carries a CRC checksum, verified whenever equiray reads pages with pyarrow. Every read checks each shard's
footer and the rows per split; :func:`check_dataset` (what a pipeline runs before it starts) also reads every page of
a dataset of up to ``FULL_CHECK_BYTES`` on disk. A truncated, corrupt or missing shard is named, and a damaged page is
caught instead of being trained on (without a checksum, flipped image bytes read back as other pixels, silently).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch

from equiray.data.sources import SPLITS, ImageDataset, SourceOptions, load_source
from equiray.errors import DataError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
META_FILE = "_dataset.json"
LEGACY_META_FILE = "dataset.json"  # the name before the Parquet readers' convention was followed; still read
VERIFY_MODES = ("auto", "full", "footers")
FULL_CHECK_BYTES = 1 << 30  # verify="auto" reads every page of a dataset up to this size before a pipeline starts


def shard_error(path, exc: BaseException, *, fix: str = "prepare the dataset again with --overwrite") -> DataError:
    """The one line for a Parquet file pyarrow could not read: the file, pyarrow's first line, what to do."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DataError(f"{path} is not a readable Parquet shard ({reason}); {fix}")


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("image", pa.binary()),
        ("label", pa.int64()),
        ("split", pa.string()),
        ("index", pa.int64()),
        ("height", pa.int16()),
        ("width", pa.int16()),
        ("channels", pa.int16()),
    ], metadata={b"equiray.schema_version": str(SCHEMA_VERSION).encode(),
                 b"equiray.image_encoding": b"raw uint8, row-major (height, width, channels)"})


def write_parquet(ds: ImageDataset, out_dir: str | os.PathLike, *, rows_per_shard: int = 10_000,
                  overwrite: bool = False, extra_meta: Mapping | None = None) -> dict:
    """Write ``ds`` as Parquet shards under ``out_dir`` atomically; returns the metadata written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # not tempfile.mkdtemp: that makes the folder 0700, unreadable to others on shared storage; mkdir applies the
    # user's umask
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(0o777)
    try:
        h, w, c = ds.shape
        schema = _schema()
        for split in SPLITS:
            x, y, idx = ds.images[split], ds.labels[split], ds.indices[split]
            (tmp / split).mkdir()
            for shard, start in enumerate(range(0, max(len(y), 1), rows_per_shard)):
                stop = min(start + rows_per_shard, len(y))
                n = stop - start
                flat = x[start:stop].reshape(n, -1)  # (n, H*W*C)
                table = pa.table({
                    "image": pa.array([row.tobytes() for row in flat], type=pa.binary()),
                    "label": pa.array(y[start:stop], type=pa.int64()),
                    "split": pa.array([split] * n, type=pa.string()),
                    "index": pa.array(idx[start:stop], type=pa.int64()),
                    "height": pa.array(np.full(n, h), type=pa.int16()),
                    "width": pa.array(np.full(n, w), type=pa.int16()),
                    "channels": pa.array(np.full(n, c), type=pa.int16()),
                }, schema=schema)
                pq.write_table(table, tmp / split / f"part-{shard:05d}.parquet", write_page_checksum=True)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "source": ds.source,
            "classes": list(ds.classes),
            "num_classes": len(ds.classes),
            "shape": [h, w, c],
            "rows": ds.counts(),
            **(dict(extra_meta) if extra_meta else {}),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s rows to %s", sum(meta["rows"].values()), out)
    return meta


def prepare(source: str, out_dir: str | os.PathLike, *, options: SourceOptions = SourceOptions(),
            overwrite: bool = False, rows_per_shard: int = 10_000) -> dict:
    """Load ``source`` and write it under ``out_dir``. If ``out_dir`` already holds the same source prepared
    with the same options, nothing is done (returns its metadata)."""
    out = Path(out_dir)
    options_meta = {"val_fraction": options.val_fraction, "test_fraction": options.test_fraction,
                    "seed": options.seed, "size": options.size, "channels": options.channels,
                    "max_per_split": options.max_per_split}
    if out.exists() and not overwrite:
        try:
            meta = read_meta(out)
        except DataError:
            meta = None
        if meta and meta.get("source") == source and meta.get("options") == options_meta:
            log.debug("%s already prepared in %s; skipping", source, out)
            return meta
        raise DataError(f"{out} already exists and holds something else; pass --overwrite to replace it")
    ds = load_source(source, options)
    return write_parquet(ds, out, rows_per_shard=rows_per_shard, overwrite=overwrite,
                         extra_meta={"options": options_meta})


def read_meta(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / META_FILE
    if not path.is_file() and (Path(data_dir) / LEGACY_META_FILE).is_file():
        path = Path(data_dir) / LEGACY_META_FILE
    if not path.is_file():
        raise DataError(f"{data_dir} is not a prepared dataset (no {META_FILE}); run "
                        f"`equiray data prepare SOURCE --out {data_dir}` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is corrupt ({exc}); prepare the dataset again with --overwrite") from None


def split_files(data_dir: str | os.PathLike, split: str) -> list[str]:
    """The Parquet files of one split (sorted), for ``ray.data.read_parquet`` or pyarrow. Each file's footer is
    read (a few kB) and the rows are counted against the metadata, so a truncated or missing shard is named here,
    before Ray Data or a training loop meets it."""
    return _checked_files(data_dir, split)[0]


def _checked_files(data_dir, split: str) -> tuple[list[str], int]:
    import pyarrow.parquet as pq

    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    meta = read_meta(data_dir)
    files = sorted(str(p) for p in (Path(data_dir) / split).glob("*.parquet"))
    if not files:
        raise DataError(f"{data_dir}/{split} holds no Parquet files; prepare the dataset again with --overwrite")
    rows = 0
    for f in files:
        try:
            rows += pq.read_metadata(f).num_rows
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a broken file
            raise shard_error(f, exc) from None
    expected = meta.get("rows", {}).get(split)
    if expected is not None and rows != expected:
        raise DataError(f"{data_dir}/{split} holds {rows} rows in {len(files)} shards, its metadata says "
                        f"{expected}: a shard is missing or extra; prepare the dataset again with --overwrite")
    return files, rows


def check_dataset(data_dir: str | os.PathLike, *, verify: str = "auto", splits=SPLITS) -> None:
    """Check a prepared dataset before work starts, so a damaged shard is named in one line instead of failing a
    training worker (or, with no error at all, being trained on). ``verify``: ``footers`` checks every shard's
    footer and the rows per split against the metadata (a few kB per shard); ``full`` also reads every page and
    compares its checksum; ``auto`` is ``full`` for a dataset of up to ``FULL_CHECK_BYTES`` on disk (Fashion-MNIST:
    ~35 MB, a fraction of a second), ``footers`` above (a dataset that large is checked as it is read)."""
    if verify not in VERIFY_MODES:
        raise DataError(f"data.verify: choose one of {', '.join(VERIFY_MODES)}, not {verify!r}")
    files = [f for split in splits for f in _checked_files(data_dir, split)[0]]
    if verify == "full" or (verify == "auto" and sum(os.path.getsize(f) for f in files) <= FULL_CHECK_BYTES):
        for f in files:
            _read_pages(f)


def find_damaged_shard(data_dir: str | os.PathLike, splits=SPLITS) -> None:
    """Read every page of ``splits`` and raise the :class:`DataError` naming the first shard that cannot be read
    (nothing when every shard reads): what a pipeline does when a read failed elsewhere (in a Ray Data task)."""
    check_dataset(data_dir, verify="full", splits=splits)


def _read_pages(path: str) -> None:
    import pyarrow.parquet as pq

    try:
        for _ in pq.ParquetFile(path, page_checksum_verification=True).iter_batches(batch_size=4096):
            pass
    except Exception as exc:  # noqa: BLE001 - a corrupt page behind a readable footer
        raise shard_error(path, exc) from None


def split_summary(data_dir: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """``{split: (rows, shards)}`` after checking every shard of every split (what ``equiray data info`` shows)."""
    out = {}
    for split in SPLITS:
        files, rows = _checked_files(data_dir, split)
        out[split] = (rows, len(files))
    return out


def decode_images(images, height: int, width: int, channels: int) -> torch.Tensor:
    """Raw image bytes (a sequence of ``bytes`` or a numpy object array) -> float ``(B, C, H, W)`` in [0, 1]."""
    buf = np.frombuffer(b"".join(images), dtype=np.uint8)
    expected = len(images) * height * width * channels
    if buf.size != expected:
        raise DataError(f"image bytes do not match the shape ({height}, {width}, {channels}): got {buf.size} "
                        f"bytes for {len(images)} images")
    x = torch.from_numpy(buf.reshape(len(images), height, width, channels).copy())  # (B, H, W, C) uint8
    return x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, C, H, W)


def decode_batch(batch: Mapping[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """A numpy batch as Ray Data's ``iter_batches`` yields it -> ``(images (B, C, H, W) float, labels (B,))``."""
    if len(batch["label"]) == 0:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    h, w, c = int(batch["height"][0]), int(batch["width"][0]), int(batch["channels"][0])
    x = decode_images(list(batch["image"]), h, w, c)
    return x, torch.tensor(np.asarray(batch["label"]), dtype=torch.long)


def resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C, size, size)``: area averaging down, bilinear up (a no-op for ``None`` or the
    same size). What ``data.resize`` in a pipeline config does after reading."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="area" if size < x.shape[-1] else "bilinear")


def read_split(data_dir: str | os.PathLike, split: str, *, limit: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split in memory via pyarrow: ``(images (N, C, H, W) float in [0, 1], labels (N,))``."""
    import pyarrow.parquet as pq

    xs, ys = [], []
    n = 0
    for f in split_files(data_dir, split):
        try:
            table = pq.read_table(f, page_checksum_verification=True)
        except Exception as exc:  # noqa: BLE001 - a corrupt page behind a readable footer
            raise shard_error(f, exc) from None
        batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        x, y = decode_batch(batch)
        xs.append(x)
        ys.append(y)
        n += len(y)
        if limit is not None and n >= limit:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    return (x[:limit], y[:limit]) if limit is not None else (x, y)


def iter_batches(data_dir: str | os.PathLike, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stream a split in order with pyarrow (no Ray), for evaluation loops."""
    import pyarrow.parquet as pq

    for f in split_files(data_dir, split):
        batches = pq.ParquetFile(f, page_checksum_verification=True).iter_batches(batch_size=batch_size)
        while True:
            try:
                rb = next(batches)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - a corrupt page behind a readable footer
                raise shard_error(f, exc) from None
            yield decode_batch({name: rb.column(name).to_numpy(zero_copy_only=False) for name in rb.schema.names})
