"""Reading and writing through real storage daemons on 127.0.0.1, with the ledger."""

from __future__ import annotations

import asyncio

import pytest
from daemon_procs import Procs

from daemons.kvbytes import KvGeometry, span_content
from daemons.kvclient import KvIncomplete, Ledger, StorageClient, _runs
from daemons.storage import STRIPE_BLOCKS, server_for

GEOM = KvGeometry(layers=61, block_tokens=64, block_bytes=256)
N = 3 * STRIPE_BLOCKS + 16  # preloaded blocks of "a1": every one of the 3 servers holds a stripe


@pytest.fixture
def servers(tmp_path):
    procs = Procs()
    try:
        addrs = [procs.storage(tmp_path, [{"trajectory": "a1", "blocks": N}], i, 3) for i in range(3)]
        yield addrs, procs.procs
    finally:
        procs.stop()


def test_runs():
    assert _runs([3, 4, 5, 9, 10, 12]) == [(3, 3), (9, 2), (12, 1)]
    assert _runs([]) == []
    assert _runs([3, 4, 5, 6, 7], longest=2) == [(3, 2), (5, 2), (7, 1)]


def test_writes_go_in_calls_of_bounded_size():
    from daemons import dualpath_pb2 as pb
    from daemons.kvclient import calls_of

    msgs = [pb.KvData(data=b"x" * n) for n in (6, 5, 4, 12, 1)]
    assert [[len(m.data) for m in c] for c in calls_of(msgs, limit=10)] == [[6], [5, 4], [12], [1]]


def test_a_long_write_back_is_split_but_every_block_lands(servers, monkeypatch):
    import daemons.kvclient as kvclient

    monkeypatch.setattr(kvclient, "WRITE_BYTES", 3 * GEOM.block_bytes)  # 3 blocks a call at most
    addrs, _ = servers

    async def go():
        client, ledger = StorageClient(addrs, GEOM), Ledger()
        await client.write("w1", "a1", N, 40, ledger)
        await client.read("r2", "a1", N, 40, ledger)
        await client.close()
        return ledger

    ledger = asyncio.run(go())
    assert ledger.blocks_written == 40 and ledger.blocks_verified == 40 and ledger.clean


def test_read_whole_context_from_all_servers(servers):
    addrs, _ = servers

    async def go():
        client, ledger = StorageClient(addrs, GEOM), Ledger()
        data = await client.read("r1", "a1", 0, N, ledger)
        await client.close()
        return data, ledger

    data, ledger = asyncio.run(go())
    assert data == span_content(GEOM, "a1", 0, N)  # the buffer holds the context, in block order
    assert (ledger.blocks_read, ledger.blocks_verified, ledger.blocks_corrupt, ledger.blocks_lost) == (N, N, 0, 0)
    assert ledger.clean


def test_write_back_then_read(servers):
    addrs, _ = servers

    async def go():
        client, ledger = StorageClient(addrs, GEOM), Ledger()
        await client.write("w1", "a1", N, 7, ledger)  # decode completed 7 more blocks
        await client.read("r2", "a1", N - 5, 12, ledger)
        await client.close()
        return ledger

    ledger = asyncio.run(go())
    assert ledger.blocks_written == 7 and ledger.blocks_read == 12 and ledger.blocks_verified == 12 and ledger.clean


def test_blocks_that_do_not_exist_are_lost_not_ignored(servers):
    addrs, _ = servers

    async def go():
        client, ledger = StorageClient(addrs, GEOM), Ledger()
        with pytest.raises(KvIncomplete):
            await client.read("r3", "a1", N - 2, 5, ledger)  # N, N+1, N+2 were never written
        await client.close()
        return ledger

    ledger = asyncio.run(go())
    # a server aborts its whole stream at its first missing block: its earlier blocks may arrive
    assert ledger.blocks_lost >= 3 and not ledger.clean
    assert ledger.blocks_read + ledger.blocks_lost == 5


def test_a_dead_server_loses_its_share(servers):
    addrs, procs = servers
    procs[1].terminate()
    procs[1].wait(timeout=10)

    async def go():
        client, ledger = StorageClient(addrs, GEOM), Ledger()
        with pytest.raises(KvIncomplete):
            await client.read("r4", "a1", 0, N, ledger)
        await client.close()
        return ledger

    ledger = asyncio.run(go())
    share = sum(1 for b in range(N) if server_for("a1", b, 3) == 1)
    assert share > 0
    assert ledger.blocks_lost == share and ledger.blocks_verified == N - share


def test_corruption_is_detected(servers, tmp_path):
    addrs, _ = servers
    # flip one byte of block 0 in the file of the server that holds it
    owner = server_for("a1", 0, 3)
    path = tmp_path / f"st{owner}" / "a1.kv"
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0xFF
    path.write_bytes(bytes(raw))

    async def go():
        client, ledger = StorageClient(addrs, GEOM), Ledger()
        with pytest.raises(KvIncomplete):
            await client.read("r5", "a1", 0, 6, ledger)
        await client.close()
        return ledger

    ledger = asyncio.run(go())
    assert ledger.blocks_corrupt == 1 and ledger.blocks_verified == 5 and not ledger.clean


def test_ledger_add():
    a = Ledger(blocks_read=2, blocks_lost=1)
    b = Ledger(blocks_read=3, blocks_corrupt=1)
    s = a.add(b)
    assert (s.blocks_read, s.blocks_lost, s.blocks_corrupt) == (5, 1, 1)


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_dead_server_loses_its_blocks_unless_another_replica_holds_them(tmp_path, replicas):
    """Two servers, one killed: with one copy its stripes are lost (counted, and the read refused); with two the
    read falls back to the live copy, and a write-back lands on the live one (nothing lost either way)."""
    procs = Procs()
    try:
        addrs = [procs.storage(tmp_path, [{"trajectory": "a1", "blocks": N}], i, 2, ("--replicas", str(replicas)))
                 for i in range(2)]
        dead = procs.procs[0]
        dead.kill()
        dead.wait(timeout=10)
        mine = sum(1 for b in range(N) if server_for("a1", b, 2) == 0)

        async def go():
            client, ledger = StorageClient(addrs, GEOM, replicas=replicas), Ledger()
            try:
                data = await client.read("r", "a1", 0, N, ledger)
            except KvIncomplete:
                data = None
            await client.write("w", "a1", N, 2 * STRIPE_BLOCKS, ledger)  # both stripes' servers
            await client.close()
            return data, ledger

        data, ledger = asyncio.run(go())
        if replicas == 1:
            assert data is None and ledger.blocks_lost == mine + sum(
                1 for b in range(N, N + 2 * STRIPE_BLOCKS) if server_for("a1", b, 2) == 0)
        else:
            assert data == span_content(GEOM, "a1", 0, N) and ledger.blocks_lost == 0
            assert ledger.blocks_read == ledger.blocks_verified == N
            assert ledger.blocks_written == 2 * STRIPE_BLOCKS  # one live copy of each
    finally:
        procs.stop()
