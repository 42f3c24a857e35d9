"""What every dpemu daemon does the same way: channel options, listening, 'ready', stopping.

A daemon listens on its addresses, prints ``ready PORT...`` once it serves (the
runner and the tests wait for that line instead of sleeping), and stops on
SIGTERM or SIGINT with a short grace period.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Awaitable, Callable

import grpc

MAX_MESSAGE_BYTES = 64 << 20


def grpc_options(dscp: int | None = None) -> list[tuple[str, int]]:
    """Channel/server options; `dscp` marks the packets (KV vs collective traffic classes)."""
    opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    return opts + ([("grpc.dscp", dscp)] if dscp is not None else [])


async def serve_until_stopped(server: grpc.aio.Server, addresses: list[str],
                              on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
    """Listen on `addresses`, print 'ready PORT...', run until SIGTERM/SIGINT, then stop."""
    ports = [server.add_insecure_port(a) for a in addresses]
    if 0 in ports:
        raise SystemExit(f"cannot listen on one of {addresses}")
    await server.start()
    print("ready " + " ".join(map(str, ports)), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)
    if on_stop is not None:
        await on_stop()
