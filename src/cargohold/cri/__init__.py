"""A CRI image service: Kubernetes' ``runtime.v1.ImageService`` (and ``RuntimeService.Version``) over gRPC on a
unix socket, on a cargohold data root (namespace ``k8s.io`` by default), so kubelet and crictl can pull, list,
inspect and remove images and read image filesystem usage.

``proto/api.proto`` is a subset of k8s.io/cri-api's ``pkg/apis/runtime/v1/api.proto`` with the upstream message
names and field numbers. Its Python modules (``api_pb2.py``, ``api_pb2_grpc.py``, ``api_pb2.pyi``) are generated
by ``make proto`` (``scripts/gen-proto.sh``, grpcio-tools) and committed: installing or testing cargohold needs
only the grpcio and protobuf runtimes, at versions no older than the generator's (pyproject pins them). Edit the
``.proto``, run ``make proto``, commit both.

Modules: ``server`` (the gRPC services and the socket server), ``images`` (cargohold images and usage as CRI
messages, CRI credentials), ``errors`` (cargohold error kinds to gRPC status codes, one table).
"""
