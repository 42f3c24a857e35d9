"""`dpemu top` on a real run: `dpemu run serving_tiny` (DualPath only, 16 agents) in the background, `top --once`
while it serves (the cluster's NICs named, an SNIC reading, the serving plane answering), then the live view
into a pipe until the run ends: one status watcher all along, and top leaves (exit 0) when the cluster goes
down, its watcher with it (the suite's leak check counts every "-m daemons." process)."""

from __future__ import annotations

import re
import time

import pytest

from netns_tools import Background, describe, marked_procs, proc_ppid, run_dpemu, wait_for

from scenarios import live

NICS = ("pe1-snic", "de1-snic", "pe1-cnic0", "pe1-cnic1", "de1-cnic0", "de1-cnic1", "st1-nic")
RATE = re.compile(r"\b\d+(\.\d+)?[KMGT]?bit/s")  # a zero rate shows as "0"


def _watchers(ppid: int) -> set[tuple[int, int]]:
    """The status watchers that top (`ppid`) started: `ip netns exec` execs python, so the pid is its child."""
    return {k for k, argv in marked_procs().items() if "daemons.statuswatch" in argv and proc_ppid(k[0]) == ppid}


@pytest.mark.netns
def test_top_shows_a_serving_run_and_leaves_when_it_ends(tmp_path):
    (tmp_path / "top").mkdir()
    run = Background(tmp_path, "run", "serving_tiny", "--set", "serving.modes=[dualpath]",
                     "--set", "serving.workload.agents=16", "--out", str(tmp_path / "out"))
    view = None
    try:
        wait_for(lambda: (c := live.current()) is not None and c.owner_pid == run.pid, 300,
                 "the run's /run/dpemu/live.json (built and calibrated)", run=run)
        seen_rate = seen_serving = False
        deadline = time.monotonic() + 240
        while not (seen_rate and seen_serving):
            assert run.proc.poll() is None and time.monotonic() < deadline, \
                f"the run ended (or 240 s passed) before top saw an SNIC read and the serving plane\n{run.output()}"
            res = run_dpemu("top", "--once", "--interval", "1", timeout=60)
            assert res.returncode == 0 and "Traceback" not in res.stderr, describe(res)
            if "cluster went down" in res.stdout:
                continue  # the run is tearing down: the assert above ends the loop
            for nic in NICS:
                assert re.search(rf"^\s*(\w+\s+)?{nic}\s", res.stdout, re.M), f"{nic} missing\n{res.stdout}"
            assert "serving_tiny" in res.stdout and f"pid {run.pid}" in res.stdout
            seen_rate |= any(RATE.search(line) for line in res.stdout.splitlines() if "-snic" in line)
            seen_serving |= bool(re.search(r"^pe1\s+pe\s+\d+\s+\d+\s+\d+", res.stdout, re.M)
                                 and "turns in the scheduler: " in res.stdout)
        print(res.stdout)

        # the live view, into a pipe (frame after frame) until the cluster goes away
        view = Background(tmp_path / "top", "top", "--interval", "0.5")
        first = wait_for(lambda: _watchers(view.pid), 30, "top's status watcher", run=view)
        time.sleep(2)
        assert _watchers(view.pid) == first and len(first) == 1, "one watcher, started once"
        assert run.wait(600) in (0, 3), run.output()  # 3: finished, but not trustworthy on this machine
        assert view.wait(30) == 0, view.output()
        out = view.out_path.read_text()
        assert "dpemu top: cluster went down" in out and "pe1-snic" in out, view.output()
        assert not set(marked_procs()) & first, "top's watcher outlived it"
    finally:
        if view is not None:
            view.close()
        run.close()
