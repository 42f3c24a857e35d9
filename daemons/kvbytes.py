"""KV cache bytes: geometry of scaled blocks and their verifiable contents.

The real KV of a token is `kv_bytes_per_token` bytes spread over `layers`
layers; a Full Block holds all layers of `block_tokens` tokens. dpemu moves
only `byte_scale` of the real bytes, so a scaled block has
``block_bytes = round(block_tokens * kv_bytes_per_token * byte_scale)`` bytes
(at least 1 per layer), laid out layer-major: layer l of a block is the byte
range ``[floor(block_bytes * l / layers), floor(block_bytes * (l + 1) / layers))``.
Layer slices therefore stay contiguous and exact even when a layer's share is
a fraction of a byte per token.

Contents are derived, never stored anywhere but in the storage servers: block
b of trajectory t is ``SHAKE-128("t/b")`` truncated to `block_bytes`. Any
receiver recomputes the expected bytes of a span and compares: a corrupt,
misplaced or truncated transfer is detected, and counted in the run's ledger.
Pure functions, no I/O: daemons and tests import this freely.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass


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


class _ContentCache:
    """Recently derived blocks, bounded in bytes (least recently used out first).

    An agent's context is read again every turn, mostly by the same few nodes;
    deriving its blocks once per process instead of once per read keeps the
    CPU of verification per turn small. Correctness does not depend on it: a
    cached block is the same pure function of (trajectory, block, size)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._blocks: collections.OrderedDict[tuple[str, int, int], bytes] = collections.OrderedDict()

    def get(self, trajectory: str, block: int, nbytes: int) -> bytes:
        key = (trajectory, block, nbytes)
        data = self._blocks.get(key)
        if data is not None:
            self._blocks.move_to_end(key)
            return data
        data = hashlib.shake_128(f"{trajectory}/{block}".encode()).digest(nbytes)
        self._blocks[key] = data
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            _, old = self._blocks.popitem(last=False)
            self.bytes -= len(old)
        return data


_CONTENT = _ContentCache(max_bytes=128 << 20)


def block_content(geom: KvGeometry, trajectory: str, block: int) -> bytes:
    """The bytes of one Full Block (all layers)."""
    return _CONTENT.get(trajectory, block, geom.block_bytes)


def span_content(geom: KvGeometry, trajectory: str, first_block: int, blocks: int,
                 layer_first: int = 0, layers: int = 0) -> bytes:
    """The bytes of a span: for each block in order, its layer slice."""
    lo, hi = geom.layer_range(layer_first, layers)
    return b"".join(block_content(geom, trajectory, b)[lo:hi] for b in range(first_block, first_block + blocks))


def layer_slices(geom: KvGeometry, full: bytes, blocks: int, layer_first: int = 0, layers: int = 0) -> bytes:
    """From the bytes of `blocks` consecutive Full Blocks, the layer slice of each, in block order.

    This is how a node forwards a layer chunk of KV it holds (read from storage,
    or derived once per request) without deriving the contents again."""
    if len(full) != blocks * geom.block_bytes:
        raise ValueError(f"{len(full)} bytes are not {blocks} Full Blocks of {geom.block_bytes}")
    lo, hi = geom.layer_range(layer_first, layers)
    bb = geom.block_bytes
    if (lo, hi) == (0, bb):
        return bytes(full)
    mv = memoryview(full)
    return b"".join(mv[i * bb + lo:i * bb + hi] for i in range(blocks))


def verify_span(geom: KvGeometry, trajectory: str, first_block: int, blocks: int, layer_first: int,
                layers: int, data: bytes, expected: bytes | None = None) -> list[int]:
    """Blocks of the span whose bytes in `data` are wrong or missing (empty list = all good).

    `expected` is the span's correct bytes if the caller has them already
    (:class:`ExpectedSpans`); otherwise they are derived here."""
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


class ExpectedSpans:
    """The correct bytes of the spans a node receives for its live requests.

    A request's KV arrives in several layer chunks; the expected Full Blocks of a
    span are derived once per request and sliced per chunk, so verifying costs
    one derivation per block and request, not one per chunk. ``drop`` when the
    request leaves the node."""

    def __init__(self, geom: KvGeometry):
        self.geom = geom
        self._full: dict[str, dict[tuple[str, int, int], bytes]] = {}

    def __len__(self) -> int:
        return len(self._full)

    def layer_slice(self, request_id: str, trajectory: str, first_block: int, blocks: int,
                    layer_first: int = 0, layers: int = 0) -> bytes:
        spans = self._full.setdefault(request_id, {})
        key = (trajectory, first_block, blocks)
        full = spans.get(key)
        if full is None:
            full = spans[key] = span_content(self.geom, trajectory, first_block, blocks)
        return layer_slices(self.geom, full, blocks, layer_first, layers)

    def drop(self, request_id: str) -> None:
        self._full.pop(request_id, None)
