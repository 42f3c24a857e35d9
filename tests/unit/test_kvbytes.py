"""KV geometry and derived contents: exact layer slices, verification catches damage."""

import pytest

from daemons.kvbytes import KvGeometry, block_content, span_content, verify_span


def test_scaled_geometry_ds660b():
    # 64 tokens x 61 layers x 656 B = 2,560,  ... x 1e-4 -> 256 bytes per Full Block
    g = KvGeometry.scaled(layers=61, block_tokens=64, kv_bytes_per_token=61 * 656, byte_scale=1e-4)
    assert g.block_bytes == round(64 * 61 * 656 * 1e-4) == 256


def test_layer_slices_tile_the_block_exactly():
    g = KvGeometry(layers=61, block_tokens=64, block_bytes=256)
    edges = [g.layer_range(layer, 1) for layer in range(61)]
    assert edges[0][0] == 0 and edges[-1][1] == 256
    assert all(a[1] == b[0] for a, b in zip(edges, edges[1:]))  # contiguous, no gap, no overlap
    assert all(hi - lo in (4, 5) for lo, hi in edges)  # 256/61 = 4.2 bytes per layer
    assert g.layer_range(0, 0) == (0, 256)
    assert g.span_bytes(10, 0, 61) == g.span_bytes(10) == 2560


def test_layer_groups_concatenate_to_the_block():
    g = KvGeometry(layers=61, block_tokens=64, block_bytes=256)
    full = span_content(g, "t1", 3, 2)
    groups = [(0, 16), (16, 15), (31, 30)]
    parts = [span_content(g, "t1", b, 1, lf, n) for b in (3, 4) for lf, n in groups]
    assert b"".join(parts) == full


def test_contents_differ_by_trajectory_and_block():
    g = KvGeometry(layers=4, block_tokens=64, block_bytes=64)
    assert block_content(g, "a", 0) != block_content(g, "a", 1)
    assert block_content(g, "a", 0) != block_content(g, "b", 0)
    assert block_content(g, "a", 0) == block_content(g, "a", 0)
    assert len(block_content(g, "a", 0)) == 64


def test_verify_detects_corruption_truncation_and_misplacement():
    g = KvGeometry(layers=8, block_tokens=64, block_bytes=80)
    good = span_content(g, "t", 10, 3, 2, 3)
    assert verify_span(g, "t", 10, 3, 2, 3, good) == []
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 1
    assert verify_span(g, "t", 10, 3, 2, 3, bytes(flipped)) == [11]
    assert verify_span(g, "t", 10, 3, 2, 3, good[:-1]) == [12]
    assert verify_span(g, "t", 10, 3, 2, 3, good + b"x") == [12]
    assert verify_span(g, "t", 11, 3, 2, 3, good) == [11, 12, 13]  # right bytes, wrong place
    assert verify_span(g, "u", 10, 3, 2, 3, good) == [10, 11, 12]


@pytest.mark.parametrize("layers, block_bytes", [(61, 60), (0, 10)])
def test_bad_geometry_refused(layers, block_bytes):
    with pytest.raises(ValueError):
        KvGeometry(layers=layers, block_tokens=64, block_bytes=block_bytes)


def test_layer_slice_out_of_range():
    g = KvGeometry(layers=8, block_tokens=64, block_bytes=80)
    with pytest.raises(ValueError):
        g.layer_range(6, 3)


def test_contents_come_from_one_ring_each_trajectory_at_its_origin():
    from daemons import kvbytes
    g = KvGeometry(layers=4, block_tokens=64, block_bytes=100)
    span = span_content(g, "t", 5, 3)
    assert span == b"".join(block_content(g, "t", b) for b in (5, 6, 7))  # a span is its blocks, in order
    o = kvbytes._origin("t")
    assert block_content(g, "t", 5) == kvbytes._pool()[o + 500:o + 600] or o + 600 > kvbytes.POOL_BYTES
    # the ring wraps: a span across its end is still its blocks, in order
    ring_blocks = kvbytes.POOL_BYTES // 100
    first = (kvbytes.POOL_BYTES - o) // 100 - 1
    across = span_content(g, "t", first, 3)
    assert across == b"".join(block_content(g, "t", b) for b in range(first, first + 3))
    assert block_content(g, "t", 0) != block_content(g, "t", ring_blocks - 1)
    # every block of a long trajectory differs from every other
    blocks = {block_content(g, "long", b) for b in range(5000)}
    assert len(blocks) == 5000


def test_a_span_longer_than_the_ring_is_still_its_blocks():
    from daemons import kvbytes
    bb = 1 << 20
    g = KvGeometry(layers=4, block_tokens=64, block_bytes=bb)
    n = kvbytes.POOL_BYTES // bb + 2
    span = span_content(g, "x", 1, n, 1, 2)
    lo, hi = g.layer_range(1, 2)
    assert span == b"".join(block_content(g, "x", b)[lo:hi] for b in range(1, 1 + n))
