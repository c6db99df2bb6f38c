"""The content store: blobs by digest (``store`` says what one is; ``local`` keeps files, ``namespaced``
adds namespaces and labels from the metadata DB)."""
