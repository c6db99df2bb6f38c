#!/bin/sh
# Regenerates the committed gRPC/protobuf Python code from every src/cargohold/**/proto/*.proto
# (make proto). Needs grpcio-tools (the dev extra). The generated modules are committed, so users and CI
# need only the grpcio and protobuf runtimes; keep pyproject's minimum versions at or above the generator's.
set -eu
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
files=$(find src/cargohold -path '*/proto/*.proto' | sort)
[ -n "$files" ] || { echo "no .proto files under src/cargohold" >&2; exit 1; }
# shellcheck disable=SC2086
"$python" -m grpc_tools.protoc -I src --python_out=src --grpc_python_out=src --pyi_out=src $files
echo "generated:" $files
