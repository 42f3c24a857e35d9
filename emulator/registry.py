"""What a run owns: the machine-wide lock and the manifest of created objects.

Only one dpemu run may hold the machine at a time (namespaces, bridges and CPU
are shared). The run takes an exclusive ``flock`` on ``/run/dpemu/lock`` and,
BEFORE creating anything, writes ``/run/dpemu/manifest.json`` listing every
kernel object it is about to create and, as they start, every process (pid and
start time, so a recycled pid is never mistaken for ours). ``dpemu clean`` uses
the manifest after a run was killed with SIGKILL; a run that ends normally or by
an exception removes its objects itself and then the manifest.

``/run`` is a tmpfs: after a reboot there is nothing left to clean anyway.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import BusyError

STATE_DIR = Path(os.environ.get("DPEMU_STATE_DIR", "/run/dpemu"))


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), None if gone."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields else None


@dataclass
class Manifest:
    run_id: str
    owner_pid: int
    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # root-namespace interfaces and bridges
    procs: list[tuple[int, int]] = field(default_factory=list)  # (pid, start time)
    servers: list[dict] = field(default_factory=list)  # the other servers of the run (emulator.servers.ServerSpec)

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        data = json.loads(path.read_text())
        data["procs"] = [tuple(p) for p in data.get("procs", [])]
        return cls(**data)


class Registry:
    """The lock plus the manifest of the current run. Use as a context manager."""

    def __init__(self, state_dir: Path = STATE_DIR):
        self.dir = state_dir
        self.lock_path = state_dir / "lock"
        self.manifest_path = state_dir / "manifest.json"
        self._lock_fd: int | None = None
        self.manifest: Manifest | None = None

    def acquire(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BusyError(f"another dpemu run (pid {holder}) holds the machine; wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Registry":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def leftover(self) -> Manifest | None:
        """The manifest a killed run left behind, if any (call with the lock held)."""
        if self.manifest_path.exists():
            return Manifest.load(self.manifest_path)
        return None

    def begin(self, run_id: str, netns: list[str], links: list[str], servers: list[dict] | None = None) -> Manifest:
        self.manifest = Manifest(run_id, os.getpid(), list(netns), list(links), servers=list(servers or []))
        self._write()
        return self.manifest

    def add_proc(self, pid: int) -> None:
        start = proc_start_time(pid)
        if self.manifest is not None and start is not None:
            self.manifest.procs.append((pid, start))
            self._write()

    def end(self) -> None:
        self.manifest = None
        self.manifest_path.unlink(missing_ok=True)

    def _write(self) -> None:
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.manifest), indent=1))
        tmp.replace(self.manifest_path)
