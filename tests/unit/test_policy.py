"""The paper's scheduling rules (section 5), one behaviour per test."""

import pytest

from daemons.policy import (EngineLoad, NodeLoad, RoundRobin, alpha_tokens, beta_tokens, choose_de, choose_pe,
                            choose_read_side)


def pe(node, engine, tokens, requests=1):
    return EngineLoad(node, engine, requests, tokens)


NODES = {"pe1": NodeLoad("pe1", 0), "pe2": NodeLoad("pe2", 10_000)}


def test_pe_lowest_tokens_among_nodes_with_short_read_queue():
    engines = [pe("pe1", 0, 500), pe("pe1", 1, 300), pe("pe2", 0, 100)]
    # pe2's read queue (10k) is above alpha (5k): its idle engine is not preferred
    assert choose_pe(engines, NODES, alpha_tokens=5_000, beta_tokens=1e9) == engines[1]


def test_pe_falls_back_to_lowest_tokens_when_every_queue_is_long():
    engines = [pe("pe1", 0, 500), pe("pe2", 0, 100)]
    assert choose_pe(engines, NODES, alpha_tokens=-1, beta_tokens=1e9) == engines[1]


def test_pe_skips_engines_above_beta_and_waits_when_all_are():
    engines = [pe("pe1", 0, 900), pe("pe1", 1, 2_000)]
    assert choose_pe(engines, NODES, alpha_tokens=5_000, beta_tokens=1_000) == engines[0]
    assert choose_pe(engines, NODES, alpha_tokens=5_000, beta_tokens=800) is None


def de(node, engine, tokens, requests, hbm=None):
    return EngineLoad(node, engine, requests, tokens, hbm)


def test_de_group_with_fewest_tokens_then_fewest_requests_under_z():
    engines = [de("de1", 0, 9_000, 1), de("de1", 1, 9_000, 1),
               de("de2", 0, 4_000, 3), de("de2", 1, 1_000, 1), de("de2", 2, 1_000, 2)]
    # de2 has 6k tokens vs de1's 18k; Z = 1.05 x 6000 / 3 = 2100; a 1000-token request keeps
    # engines 1 and 2 under Z (2000), and engine 1 has fewer requests
    assert choose_de(engines, 1_000) == engines[3]


def test_de_least_tokens_when_nobody_stays_under_z():
    engines = [de("de1", 0, 3_000, 1), de("de1", 1, 2_000, 5)]
    # Z = 1.05 x 5000 / 2 = 2625: a 5000-token request pushes everyone over Z
    assert choose_de(engines, 5_000) == engines[1]


def test_de_queued_tokens_count_toward_the_group():
    engines = [de("de1", 0, 1_000, 1), de("de2", 0, 2_000, 1)]
    assert choose_de(engines, 100) == engines[0]
    assert choose_de(engines, 100, queued_tokens={"de1": 5_000}) == engines[1]


def test_de_never_an_engine_whose_hbm_cannot_hold_the_request():
    engines = [de("de1", 0, 0, 0, hbm=1_000), de("de1", 1, 50_000, 9, hbm=40_000)]
    assert choose_de(engines, 30_000) == engines[1]
    assert choose_de(engines, 50_000) is None


@pytest.mark.parametrize("pe_q, de_q, side", [(100, 50, "de"), (50, 100, "pe"), (70, 70, "pe")])
def test_read_side_is_the_shorter_queue(pe_q, de_q, side):
    assert choose_read_side(NodeLoad("pe1", pe_q), NodeLoad("de1", de_q)) == side


def test_a_tie_goes_to_the_node_given_less_to_read():
    assert choose_read_side(NodeLoad("pe1", 0, 9_000), NodeLoad("de1", 0, 4_000)) == "de"
    assert choose_read_side(NodeLoad("pe1", 0, 4_000), NodeLoad("de1", 0, 9_000)) == "pe"
    assert choose_read_side(NodeLoad("pe1", 10, 0), NodeLoad("de1", 20, 0)) == "pe"  # the queue comes first


def test_alpha_and_beta():
    # 400 Gbit/s SNIC, 40,016 B/token: 3 s reads 150e9 B = 3.75M tokens
    assert alpha_tokens(400e9, 40_016) == pytest.approx(400e9 / 8 * 3 / 40_016)
    assert beta_tokens(1e-4) == pytest.approx(50_000)


def test_round_robin_cycles_regardless_of_load():
    rr = RoundRobin()
    engines = [pe("pe2", 0, 0), pe("pe1", 1, 10**9), pe("pe1", 0, 5)]
    picks = [rr.choose("pe", engines) for _ in range(4)]
    assert [(e.node, e.engine) for e in picks] == [("pe1", 0), ("pe1", 1), ("pe2", 0), ("pe1", 0)]


def test_split_blocks_level_the_two_read_queues():
    from daemons.policy import split_blocks
    assert split_blocks(100, 64, 0, 0) == 50                      # empty queues: half each
    assert split_blocks(100, 64, 64 * 40, 0) == 30                # PE 40 blocks behind: it takes 20 fewer
    assert split_blocks(100, 64, 0, 64 * 1000) == 100             # DE far behind: all on the PE side
    assert split_blocks(100, 64, 64 * 1000, 0) == 0               # and the other way round
    pe, de = 64 * 40, 64 * 10
    x = split_blocks(100, 64, pe, de)
    assert abs((pe + 64 * x) - (de + 64 * (100 - x))) <= 64       # both drain together, to a block
