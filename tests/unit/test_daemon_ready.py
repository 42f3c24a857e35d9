"""A daemon's start is bounded: it says "ready" in time, or the run stops with its name and its stderr."""

import subprocess
import sys

import pytest

from scenarios.serve import stderr_path, wait_ready


def _start(code: str, log):
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=log, text=True)


def test_a_daemon_that_says_ready_is_ready(tmp_path):
    log = stderr_path(tmp_path, "node pe1")
    assert log.name == "node-pe1.stderr.log"
    with log.open("w") as f:
        proc = _start("print('starting'); print('ready', flush=True); import time; time.sleep(5)", f)
        try:
            wait_ready(proc, "node pe1", log, timeout_s=20)
        finally:
            proc.kill()
            proc.wait()


def test_a_silent_daemon_times_out_with_its_name(tmp_path):
    log = stderr_path(tmp_path, "storage st1")
    with log.open("w") as f:
        proc = _start("import sys, time; sys.stderr.write('binding 10.10.3.1:7000\\n'); sys.stderr.flush(); "
                      "time.sleep(30)", f)
        try:
            with pytest.raises(RuntimeError, match=r"storage st1 did not start: it was not ready after 0.5 s.*binding"):
                wait_ready(proc, "storage st1", log, timeout_s=0.5)
        finally:
            proc.kill()
            proc.wait()


def test_a_daemon_that_exits_says_how_and_why(tmp_path):
    log = stderr_path(tmp_path, "node de2")
    with log.open("w") as f:
        proc = _start("import sys; sys.stderr.write('address already in use\\n'); sys.exit(3)", f)
        with pytest.raises(RuntimeError, match=r"node de2 did not start: it exited with code 3.*already in use"):
            wait_ready(proc, "node de2", log, timeout_s=20)
