"""scenarios.cli without root: plan, list, and `run` refusing before it builds anything."""

from __future__ import annotations

import os

import pytest

from emulator import net as emulator_net
from emulator import registry as emulator_registry
from scenarios import cli, results


def words(text: str) -> str:
    """Whitespace-normalized text (rich may wrap long lines for a narrow console)."""
    return " ".join(text.split())


@pytest.fixture
def not_root(monkeypatch, tmp_path):
    """Pretend to be an ordinary user, and make anything that would touch the
    machine (build, the /run/dpemu lock and manifest, the results directory)
    fail the test loudly if it is ever reached."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("reached a step that touches the machine")

    monkeypatch.setattr(emulator_net.Emulation, "build", forbidden)
    monkeypatch.setattr(emulator_net.Emulation, "__init__", forbidden)
    monkeypatch.setattr(emulator_registry.Registry, "__enter__", forbidden)
    monkeypatch.setattr(results, "make_run_dir", forbidden)
    return tmp_path / "results"


# -- plan --------------------------------------------------------------------
def test_plan_tiny(capsys):
    assert cli.main(["plan", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "tc -n dp-pe1 qdisc add dev pe1-snic root handle 1: htb" in out.splitlines()[
        out.splitlines().index("## tc operations") + 1]
    assert "# scenario tiny: 4 hosts, 4 bridges, 7 shaped links + 4 management links, 104 tc operations" in out
    assert "ok: every link within the faithful range" in out


def test_plan_with_set(capsys):
    assert cli.main(["plan", "tiny", "--set", "cluster.prefill_nodes=2"]) == 0
    assert "# scenario tiny: 5 hosts, 4 bridges, 10 shaped links + 5 management links," in capsys.readouterr().out


def test_plan_bad_file_returns_1_with_error_on_stderr(tiny_data, write_scenario, capsys):
    tiny_data["cluster"]["snic_rate"] = 40
    path = write_scenario(tiny_data, "bad.yaml")
    assert cli.main(["plan", path]) == 1
    cap = capsys.readouterr()
    assert cap.out == ""
    err = words(cap.err)
    assert err.startswith("dpemu: bad.yaml: cluster.snic_rate: ")
    assert "has no unit" in err


def test_plan_refused_scenario_returns_1(capsys):
    assert cli.main(["plan", "tiny", "--set", "scale.bytes=0.000001"]) == 1
    assert "REFUSED: snic links would be shaped to" in capsys.readouterr().out


def test_plan_unknown_scenario(capsys):
    assert cli.main(["plan", "no_such_scenario"]) == 1
    assert "no such scenario" in capsys.readouterr().err


def test_error_message_stays_on_one_line(tiny_data, write_scenario, capsys):
    tiny_data["name"] = "not valid " * 60  # a message longer than any terminal
    assert cli.main(["plan", write_scenario(tiny_data)]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# -- list --------------------------------------------------------------------
def test_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert {"default", "cluster", "tiny", "calibrate_all"} <= set(names)
    # every shipped scenario is valid in a fresh clone: the replay scenarios' trace ships with the repository
    assert [line for line in out.splitlines() if "invalid" in line] == []


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2


# -- run refuses without root ----------------------------------------------
def test_run_without_root_fails_before_building(not_root, capsys):
    assert cli.main(["run", "tiny", "--out", str(not_root)]) == 1
    err = words(capsys.readouterr().err)
    assert "use sudo" in err
    assert not not_root.exists()


def test_run_with_bad_override_fails_before_building(not_root, capsys):
    assert cli.main(["run", "tiny", "--set", "cluster.prefill_nodes=0", "--out", str(not_root)]) == 1
    err = words(capsys.readouterr().err)
    assert "cluster.prefill_nodes" in err
    assert "greater than or equal to 1" in err
    assert not not_root.exists()


def test_run_of_refused_plan_fails_before_building(not_root, capsys):
    assert cli.main(["run", "tiny", "--set", "scale.bytes=0.000001", "--out", str(not_root)]) == 1
    assert "cannot be emulated faithfully" in words(capsys.readouterr().err)


def test_result_tables_fit_80_columns_without_truncation():
    from rich.console import Console

    from scenarios import tables
    from scenarios.terminal import calibration_table, rich_grid, serving_table
    row = {"link_class": "stnic", "direction": "down", "links": 2, "real_bps": 1.6e12, "configured_bps": 160e6,
           "expected_bps": 160e6, "achieved_bps": 159.87e6, "worst_error": -0.0123, "iperf3_goodput_bps": 152.51e6,
           "within_tolerance": True}
    mode = {"jct_s": 184.4, "requests": 1768, "paths": {"pe": 1260, "de": 1508},
            "snic_util": {"pe": 1.0, "de": 0.73}, "cnic_util": {"pe": 0.2, "de": 0.07},
            "ttft_s": {"p50": 10.34, "p99": 122.04}, "tpot_s": {"p50": 0.0143, "p99": 0.0156}}
    coll = {"prefill": {"count": 12345, "p50_s": 0.0163, "p99_s": 0.0962, "bytes": 1},
            "decode": {"count": 123456, "p50_s": 0.0008, "p99_s": 0.0113, "bytes": 1}}
    summary = {"scenario": "default", "calibration": {"mode": "class", "classes": [row]},
               "modes": {"basic": mode, "dualpath": {**mode, "collectives": coll}, "oracle": mode}}
    console = Console(width=80, record=True)
    console.print(calibration_table(summary))
    console.print(serving_table(summary))
    console.print(rich_grid(tables.collectives(summary)))
    text = console.export_text()
    assert "…" not in text
    assert "dualpath" in text and "159.9Mbit" in text and "10.3/122.0" in text
    assert "16.3/96.2" in text and "0.8/11.3" in text  # collectives of the one mode that ran them


def test_isolation_comparison_and_its_table():
    from rich.console import Console

    from scenarios import tables
    from scenarios.terminal import rich_grid
    from scenarios.results import isolation_comparison

    def mode(prefill_p99, decode_p99, tpot_p99):
        return {"jct_s": 20.0, "tpot_s": {"p50": 0.017, "p99": tpot_p99}, "ttft_s": {"p50": 3.5, "p99": 7.0},
                "cnic_util": {"pe": 0.25, "de": 0.05}, "cnic_kv_gbps": 345.6,
                "collectives": {"prefill": {"count": 9, "p50_s": 0.015, "p99_s": prefill_p99, "bytes": 1},
                                "decode": {"count": 9, "p50_s": 0.001, "p99_s": decode_p99, "bytes": 1}}}

    modes = {"basic": mode(0.02, 0.004, 0.020), "oracle": mode(0.025, 0.005, 0.019),
             "dualpath": mode(0.026, 0.006, 0.021)}
    off = mode(0.096, 0.011, 0.0246)
    iso = isolation_comparison(True, modes, off)
    assert iso["on"]["slowdown_p99"] == {"prefill": 1.04, "decode": 1.2}
    assert iso["off"]["slowdown_p99"] == {"prefill": 3.84, "decode": 2.2}
    assert iso["off"]["tpot_p99_vs_basic"] == 1.23
    assert "slowdown_p99" not in iso["reference"]
    # configured off: the flipped run is the "on" one
    assert isolation_comparison(False, modes, off)["on"]["slowdown_p99"]["prefill"] == 3.84
    console = Console(width=80, record=True)
    console.print(rich_grid(tables.isolation({"isolation": iso})))
    text = console.export_text()
    assert "…" not in text and "3.84x" in text and "isolation off" in text and " 346" in text
    md = tables.markdown(tables.isolation({"isolation": iso}))  # report.md has the same rows
    assert md[2] == "| run | prefill p50/p99 | slow | decode p50/p99 | slow | TPOT p50/p99 | TTFT s p50 | KV Gbit/s |"
    assert md[6] == "| isolation off | 15.0/96.0 | 3.84x | 1.0/11.0 | 2.20x | 17.0/24.6 | 3.5 | 346 |"


def test_plan_lists_the_serving_daemons_of_every_mode(capsys):
    assert cli.main(["plan", "isolation"]) == 0
    out = capsys.readouterr().out
    for mode in ("basic", "oracle", "dualpath"):
        assert f"{mode}: node de1: setpriv --pdeathsig TERM -- ip netns exec dp-de1 " in out
        assert f"{mode}: workload driver: " in out
    # collectives on: every node names its whole engine group and the collective DSCP
    assert "--collective-group 10.32.2.1:7300,10.32.2.2:7300,10.32.2.3:7300,10.32.2.4:7300" in out
    assert out.count("dualpath: scheduler: ") == 2  # once more with isolation flipped


def test_kv_throughput_on_the_compute_fabric_is_upward_cnic_bytes_less_collectives():
    from emulator.monitor import ClassKey, ClassSample, TcSampler
    from scenarios.modestats import LinkKey, cnic_kv_gbps as _cnic_kv_gbps

    up, down, snic = ClassKey("dp-pe1", "pe1-cnic0", 1), ClassKey(None, "dp-pe1-cnic0", 1), ClassKey("x", "s", 1)
    keys = {up: LinkKey("pe1-cnic0", "cnic", "pe", "up", "link", 160e6),
            down: LinkKey("pe1-cnic0", "cnic", "pe", "down", "link", 160e6),
            snic: LinkKey("pe1-snic", "snic", "pe", "up", "link", 20e6)}
    sampler = TcSampler(list(keys))
    for t, n in ((10.0, 0), (12.0, 10_000_000)):  # 10 MB up in 2 s; the other links' bytes do not count
        sampler.samples += [ClassSample(t, k, n * (1 + i), 0, 0, 0) for i, k in enumerate(keys)]
    # (10 MB - 2 MB of collectives) x 8 / 2 s = 32 Mbit/s emulated; rates scaled x0.0004 -> 80 Gbit/s real
    assert _cnic_kv_gbps(sampler, keys, 10.0, 12.0, 2_000_000, 0.0004) == 80.0
    assert _cnic_kv_gbps(sampler, {snic: keys[snic]}, 10.0, 12.0, 0, 0.0004) is None
