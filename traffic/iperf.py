"""One iperf3 test end, run inside a namespace: ``python -m traffic.iperf``.

Uses the ``iperf3`` Python wrapper around libiperf. The server handles exactly
one test and exits; the client retries the connection for a bounded time (the
server may still be binding its socket) and prints iperf3's JSON result on
stdout, so the caller (``emulator.calibrate``) reads it from the pipe.

With ``--wait-go`` the client loads everything, prints ``ready`` and blocks
until a line arrives on stdin: the caller starts all flows of a round at the
same instant (a barrier), however long dozens of Python start-ups take.

    python -m traffic.iperf server --bind 10.10.3.1 --port 5201
    python -m traffic.iperf client --server 10.10.3.1 --port 5201 --bind 10.10.1.1 --duration 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _server(args) -> int:
    import iperf3

    srv = iperf3.Server()
    srv.bind_address = args.bind
    srv.port = args.port
    srv.json_output = True
    print("listening", flush=True)
    result = srv.run()
    print(json.dumps({"error": result.error} if result.error else result.json), flush=True)
    return 1 if result.error else 0


def _client(args) -> int:
    import iperf3

    if args.wait_go:
        print("ready", flush=True)
        if not sys.stdin.readline():
            return 1  # the caller went away: no test
    deadline = time.monotonic() + args.connect_timeout
    while True:
        cli = iperf3.Client()
        cli.server_hostname = args.server
        cli.port = args.port
        cli.bind_address = args.bind
        cli.duration = args.duration
        cli.protocol = "tcp"
        cli.json_output = True
        result = cli.run()
        del cli
        if not result.error:
            print(json.dumps(result.json), flush=True)
            return 0
        if "connect" not in result.error or time.monotonic() > deadline:
            print(json.dumps({"error": result.error}), flush=True)
            return 1
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m traffic.iperf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, required=True)
    c = sub.add_parser("client")
    c.add_argument("--server", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--bind", required=True)
    c.add_argument("--duration", type=int, required=True)
    c.add_argument("--connect-timeout", type=float, default=5.0)
    c.add_argument("--wait-go", action="store_true", help="print 'ready', start when a line arrives on stdin")
    args = parser.parse_args(argv)
    return _server(args) if args.role == "server" else _client(args)


if __name__ == "__main__":
    sys.exit(main())
