"""daemons.runtime.RpcCounter on a real grpc.aio server on 127.0.0.1 (a tiny Storage servicer): calls, messages
each way and their serialized bytes per method, for unary and server-streaming methods; methods not served are
not counted; and rpc_counts, the counter as the status replies carry it."""

from __future__ import annotations

import asyncio

import grpc

from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from daemons.runtime import RpcCounter, rpc_counts

READ = "/dualpath.v1.Storage/Read"
STATS = "/dualpath.v1.Storage/Stats"


def kv(i: int) -> pb.KvData:
    return pb.KvData(request_id="r1", span=pb.BlockSpan(trajectory="t", first_block=i, blocks=1),
                     data=bytes([i]) * (10 * (i + 1)))


class TinyStorage(pb_grpc.StorageServicer):
    async def Stats(self, request, context):
        return pb.StorageStats(blocks_read=7)

    async def Read(self, request, context):
        for i in range(3):
            yield kv(i)


READ_REQUEST = pb.ReadRequest(request_id="r1", spans=[pb.BlockSpan(trajectory="t", first_block=0, blocks=3)],
                              max_message_bytes=4096)


async def exercise(counter: RpcCounter):
    server = grpc.aio.server(interceptors=[counter])
    pb_grpc.add_StorageServicer_to_server(TinyStorage(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.StorageStub(ch)
            stats = [await stub.Stats(pb.StatsRequest(), timeout=5), await stub.Stats(pb.StatsRequest(), timeout=5)]
            read = [m async for m in stub.Read(READ_REQUEST, timeout=5)]
            # a method no servicer serves: answered UNIMPLEMENTED, not counted
            unknown = ch.unary_unary("/dualpath.v1.Storage/Nope", request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)
            try:
                await unknown(b"x", timeout=5)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
    finally:
        await server.stop(None)
    return stats, read, code


def test_rpc_counter_counts_calls_messages_and_bytes():
    counter = RpcCounter()
    stats, read, code = asyncio.run(exercise(counter))
    assert [s.blocks_read for s in stats] == [7, 7]
    assert read == [kv(0), kv(1), kv(2)]
    assert code == grpc.StatusCode.UNIMPLEMENTED

    assert pb.StatsRequest().SerializeToString() == b""  # an empty message: 0 bytes in
    assert pb.StorageStats(blocks_read=7).SerializeToString() == b"\x08\x07"  # field 1 varint 7: 2 bytes out
    read_in = len(READ_REQUEST.SerializeToString())
    read_out = sum(len(kv(i).SerializeToString()) for i in range(3))
    assert read_in > 0 and read_out > 60  # 10 + 20 + 30 bytes of data, plus ids and spans

    # method -> [calls, messages_in, messages_out, bytes_in, bytes_out]
    assert counter.counts == {STATS: [2, 2, 2, 0, 4], READ: [1, 1, 3, read_in, read_out]}
    assert counter.snapshot() == [(READ, 1, 1, 3, read_in, read_out), (STATS, 2, 2, 2, 0, 4)]  # sorted by method


def test_rpc_counts():
    assert rpc_counts(None) == []
    counter = RpcCounter()
    assert rpc_counts(counter) == []
    asyncio.run(exercise(counter))
    got = rpc_counts(counter)
    read_in = len(READ_REQUEST.SerializeToString())
    read_out = sum(len(kv(i).SerializeToString()) for i in range(3))
    assert got == [pb.RpcCount(method=READ, calls=1, messages_in=1, messages_out=3, bytes_in=read_in,
                               bytes_out=read_out),
                   pb.RpcCount(method=STATS, calls=2, messages_in=2, messages_out=2, bytes_in=0, bytes_out=4)]

