"""Policies of one's own (daemons/policyapi.py): named by file or import path, checked when the scenario loads,
and called by the scheduler, a bad answer falling back to the paper's choice."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from daemons import dualpath_pb2 as pb
from daemons import policyapi
from daemons.policy import EngineLoad, NodeLoad
from daemons.scheduler import SchedulerConfig, SchedulerService, _Pending
from emulator.errors import ConfigError
from scenarios import schema

GOOD = """
from daemons.policyapi import Policy

class DeReads(Policy):
    def read_side(self, pe, de):
        return "de"

    def choose_pe(self, engines, nodes, alpha_tokens, beta_tokens):
        return max(engines, key=lambda e: (e.node, e.engine))  # always the last engine

class Counting(Policy):
    def __init__(self):
        self.seen = 0

    def read_side(self, pe, de):
        self.seen += 1
        return "pe" if self.seen % 2 else "de"

class Raises(Policy):
    def read_side(self, pe, de):
        raise KeyError("oops")

    def choose_pe(self, engines, nodes, alpha_tokens, beta_tokens):
        return 0

class Waits(Policy):
    def read_side(self, pe, de):
        return "both"

    def choose_pe(self, engines, nodes, alpha_tokens, beta_tokens):
        return None

class NoReadSide(Policy):
    pass

class WrongArgs(Policy):
    def read_side(self, pe):
        return "pe"

class BadInit(Policy):
    def __init__(self):
        raise RuntimeError("no config")

    def read_side(self, pe, de):
        return "pe"

class NotAPolicy:
    def read_side(self, pe, de):
        return "pe"

NOT_A_CLASS = 3
"""


@pytest.fixture
def policies(tmp_path, monkeypatch) -> Path:
    """A directory (the current one) holding mine.py and a package pkg_<id>/plans.py with the same classes."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text(GOOD)
    (tmp_path / "broken.py").write_text("def read_side(:\n")
    (tmp_path / "crashes.py").write_text("import os\nraise SystemExit(3)\n")
    pkg = tmp_path / f"pkg_{abs(hash(str(tmp_path)))}"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "plans.py").write_text(GOOD)
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith(pkg.name)]:
        del sys.modules[name]


def test_a_file_path_loads_and_is_kept_absolute(policies):
    spec = policyapi.resolve("mine.py:DeReads")
    assert spec == f"{policies / 'mine.py'}:DeReads"
    assert policyapi.load_policy(spec).read_side(NodeLoad("pe1", 0), NodeLoad("de1", 0)) == "de"
    assert policyapi.resolve(spec) == spec  # an absolute path stays as it is
    assert policyapi.resolve("./sub/../mine.py:DeReads") == spec


def test_an_import_path_loads_from_the_current_directory(policies):
    pkg = next(p.name for p in policies.iterdir() if p.name.startswith("pkg_"))
    spec = policyapi.resolve(f"{pkg}.plans:Counting")
    assert spec == f"{pkg}.plans:Counting"  # an import path is kept as written
    assert isinstance(policyapi.load_policy(spec), policyapi.Policy)
    assert str(policies) not in sys.path  # the current directory was on it only while importing


def test_built_in_names_stay_names():
    for name in ("paper", "round_robin", "round_robin_pe_reads", "round_robin_alternating"):
        assert policyapi.resolve(name) == name


@pytest.mark.parametrize("spec, problem", [
    ("bogus", "'bogus' is not a policy: give a built-in name (paper, round_robin"),
    ("nope.py:DeReads", "does not exist"),
    ("broken.py:DeReads", "failed: SyntaxError: invalid syntax (line 1)"),
    ("crashes.py:DeReads", "failed: SystemExit: 3 (crashes.py, line 2)"),
    ("mine.py:Missing", "has no class Missing (its Policy subclasses: BadInit, Counting, DeReads"),
    ("mine.py:NOT_A_CLASS", "NOT_A_CLASS in file"),
    ("mine.py:NotAPolicy", "does not subclass daemons.policyapi.Policy"),
    ("mine.py:NoReadSide", "does not implement read_side(self, pe, de)"),
    ("mine.py:WrongArgs", "WrongArgs.read_side must take (self, pe, de)"),
    ("mine.py:BadInit", "BadInit() failed: RuntimeError: no config"),
    ("mine.py:1st", "'1st' after ':' is not a class name"),
    (":DeReads", "nothing before ':'"),
    ("no_such_module_zz.plans:X", "no module named 'no_such_module_zz'"),
    ("json:JSONDecoder", "class JSONDecoder in module json does not subclass"),
    ("a-b:X", "'a-b' is neither a Python file"),
])
def test_every_bad_policy_is_named_with_its_problem(policies, spec, problem):
    with pytest.raises(ValueError) as err:
        policyapi.resolve(spec)
    assert problem in str(err.value)
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value)


