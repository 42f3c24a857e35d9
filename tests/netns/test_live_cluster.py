"""A live cluster, as a student uses it: `dpemu up` at a prompt in tmux, `dpemu exec`, the prompt's node
commands, `dpemu load` and `dpemu top` from other terminals, then `dpemu down`; and a SIGKILLed `up` that
`dpemu clean` removes. The suite's leak check runs after each test as well."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess

import pytest

from netns_tools import (DPEMU, REPO, Background, assert_nothing_left, describe, leftovers, run_dpemu, wait_for)

from emulator.registry import STATE_DIR

LIVE = STATE_DIR / "live.json"
SMALL_LOAD = ["mode=dualpath", "agents=12", "turns=2"]


def _live(kind: str = "up") -> dict | None:
    try:
        data = json.loads(LIVE.read_text())
    except (OSError, ValueError):
        return None
    return data if data["kind"] == kind else None


class Tmux:
    """A tmux server of the test's own (its own socket), so nothing of the user's tmux is touched."""

    def __init__(self, tmp):
        if shutil.which("tmux") is None:
            pytest.fail("tmux is not installed (the Makefile's apt packages bring it)", pytrace=False)
        self.sock = str(tmp / "tmux.sock")
        self.env = f"HOME={tmp}"  # the prompt's history goes there, not to root's home
        self.started = False

    def tmux(self, *args: str, check: bool = True) -> str:
        res = subprocess.run(["tmux", "-S", self.sock, *args], capture_output=True, text=True, timeout=20)
        if check and res.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {res.stderr}")
        return res.stdout

    def start(self, window: str, argv: list[str]) -> None:
        """`argv` in a new window (the first one starts the session), kept on screen after it exits."""
        cmd = ["env", self.env, *argv]
        if not self.started:
            self.tmux("new-session", "-d", "-s", "dpemu", "-n", window, "-x", "160", "-y", "60", "-c", str(REPO),
                      *cmd)
            self.tmux("set-option", "-t", "dpemu", "remain-on-exit", "on")
            self.started = True
        else:
            self.tmux("new-window", "-t", "dpemu", "-n", window, "-c", str(REPO), *cmd)

    def keys(self, window: str, text: str) -> None:
        self.tmux("send-keys", "-t", f"dpemu:{window}", text, "Enter")

    def screen(self, window: str) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", f"dpemu:{window}")

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", self.sock, "kill-server"], capture_output=True, timeout=20)


@pytest.mark.netns
def test_up_exec_prompt_load_top_down(tmp_path):
    t = Tmux(tmp_path)
    out = tmp_path / "results"
    try:
        t.start("up", [DPEMU, "up", "serving_tiny", "--out", str(out)])
        wait_for(lambda: _live("up"), 180, "dpemu up to publish its cluster", period=0.5)
        wait_for(lambda: "dpemu> " in t.screen("up"), 30, "the prompt", period=0.2)
        screen = t.screen("up")
        assert "the cluster of serving_tiny is up" in screen and "dp-pe1" in screen, screen

        # dpemu exec: a command in a node's namespace, by the node's name
        res = run_dpemu("exec", "pe1", "--", "ip", "-br", "addr", "show", "dev", "pe1-snic")
        assert res.returncode == 0 and "10.10.1.1" in res.stdout, describe(res)
        res = run_dpemu("exec", "pe9", "--", "true")
        assert res.returncode == 1 and "no node 'pe9'" in res.stderr and "pe1, de1" in res.stderr, describe(res)

        # the prompt: a node command with another node's name in it, across the storage fabric
        t.keys("up", "pe1 ping -c 2 -W 2 de1")
        wait_for(lambda: "2 received" in t.screen("up"), 20, "pe1 to ping de1 from the prompt", period=0.2)
        assert "PING 10.10.2.1" in t.screen("up")

        # a load from another terminal while dpemu top watches in a third
        load = Background(tmp_path, "load", *SMALL_LOAD)
        try:
            t.start("top", [DPEMU, "top"])
            busy = wait_for(lambda: _busy_snic(t.screen("top")), 120, "dpemu top to show an SNIC carrying KV",
                            run=load, period=0.5)
            print("dpemu top under load:\n" + t.screen("top"))
            assert busy
            assert load.wait(300) in (0, 3), load.output()  # 3: finished, the verdict says why not trusted
        finally:
            load.close()
        text = load.out_path.read_text()
        (load_dir,) = re.findall(r"results: (\S+/load1)", text)
        summary = json.loads((REPO / load_dir / "summary.json").read_text())  # an absolute path stays absolute
        assert set(summary["modes"]) == {"dualpath"} and summary["modes"]["dualpath"]["requests"] == 24
        assert summary["ledger"]["blocks_read"] > 0 and summary["ledger"]["blocks_lost"] == 0

        # Ctrl-C during a load at the prompt ends that load only: the prompt comes back, the cluster stays up
        t.keys("up", "load " + " ".join(SMALL_LOAD))
        wait_for(lambda: t.screen("up").count("serving mode dualpath") >= 1, 60, "the prompt's load to start",
                 period=0.2)
        t.tmux("send-keys", "-t", "dpemu:up", "C-c")
        wait_for(lambda: "load: interrupted by Ctrl-C" in t.screen("up"), 60, "the load to stop", period=0.2)
        wait_for(lambda: t.screen("up").rstrip().endswith("dpemu>"), 60, "the prompt again", period=0.2)
        assert _live("up") is not None
        res = run_dpemu("exec", "de1", "--", "ping", "-c", "1", "-W", "2", "10.10.1.1")
        assert res.returncode == 0, describe(res)

        # down: the owner tears everything down and says so in its terminal
        res = run_dpemu("down", timeout=180)
        assert res.returncode == 0 and "went down" in res.stdout, describe(res)
        wait_for(lambda: "the cluster is down" in t.screen("up"), 30, "dpemu up to say it is down", period=0.2)
        assert not LIVE.exists()
        assert_nothing_left("after dpemu down")
    finally:
        if t.started:
            print("the dpemu up terminal at the end:\n" + t.screen("up"))
        t.kill()
        if leftovers()["netns"]:
            run_dpemu("down", timeout=180)


def _busy_snic(screen: str) -> bool:
    """A line of top's screen about an SNIC with a non-zero rate (a number with a bit/s unit that is not 0)."""
    for line in screen.splitlines():
        if "snic" in line and re.search(r"\b(?!0(?:\.0+)?\s?[kMGT]?bit)\d+(\.\d+)?\s?[kMGT]bit", line):
            return True
    return False


@pytest.mark.netns
def test_a_killed_up_is_removed_by_clean_and_down_says_there_is_nothing(tmp_path):
    run = Background(tmp_path, "up", "serving_tiny", "--no-prompt", "--out", str(tmp_path / "results"))
    try:
        wait_for(lambda: _live("up"), 180, "dpemu up to publish its cluster", run=run, period=0.5)
        res = run_dpemu("load", "cluster.prefill_nodes=2")
        assert res.returncode == 1 and "serving.* keys only" in res.stderr, describe(res)
        run.proc.send_signal(signal.SIGKILL)
        assert run.wait(30) == -signal.SIGKILL
    finally:
        run.close()
    assert leftovers()["netns"], "a SIGKILLed up left nothing: the test tests nothing"
    res = run_dpemu("load", "mode=dualpath")
    assert res.returncode == 1 and "no dpemu cluster is live" in res.stderr, describe(res)
    res = run_dpemu("clean", timeout=120)
    assert res.returncode == 0, describe(res)
    assert not LIVE.exists()
    assert_nothing_left("after SIGKILL + dpemu clean")
    res = run_dpemu("down")
    assert res.returncode == 0 and "nothing to do" in res.stdout, describe(res)
