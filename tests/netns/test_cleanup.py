"""A run removes everything it built however it ends: signal, crash, SIGKILL + `dpemu clean`.

All runs use the `tiny` scenario (1P1D, 2 GPUs, 1 storage server).
"""

from __future__ import annotations

import json
import signal

import pytest

from netns_tools import (MANIFEST, Background, alive, assert_nothing_left, class_bytes, describe, dpemu_env,
                         iperf_children, leftovers, netns_names, run_dpemu, wait_for)

TINY_NETNS = {"dp-pe1", "dp-de1", "dp-st1", "dp-ctl1"}
PDEATH_S = 2.0  # SIGTERM on parent death is immediate; a calibration flow of `tiny` lasts 4 s
TRAFFIC_BYTES = 500_000  # 0.1 s at 40 Mbit/s


def _start_tiny(tmp_path) -> Background:
    return Background(tmp_path, "run", "tiny", "--out", str(tmp_path / "results"))


def _wait_built_and_loaded(run: Background) -> dict:
    """Until the namespaces exist, then until the run has an iperf3 process running."""
    wait_for(lambda: "dp-pe1" in netns_names(), 30, "namespace dp-pe1 of the run", run)
    return wait_for(lambda: iperf_children(run.pid), 60, "an iperf3 process of the run", run)


@pytest.mark.netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_tears_down(tmp_path, sig):
    run = _start_tiny(tmp_path)
    try:
        daemons = _wait_built_and_loaded(run)
        assert TINY_NETNS <= netns_names()
        run.proc.send_signal(sig)
        rc = run.wait(60)
        assert rc == 130, f"exit {rc}\n{run.output()}"
        assert "removed" in run.stderr, run.output()
    finally:
        run.close()
    assert_nothing_left(f"after {sig.name}")
    assert not [p for p, s in daemons if alive(p, s)], daemons


@pytest.mark.netns
@pytest.mark.parametrize("stage", ["after_build", "after_calibration"])
def test_crash_tears_down(tmp_path, stage):
    res = run_dpemu("run", "tiny", "--out", str(tmp_path), env=dpemu_env(DPEMU_FAULT=stage), timeout=120)
    assert res.returncode != 0, describe(res)
    assert "injected fault" in res.stderr, describe(res)
    assert f"injected fault at {stage}" in res.stderr, describe(res)
    assert_nothing_left(f"after a crash {stage}")


@pytest.mark.netns
def test_sigkill_leaves_manifest_then_clean_removes_everything(tmp_path):
    run = _start_tiny(tmp_path)
    try:
        _wait_built_and_loaded(run)
        # kill it mid-flow: the first round's iperf3 traffic is on the wire (pe1's storage port)
        wait_for(lambda: (class_bytes("dp-pe1-snic") or 0) > TRAFFIC_BYTES, 30,
                 f"{TRAFFIC_BYTES} bytes through dp-pe1-snic", run)
        daemons = iperf_children(run.pid)
        assert any(" client " in argv for argv in daemons.values()), daemons
        run.proc.send_signal(signal.SIGKILL)
        assert run.wait(30) == -signal.SIGKILL
    finally:
        run.close()

    # a SIGKILLed run cannot clean up: its namespaces and its manifest are still there
    left = leftovers()
    assert TINY_NETNS <= set(left["netns"]), left
    assert {"dp-stor", "dp-rail0", "dp-rail1", "dp-mgmt", "dp-pe1-snic", "dp-st1-nic", "dp-ctl1-mgmt"} <= set(left["links"]), left
    assert left["manifest"] is True
    manifest = json.loads(MANIFEST.read_text())
    assert manifest["owner_pid"] == run.pid
    assert set(manifest["netns"]) == TINY_NETNS
    recorded = {tuple(p) for p in manifest["procs"]}
    assert set(daemons) <= recorded, (daemons, recorded)

    # the iperf3 daemons die with their parent (setpriv --pdeathsig TERM), before any clean and long
    # before their flows would have ended on their own (the run was killed in the first second of a 4 s round)
    wait_for(lambda: not [p for p, s in daemons if alive(p, s)], PDEATH_S,
             f"the run's iperf3 processes {sorted(daemons.values())} to die with their parent")

    res = run_dpemu("clean", timeout=120)
    assert res.returncode == 0, describe(res)
    assert "removed" in res.stdout, describe(res)
    assert_nothing_left("after dpemu clean")
    assert not [p for p, s in daemons if alive(p, s)]

    # and a second clean finds nothing
    res = run_dpemu("clean", timeout=60)
    assert res.returncode == 0, describe(res)
    assert "nothing to clean" in res.stdout, describe(res)


@pytest.mark.netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_second_signal_during_teardown(tmp_path, sig):
    """An impatient user presses Ctrl-C twice: the second one lands while the run is
    cleaning up (its iperf3 processes are stopped, its namespaces not yet removed)."""
    run = _start_tiny(tmp_path)
    try:
        _wait_built_and_loaded(run)
        run.proc.send_signal(sig)
        wait_for(lambda: not iperf_children(run.pid), 20, "the run to stop its iperf3 processes")
        assert "dp-pe1" in netns_names(), "teardown already finished: the second signal would test nothing"
        run.proc.send_signal(sig)
        rc = run.wait(60)
        left = leftovers()
        claims_clean = "everything the run built was removed" in run.stderr
        output = run.output()
    finally:
        run.close()
        if any(leftovers().values()):  # what the bug left: remove it (dpemu's own objects only)
            run_dpemu("clean", timeout=120)
    assert rc == 130, f"exit {rc}\n{output}"
    assert left == {"netns": [], "links": [], "procs": [], "manifest": False} or not claims_clean, \
        f"dpemu said everything was removed but left {left}"
    assert left == {"netns": [], "links": [], "procs": [], "manifest": False}, f"left behind: {left}"
