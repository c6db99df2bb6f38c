"""Caps on the work one image may ask for, so a hostile or broken registry cannot make cargohold recurse, download
or parse without end. Each error names its cap. The values follow what registries and runtimes accept in practice:

- manifests and indexes: at most 4 MiB (containerd's and distribution's manifest limit);
- image configs: at most 8 MiB (containerd allows 8 MiB for any non-layer blob it reads into memory);
- layers in a manifest: at most 1,000 (docker refuses to run more than 127 with overlayfs; 1,000 leaves room
  for other snapshotters and artifacts without inviting absurd counts);
- manifests in an index: at most 10,000;
- index nesting (an index listing an index, ...): at most 16 levels.
"""

from __future__ import annotations

from cargohold.errors import InvalidArgumentError

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
MAX_CONFIG_SIZE = 8 * 1024 * 1024
MAX_LAYERS = 1000
MAX_INDEX_MANIFESTS = 10_000
MAX_INDEX_DEPTH = 16


def check_index_depth(level: int, digest: object) -> None:
    """Refuse index ``digest`` found at nesting ``level`` (the target index is level 1) beyond the cap."""
    if level > MAX_INDEX_DEPTH:
        raise InvalidArgumentError(
            f"index {digest}: indexes nested more than {MAX_INDEX_DEPTH} deep (the limit of index nesting)"
        )
