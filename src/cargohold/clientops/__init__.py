"""Operations of the facade beyond the core, one module per concern, each a mixin on ``ClientBase``:
``archive`` (export, import), ``push`` (push to a registry), ``runtime`` (runtime handlers' snapshotters,
container rootfs). ``cargohold.client.Client`` combines them."""
