"""Developer tooling shipped with the package: a local registry, sample images, the demo and the benchmark."""
