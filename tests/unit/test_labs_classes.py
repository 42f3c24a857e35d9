"""Lab 3, traffic classes (scenarios/labs_classes.py), without root: its grading of a real recorded run of the
lab's scenario (tests/unit/fixtures/labs/lab3, trimmed by ``record`` below) against correct and wrong predictions,
and its reading of packet captures crafted here with scapy (KV and collective packets with the right and the
wrong DSCP marks). The correct predictions are what a student reasons from the scenario and the paper, never
copied from the run's measured values.

    .venv/bin/python tests/unit/test_labs_classes.py results/lab3_traffic_classes/<run id>   # re-record
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "labs" / "lab3"
MODES = ("oracle", "dualpath", "dualpath-isolation-off")


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def lab3_run(tmp_path) -> Path:
    """A copy of the recorded lab 3 run (grading writes into the directory it grades)."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "lab3"))


def write(tmp_path: Path, data: dict, name: str = "predictions.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def correct(run: Path) -> dict:
    """What a student who reasons right predicts: the marks from the scenario's traffic_classes, the KV share
    from the handout's per-turn estimate (the workload's mean turn, the model's KV and AllToAll bytes per
    token), "unchanged" with isolation on, "clearly slower" off, and KV unaffected by its class."""
    from daemons import costmodel
    from traffic import collectives
    from traffic.traces import play
    from traffic.workload import WorkloadSpec

    sc = yaml.safe_load((run / "scenario.yaml").read_text())
    w = sc["serving"]["workload"]
    turns = [t for tr in play(WorkloadSpec(set_name=w["set"], seed=w["seed"], agents=w["agents"],
                                           turns_per_agent=w["turns_per_agent"], gen_scale=w["gen_scale"]))[0]
             for t in tr.turns]
    mean = {k: sum(getattr(t, k) for t in turns) / len(turns)
            for k in ("context_before_tokens", "append_tokens", "gen_tokens")}
    m = costmodel.MODELS[sc["cluster"]["model"]]
    p, d = sc["cluster"]["prefill_nodes"], sc["cluster"]["decode_nodes"]
    # the context crosses once, whichever side read it (DE -> PE forward, or PE -> DE push), and the new
    # tokens' KV goes PE -> DE
    kv = costmodel.kv_bytes_per_token(m) * (mean["context_before_tokens"] + mean["append_tokens"])
    moe = m.layers - m.dense_layers
    coll = moe * (mean["append_tokens"] * collectives.alltoall_bytes_per_token(m, p)
                  + mean["gen_tokens"] * collectives.alltoall_bytes_per_token(m, d))
    return {"dscp_kv": sc["traffic_classes"]["dscp_kv"], "dscp_collective": sc["traffic_classes"]["dscp_collective"],
            "kv_byte_share": round(kv / (kv + coll), 2), "slowdown_on": 1.0, "slowdown_off": 3.0,
            "kv_rate_on_over_off": 1.0}


def craft(path: Path, kv: int = 10, coll: int = 46, wrong_kv: int = 0, wrong_coll: int = 0) -> Path:
    """A capture as tcpdump writes it on pe1's CNIC: KV to and from engines (7200) and storage (7000), each
    with an ack, collectives to pe2 (7300), an ARP; `wrong_*` packets of a kind carry DSCP 0 instead."""
    from scapy.all import ARP, IP, TCP, Ether, Raw, wrpcap

    pe1, pe2, de1 = "10.32.1.1", "10.32.1.2", "10.32.2.1"
    pkts = []
    for i in range(12):
        dscp = 0 if i < wrong_kv else kv
        pkts.append(Ether() / IP(src=de1, dst=pe1, tos=dscp << 2) / TCP(sport=7200, dport=41000 + i % 2, flags="A")
                    / Raw(b"k" * 1400))
        pkts.append(Ether() / IP(src=pe1, dst=de1, tos=dscp << 2) / TCP(sport=41000 + i % 2, dport=7200, flags="A"))
    pkts.append(Ether() / IP(src=pe1, dst="10.10.3.1", tos=kv << 2) / TCP(sport=52000, dport=7000) / Raw(b"s" * 600))
    for i in range(6):
        dscp = 0 if i < wrong_coll else coll
        pkts.append(Ether() / IP(src=pe1, dst=pe2, tos=dscp << 2) / TCP(sport=43000, dport=7300, flags="PA")
                    / Raw(b"c" * 300))
    pkts.append(Ether() / ARP(psrc=pe1, pdst=pe2))
    wrpcap(str(path), pkts)
    return path


# -- the capture ------------------------------------------------------------------------------------------------
def test_a_capture_is_counted_per_kind_and_dscp(tmp_path):
    from scenarios import labs_classes
    cap = labs_classes.read_capture(craft(tmp_path / "c.pcap"))
    assert cap.marks("kv") == {10: 13} and cap.marks("kv", data=False) == {10: 12}  # the acks carry no data
    assert cap.marks("collective") == {46: 6} and cap.marks("other") == {} and cap.non_ip == 1
    assert cap.total("kv", what=1) == 12 * (14 + 20 + 20 + 1400) + 12 * (14 + 20 + 20) + (14 + 20 + 20 + 600)
    table = "\n".join(cap.table())
    assert "KV          7000, 7200    10  0x28   yes       13" in table
    assert "KV          7000, 7200    10  0x28    no       12" in table
    assert "collective  7300          46  0xb8   yes        6" in table


def test_a_file_that_is_no_capture_is_refused(tmp_path):
    from emulator.errors import ConfigError
    from scenarios import labs_classes
    bad = tmp_path / "notes.pcap"
    bad.write_text("not a capture\n")
    with pytest.raises(ConfigError, match="cannot be read as a packet capture"):
        labs_classes.read_capture(bad)


def test_right_marks_pass_with_the_counts(lab3_run, tmp_path):
    from scenarios import labs, labs_classes
    pred = {**labs.read_predictions(labs_classes.LAB, write(tmp_path, correct(lab3_run))),
            "pcap": craft(tmp_path / "c.pcap")}
    rows = {r.key: r for r in labs_classes.grade(lab3_run, pred)}
    assert rows["dscp_kv"].ok and rows["dscp_kv"].source == "capture" and rows["dscp_kv"].expected == 10
    assert "all 13 of the capture's KV packets (port 7000, 7200) with data carry DSCP 10" in rows["dscp_kv"].why
    assert rows["dscp_collective"].ok and "all 6 of the capture's collective packets" in rows["dscp_collective"].why


@pytest.mark.parametrize("kind, marks, why", [
    ("dscp_kv", {"wrong_kv": 3}, "capture's 13 KV packets (port 7000, 7200) with data carries traffic_classes.dscp_kv "
                                 "= 10 (tos 0x28): 3 carry DSCP 0, 10 carry DSCP 10; 3 of its packets without data "
                                 "(handshake, acks) carry DSCP 0"),
    ("dscp_collective", {"wrong_coll": 2}, "capture's 6 collective packets (port 7300) with data carries "
                                           "traffic_classes.dscp_collective = 46 (tos 0xb8): 2 carry DSCP 0, 4 carry "
                                           "DSCP 46"),
    ("dscp_kv", {"kv": 46, "coll": 10}, "dscp_kv = 10 (tos 0x28): 13 carry DSCP 46"),  # the marks swapped
])
def test_a_packet_with_the_wrong_mark_fails_its_key_even_with_the_right_prediction(lab3_run, tmp_path, kind,
                                                                                   marks, why):
    from scenarios import labs, labs_classes
    pred = {**labs.read_predictions(labs_classes.LAB, write(tmp_path, correct(lab3_run))),
            "pcap": craft(tmp_path / "c.pcap", **marks)}
    rows = {r.key: r for r in labs_classes.grade(lab3_run, pred)}
    assert not rows[kind].ok and rows[kind].source == "capture"
    assert rows[kind].why.startswith("not every one of the capture's") and why in rows[kind].why
    others = {"dscp_kv", "dscp_collective"} - {kind} if "wrong" in next(iter(marks)) else set()
    assert all(rows[k].ok for k in others | {k for k in rows if not k.startswith("dscp_")})


def test_an_unmarked_handshake_is_named_but_fails_nothing(lab3_run, tmp_path):
    """The collective agents' listening sockets answer a connection with an unmarked SYN-ACK (a real capture's
    finding, TEACHER.md): it moves no collective byte, so the key passes and its why line names it."""
    from scapy.all import IP, TCP, Ether, rdpcap, wrpcap
    from scenarios import labs, labs_classes
    path = craft(tmp_path / "c.pcap")
    pkts = list(rdpcap(str(path))) + [Ether() / IP(src="10.32.1.2", dst="10.32.1.1", tos=0)
                                      / TCP(sport=7300, dport=38284, flags="SA")]
    wrpcap(str(path), pkts)
    pred = {**labs.read_predictions(labs_classes.LAB, write(tmp_path, correct(lab3_run))), "pcap": path}
    row = {r.key: r for r in labs_classes.grade(lab3_run, pred)}["dscp_collective"]
    assert row.ok and "1 of its packets without data (handshake, acks) carry DSCP 0" in row.why


def test_a_capture_without_kv_fails_and_says_where_to_capture(lab3_run, tmp_path):
    from scapy.all import IP, TCP, Ether, wrpcap
    from scenarios import labs, labs_classes
    path = tmp_path / "mgmt.pcap"
    wrpcap(str(path), [Ether() / IP(tos=0) / TCP(sport=50000, dport=7100)])  # management traffic only
    pred = {**labs.read_predictions(labs_classes.LAB, write(tmp_path, correct(lab3_run))), "pcap": path}
    rows = {r.key: r for r in labs_classes.grade(lab3_run, pred)}
    assert not rows["dscp_kv"].ok and "holds no KV packets (port 7000, 7200) with data" in rows["dscp_kv"].why
    assert "take it on a CNIC while DualPath serves" in rows["dscp_kv"].why


# -- grading the recorded run -----------------------------------------------------------------------------------
def test_correct_predictions_pass_and_the_grade_and_picture_are_written(lab3_run, tmp_path, capsys):
    from scenarios import cli
    path = write(tmp_path, correct(lab3_run))
    code = cli.main(["lab", "check", "3", "--results", str(lab3_run), "--predictions", str(path)])
    out = capsys.readouterr().out
    grade = json.loads((lab3_run / "grade.json").read_text())
    assert [r["key"] for r in grade["rows"] if not r["ok"]] == []
    assert grade["passed"] == grade["total"] == 6 and code == (0 if grade["trustworthy"] else 3)
    assert "6 of 6 predictions passed" in out
    rows = {r["key"]: r for r in grade["rows"]}
    assert rows["dscp_kv"]["source"] == "capture"  # the run's own cnic.pcap, taken during dualpath
    assert "4 of its packets without data (handshake, acks) carry DSCP 0" in rows["dscp_collective"]["why"]
    summary = json.loads((lab3_run / "summary.json").read_text())
    on, off = (summary["isolation"][k]["cnic_kv_gbps"] for k in ("on", "off"))
    assert rows["kv_rate_on_over_off"]["expected"] == round(on / off, 4)
    assert rows["slowdown_off"]["expected"] > 2 and rows["slowdown_off"]["tolerance"] == "same side of 2x"
    assert grade["picture"] == "isolation.png" and (lab3_run / "isolation.png").stat().st_size > 20_000
    table = (lab3_run / "capture.txt").read_text()
    assert "KV          7000, 7200    10  0x28   yes" in table and "collective  7300           0  0x00    no" in table


def test_the_waits_are_completion_less_own_wire_time(lab3_run):
    """The graded wait: a collective's completion less its bytes at the CNIC rate x the byte scale (400 Gbit/s x
    5e-4 = 25 MB per real second); the printed completion p99 is the biggest batches' own bytes."""
    from scenarios import labs_classes
    assert labs_classes.wire_rate(lab3_run) == 400e9 / 8 * 5e-4
    rows = labs_classes.collectives(lab3_run, "oracle")
    b, c, w = max(rows)
    assert w == pytest.approx(c - b / 25e6 * 1e3)
    waits = labs_classes.p99_waits(lab3_run, labs_classes.traffic_classes(lab3_run))
    summary = json.loads((lab3_run / "summary.json").read_text())
    assert waits["reference"] < summary["isolation"]["reference"]["collective_s"]["prefill"]["p99"] * 1e3 / 5


@pytest.mark.parametrize("key, wrong, why", [
    ("dscp_kv", 46, "all 113 of the capture's KV packets (port 7000, 7200) with data carry DSCP 10"),  # swapped
    ("dscp_collective", 10, "carry DSCP 46, the scenario's traffic_classes.dscp_collective = 46"),
    ("kv_byte_share", 0.76, "a turn's context KV crosses once"),  # pushed and forwarded: counted twice
    ("slowdown_on", 2.5, "leaves ahead of any queued KV"),  # isolation taken to change nothing
    ("slowdown_off", 1.0, "queue behind the KV ahead of them"),  # "isolation is a detail"
    ("kv_rate_on_over_off", 0.01, "may borrow up to the link rate (HTB ceil)"),  # the 1% guarantee as a cap
])
def test_each_wrong_prediction_fails_for_its_reason(lab3_run, tmp_path, key, wrong, why):
    from scenarios import labs, labs_classes
    pred = labs.read_predictions(labs_classes.LAB, write(tmp_path, {**correct(lab3_run), key: wrong}))
    rows = {r.key: r for r in labs_classes.grade(lab3_run, pred)}
    assert [k for k, r in rows.items() if not r.ok] == [key]
    assert why in rows[key].why


def test_slowdown_off_is_graded_by_its_side_of_2x(lab3_run, tmp_path):
    from scenarios import labs, labs_classes
    for value, ok in ((2.0, True), (15, True), (1.9, False)):
        pred = labs.read_predictions(labs_classes.LAB, write(tmp_path, {**correct(lab3_run), "slowdown_off": value}))
        assert {r.key: r for r in labs_classes.grade(lab3_run, pred)}["slowdown_off"].ok is ok


def test_a_dscp_must_be_an_integer_of_six_bits(tmp_path):
    from emulator.errors import ConfigError
    from scenarios import labs, labs_classes
    bad = {**correct(FIXTURE), "dscp_kv": 0x28, "dscp_collective": "EF"}
    with pytest.raises(ConfigError) as exc:
        labs.read_predictions(labs_classes.LAB, write(tmp_path, bad))
    assert "dscp_kv: 40 is not a DSCP value" not in str(exc.value)  # 0x28 = 40 is a DSCP (it is not 10)
    assert "dscp_collective: 'EF' is not a DSCP value" in str(exc.value)


def test_without_a_capture_the_marks_are_the_scenarios(lab3_run, tmp_path):
    from scenarios import labs, labs_classes
    (lab3_run / "cnic.pcap").unlink()
    pred = labs.read_predictions(labs_classes.LAB, write(tmp_path, correct(lab3_run)))
    rows = {r.key: r for r in labs_classes.grade(lab3_run, pred)}
    assert rows["dscp_kv"].ok and rows["dscp_kv"].source == "scenario" and "no capture" in rows["dscp_kv"].why
    assert labs_classes.picture(lab3_run, pred, tmp_path) == "isolation.png"


def test_a_load_directory_grades_the_marks_and_says_why_the_slowdowns_cannot_be(lab3_run, tmp_path):
    """A `dpemu up` load serves one mode: no reference, no isolation-off run."""
    from scenarios import labs, labs_classes
    s = json.loads((lab3_run / "summary.json").read_text())
    del s["isolation"]
    (lab3_run / "summary.json").write_text(json.dumps(s))
    shutil.rmtree(lab3_run / "oracle")
    pred = labs.read_predictions(labs_classes.LAB, write(tmp_path, correct(lab3_run)))
    rows = {r.key: r for r in labs_classes.grade(lab3_run, pred)}
    assert rows["dscp_kv"].ok and rows["kv_byte_share"].ok
    for key in ("slowdown_on", "slowdown_off", "kv_rate_on_over_off"):
        assert not rows[key].ok and "no isolation comparison" in rows[key].why


def test_pcap_is_checked_before_anything_runs(tmp_path, monkeypatch, capsys):
    from scenarios import cli, runner
    monkeypatch.setattr(runner, "run", lambda *_a, **_k: pytest.fail("ran the experiment"))
    path = write(tmp_path, correct(FIXTURE))
    assert cli.main(["lab", "check", "3", "--predictions", str(path), "--pcap", str(tmp_path / "none.pcap"),
                     "--runs", str(tmp_path / "r")]) == 1
    assert "no such capture file" in words(capsys.readouterr().err)
    craft(tmp_path / "c.pcap")
    assert cli.main(["lab", "check", "1", "--pcap", str(tmp_path / "c.pcap"), "--runs", str(tmp_path / "r")]) == 1
    assert not (tmp_path / "r").exists()


def test_a_given_capture_is_graded_instead_of_the_runs(lab3_run, tmp_path, capsys):
    from scenarios import cli
    path = write(tmp_path, correct(lab3_run))
    pcap = craft(tmp_path / "mine.pcap", wrong_kv=3)
    assert cli.main(["lab", "check", "3", "--results", str(lab3_run), "--predictions", str(path), "--pcap",
                     str(pcap), "--out", str(tmp_path / "g")]) == 5
    grade = json.loads((tmp_path / "g" / "grade.json").read_text())
    assert [r["key"] for r in grade["rows"] if not r["ok"]] == ["dscp_kv"]
    assert "mine.pcap" in (tmp_path / "g" / "capture.txt").read_text()


# -- the capture lab check takes during its run -------------------------------------------------------------------
class _Live:
    """live.json of this process's run, as runner.run publishes it once the cluster is built."""

    def __init__(self, run: Path):
        import os
        self.owner_pid, self.run_dir = os.getpid(), str(run)

    def plan(self):
        from scenarios import schema
        from scenarios.plan import make_plan
        return make_plan(schema.load(str(Path(__file__).resolve().parents[2] / "labs" / "3-traffic-classes"
                                         / "scenario.yaml")))


@pytest.fixture
def fake_tcpdump(monkeypatch):
    """The capture's processes started as the runner starts them (emulator.procs: setpriv, its own session),
    but `sleep` outside any namespace stands in for tcpdump: (netns, argv) of each start, and the processes."""
    from emulator import procs
    from scenarios import labs_classes
    calls = []

    class Group(procs.ProcessGroup):
        def start(self, name, netns, argv, **kw):
            calls.append((netns, argv))
            proc = super().start(name, None, ["sleep", "60"], **kw)
            calls.append(proc)
            return proc

    monkeypatch.setattr(labs_classes, "ProcessGroup", Group)
    return calls


def _wait(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


def test_the_capture_starts_once_dualpath_serves_and_never_outlives_the_run(tmp_path, monkeypatch, fake_tcpdump):
    from scenarios import labs_classes, live
    run = tmp_path / "run"
    monkeypatch.setattr(live, "current", lambda: _Live(run))
    with labs_classes.capture():
        time.sleep(0.6)
        assert fake_tcpdump == []  # the cluster is up but serves no DualPath yet
        (run / "dualpath").mkdir(parents=True)
        (run / "dualpath" / "scheduler.json").write_text("{}")
        assert _wait(lambda: len(fake_tcpdump) == 2)
        (netns, argv), proc = fake_tcpdump
        assert netns == "dp-pe1" and argv[:3] == ["tcpdump", "-i", "pe1-cnic0"]
        assert argv[argv.index("-c") + 1] == str(labs_classes.CAPTURE_PACKETS)
        assert argv[argv.index("-w") + 1] == str(run / "cnic.pcap")
        assert proc.poll() is None
    assert proc.poll() is not None  # the run is over: stopped, nothing left behind


def test_the_capture_stops_when_the_dualpath_mode_ends(tmp_path, monkeypatch, fake_tcpdump):
    from scenarios import labs_classes, live
    run = tmp_path / "run"
    (run / "dualpath").mkdir(parents=True)
    (run / "dualpath" / "scheduler.json").write_text("{}")
    monkeypatch.setattr(live, "current", lambda: _Live(run))
    with labs_classes.capture():
        assert _wait(lambda: len(fake_tcpdump) == 2)
        proc = fake_tcpdump[1]
        (run / "dualpath" / "links.csv").write_text("")  # the mode's samples are written: it is over
        assert _wait(lambda: proc.poll() is not None)


def test_the_capture_ignores_a_cluster_it_does_not_own(tmp_path, monkeypatch, fake_tcpdump):
    from scenarios import labs_classes, live
    run = tmp_path / "run"
    (run / "dualpath").mkdir(parents=True)
    (run / "dualpath" / "scheduler.json").write_text("{}")
    other = _Live(run)
    other.owner_pid = 1  # another engineer's `dpemu up`
    monkeypatch.setattr(live, "current", lambda: other)
    with labs_classes.capture():
        time.sleep(0.6)
    assert fake_tcpdump == []


# -- recording the fixture ----------------------------------------------------------------------------------------
def record(run: Path, out: Path = FIXTURE, packets: int = 300) -> None:
    """Copy what the grader and the picture read from a real run of the lab into the fixture, trimmed: the
    resolved scenario.yaml; of summary.json the keys they read; per run the prefill collectives (the graded
    phase) with the columns read; of dualpath/links.csv the CNICs' upward rows, first and last sample of each
    class; the capture's first `packets` packets as tcpdump wrote them. The values are the run's own."""
    import csv

    import scapy.layers.l2  # noqa: F401 - Ethernet frames parsed, not read as raw bytes
    from scapy.utils import PcapReader, PcapWriter
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(run / "scenario.yaml", out / "scenario.yaml")
    s = json.loads((run / "summary.json").read_text())
    keep = {k: s[k] for k in ("scenario", "run_id", "seed", "scale", "isolation", "failed_turns", "fidelity")}
    keep["modes"] = {m: {k: v[k] for k in ("jct_s", "requests", "collectives", "cnic_kv_gbps", "cnic_util")}
                     for m, v in {**s["modes"], **s.get("extra_runs", {})}.items()}
    (out / "summary.json").write_text(json.dumps(keep, indent=1) + "\n")
    for mode in MODES:
        (out / mode).mkdir()
        with (run / mode / "collectives.csv").open() as f, (out / mode / "collectives.csv").open("w") as g:
            w = csv.writer(g)
            w.writerow(["phase", "bytes", "completion_s"])
            w.writerows([r["phase"], r["bytes"], r["completion_s"]] for r in csv.DictReader(f)
                        if r["phase"] == "prefill")
    with (run / "dualpath" / "links.csv").open() as f, (out / "dualpath" / "links.csv").open("w") as g:
        rows = [r for r in csv.DictReader(f) if (r["link_class"], r["direction"]) == ("cnic", "up")]
        ends = {}
        for r in rows:
            ends.setdefault((r["link"], r["tclass"]), [r, r])[1] = r
        w = csv.DictWriter(g, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for pair in ends.values() for r in pair)
    with PcapReader(str(run / "cnic.pcap")) as reader, PcapWriter(str(out / "cnic.pcap"), snaplen=128) as writer:
        for i, p in enumerate(reader):
            if i == packets:
                break
            writer.write(p)


if __name__ == "__main__":
    record(Path(sys.argv[1]))
