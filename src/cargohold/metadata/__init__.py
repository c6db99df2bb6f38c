"""SQLite (WAL) metadata: namespaces, images, content records and labels, snapshots, leases."""
