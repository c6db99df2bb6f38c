"""cargohold: containerd's image pipeline, rebuilt in Python.

Pull images from OCI/Docker registries into a content-addressed store, unpack their layers into
snapshotters, export and import archives, and serve a CRI image service.
"""

__version__ = "0.1.0"
