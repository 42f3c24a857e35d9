"""Prefill and decode node daemons with a storage server, as real processes on 127.0.0.1.

Real gRPC, real bytes, every block verified by its receiver; the ledgers of the
three processes must add up to the data paths of the paper.
"""

from __future__ import annotations

import grpc
import pytest

from daemon_procs import BLOCK_BYTES as BB
from daemon_procs import BLOCK_TOKENS as BT
from daemon_procs import Procs
from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from daemons.gpu import layer_chunks

HIT, NEW, GEN, CHUNKS = 40, 100, 70, 4


@pytest.fixture(params=[None], ids=["one-call-per-push"])
def cluster(tmp_path, request):
    procs = Procs()
    extra = () if request.param is None else ("--push-bytes", str(request.param))
    try:
        st = procs.storage(tmp_path, [{"trajectory": "t1", "blocks": HIT}, {"trajectory": "t2", "blocks": HIT}])
        nodes = {}
        for name, role in (("pe1", "pe"), ("de1", "de")):
            info = procs.node(name, role, st, extra=extra)
            nodes[name] = {**info, "cnic": info["cnics"], "stub": pb_grpc.NodeStub(grpc.insecure_channel(info["mgmt"]))}
        nodes["st"] = procs.storage_stub(st)
        yield nodes
    finally:
        procs.stop()


def _spec(rid: str, traj: str = "t1") -> pb.RequestSpec:
    return pb.RequestSpec(request_id=rid, trajectory=traj, hit_blocks=HIT, new_tokens=NEW, gen_tokens=GEN,
                          layer_chunks=CHUNKS)


def _prefill(c, spec, path, layerwise=True, pe_blocks=0) -> pb.PrefillReply:
    return c["pe1"]["stub"].Prefill(pb.PrefillRequest(
        request=spec, pe_engine=1, path=path, layerwise=layerwise, de_mgmt=c["de1"]["mgmt"],
        de_cnic=c["de1"]["cnic"][0], de_engine=0, pe_cnic=c["pe1"]["cnic"][1], pe_blocks=pe_blocks), timeout=60)


def _decode(c, spec) -> pb.DecodeReply:
    return c["de1"]["stub"].Decode(pb.DecodeRequest(request=spec, de_engine=0, context_tokens=HIT * BT + NEW),
                                   timeout=60)


def _ledger(c, name) -> pb.Ledger:
    return c[name]["stub"].Status(pb.StatusRequest()).ledger


