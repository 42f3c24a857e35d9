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
        (port,) = self.start(["-m", "daemons.storage", "--listen", "127.0.0.1:0", "--dir", str(root / f"st{index}"),
                              *GEOM_ARGS, "--preload", str(path), "--server-index", str(index),
                              "--servers", str(servers), *extra])
        return f"127.0.0.1:{port}"

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
