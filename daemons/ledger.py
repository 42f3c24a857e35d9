"""The KV ledger: every block a run moved, counted by who sent it and by who checked it. One type, with its
conversions (the proto message daemons report, the dict summary.json holds).

Every receiver verifies every block against its derived contents (:mod:`daemons.kvbytes`): a node what it
reads from storage and what is pushed to it, a storage server what is written to it. So in a run where
nothing went missing every block moved is checked once:

    blocks_verified + blocks_corrupt == blocks_read + blocks_forwarded + blocks_written

``blocks_lost`` counts the blocks that should have arrived and did not: a read a storage server could not
serve, a write no replica took, a request's KV that was never pushed in full (the coverage check before
decode and before each prefill layer chunk). A clean run has corrupt == lost == 0. Counts are of block
pieces: a push of one layer chunk of 10 blocks counts 10, as its receiver verifies it; a write to two
replicas counts twice, as two servers verify it.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from daemons import dualpath_pb2 as pb

KEYS = ("blocks_read",       # received from storage by nodes (intact or not)
        "blocks_written",    # block copies storage servers took from writers
        "blocks_forwarded",  # pushed node -> node over the compute fabric
        "blocks_verified",   # checked intact by their receiver (node or storage server)
        "blocks_corrupt",    # failed that check
        "blocks_lost")       # should have arrived and did not
_BYTES = 8 * len(KEYS)


class Ledger:
    """Block counts of one daemon, or of a whole run summed. A daemon's own ledger lives in a file
    (:meth:`in_file`, a shared memory map): every count is in the file the moment it is made, so a daemon
    that is killed mid-run still accounts for every block it moved."""

    KEYS = KEYS
    __slots__ = ("_v", "_map")

    def __init__(self, blocks_read: int = 0, blocks_written: int = 0, blocks_forwarded: int = 0,
                 blocks_verified: int = 0, blocks_corrupt: int = 0, blocks_lost: int = 0):
        self._map = None
        self._v = memoryview(bytearray(_BYTES)).cast("q")
        for i, v in enumerate((blocks_read, blocks_written, blocks_forwarded, blocks_verified, blocks_corrupt,
                               blocks_lost)):
            self._v[i] = v

    @classmethod
    def in_file(cls, path: str | Path) -> "Ledger":
        """A zeroed ledger kept in `path` (created or truncated)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, _BYTES)
            m = mmap.mmap(fd, _BYTES)
        finally:
            os.close(fd)
        lg = cls.__new__(cls)
        lg._map, lg._v = m, memoryview(m).cast("q")
        return lg

    @classmethod
    def read_file(cls, path: str | Path) -> "Ledger":
        """The counts a daemon's ledger file holds (it may be dead)."""
        data = Path(path).read_bytes()
        if len(data) != _BYTES:
            raise ValueError(f"{path}: {len(data)} bytes, a ledger file holds {_BYTES}")
        return cls(*memoryview(data).cast("q"))

    def add(self, other: "Ledger") -> "Ledger":
        return Ledger(*(a + b for a, b in zip(self._v, other._v, strict=True)))

    @classmethod
    def total(cls, ledgers) -> "Ledger":
        out = cls()
        for lg in ledgers:
            out = out.add(lg)
        return out

    @property
    def clean(self) -> bool:
        return self.blocks_corrupt == 0 and self.blocks_lost == 0

    @property
    def unchecked(self) -> int:
        """Blocks moved that no receiver checked (0 when the ledger adds up)."""
        return self.blocks_read + self.blocks_forwarded + self.blocks_written - self.blocks_verified \
            - self.blocks_corrupt

    # -- conversions -----------------------------------------------------------------------------------
    def to_proto(self) -> pb.Ledger:
        return pb.Ledger(**self.as_dict())

    @classmethod
    def from_proto(cls, msg: pb.Ledger) -> "Ledger":
        return cls(*(getattr(msg, k) for k in KEYS))

    def as_dict(self) -> dict[str, int]:
        return dict(zip(KEYS, self._v, strict=True))

    @classmethod
    def from_dict(cls, data: dict) -> "Ledger":
        """A ledger as summary.json holds it (figures it does not name, such as ``unchecked``, are ignored)."""
        return cls(*(int(data.get(k, 0)) for k in KEYS))

    def __eq__(self, other) -> bool:
        return isinstance(other, Ledger) and list(self._v) == list(other._v)

    def __repr__(self) -> str:
        return "Ledger(" + ", ".join(f"{k}={v}" for k, v in self.as_dict().items()) + ")"


def _field(i: int) -> property:
    def get(self) -> int:
        return self._v[i]

    def put(self, value: int) -> None:
        self._v[i] = value

    return property(get, put)


for _i, _k in enumerate(KEYS):
    setattr(Ledger, _k, _field(_i))