NEW_BLOCKS = -(-NEW // BT)  # 2


def test_layer_chunks_cover_every_layer_once():
    chunks = layer_chunks(61, 4)
    assert chunks == [(0, 15), (15, 15), (30, 15), (45, 16)]
    assert layer_chunks(3, 8) == [(0, 1), (1, 1), (2, 1)]


def test_pe_read_path_then_decode_and_write_back(cluster):
    spec = _spec("r-pe")
    reply = _prefill(cluster, spec, pb.READ_PATH_PE)
    assert reply.read_s > 0 and reply.prefill_s > 0
    pe, de = _ledger(cluster, "pe1"), _ledger(cluster, "de1")
    assert (pe.blocks_read, pe.blocks_verified) == (HIT, HIT)  # storage -> PE, verified
    # per chunk the PE sends that chunk's layers of every hit block and of the new tokens' blocks
    assert pe.blocks_forwarded == CHUNKS * (HIT + NEW_BLOCKS) == de.blocks_verified
    assert de.blocks_read == 0 and de.blocks_corrupt == pe.blocks_corrupt == 0

    dec = _decode(cluster, spec)
    # context 2660 tokens -> block 40 completed by prefill; decode to 2730 completes block 41
    assert dec.blocks_written == 2
    assert dec.tpot_s > 0 and dec.decode_s >= dec.first_token_s
    assert _ledger(cluster, "de1").blocks_written == 2
    assert cluster["st"].Stats(pb.StatsRequest()).blocks_written == 2
    # the next turn can read the grown context back, verified
    msgs = list(cluster["st"].Read(pb.ReadRequest(request_id="next", spans=[
        pb.BlockSpan(trajectory="t1", first_block=0, blocks=HIT + 2)])))
    assert sum(m.span.blocks for m in msgs) == HIT + 2
    assert cluster["de1"]["stub"].Status(pb.StatusRequest()).buffer_bytes == 0  # freed at decode start


def test_de_read_path_moves_hit_kv_over_the_compute_fabric(cluster):
    spec = _spec("r-de", "t2")
    reply = _prefill(cluster, spec, pb.READ_PATH_DE)
    assert reply.read_s > 0
    pe, de = _ledger(cluster, "pe1"), _ledger(cluster, "de1")
    assert de.blocks_read == HIT and pe.blocks_read == 0  # the DE node's SNIC read it
    assert de.blocks_forwarded == CHUNKS * HIT == pe.blocks_verified  # DE -> PE, layer chunk by chunk
    assert pe.blocks_forwarded == NEW_BLOCKS  # only the new tokens' KV goes back, all layers in one call
    assert de.blocks_verified == HIT + NEW_BLOCKS
    assert pe.blocks_corrupt == de.blocks_corrupt == 0
    status = cluster["de1"]["stub"].Status(pb.StatusRequest())
    # the DE buffer holds the hit KV it read plus the new KV (reserved by Fetch, held until decode)
    assert status.buffer_bytes == (HIT + NEW_BLOCKS) * BB
    _decode(cluster, spec)
    assert cluster["de1"]["stub"].Status(pb.StatusRequest()).buffer_bytes == 0


@pytest.mark.parametrize("pe_blocks", [15, 0, HIT])
def test_split_reads_read_each_part_on_its_side_and_forward_it_once(cluster, pe_blocks):
    spec = _spec(f"r-split-{pe_blocks}", "t2")
    reply = _prefill(cluster, spec, pb.READ_PATH_SPLIT, pe_blocks=pe_blocks)
    assert reply.read_s >= 0 and reply.prefill_s > 0
    pe, de = _ledger(cluster, "pe1"), _ledger(cluster, "de1")
    de_part = HIT - pe_blocks
    assert (pe.blocks_read, de.blocks_read) == (pe_blocks, de_part)  # each SNIC reads its own part
    assert de.blocks_forwarded == CHUNKS * de_part                  # DE -> PE: its part, chunk by chunk
    assert pe.blocks_verified == pe_blocks + CHUNKS * de_part       # PE: its read + every pushed piece
    # PE -> DE: the PE's part and the new tokens' KV, chunk by chunk (the DE holds its own part)
    assert pe.blocks_forwarded == CHUNKS * (pe_blocks + NEW_BLOCKS)
    assert de.blocks_verified == de_part + CHUNKS * (pe_blocks + NEW_BLOCKS)
    assert pe.blocks_corrupt == de.blocks_corrupt == pe.blocks_lost == 0
    assert cluster["de1"]["stub"].Status(pb.StatusRequest()).buffer_bytes == (HIT + NEW_BLOCKS) * BB
    assert cluster["pe1"]["stub"].Status(pb.StatusRequest()).buffer_bytes == 0
    _decode(cluster, spec)
    assert cluster["de1"]["stub"].Status(pb.StatusRequest()).buffer_bytes == 0


# a layer chunk of the 40 hit blocks is ~40 x 64 bytes (15 of 61 layers of 256-byte blocks); pushes of at most
# 1000 bytes cut every chunk into pieces of 15 blocks and every call into one piece
@pytest.mark.parametrize("cluster", [1000], ids=["pieces"], indirect=True)
def test_chunks_larger_than_a_push_go_in_pieces_and_count_once(cluster):
    spec = _spec("r-big", "t2")
    _prefill(cluster, spec, pb.READ_PATH_DE)
    pe, de = _ledger(cluster, "pe1"), _ledger(cluster, "de1")
    assert de.blocks_forwarded == CHUNKS * HIT == pe.blocks_verified  # every block once, in pieces
    assert de.blocks_verified == HIT + NEW_BLOCKS and pe.blocks_corrupt == de.blocks_corrupt == 0
    _decode(cluster, spec)
    spec = _spec("r-big-pe", "t1")
    _prefill(cluster, spec, pb.READ_PATH_PE)
    assert _ledger(cluster, "de1").blocks_verified == HIT + NEW_BLOCKS + CHUNKS * (HIT + NEW_BLOCKS)


def test_oracle_moves_no_kv(cluster):
    _prefill(cluster, _spec("r-or"), pb.READ_PATH_NONE)
    pe, de = _ledger(cluster, "pe1"), _ledger(cluster, "de1")
    assert pe.blocks_read == pe.blocks_forwarded == de.blocks_read == de.blocks_verified == 0


def test_basic_reads_everything_then_copies(cluster):
    reply = _prefill(cluster, _spec("r-basic"), pb.READ_PATH_PE, layerwise=False)
    pe = _ledger(cluster, "pe1")
    assert pe.blocks_read == HIT and pe.blocks_forwarded == CHUNKS * (HIT + NEW_BLOCKS)
    assert reply.prefill_s > 0


def test_missing_context_is_counted_lost(cluster):
    spec = pb.RequestSpec(request_id="r-miss", trajectory="nope", hit_blocks=5, new_tokens=10, gen_tokens=1,
                          layer_chunks=2)
    with pytest.raises(grpc.RpcError, match="5 lost"):  # nothing to forward: the request fails
        _prefill(cluster, spec, pb.READ_PATH_PE)
    assert _ledger(cluster, "pe1").blocks_lost == 5
    assert _ledger(cluster, "de1").blocks_verified == 0  # no made-up KV reached the DE
    assert cluster["de1"]["stub"].Status(pb.StatusRequest()).buffer_bytes == 0


def test_failed_prefill_returns_its_decode_buffer_reservation(cluster):
    spec = _spec("r-fail")
    with pytest.raises(grpc.RpcError):  # the DE engine's CNIC address is dead: the first push fails
        cluster["pe1"]["stub"].Prefill(pb.PrefillRequest(
            request=spec, pe_engine=0, path=pb.READ_PATH_PE, layerwise=True, de_mgmt=cluster["de1"]["mgmt"],
            de_cnic="127.0.0.1:1", de_engine=0, pe_cnic=cluster["pe1"]["cnic"][0]), timeout=60)
    assert cluster["de1"]["stub"].Status(pb.StatusRequest()).buffer_bytes == 0
    assert cluster["pe1"]["stub"].Status(pb.StatusRequest()).buffer_bytes == 0
