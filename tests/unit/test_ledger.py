"""daemons.ledger: one ledger type, its conversions, and its file that outlives a killed daemon."""

from __future__ import annotations

import subprocess
import sys

from daemons import dualpath_pb2 as pb
from daemons.ledger import Ledger


def test_conversions_round_trip_and_the_sum_adds_up():
    a = Ledger(blocks_read=5, blocks_forwarded=3, blocks_written=2, blocks_verified=9, blocks_corrupt=1)
    assert Ledger.from_proto(a.to_proto()) == a == Ledger.from_dict({**a.as_dict(), "unchecked": 0})
    assert a.unchecked == 0 and not a.clean
    b = Ledger(blocks_read=1, blocks_lost=2)
    total = Ledger.total([a, b])
    assert total.as_dict() == {"blocks_read": 6, "blocks_written": 2, "blocks_forwarded": 3, "blocks_verified": 9,
                               "blocks_corrupt": 1, "blocks_lost": 2}
    assert total.unchecked == 1  # one block read that nobody checked
    assert set(Ledger.KEYS) == set(pb.Ledger.DESCRIPTOR.fields_by_name)  # the proto carries every count


def test_a_daemon_killed_mid_run_still_accounts_for_every_block_it_counted(tmp_path):
    path = tmp_path / "node.bin"
    code = (f"import os, signal\nfrom daemons.ledger import Ledger\nlg = Ledger.in_file({str(path)!r})\n"
            "for _ in range(1000):\n    lg.blocks_read += 1\n    lg.blocks_verified += 1\n"
            "lg.blocks_lost += 3\nos.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], timeout=30)
    assert proc.returncode == -9  # killed, no exit handler ran
    assert Ledger.read_file(path) == Ledger(blocks_read=1000, blocks_verified=1000, blocks_lost=3)
