"""The unpacker: fetch + apply layers into a snapshotter, keyed by chainID, leaving every image complete."""
