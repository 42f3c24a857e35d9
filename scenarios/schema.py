"""Scenario files: their schema, loading, ``--set`` overrides and validation.

A scenario is a YAML file describing the REAL cluster (rates in real units),
the scale that maps it onto this machine, and how to run it. Everything is
checked here, before anything is built: unknown keys, missing units, zero or
negative rates, P or D of 0 and bad names are refused with the file, the field
path and the reason (``default.yaml: cluster.snic_rate: '40' has no unit``).

The models are pydantic (frozen, ``extra='forbid'``); unit strings are parsed by :mod:`emulator.units` and
serialized back to unit strings, so the resolved scenario a run stores reads like the file a user wrote.
"""

from __future__ import annotations

import itertools
import math
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, StrictInt, ValidationError,
                      field_validator, model_validator)

from emulator.errors import ConfigError, UnitError
from emulator.units import format_rate, format_size, parse_duration, parse_rate, parse_size
from emulator.tcplan import MIN_DEFAULT_SHARE
from daemons.gpu import GPU_MODELS
from daemons import policyapi
from daemons.policy import READ_PATHS
from scenarios.faultspec import Fault, problems as fault_problems
from scenarios.placement import Servers
from topologies.cluster import MAX_GPUS_PER_NODE, MAX_NODES_PER_ROLE, MODELS, ClusterSpec, Scale, compute_classes

SCENARIO_DIR = Path(__file__).resolve().parent / "catalog"


def _fmt_duration(t_s: float) -> str:
    return f"{t_s * 1000:g}ms" if t_s < 1 else f"{t_s:g}s"


Rate = Annotated[float, BeforeValidator(parse_rate), PlainSerializer(format_rate)]
Size = Annotated[float, BeforeValidator(parse_size), PlainSerializer(format_size)]
Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(_fmt_duration)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Storage(_Model):
    servers: StrictInt = Field(2, ge=1, le=MAX_NODES_PER_ROLE, description="storage servers")
    replicas: StrictInt = Field(1, ge=1, description="storage servers holding each block: writes go to all, a read "
                                                     "falls back to a live one (docs/faults.md)")
    nic_rate: Rate = Field(1600e9, description="NIC rate of one storage server")


class Cluster(_Model):
    model: Literal[MODELS] = "ds660b"  # type: ignore[valid-type]
    gpu_model: Literal[GPU_MODELS] = Field(  # type: ignore[valid-type]
        "profile", description="GPU time: the layer profile measured on an H200, converted to H800/H100, or "
                               "the analytic roofline (docs/costmodel.md)")
    prefill_nodes: StrictInt = Field(ge=1, le=MAX_NODES_PER_ROLE)
    decode_nodes: StrictInt = Field(ge=1, le=MAX_NODES_PER_ROLE)
    gpus_per_node: StrictInt = Field(8, ge=1, le=MAX_GPUS_PER_NODE)
    cnic_rate: Rate = Field(400e9, description="compute NIC, one per GPU")
    snic_rate: Rate = Field(400e9, description="storage NIC, one per node")
    dram_buffer: Size = Field(64e9, description="DRAM KV buffer per compute node")
    storage: Storage = Storage()


def _number(v: Any) -> Any:
    """A plain number: YAML booleans are refused (pydantic would read `yes` as 1)."""
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a number")
    return v


Number = Annotated[float, BeforeValidator(_number)]


class ScaleModel(_Model):
    bytes: Number = Field(gt=0, le=1, description="fraction of real bytes moved")
    time: Number = Field(1.0, gt=0, description="wall seconds per real second")


class Emulation(_Model):
    queue: Duration = Field(0.010, description="queue of every shaped port, as REAL time at its rate (x scale.time)")
    skb: Duration = Field(0.001, description="longest REAL time one GSO/TSO skb holds a port at the slowest rate of "
                                             "its fabric (x scale.time); skbs are capped to it on every link")
    tcp_cc: Literal["reno", "bbr"] = "reno"
    lossless: bool = Field(True, description="both fabrics lossless as the paper's (fixed TCP receive buffers while "
                                             "serving); false: TCP probes until queues drop")
    dequeue_timing: bool = Field(True, description="trace dequeue timing (false: cheaper, and the verdict fails: "
                                                   "not measured)")

    @field_validator("queue")
    @classmethod
    def _queue_range(cls, v: float) -> float:
        if not 0.0005 <= v <= 1:
            raise ValueError(f"{_fmt_duration(v)}: must be between 0.5ms and 1s")
        return v

    @field_validator("skb")
    @classmethod
    def _skb_range(cls, v: float) -> float:
        if not 0 < v <= 0.1:
            raise ValueError(f"{_fmt_duration(v)}: must be above 0 and at most 100ms")
        return v

    @model_validator(mode="after")
    def _skb_within_queue(self) -> "Emulation":
        if self.skb > self.queue / 2:
            raise ValueError(f"skb {_fmt_duration(self.skb)} is more than half the queue {_fmt_duration(self.queue)}: "
                             "a queue must hold several skbs")
        return self


