"""gRPC daemons of the serving plane (storage, prefill, decode, scheduler) and what they share with the
workload driver (the proto, KV byte models).

Importing this package sets gRPC's I/O engine for every process of the serving plane, before any module
imports grpc (gRPC reads ``GRPC_EXPERIMENTS`` once, when it is imported): the classic epoll poller instead
of the EventEngine client and listener. On this 2-core machine the EventEngine's thread pool hands every
completion from thread to thread (futex wake-ups, ~21% of the machine's CPU while serving); without it a
DualPath turn of the default scenario costs ~24% less CPU (`dpemu bench serve`: 56.8 -> 42.9 core-ms per
turn; docs/fidelity.md). A ``GRPC_EXPERIMENTS`` already in the environment is kept, so
``GRPC_EXPERIMENTS=event_engine_client,event_engine_listener`` measures the EventEngine again.
"""

import os

GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"

os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
