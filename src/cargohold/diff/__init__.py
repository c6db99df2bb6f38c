"""Layer diffs: detect and (de)compress layer blobs, apply them to directories, describe resulting trees."""

from cargohold.diff.apply import ApplyResult, ProgressFn, apply_layer
from cargohold.diff.compression import (
    Compression,
    compress,
    compress_gzip,
    compress_zstd,
    decompress_stream,
    detect_compression,
    write_gzip,
    write_zstd,
)
from cargohold.diff.tree import TreeEntry, compare_trees, snapshot_tree

__all__ = [
    "ApplyResult",
    "Compression",
    "ProgressFn",
    "TreeEntry",
    "apply_layer",
    "compare_trees",
    "compress",
    "compress_gzip",
    "compress_zstd",
    "decompress_stream",
    "detect_compression",
    "snapshot_tree",
    "write_gzip",
    "write_zstd",
]
