"""Generated gRPC/protobuf modules of the CRI subset in ``api.proto`` (``make proto``; do not edit)."""
