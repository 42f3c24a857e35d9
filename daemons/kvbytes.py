"""KV cache bytes: geometry of scaled blocks and their verifiable contents.

The real KV of a token is `kv_bytes_per_token` bytes spread over `layers`
layers; a Full Block holds all layers of `block_tokens` tokens. dpemu moves
only `byte_scale` of the real bytes, so a scaled block has
``block_bytes = round(block_tokens * kv_bytes_per_token * byte_scale)`` bytes
(at least 1 per layer), laid out layer-major: layer l of a block is the byte
range ``[floor(block_bytes * l / layers), floor(block_bytes * (l + 1) / layers))``.
Layer slices therefore stay contiguous and exact even when a layer's share is
a fraction of a byte per token.

Contents are derived, never stored anywhere but in the storage servers. Every
process derives the same read-only content pool: ``POOL_BYTES`` of
``SHAKE-128("dpemu/kv-pool")``, seen as a ring. A trajectory starts at its own
origin in the ring (BLAKE2b of its name) and its blocks follow one another:
block b of trajectory t is the `block_bytes` of the ring at ``origin(t) + b x
block_bytes``. Any receiver derives the expected bytes of a span and compares:
a corrupt, truncated or misplaced transfer is detected and counted in the
run's ledger. The blocks of one trajectory are all different up to
POOL_BYTES / block_bytes blocks (~10,000 at the default scale; contexts have
~1,000); a block delivered to another trajectory passes only if the two
origins happen to lie exactly that many blocks apart (a chance of
block_bytes / POOL_BYTES per pair of trajectories, then only for that one
block).

A span is one slice of the ring and a layer slice one strided copy (numpy),
whatever its number of blocks: deriving and verifying cost no Python work per
block, and no cache (the ring is 2 x 16 MiB per process, derived in ~60 ms).
Pure functions, no I/O: daemons and tests import this freely.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KvGeometry:
    layers: int
    block_tokens: int
    block_bytes: int  # scaled bytes of one Full Block

    def __post_init__(self) -> None:
        if self.layers < 1 or self.block_tokens < 1:
            raise ValueError("layers and block_tokens must be >= 1")
        if self.block_bytes < self.layers:
            raise ValueError(f"block_bytes {self.block_bytes} < layers {self.layers}: every layer needs a byte; "
                             "raise scale.bytes")

    @classmethod
    def scaled(cls, layers: int, block_tokens: int, kv_bytes_per_token: float, byte_scale: float) -> "KvGeometry":
        return cls(layers, block_tokens, max(layers, round(block_tokens * kv_bytes_per_token * byte_scale)))

    def layer_range(self, layer_first: int, layers: int) -> tuple[int, int]:
        """Byte range inside a block of layers [layer_first, layer_first + layers); layers 0 = all."""
        if layers == 0:
            return 0, self.block_bytes
        last = layer_first + layers
        if layer_first < 0 or layers < 0 or last > self.layers:
            raise ValueError(f"layer slice [{layer_first}, {last}) outside 0..{self.layers}")
        return self.block_bytes * layer_first // self.layers, self.block_bytes * last // self.layers

    def span_bytes(self, blocks: int, layer_first: int = 0, layers: int = 0) -> int:
        lo, hi = self.layer_range(layer_first, layers)
        return blocks * (hi - lo)

    def blocks_for_tokens(self, tokens: int) -> int:
        """Full Blocks needed to hold `tokens` tokens (the last one may be partial)."""
        return -(-tokens // self.block_tokens)


POOL_BYTES = 1 << 24  # the content ring (16 MiB)


@functools.cache
def _pool() -> bytes:
    """The ring, twice over: every span of up to POOL_BYTES is then one slice, wherever it starts."""
    ring = hashlib.shake_128(b"dpemu/kv-pool").digest(POOL_BYTES)
    return ring + ring


@functools.lru_cache(maxsize=1 << 16)
def _origin(trajectory: str) -> int:
    return int.from_bytes(hashlib.blake2b(trajectory.encode(), digest_size=8).digest(), "little") % POOL_BYTES


def _ring(start: int, nbytes: int) -> bytes:
    """`nbytes` of the ring from `start` (any integer), wrapping as often as needed."""
    pool, start = _pool(), start % POOL_BYTES
    if nbytes <= POOL_BYTES:
        return pool[start:start + nbytes]
    parts = []  # after POOL_BYTES the ring is back at `start`: every piece starts there
    while nbytes > 0:
        take = min(nbytes, POOL_BYTES)
        parts.append(pool[start:start + take])
        nbytes -= take
    return b"".join(parts)


def block_content(geom: KvGeometry, trajectory: str, block: int) -> bytes:
    """The bytes of one Full Block (all layers)."""
    return _ring(_origin(trajectory) + block * geom.block_bytes, geom.block_bytes)


def span_content(geom: KvGeometry, trajectory: str, first_block: int, blocks: int,
                 layer_first: int = 0, layers: int = 0) -> bytes:
    """The bytes of a span: for each block in order, its layer slice."""
    full = _ring(_origin(trajectory) + first_block * geom.block_bytes, blocks * geom.block_bytes)
    return layer_slices(geom, full, blocks, layer_first, layers)


def layer_slices(geom: KvGeometry, full, blocks: int, layer_first: int = 0, layers: int = 0) -> bytes:
    """From the bytes of `blocks` consecutive Full Blocks, the layer slice of each, in block order.

    This is how a node forwards a layer chunk of KV it holds (read from storage,
    or derived once per request) without deriving the contents again."""
    if len(full) != blocks * geom.block_bytes:
        raise ValueError(f"{len(full)} bytes are not {blocks} Full Blocks of {geom.block_bytes}")
    lo, hi = geom.layer_range(layer_first, layers)
    if (lo, hi) == (0, geom.block_bytes) or blocks == 0:
        return bytes(full)
    return np.frombuffer(full, dtype=np.uint8).reshape(blocks, geom.block_bytes)[:, lo:hi].tobytes()


def verify_span(geom: KvGeometry, trajectory: str, first_block: int, blocks: int, layer_first: int,
                layers: int, data: bytes, expected: bytes | None = None) -> list[int]:
    """Blocks of the span whose bytes in `data` are wrong or missing (empty list = all good).

    `expected` is the span's correct bytes if the caller has them already; otherwise they are derived here
    (one slice of the ring and one strided copy)."""
    if expected is None:
        expected = span_content(geom, trajectory, first_block, blocks, layer_first, layers)
    if data == expected:
        return []
    lo, hi = geom.layer_range(layer_first, layers)
    width = hi - lo
    bad = [first_block + i for i in range(blocks)
           if data[i * width:(i + 1) * width] != expected[i * width:(i + 1) * width]]
    if not bad:  # every block matched, so the length did not: trailing garbage
        bad.append(first_block + blocks - 1)
    return bad
