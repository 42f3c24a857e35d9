"""scenarios.fabric: the paper's section 3 accounting, and a run's CNIC figures beside it."""

from __future__ import annotations

import pytest

from scenarios import fabric


def test_the_papers_worked_example_at_2p4d():
    # section 3: at 2P4D (g=8, s=1, M=500 GB/s, Bs=50 GB/s) PE CNIC write 37.5%, DE CNIC read 31%,
    # DE CNIC write 25%, DE DRAM 40% of capacity
    u = fabric.saturated(2, 4, 8, 1.0)
    assert u["pe_down"] == pytest.approx(0.375)
    assert u["de_up"] == pytest.approx(0.3125)
    assert u["de_down"] == pytest.approx(0.25)
    assert u["de_dram"] == pytest.approx(0.40)
    assert u["pe_up"] == pytest.approx(0.25)  # 2Bs/g


def test_the_congestion_free_region_is_one_seventh_to_seven_halves():
    for g, s in ((8, 1.0), (1, 0.125)):  # the paper's node, and dpemu's 1-GPU slice of it (SNIC at B/8)
        r = fabric.region(g, s)
        assert r["all"] == (pytest.approx(1 / 7), pytest.approx(3.5))
        assert r["pe_down"][0] == pytest.approx(1 / 7)
        assert r["de_down"][1] == pytest.approx(3.5) and r["de_dram"][1] == pytest.approx(3.5)
        assert r["de_up"][1] == pytest.approx(6.0)
        assert r["wire"] == (pytest.approx(1 / 8), pytest.approx(8.0))


@pytest.mark.parametrize("p,d", [(1, 8), (1, 7), (2, 4), (7, 2), (4, 1), (8, 1)])
def test_a_link_saturates_exactly_at_the_regions_edge(p, d):
    lo, hi = fabric.region(8, 1.0)["all"]
    worst = max(fabric.saturated(p, d, 8, 1.0).values())
    inside = lo - 1e-9 <= p / d <= hi + 1e-9
    assert (worst <= 1 + 1e-9) == inside, (p, d, worst)


def test_wire_and_loopback_split_each_byte_once_per_crossing():
    loads = fabric.cnic_loads(r_pe=6.0, r_de=12.0, p=2, d=3, g=2)  # 4 PE CNICs, 6 DE CNICs
    # every byte read on one side crosses the fabric once: up on its side, down on the other
    assert loads["wire"]["pe_up"] * 4 == loads["wire"]["de_down"] * 6 == 6.0
    assert loads["wire"]["de_up"] * 6 == loads["wire"]["pe_down"] * 4 == 12.0
    # the DE copies all KV into HBM; the PE copies only what it read itself
    assert loads["loopback"]["de_up"] * 6 == 18.0 and loads["loopback"]["pe_up"] * 4 == 6.0
    assert fabric.de_dram_load(6.0, 12.0, 3) == pytest.approx((36 + 12) / 3)


def test_a_run_is_compared_at_the_reads_it_made():
    from emulator.monitor import ClassKey, ClassSample, TcSampler
    from scenarios.modestats import LinkKey, fabric_figures

    snic, cnic = 20e6, 160e6  # dpemu's scaled 1:8
    keys, series = {}, {}

    def link(host, cls, side, rate, up_bps, down_bps):
        nic = cls + ("0" if cls == "cnic" else "")
        for direction, bps in (("up", up_bps), ("down", down_bps)):
            k = ClassKey(host if direction == "up" else None, f"{host}-{nic}-{direction}", 1)
            keys[k] = LinkKey(f"{host}-{nic}", cls, side, direction, "link", rate)
            series[k] = bps
    # 1P2D, reads balanced: the PE's SNIC 20 Mbit/s, each DE's 20 Mbit/s
    link("pe1", "snic", "pe", snic, 0, 20e6)
    link("pe1", "cnic", "pe", cnic, 20e6, 40e6)
    for h in ("de1", "de2"):
        link(h, "snic", "de", snic, 0, 20e6)
        link(h, "cnic", "de", cnic, 20e6, 10e6)
    sampler = TcSampler(list(keys))
    for t in (0.0, 1.0, 2.0):
        sampler.samples += [ClassSample(t, k, int(bps / 8 * t), 0, 0, 0) for k, bps in series.items()]
    f = fabric_figures(sampler, keys, 0.0, 2.0, 1.0)
    assert (f["p"], f["d"], f["g"]) == (1, 2, 1) and f["s"] == pytest.approx(0.125)
    assert f["measured_wire"] == {"pe_up": 0.125, "pe_down": 0.25, "de_up": 0.125, "de_down": 0.0625}
    assert f["predicted_wire"] == f["measured_wire"]  # these rates are exactly the formula's
    assert f["de_read_share"] == pytest.approx(2 / 3, abs=1e-4)
    assert f["with_loopback"]["de_down"] == pytest.approx(0.0625 + 60e6 / 2 / cnic)
    assert f["saturated"] == {k: pytest.approx(v, abs=1e-4) for k, v in fabric.saturated(1, 2, 1, 0.125).items()}
    assert f["peak_wire"] == f["measured_wire"]  # constant rates: every window is the mean