def test_the_scenario_refuses_a_bad_policy_naming_the_field(policies, tiny_data):
    tiny_data["serving"] = {**(tiny_data.get("serving") or {}), "policy": "mine.py:NoReadSide"}
    with pytest.raises(ConfigError) as err:
        schema.from_dict(tiny_data, "given.yaml")
    assert "given.yaml: serving.policy" in str(err.value) and "does not implement read_side" in str(err.value)


def test_the_scenario_keeps_a_policy_file_absolute(policies, tiny_data):
    tiny_data["serving"] = {**(tiny_data.get("serving") or {}), "policy": "mine.py:DeReads"}
    sc = schema.from_dict(tiny_data, "given.yaml")
    assert sc.serving.policy == f"{policies / 'mine.py'}:DeReads"
    again = schema.from_dict(sc.resolved(), "resolved.yaml")  # a run's stored scenario loads again
    assert again.serving.policy == sc.serving.policy
    # a sweep point is named by the file, not its directories
    assert schema.label_of({"serving.policy": sc.serving.policy}) == "policy=mine.py_DeReads"


# -- the scheduler calls it -----------------------------------------------------------------------------------
GPUS, HIT_BLOCKS, BLOCK_TOKENS, NEW = 2, 100, 64, 300


def _service(policy: str, mode: str = "dualpath") -> SchedulerService:
    nodes = [{"name": name, "role": role, "mgmt": f"127.0.0.1:{7100 + i}",
              "cnics": [f"127.0.0.1:{8000 + 10 * i + g}" for g in range(GPUS)]}
             for i, (name, role) in enumerate([("pe1", "pe"), ("pe2", "pe"), ("de1", "de"), ("de2", "de")])]
    return SchedulerService(SchedulerConfig.from_json({
        "mode": mode, "policy": policy, "layer_chunks": 2, "alpha_tokens": 1e12, "beta_tokens": 1e12,
        "hbm_tokens": 10**9, "nodes": nodes}))


def _burst(service: SchedulerService, n: int) -> list:
    loop = asyncio.new_event_loop()
    try:
        for i in range(n):
            spec = pb.RequestSpec(request_id=f"r{i}", trajectory=f"a{i}", hit_blocks=HIT_BLOCKS, new_tokens=NEW,
                                  gen_tokens=10)
            turn = pb.TurnRequest(agent=f"a{i}", request=spec, context_tokens=HIT_BLOCKS * BLOCK_TOKENS + NEW)
            service.queue.append(_Pending(turn, loop.create_future()))
        return service._place_ready()
    finally:
        loop.close()


def test_the_scheduler_asks_the_plugin_for_the_read_side_and_the_pe_engine(policies):
    service = _service(policyapi.resolve("mine.py:DeReads"))
    placed = _burst(service, 12)
    assert len(placed) == 12
    assert {c.path for _, c in placed} == {pb.READ_PATH_DE}  # its read side, every turn
    assert {(c.pe_eng.node, c.pe_eng.engine) for _, c in placed} == {("pe2", GPUS - 1)}  # its engine
    assert len({(c.de_eng.node, c.de_eng.engine) for _, c in placed}) == 2 * GPUS  # DE: the paper's rule
    assert service.plugin.calls == Counter(read_side=12, choose_pe=12)
    assert service.plugin.fallbacks == {} and not service.events


def test_the_plugin_keeps_its_own_state_and_basic_never_asks_its_read_side(policies):
    service = _service(policyapi.resolve("mine.py:Counting"))
    placed = _burst(service, 6)
    assert [c.path for _, c in placed] == [pb.READ_PATH_PE, pb.READ_PATH_DE] * 3
    basic = _service(policyapi.resolve("mine.py:Counting"), mode="basic")
    assert {c.path for _, c in _burst(basic, 4)} == {pb.READ_PATH_PE}
    assert basic.plugin.calls["read_side"] == 0 and basic.plugin.calls["choose_pe"] == 4


