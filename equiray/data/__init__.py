"""Data: sources -> Parquet shards -> tensors, plus deterministic evaluation views."""
from equiray.data.parquet import (META_FILE, VERIFY_MODES, check_dataset, decode_batch, decode_images,
                                  find_damaged_shard, iter_batches, prepare, read_meta, read_split, resize,
                                  split_files, split_summary, write_parquet)
from equiray.data.sources import SPLITS, ImageDataset, SourceOptions, list_sources, load_source
from equiray.data.views import (CORRUPTIONS, RANDOM_ROTATIONS, angle_views, apply_view, corruption_views, group_views,
                                parse_view, random_angles)

__all__ = [
    "META_FILE", "SPLITS", "VERIFY_MODES", "CORRUPTIONS", "RANDOM_ROTATIONS", "ImageDataset", "SourceOptions",
    "angle_views", "apply_view", "check_dataset", "corruption_views", "find_damaged_shard", "random_angles",
    "decode_batch", "decode_images", "group_views", "iter_batches", "list_sources", "load_source", "parse_view",
    "prepare", "read_meta", "read_split", "resize", "split_files", "split_summary", "write_parquet",
]
