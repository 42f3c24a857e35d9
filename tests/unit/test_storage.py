"""The storage daemon as a real process on 127.0.0.1: real gRPC, real bytes, verified."""

from __future__ import annotations

import grpc
import pytest
from daemon_procs import Procs

from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from daemons.kvbytes import KvGeometry, span_content, verify_span
from daemons.storage import STRIPE_BLOCKS, server_for

GEOM = KvGeometry(layers=61, block_tokens=64, block_bytes=256)


@pytest.fixture
def storage(tmp_path):
    """Two storage servers with a preloaded trajectory 'a1' of three stripes."""
    procs = Procs()
    try:
        addrs = [procs.storage(tmp_path, [{"trajectory": "a1", "blocks": 3 * STRIPE_BLOCKS}], i, 2,
                               ("--max-message-bytes", "2048")) for i in range(2)]
        yield [procs.storage_stub(a) for a in addrs]
    finally:
        procs.stop()


def _held(i: int, blocks: range) -> list[int]:
    return [b for b in blocks if server_for("a1", b, 2) == i]


def test_striping_keeps_runs_together_and_uses_every_server():
    owners = [server_for("a1", b, 2) for b in range(4 * STRIPE_BLOCKS)]
    assert set(owners) == {0, 1}
    runs = [owners[i:i + STRIPE_BLOCKS] for i in range(0, len(owners), STRIPE_BLOCKS)]
    assert all(len(set(r)) == 1 for r in runs)  # a stripe lives on one server
    assert all(runs[i][0] != runs[i + 1][0] for i in range(3))  # consecutive stripes alternate


def test_read_returns_verified_full_blocks_in_large_messages(storage):
    for i, stub in enumerate(storage):
        for b in _held(i, range(3 * STRIPE_BLOCKS))[:3]:
            msgs = list(stub.Read(pb.ReadRequest(request_id="r1", spans=[
                pb.BlockSpan(trajectory="a1", first_block=b, blocks=1)])))
            assert len(msgs) == 1 and msgs[0].request_id == "r1"
            assert verify_span(GEOM, "a1", b, 1, 0, 0, msgs[0].data) == []


def test_multi_block_read_is_chunked_by_message_size(storage, tmp_path):
    stub = storage[0]
    mine = _held(0, range(3 * STRIPE_BLOCKS))
    # a write of 20 contiguous blocks to a new trajectory, then a read back in 2048-byte messages (8 blocks)
    data = span_content(GEOM, "w9", 0, 20)
    ack = stub.Write(pb.KvBatch(items=[pb.KvData(request_id="w", span=pb.BlockSpan(trajectory="w9", first_block=0,
                                                                               blocks=20), data=data)]))
    assert (ack.blocks, ack.bytes) == (20, 20 * 256)
    msgs = list(stub.Read(pb.ReadRequest(request_id="r2", spans=[pb.BlockSpan(trajectory="w9", first_block=0,
                                                                            blocks=20)])))
    assert [m.span.blocks for m in msgs] == [8, 8, 4]
    assert b"".join(m.data for m in msgs) == data
    stats = stub.Stats(pb.StatsRequest())
    assert stats.blocks_written == 20 and stats.blocks_read == 20
    assert mine  # the preload gave this server blocks too


def test_missing_block_is_not_found_and_counted(storage):
    not_mine = _held(1, range(3 * STRIPE_BLOCKS))[0]
    with pytest.raises(grpc.RpcError) as exc:
        list(storage[0].Read(pb.ReadRequest(request_id="r", spans=[
            pb.BlockSpan(trajectory="a1", first_block=not_mine, blocks=1)])))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    assert storage[0].Stats(pb.StatsRequest()).blocks_missing == 1


def test_layer_slices_are_refused(storage):
    with pytest.raises(grpc.RpcError) as exc:
        list(storage[0].Read(pb.ReadRequest(request_id="r", spans=[
            pb.BlockSpan(trajectory="a1", first_block=0, blocks=1, layer_first=0, layers=4)])))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_write_of_partial_block_is_refused(storage):
    with pytest.raises(grpc.RpcError) as exc:
        storage[0].Write(pb.KvBatch(items=[pb.KvData(request_id="w", span=pb.BlockSpan(trajectory="x", first_block=0,
                                                                                     blocks=1), data=b"\0" * 100)]))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unsafe_trajectory_name_is_refused(storage):
    with pytest.raises(grpc.RpcError) as exc:
        span = pb.BlockSpan(trajectory="../etc", first_block=0, blocks=1)
        storage[0].Write(pb.KvBatch(items=[pb.KvData(request_id="w", span=span, data=b"\0" * 256)]))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