class TrafficClasses(_Model):
    """Compute-fabric isolation (paper section 4): DSCP-classified HTB classes on every CNIC and rail port."""

    isolation: bool = Field(True, description="false: one FIFO class for everything on the compute fabric")
    collective_share: Number = Field(0.985, gt=0, lt=1, description="link share guaranteed to collectives")
    kv_share: Number = Field(0.01, gt=0, lt=1, description="link share guaranteed to KV (it borrows any gap)")
    dscp_collective: StrictInt = Field(46, ge=0, le=63)
    dscp_kv: StrictInt = Field(10, ge=0, le=63)

    @model_validator(mode="after")
    def _consistent(self) -> "TrafficClasses":
        if self.dscp_collective == self.dscp_kv:
            raise ValueError(f"dscp_collective and dscp_kv are both {self.dscp_kv}")
        if self.collective_share + self.kv_share > 1 - MIN_DEFAULT_SHARE + 1e-12:
            raise ValueError(f"collective_share + kv_share = {self.collective_share + self.kv_share:g}: at most "
                             f"{1 - MIN_DEFAULT_SHARE:g} (unmarked traffic keeps {MIN_DEFAULT_SHARE:g})")
        return self

    def classes(self) -> tuple:
        if not self.isolation:
            return ()
        return compute_classes(self.collective_share, self.kv_share, self.dscp_collective, self.dscp_kv)


class Calibration(_Model):
    mode: Literal["class", "all"] = "class"
    duration: Duration = 5.0

    @field_validator("duration")
    @classmethod
    def _long_enough(cls, v: float) -> float:
        if v < 3:
            raise ValueError("must be at least 3s (1s warm-up, steady window, cool-down)")
        return v


REPO_ROOT = Path(__file__).resolve().parents[1]


def trace_path(file: str) -> Path:
    """A trace file: absolute, or relative to the repository root (the Mooncake trace ships in traffic/data/)."""
    p = Path(file)
    return p if p.is_absolute() else REPO_ROOT / p


class Trace(_Model):
    """Replay a Mooncake trace instead of generating agents: each request is a one-turn agent, its prefix hit
    (512-token blocks seen in earlier requests) in storage, arriving at its timestamp / speed."""

    file: str = Field(description="Mooncake JSONL; relative paths are from the repository root")
    requests: StrictInt | None = Field(None, ge=1, description="the first N requests; None: all")
    speed: Number = Field(1.0, gt=0, description="arrival times divided by this")
    skip: StrictInt = Field(0, ge=0, description="requests before the replayed ones: they only warm the cache")

    @model_validator(mode="after")
    def _readable(self) -> "Trace":
        from traffic.traces import load_mooncake  # validated here, before anything is built

        try:
            got = load_mooncake(trace_path(self.file), None if self.requests is None else self.skip + self.requests)
        except OSError as exc:
            raise ValueError(f"cannot read trace {trace_path(self.file)}: {exc.strerror}") from None
        if len(got) <= self.skip:
            raise ValueError(f"the trace has {len(got)} requests: none left after skipping {self.skip}")
        return self


class Workload(_Model):
    set: Literal["32K", "48K", "64K"] = "64K"
    agents: StrictInt = Field(8, ge=1)
    turns_per_agent: StrictInt | None = Field(2, ge=1, description="None: whole trajectories")
    append_scale: Number = Field(1.0, gt=0)
    gen_scale: Number = Field(1.0, gt=0)
    seed: StrictInt = 0
    arrival_rate: Number | None = Field(None, gt=0, description="agents per real second; None: offline")
    drain: bool = Field(False, description="online runs: let every agent finish its trajectory; false: once "
                                           "every turn submitted up to the last arrival (the steady window's "
                                           "end) has finished, agents start no new turn")
    sampling: Literal["agents", "turns"] = Field("agents", description="agents: every trajectory weighs the "
                                                 "same; turns: drawn by length, the turn mix of whole trajectories")
    trace: Trace | None = Field(None, description="replay a Mooncake trace instead (set, agents, turns, scales "
                                                  "and sampling are then unused)")

    @model_validator(mode="after")
    def _windows(self) -> "Workload":
        if self.sampling == "turns" and self.turns_per_agent is None:
            raise ValueError("sampling: turns draws k-turn windows; set turns_per_agent")
        if self.trace is not None and self.arrival_rate is not None:
            raise ValueError("a trace brings its own arrival times: drop arrival_rate (use trace.speed)")
        return self


