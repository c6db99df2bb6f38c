"""The operations on a ``Store``, one module each: ``pull``, ``unpack``, ``mount`` (mount, rootfs),
``archive`` (export, import), ``push``, ``copy``, ``runtime`` (what CRI needs), ``referrers``, ``images``
(records, names) and ``gc``. Each takes the ``Store``, the resolver where it talks to a registry, the event
sink and the executors it may use; ``cargohold.client.Client`` passes its own."""
