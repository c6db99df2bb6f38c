"""OCI data model: digests, descriptors, manifests, indexes, configs, media types, platforms, references."""
