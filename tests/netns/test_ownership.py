"""dpemu touches only its own objects, and only one run owns the machine."""

from __future__ import annotations

import os
import re

import pytest

from netns_tools import LOCK, assert_nothing_left, describe, link_names, netns_names, run_dpemu, sh

# Close to our names but outside ^dp-[a-z0-9][a-z0-9-]*$ and in no manifest.
OWNED_GRAMMAR = re.compile(r"^dp-[a-z0-9][a-z0-9-]*$")  # the documented grammar, not the code's copy
DECOY_NETNS = ["dpx-decoy", "dp-Decoy", "dp_decoy"]
DECOY_VETH = ("dpxdecoy0", "dpxdecoy1")
DECOY_VETH2 = ("dp-Decoy0", "dp_decoy1")


@pytest.mark.netns
def test_clean_leaves_foreign_objects_alone():
    assert not any(OWNED_GRAMMAR.match(n) for n in DECOY_NETNS + list(DECOY_VETH + DECOY_VETH2))
    made_ns, made_links = [], []
    try:
        for ns in DECOY_NETNS:
            assert ns not in netns_names(), f"{ns} already exists; not ours to touch"
            sh(["ip", "netns", "add", ns])
            made_ns.append(ns)
        for a, b in (DECOY_VETH, DECOY_VETH2):
            assert not ({a, b} & link_names()), f"{a}/{b} already exist; not ours to touch"
            sh(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
            made_links.append(a)
        # a process inside a decoy namespace must survive too
        sleeper = sh(["ip", "netns", "exec", "dpx-decoy", "sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"])
        sleeper_pid = int(sleeper.stdout.strip())

        res = run_dpemu("clean", timeout=60)
        assert res.returncode == 0, describe(res)
        assert "nothing to clean" in res.stdout, describe(res)

        assert set(DECOY_NETNS) <= netns_names()
        assert set(DECOY_VETH + DECOY_VETH2) <= link_names()
        assert os.path.exists(f"/proc/{sleeper_pid}"), "dpemu clean killed a process in a foreign namespace"
    finally:
        for ns in made_ns:
            for pid in sh(["ip", "netns", "pids", ns], check=False).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            sh(["ip", "netns", "delete", ns], check=False)
        for a in made_links:
            sh(["ip", "link", "delete", a], check=False)
    assert not (set(DECOY_NETNS) & netns_names())
    assert not (set(DECOY_VETH + DECOY_VETH2) & link_names())


@pytest.mark.netns
def test_second_run_is_refused(tmp_path):
    from emulator.registry import Registry

    with Registry():
        assert LOCK.read_text() == str(os.getpid())
        res = run_dpemu("run", "tiny", "--out", str(tmp_path), timeout=60)
        assert res.returncode == 1, describe(res)
        assert "another dpemu run" in res.stderr, describe(res)
        assert f"pid {os.getpid()}" in res.stderr, describe(res)
        # it created nothing and did not take over the lock
        assert_nothing_left("by a refused run")
        assert LOCK.read_text() == str(os.getpid())


@pytest.mark.netns
def test_refused_run_writes_no_results_directory(tmp_path):
    from emulator.registry import Registry

    with Registry():
        res = run_dpemu("run", "tiny", "--out", str(tmp_path), timeout=60)
        assert res.returncode == 1, describe(res)
        assert "another dpemu run" in res.stderr, describe(res)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert written == [], f"a refused run wrote {written}"
