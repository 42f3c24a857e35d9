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


def block_content(geom: KvGeometry, trajectory: str, block: int) -> bytes:
    """The bytes of one Full Block (all layers)."""
    return hashlib.shake_128(f"{trajectory}/{block}".encode()).digest(geom.block_bytes)


def span_content(geom: KvGeometry, trajectory: str, first_block: int, blocks: int,
                 layer_first: int = 0, layers: int = 0) -> bytes:
    """The bytes of a span: for each block in order, its layer slice."""
    lo, hi = geom.layer_range(layer_first, layers)
    return b"".join(block_content(geom, trajectory, b)[lo:hi] for b in range(first_block, first_block + blocks))


def verify_span(geom: KvGeometry, trajectory: str, first_block: int, blocks: int, layer_first: int,
                layers: int, data: bytes) -> list[int]:
    """Blocks of the span whose bytes in `data` are wrong or missing (empty list = all good)."""
    lo, hi = geom.layer_range(layer_first, layers)
    width = hi - lo
    bad = []
    for i in range(blocks):
        got = data[i * width:(i + 1) * width]
        if got != block_content(geom, trajectory, first_block + i)[lo:hi]:
            bad.append(first_block + i)
    if len(data) != blocks * width and not bad:
        bad.append(first_block + blocks - 1)  # trailing garbage
    return bad
