"""Generated protobuf/gRPC modules for containerd's snapshots API (``make proto``); do not edit the _pb2 files."""
