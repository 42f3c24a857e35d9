"""topologies.cluster: scale maths and the invariants scaling must preserve."""

from __future__ import annotations

import dataclasses

import pytest

from topologies.cluster import ClusterSpec, Scale, invariants, link_rates

DS660B_2P4D = ClusterSpec(prefill_nodes=2, decode_nodes=4, gpus_per_node=8)


def test_rate_400gbit_bytes_1e4_time_2_is_20mbit():
    assert Scale(byte_scale=1e-4, time_scale=2.0).rate(400e9) == pytest.approx(20e6, rel=1e-12)


def test_rate_factor_is_bytes_over_time():
    assert Scale(0.5, 4.0).rate_factor == pytest.approx(0.125)


def test_time_scale_defaults_to_real_time():
    assert Scale(1e-4).rate(400e9) == pytest.approx(40e6, rel=1e-12)


def test_real_rate_inverts_rate_to_within_a_bit_per_second():
    s = Scale(2.5e-4, 3.0)
    assert s.real_rate(s.rate(1.6e12)) == pytest.approx(1.6e12, abs=1 / s.rate_factor)


def test_emulated_rates_are_whole_bits_per_second():
    assert Scale(6.4e-4, 8).rate(400e9) == 32e6  # not 32000000.000000007: tc is given whole bits
    assert Scale(6.4e-4, 6).rate(400e9) == 42666667.0


def test_real_bytes_and_seconds():
    s = Scale(1e-4, 2.0)
    assert s.real_bytes(1.3e5) == pytest.approx(1.3e9, rel=1e-12)   # 130 kB moved = 1.3 GB real
    assert s.real_seconds(10.0) == pytest.approx(5.0)                # 10 wall s = 5 real s


def test_link_rates_default_cluster_at_1e4():
    rates = link_rates(DS660B_2P4D, Scale(1e-4))
    assert rates == pytest.approx({"snic": 40e6, "cnic": 40e6, "stnic": 160e6}, rel=1e-12)


def test_link_rates_uses_each_real_rate():
    c = ClusterSpec(1, 1, cnic_rate_bps=200e9, snic_rate_bps=100e9, storage_nic_rate_bps=800e9)
    rates = link_rates(c, Scale(1e-3, 2.0))
    assert rates == pytest.approx({"snic": 50e6, "cnic": 100e6, "stnic": 400e6}, rel=1e-12)


def test_invariants_2p4d_g8():
    inv = invariants(DS660B_2P4D)
    assert inv["snic_per_node_to_cnic_per_node"] == pytest.approx(1 / 8)
    assert inv["snic_to_cnic_per_gpu"] == pytest.approx(1.0)
    assert inv["p_to_d"] == pytest.approx(0.5)
    assert inv["storage_to_snic_total"] == pytest.approx(2 * 1600 / (6 * 400))


@pytest.mark.parametrize("scale", [Scale(1e-4), Scale(1e-4, 2.0), Scale(2.5e-4, 0.5), Scale(1.0)])
def test_scaling_preserves_invariants(scale):
    """The invariants computed from emulated rates equal those from real rates."""
    c = DS660B_2P4D
    r = link_rates(c, scale)
    emulated = dataclasses.replace(c, cnic_rate_bps=r["cnic"], snic_rate_bps=r["snic"],
                                   storage_nic_rate_bps=r["stnic"])
    assert invariants(emulated) == pytest.approx(invariants(c), rel=1e-12)


def test_link_rate_ratios_match_invariants():
    c = DS660B_2P4D
    r = link_rates(c, Scale(1e-4))
    inv = invariants(c)
    assert r["snic"] / (r["cnic"] * c.gpus_per_node) == pytest.approx(inv["snic_per_node_to_cnic_per_node"])
    total_storage = c.storage_servers * r["stnic"]
    total_snic = (c.prefill_nodes + c.decode_nodes) * r["snic"]
    assert total_storage / total_snic == pytest.approx(inv["storage_to_snic_total"])
