"""Every byte accounted for (issue 13), on real daemons on 127.0.0.1: what a receiver checks and where a call is
served. Each test fails without its check:
- a storage server verifies every written span (a corrupt write-back is counted, not stored);
- a decode engine checks that every block of every layer of its request's KV is here before decode (a push
  dropped, corrupt or misdirected is counted lost, and the decode refused);
- a prefill engine checks each layer chunk's hit KV before computing it (a chunk the DE never pushed);
- data calls are served on the data fabrics only, control calls on management only.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from daemon_procs import BLOCK_BYTES as BB
from daemon_procs import BLOCK_TOKENS as BT
from daemon_procs import LAYERS, Procs
from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from daemons.gpu import layer_chunks
from daemons.kvbytes import KvGeometry, layer_slices, span_content
from daemons.kvclient import KvIncomplete
from daemons.traffic_manager import TrafficManager

HIT, NEW, CHUNKS = 6, 100, 2
GEOM = KvGeometry(LAYERS, BT, BB)
NEW_BLOCKS = -(-NEW // BT)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    procs = Procs()
    root = tmp_path_factory.mktemp("kv-checks")
    try:
        st = procs.storage(root, [{"trajectory": "t1", "blocks": HIT}])
        de = procs.node("de1", "de", st, engines=1)
        yield {"st": st, "st_calls": procs.storage_stub(st), "st_mgmt": procs.mgmt[st], "de": de,
               "de_mgmt": pb_grpc.NodeStub(grpc.insecure_channel(de["mgmt"])),
               "de_cnic": pb_grpc.NodeStub(grpc.insecure_channel(de["cnics"][0]))}
    finally:
        procs.stop()


def _spec(rid: str) -> pb.RequestSpec:
    return pb.RequestSpec(request_id=rid, trajectory="t1", hit_blocks=HIT, new_tokens=NEW, gen_tokens=3,
                          layer_chunks=CHUNKS)


def _pushes(spec: pb.RequestSpec, trajectory: str = "t1") -> list[pb.KvData]:
    """What a PE sends a DE for a request on the PE read path: per layer chunk, its layers of every block."""
    blocks = HIT + NEW_BLOCKS
    full = span_content(GEOM, trajectory, 0, blocks)
    return [pb.KvData(request_id=spec.request_id, data=layer_slices(GEOM, full, blocks, lf, n),
                      span=pb.BlockSpan(trajectory=trajectory, first_block=0, blocks=blocks, layer_first=lf, layers=n))
            for lf, n in layer_chunks(LAYERS, CHUNKS)]


def _decode(c, spec):
    return c["de_mgmt"].Decode(pb.DecodeRequest(request=spec, de_engine=0, context_tokens=HIT * BT + NEW,
                                                path=pb.READ_PATH_PE), timeout=30)


def _lost(c) -> int:
    return c["de_mgmt"].Status(pb.StatusRequest()).ledger.blocks_lost


def test_a_whole_push_decodes(cluster):
    spec = _spec("ok")
    ack = cluster["de_cnic"].PushKv(pb.KvBatch(items=_pushes(spec)), timeout=10)
    assert ack.corrupt_blocks == 0
    lost = _lost(cluster)
    assert _decode(cluster, spec).decode_s > 0
    assert _lost(cluster) == lost


@pytest.mark.parametrize("how", ["dropped", "corrupt", "misdirected"])
def test_a_push_that_does_not_cover_the_request_is_lost_and_refused(cluster, how):
    spec = _spec(f"bad-{how}")
    msgs = _pushes(spec, trajectory="t9" if how == "misdirected" else "t1")  # another trajectory's KV, clean
    if how == "dropped":
        msgs = msgs[:1]  # the last layer chunk never sent
    if how == "corrupt":
        data = bytearray(msgs[1].data)
        data[5] ^= 0xFF  # one byte of block 0 of the second chunk
        msgs[1].data = bytes(data)
    ack = cluster["de_cnic"].PushKv(pb.KvBatch(items=msgs), timeout=10)
    assert ack.corrupt_blocks == (1 if how == "corrupt" else 0)
    lost = _lost(cluster)
    with pytest.raises(grpc.RpcError, match="never arrived"):
        _decode(cluster, spec)
    expected = {"dropped": HIT + NEW_BLOCKS, "corrupt": 1, "misdirected": CHUNKS * (HIT + NEW_BLOCKS)}[how]
    assert _lost(cluster) - lost == expected


def test_a_corrupt_write_back_is_counted_and_not_stored(cluster):
    data = bytearray(span_content(GEOM, "w1", 0, 3))
    data[BB + 7] ^= 0x01  # block 1
    ack = cluster["st_calls"].Write(pb.KvBatch(items=[pb.KvData(
        request_id="w", span=pb.BlockSpan(trajectory="w1", first_block=0, blocks=3), data=bytes(data))]), timeout=10)
    assert (ack.blocks, ack.corrupt_blocks) == (3, 1)
    stats = cluster["st_calls"].Stats(pb.StatsRequest(), timeout=10)
    assert stats.ledger.blocks_corrupt >= 1 and stats.ledger.blocks_verified >= 2
    with pytest.raises(grpc.RpcError) as exc:  # never served back as if it were intact
        list(cluster["st_calls"].Read(pb.ReadRequest(request_id="r", spans=[
            pb.BlockSpan(trajectory="w1", first_block=1, blocks=1)]), timeout=10))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def test_data_calls_are_refused_on_management_and_control_calls_on_data_fabrics(cluster):
    c = cluster
    with grpc.insecure_channel(c["st_mgmt"]) as ch:  # a storage read on the management network
        with pytest.raises(grpc.RpcError) as exc:
            list(pb_grpc.StorageStub(ch).Read(pb.ReadRequest(request_id="r", spans=[
                pb.BlockSpan(trajectory="t1", first_block=0, blocks=1)]), timeout=10))
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED and "data call" in exc.value.details()
    with grpc.insecure_channel(c["st"]) as ch:  # a storage server's Stats on the storage fabric
        with pytest.raises(grpc.RpcError) as exc:
            pb_grpc.StorageStub(ch).Stats(pb.StatsRequest(), timeout=10)
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    spec = _spec("plane")
    for call in (lambda: c["de_mgmt"].PushKv(pb.KvBatch(items=_pushes(spec)), timeout=10),
                 lambda: c["de_mgmt"].Fetch(pb.FetchRequest(request=spec), timeout=10),
                 lambda: c["de_cnic"].Status(pb.StatusRequest(), timeout=10),
                 lambda: c["de_cnic"].Decode(pb.DecodeRequest(request=spec), timeout=10)):
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_prefill_chunk_the_de_never_pushed_is_lost():
    """The PE side, in one process: the DE's fetch ends having pushed only the first layer chunk."""
    async def go():
        tm = TrafficManager(GEOM, None, 1 << 20)
        spec = _spec("pe-side")
        chunks = layer_chunks(LAYERS, CHUNKS)
        full = span_content(GEOM, "t1", 0, HIT)

        async def fetch():  # pushes chunk 0 of the hit KV, then returns as if it had sent everything
            tm.receive(pb.KvBatch(items=[pb.KvData(
                request_id=spec.request_id, data=layer_slices(GEOM, full, HIT, *chunks[0]),
                span=pb.BlockSpan(trajectory="t1", first_block=0, blocks=HIT, layer_first=chunks[0][0],
                                  layers=chunks[0][1]))]))
            return pb.FetchReply()

        task = asyncio.ensure_future(fetch())
        await tm.await_kv(spec, chunks[0], 0, HIT, task)  # here
        with pytest.raises(KvIncomplete, match="never arrived"):
            await tm.await_kv(spec, chunks[1], 0, HIT, task)
        return tm.ledger

    ledger = asyncio.run(go())
    assert (ledger.blocks_verified, ledger.blocks_lost) == (HIT, HIT)
