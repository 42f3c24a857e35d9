"""Fixtures of the privileged suite: root is required (a failure, never a skip),
the machine must be free, and every test is checked for leaks.

The leak check snapshots, before and after each test, the root namespace's
``ip netns list`` names, ``ip -o link`` names, the processes whose argv holds
"traffic.iperf" or "mininet:", and the run manifest; anything new afterwards
fails the test (at teardown), after ``dpemu clean`` has removed it so that the
next test starts clean.
"""

from __future__ import annotations

import os
import time

import pytest

from netns_tools import DPEMU, LOCK, leftovers, run_dpemu, snapshot

LOCK_WAIT_S = 300


@pytest.fixture(scope="session", autouse=True)
def require_root():
    """`make test` always runs as root: a netns suite that skips would hide everything."""
    if os.geteuid() != 0:
        pytest.fail("tests/netns needs root (it builds namespaces, veths and qdiscs): run `sudo make test` "
                    f"or `sudo {DPEMU.rsplit('/bin/', 1)[0]}/bin/python -m pytest tests/netns`", pytrace=False)
    if not os.path.exists(DPEMU):
        pytest.fail(f"{DPEMU} not found: run `sudo make install` first", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def machine_free(require_root):
    """Wait (bounded) for another dpemu run to release the machine; refuse a dirty machine."""
    from emulator.errors import BusyError
    from emulator.registry import Registry

    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        reg = Registry()
        try:
            reg.acquire()
        except BusyError as exc:
            if time.monotonic() > deadline:
                pytest.fail(f"the machine stayed busy for {LOCK_WAIT_S}s ({exc}; lock {LOCK})", pytrace=False)
            time.sleep(1)
            continue
        reg.release()
        break
    left = leftovers()
    if any(left.values()):
        pytest.fail(f"the machine is not clean before the netns suite: {left}; "
                    f"inspect it, then run `{DPEMU} clean`", pytrace=False)


@pytest.fixture(autouse=True)
def leak_check(require_root, machine_free):
    before = snapshot()
    yield
    after = snapshot()
    new = {k: sorted(map(str, after[k] - before[k])) for k in after}
    new = {k: v for k, v in new.items() if v}
    if new:
        res = run_dpemu("clean", timeout=120)
        still = leftovers()
        pytest.fail(f"the test left objects behind: {new}\n`dpemu clean` -> exit {res.returncode} "
                    f"{res.stdout.strip()} {res.stderr.strip()}; still present after clean: "
                    f"{ {k: v for k, v in still.items() if v} }", pytrace=False)


def pytest_collection_modifyitems(items):
    """Every test in tests/netns is a netns test, whether or not its author said so."""
    for item in items:
        if "tests/netns/" in str(item.fspath) and not item.get_closest_marker("netns"):
            raise pytest.UsageError(f"{item.nodeid} lacks @pytest.mark.netns")

