"""Start dpemu daemons as real processes on 127.0.0.1 for unit tests (no root, no namespaces)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

LAYERS, BLOCK_TOKENS, BLOCK_BYTES = 61, 64, 256
GEOM_ARGS = ["--layers", str(LAYERS), "--block-tokens", str(BLOCK_TOKENS), "--block-bytes", str(BLOCK_BYTES)]


class Procs:
    """Processes a test started; `stop()` ends every one of them."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.mgmt: dict[str, str] = {}  # a storage server's data address -> its management address (Stats)

    def start(self, argv: list[str]) -> list[int]:
        """Start `python -m ...argv`; wait for its 'ready PORT...' line; return the ports."""
        proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        line = proc.stdout.readline().split()
        if not line or line[0] != "ready":
            proc.kill()
            raise AssertionError(f"{argv[1]} did not start: {proc.stderr.read()}")
        return [int(p) for p in line[1:]]

    def storage(self, root: Path, preload: list[dict], index: int = 0, servers: int = 1,
                extra: tuple[str, ...] = ()) -> str:
        """Storage server `index` of `servers`, with `preload` written at start; returns ADDR:PORT."""
        path = root / "preload.json"
        path.write_text(json.dumps(preload))
        mgmt, port = self.start(["-m", "daemons.storage", "--listen", "127.0.0.1:0", "--mgmt", "127.0.0.1:0",
                                 "--dir", str(root / f"st{index}"), *GEOM_ARGS, "--preload", str(path),
                                 "--server-index", str(index), "--servers", str(servers), *extra])
        self.mgmt[f"127.0.0.1:{port}"] = f"127.0.0.1:{mgmt}"
        return f"127.0.0.1:{port}"

    def storage_stub(self, addr: str):
        """A storage server's calls where it serves them: Read and Write on its data address, Stats on its
        management address."""
        import grpc

        from daemons import dualpath_pb2_grpc as pb_grpc
        data = pb_grpc.StorageStub(grpc.insecure_channel(addr))
        mgmt = pb_grpc.StorageStub(grpc.insecure_channel(self.mgmt[addr]))
        return type("StorageCalls", (), {"Read": staticmethod(data.Read), "Write": staticmethod(data.Write),
                                         "Stats": staticmethod(mgmt.Stats), "data": data, "mgmt": mgmt})()

    def storage_stats(self, addr: str):
        """A storage server's Stats, asked on its management address (its data address refuses it)."""
        import grpc

        from daemons import dualpath_pb2 as pb
        from daemons import dualpath_pb2_grpc as pb_grpc
        with grpc.insecure_channel(self.mgmt[addr]) as ch:
            return pb_grpc.StorageStub(ch).Stats(pb.StatsRequest(), timeout=10)

    def node(self, name: str, role: str, storage: str, engines: int = 2, time_scale: float = 0.01,
             buffer_bytes: int = 1 << 20, extra: tuple[str, ...] = ()) -> dict:
        ports = self.start(["-m", "daemons.node", "--name", name, "--role", role, "--mgmt", "127.0.0.1:0",
                            "--cnic", ",".join(["127.0.0.1:0"] * engines), "--storage", storage,
                            "--model", "ds660b", *GEOM_ARGS, "--dram-buffer-bytes", str(buffer_bytes),
                            "--time-scale", str(time_scale), *extra])
        return {"name": name, "role": role, "mgmt": f"127.0.0.1:{ports[0]}",
                "cnics": [f"127.0.0.1:{p}" for p in ports[1:]]}

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(timeout=10)
            proc.stdout.close()
            proc.stderr.close()