def test_a_policy_that_raises_falls_back_to_the_paper_and_is_counted(policies):
    service = _service(policyapi.resolve("mine.py:Raises"))
    paper = _service("paper")
    placed, expected = _burst(service, 8), _burst(paper, 8)
    assert [(c.pe_eng, c.de_eng, c.path) for _, c in placed] == [(c.pe_eng, c.de_eng, c.path) for _, c in expected]
    assert service.plugin.fallbacks == {"read_side": {"raised": 8}, "choose_pe": {"bad_value": 8}}
    first = [e for e in service.events if e["event"] == "policy_fallback"]  # one event per (method, kind)
    assert [(e["method"], e["kind"]) for e in first] == [("choose_pe", "bad_value"), ("read_side", "raised")]
    assert "KeyError: 'oops'" in first[1]["detail"] and "mine.py" in first[1]["detail"]
    asyncio.run(service.close())
    total = service.events[-1]
    assert total["event"] == "policy_fallbacks" and total["fallbacks_total"] == 16
    assert total["calls"] == {"choose_pe": 8, "read_side": 8}


def test_a_bad_read_side_and_a_wait_on_an_idle_cluster_fall_back(policies):
    service = _service(policyapi.resolve("mine.py:Waits"))
    placed = _burst(service, 3)
    # the first turn: None while nothing runs would wait forever, so the paper places it; the next ones wait
    assert len(placed) == 1 and len(service.queue) == 2
    assert service.plugin.fallbacks == {"choose_pe": {"waits_idle": 1}, "read_side": {"bad_value": 1}}
    assert service.plugin.calls["choose_pe"] == 2  # asked again for the second turn: it may wait now


def test_guarded_checks_the_engine_is_one_offered():
    class Stranger(policyapi.Policy):
        def read_side(self, pe, de):
            return "pe"

        def choose_pe(self, engines, nodes, alpha_tokens, beta_tokens):
            return EngineLoad("pe9", 0, 0, 0)

    engines = [EngineLoad("pe1", 0, 0, 100), EngineLoad("pe1", 1, 0, 50)]
    nodes = {"pe1": NodeLoad("pe1", 0)}
    g = policyapi.Guarded(Stranger())
    assert g.choose_pe(engines, nodes, 1e9, 1e9, idle=False) == engines[1]  # the paper's: fewest tokens
    assert g.fallbacks == {"choose_pe": {"bad_value": 1}}
    equal = policyapi.Guarded(type("Same", (Stranger,), {"choose_pe": lambda s, e, n, a, b: EngineLoad(
        "pe1", 0, 0, 100)})())
    assert equal.choose_pe(engines, nodes, 1e9, 1e9, idle=False) is engines[0]  # an equal one: that engine


def test_the_scheduler_config_takes_a_plugin_and_refuses_garbage():
    base = {"mode": "dualpath", "layer_chunks": 2, "alpha_tokens": 1, "beta_tokens": 1, "hbm_tokens": 1,
            "nodes": [{"name": "pe1", "role": "pe", "mgmt": "x", "cnics": ["y"]},
                      {"name": "de1", "role": "de", "mgmt": "x", "cnics": ["y"]}]}
    assert SchedulerConfig.from_json({**base, "policy": "/abs/p.py:P"}).policy == "/abs/p.py:P"
    with pytest.raises(ValueError, match="FILE.py:Class"):
        SchedulerConfig.from_json({**base, "policy": "fancy"})


def test_the_starter_and_the_solution_of_lab_4_load():
    lab = Path(__file__).resolve().parents[2] / "labs" / "4-write-the-scheduler"
    for f in (lab / "policy.py", lab / "solution" / "policy.py"):
        p = policyapi.load_policy(policyapi.resolve(f"{f}:StudentPolicy"))
        assert p.read_side(NodeLoad("pe1", 5), NodeLoad("de1", 0)) in ("pe", "de")
    assert textwrap.dedent(policyapi.Policy.read_side.__doc__).strip().startswith("REQUIRED")