class Serving(_Model):
    modes: list[Literal["basic", "layerwise", "dualpath", "oracle"]] = Field(
        ["basic", "dualpath", "oracle"], min_length=1,
        description="layerwise: Basic's prefill-side reads with layerwise prefill (the paper's first ablation step)")
    policy: str = Field("paper", description="a name of daemons/policy.py's POLICIES, or a class of one's own: "
                        "FILE.py:Class (from the current directory) or module:Class (daemons/policyapi.py)")
    read_path: Literal[READ_PATHS] = Field(  # type: ignore[valid-type]
        "choose", description="dualpath: each request reads from the side with the shorter read queue (choose, "
                              "the paper's) or from both, split so the two queues drain together (split)")
    layer_chunks: StrictInt = Field(4, ge=1, description="layer groups per layerwise transfer")
    collectives: bool = Field(False, description="MoE AllToAll per prefill layer chunk and decode step, "
                                                 "marked with traffic_classes.dscp_collective")
    lockstep: bool = Field(True, description="the prefill engines of an EP model (ds*) run each layer chunk in "
                                             "lockstep with their EP group: its slowest engine sets the time")
    isolation_compare: bool = Field(False, description="after the modes, re-shape the compute fabric with "
                                                       "traffic_classes.isolation flipped and run dualpath again")
    block_tokens: StrictInt = Field(64, ge=1)
    balance_window: Duration = Field(1.0, gt=0, description="real seconds per window of the SNIC load-balance "
                                                            "figure (max / mean SNIC reads per window)")
    workload: Workload = Workload()

    @model_validator(mode="after")
    def _comparable(self) -> "Serving":
        if self.isolation_compare and not (self.collectives and {"oracle", "dualpath"} <= set(self.modes)):
            raise ValueError("isolation_compare needs collectives: true and modes with oracle (the reference) "
                             "and dualpath")
        return self

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:  # a class of one's own is imported and checked here, before anything runs
        return policyapi.resolve(v)

    @field_validator("modes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"modes repeat: {v}")
        return v


SweepValue = StrictInt | float | str | bool | list


class Search(_Model):
    """A capacity search (online runs): for each point and seed, probe arrival rates starting at the point's
    own ``serving.workload.arrival_rate``, up by ``factor`` while the SLO holds and down while it fails, then
    halve the gap (geometrically) between the highest passing and the lowest failing rate until they are
    within ``resolution`` of each other or ``probes`` runs were made. Every probe lets agents arrive for
    ``window`` seconds of real time (agents = ceil(rate x window))."""

    window: Duration = Field(gt=0, description="seconds of real time during which agents arrive, per probe")
    factor: Number = Field(1.25, gt=1, le=4, description="step up or down until the SLO verdict flips")
    resolution: Number = Field(1.1, gt=1, description="stop when lowest failing / highest passing <= this")
    probes: StrictInt = Field(4, ge=2, le=12, description="runs per point and seed, at most")


class Sweep(_Model):
    """Many runs of one scenario: every combination of ``grid`` (or each of ``points``), times every seed.
    Keys are dotted paths as for ``--set``; each run is the scenario with those values set."""

    grid: dict[str, list[SweepValue]] = Field({}, description="key -> values: every combination is a point")
    points: list[dict[str, SweepValue]] = Field([], description="explicit points, key -> value each")
    seeds: list[StrictInt] = Field([0], min_length=1, description="serving.workload.seed of each repeat")
    search: Search | None = Field(None, description="capacity search from each point instead of one run each")

    @model_validator(mode="after")
    def _one_kind(self) -> "Sweep":
        if self.grid and self.points:
            raise ValueError("give grid or points, not both")
        keys = list(self.grid) + [k for p in self.points for k in p]
        bad = [k for k in keys if k.split(".")[0] in ("sweep", "name", "paper") or not k]
        if bad:
            raise ValueError(f"cannot sweep {bad[0]!r}")
        empty = [k for k, v in self.grid.items() if not v]
        if empty:
            raise ValueError(f"grid {empty[0]} has no values")
        if any(not p for p in self.points):
            raise ValueError("a point sets nothing")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        return self


class Scenario(_Model):
    name: str
    description: str = ""
    cluster: Cluster
    scale: ScaleModel
    emulation: Emulation = Emulation()
    traffic_classes: TrafficClasses = TrafficClasses()
    calibration: Calibration = Calibration()
    serving: Serving | None = None
    faults: list[Fault] = Field([], description="what fails during each serving mode, when (docs/faults.md)")
    sweep: Sweep | None = None
    servers: Servers | None = Field(None, description="machines to spread the cluster over (docs/distributed.md)")
    paper: dict[str, Number | str] = Field({}, description="the paper's figures for this experiment, by the "
                                                            "name of the measured value, for reports")

    @field_validator("name")
    @classmethod
    def _ident(cls, v: str) -> str:
        if not v.isidentifier():
            raise ValueError(f"{v!r} is not a valid identifier (letters, digits, underscores)")
        return v

    def fault_problems(self) -> list[tuple[str, str]]:
        """(field, problem) of every fault that does not fit this cluster and workload, and of the replicas."""
        c, s = self.cluster, self.serving
        out = [("faults", "not injected into a cluster spread over servers (docs/distributed.md)")] \
            if self.faults and self.servers else []
        if c.storage.replicas > c.storage.servers:
            out.append(("cluster.storage.replicas", f"{c.storage.replicas} replicas need as many storage servers "
                                                    f"(cluster.storage.servers is {c.storage.servers})"))
        if self.faults and s is None:
            return out + [("faults", "faults are injected into serving modes: this scenario has no serving")]
        if s is None:
            return out
        w = s.workload
        window = w.agents / w.arrival_rate if w.arrival_rate and w.trace is None else None
        return out + fault_problems(self.faults, c.prefill_nodes, c.decode_nodes, c.gpus_per_node, c.storage.servers,
                                    list(s.modes), s.collectives, window)

    def cluster_spec(self) -> ClusterSpec:
        c = self.cluster
        return ClusterSpec(c.prefill_nodes, c.decode_nodes, c.gpus_per_node, c.cnic_rate, c.snic_rate,
                           c.storage.servers, c.storage.nic_rate, c.dram_buffer, c.model)

    def scale_spec(self) -> Scale:
        return Scale(self.scale.bytes, self.scale.time)

    def resolved(self) -> dict[str, Any]:
        """The scenario with every default filled in, units as strings."""
        return self.model_dump(mode="json")


def _reason(err: dict) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if isinstance(err.get("ctx", {}).get("error"), UnitError):
        return str(err["ctx"]["error"])
    return msg.removeprefix("Value error, ") + (f" (got {err['input']!r})" if "input" in err and
                                                  not isinstance(err["input"], dict) else "")


def apply_overrides(data: Any, sets: list[str], where: str) -> dict:
    """``--set cluster.prefill_nodes=3``: dotted path, value parsed as a YAML scalar."""
    if not isinstance(data, dict):
        raise ConfigError(where, "a scenario must be a YAML mapping")
    data = yaml.safe_load(yaml.safe_dump(data, sort_keys=False))  # deep copy of plain data, order kept
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"{where}: --set {item}", "expected KEY=VALUE, e.g. cluster.prefill_nodes=3")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: --set {item}", f"{k} is not a section")
        try:
            node[keys[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: --set {item}", f"value is not valid YAML: {exc}") from None
    return data


def from_dict(data: Any, where: str) -> Scenario:
    if not isinstance(data, dict):
        raise ConfigError(where, "a scenario must be a YAML mapping")
    try:
        sc = Scenario.model_validate(data)
    except ValidationError as exc:  # every problem, each on its own line with its file and field
        problems = [(".".join(str(p) for p in err["loc"]), _reason(err)) for err in exc.errors()]
    else:
        problems = sc.fault_problems()  # the faults against the cluster they target
        if not problems:
            return sc
    (path, reason), rest = problems[0], problems[1:]
    raise ConfigError(f"{where}: {path}", reason + "".join(f"\n{where}: {p}: {r}" for p, r in rest)) from None


def resolve_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a scenario that ships (``default``)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(str(p), "no such scenario file")
        return p
    shipped = SCENARIO_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise ConfigError(name_or_path, f"no such scenario; `dpemu list` shows the {len(list_shipped())} that ship")
    return shipped


def load(name_or_path: str, sets: list[str] | None = None) -> Scenario:
    path = resolve_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(path.name, f"not valid YAML: {exc}") from None
    if sets:
        data = apply_overrides(data, sets, path.name)
    return from_dict(data, path.name)


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its directory name, the values it sets and its scenario."""

    label: str
    values: dict[str, Any]
    scenario: Scenario
    search: Search | None = None  # the first run of a capacity search: the sweep decides the next ones


RATE_KEY, AGENTS_KEY, SEED_KEY = "serving.workload.arrival_rate", "serving.workload.agents", "serving.workload.seed"


def label_of(values: dict[str, Any]) -> str:
    """A point's name, from the values it sets: ``agents=48,modes=basic+dualpath,seed=1`` (the last
    component of each dotted key; safe as a directory name); "-" for none."""
    def text(v: Any) -> str:
        if v == []:
            return "none"
        v = v.rsplit("/", 1)[-1] if isinstance(v, str) and policyapi.is_plugin(v) else v  # a policy file: its name
        return "+".join(map(str, v)) if isinstance(v, list) else str(v)

    raw = ",".join(f"{k.rsplit('.', 1)[-1]}={text(v)}" for k, v in values.items())
    return "".join(c if c.isalnum() or c in "=,.+-_" else "_" for c in raw) or "-"


def sweep_points(name_or_path: str, sets: list[str] | None = None) -> list[Point]:
    """Every run of a scenario's sweep, each validated (a bad point is named before anything is built).
    A scenario without ``sweep`` is one point."""
    path = resolve_path(name_or_path)
    base = load(str(path), sets)
    if base.sweep is None:
        return [Point("", {}, base)]
    data = apply_overrides(yaml.safe_load(path.read_text()), sets or [], path.name)
    data.pop("sweep")
    sw = base.sweep
    combos = ([dict(zip(sw.grid, vals, strict=True)) for vals in itertools.product(*sw.grid.values())]
              if sw.grid else [dict(p) for p in sw.points] or [{}])
    points, labels = [], set()
    for seed in sw.seeds:  # seed-major: an interrupted sweep has whole curves for the first seeds
        for combo in combos:
            values = {**combo, "serving.workload.seed": seed}
            label = label_of(values)
            if label in labels:
                raise ConfigError(f"{path.name}: sweep", f"two points are both {label}")
            labels.add(label)
            sets_ = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                     for k, v in values.items()]
            sc = from_dict(apply_overrides(data, sets_, path.name), f"{path.name} [{label}]")
            if sc.serving is None:
                raise ConfigError(f"{path.name}: sweep", "a sweep varies serving runs: add a serving section")
            point = Point(label, values, sc)
            if sw.search is not None:
                if sc.serving.workload.arrival_rate is None:
                    raise ConfigError(f"{path.name}: sweep.search [{label}]", "a capacity search needs online "
                                      "runs: set serving.workload.arrival_rate (the first rate probed)")
                point = dataclasses.replace(probe(point, sc.serving.workload.arrival_rate, sw.search.window),
                                            search=sw.search)
                if point.label in labels:
                    raise ConfigError(f"{path.name}: sweep", f"two searches both start at {point.label}")
                labels.add(point.label)
            points.append(point)
    return points


def probe(start: Point, rate: float, window: float) -> Point:
    """The run of a capacity search at `rate`: the start point with that arrival rate and ceil(rate x window)
    agents (its values and label say both)."""
    rate = round(rate, 3)
    rate = int(rate) if rate == int(rate) else rate
    agents = math.ceil(rate * window - 1e-9)
    w = start.scenario.serving.workload.model_copy(update={"arrival_rate": rate, "agents": agents})
    serving = start.scenario.serving.model_copy(update={"workload": w})
    values = {**{k: v for k, v in start.values.items() if k not in (RATE_KEY, AGENTS_KEY, SEED_KEY)},
              RATE_KEY: rate, AGENTS_KEY: agents, SEED_KEY: start.values[SEED_KEY]}
    return Point(label_of(values), values, start.scenario.model_copy(update={"serving": serving}))


def list_shipped() -> list[Path]:
    return sorted(SCENARIO_DIR.glob("*.yaml"))
