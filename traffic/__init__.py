"""Load generators that run inside the emulated hosts' namespaces."""

import daemons  # noqa: F401 - gRPC's I/O engine is chosen there, before any module here imports grpc
