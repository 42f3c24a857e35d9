"""A scenario's ``faults:``: what fails, when, for how long; checked against the cluster before anything is built.

    faults:
      - {at: 20s, kind: kill, target: st1}               # a storage server dies
      - {at: 30s, kind: kill, target: pe2}               # a prefill (or decode) node daemon dies
      - {at: 40s, kind: link_down, target: de1-snic, for: 3s}   # a node's SNIC (or one CNIC: pe1-cnic0)
      - {at: 50s, kind: stop, target: de2, for: 2s}      # SIGSTOP, then SIGCONT (a storage server or a node)

``at`` is in real seconds from the start of a serving mode's workload; every fault is injected in every mode
listed in ``modes`` (default: all of them). What each does and how the cluster answers: docs/faults.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from emulator.units import parse_duration

KINDS = ("kill", "stop", "link_down")


class Fault(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    at: float = Field(ge=0, description="real seconds from the start of the mode's workload")
    kind: Literal[KINDS]  # type: ignore[valid-type]
    target: str = Field(description="kill, stop: a daemon (st1, pe1, de2); link_down: a link (pe1-snic, de1-cnic0)")
    duration: float | None = Field(None, alias="for", gt=0,
                                   description="stop, link_down: real seconds until it continues / comes up")
    modes: list[str] | None = Field(None, description="the serving modes to inject it in (default: every mode)")

    @model_validator(mode="before")
    @classmethod
    def _units(cls, data):
        if isinstance(data, dict):
            data = dict(data)
            for key in ("at", "for", "duration"):
                if isinstance(data.get(key), str):
                    data[key] = parse_duration(data[key])
        return data

    @model_validator(mode="after")
    def _duration(self) -> "Fault":
        if self.kind == "kill" and self.duration is not None:
            raise ValueError("a kill is for good: drop 'for'")
        if self.kind != "kill" and self.duration is None:
            raise ValueError(f"{self.kind} needs 'for': how long until it is undone")
        return self

    @property
    def until(self) -> float:
        """When it is undone (a kill: never)."""
        return float("inf") if self.duration is None else self.at + self.duration

    def label(self) -> str:
        return f"{self.kind} {self.target} at {self.at:g} s" + (f" for {self.duration:g} s" if self.duration else "")


def targets(prefill: int, decode: int, gpus: int, storage: int) -> tuple[set[str], set[str]]:
    """(daemon targets, link targets) of a cluster: st1.., pe1.., de1..; <node>-snic, <node>-cnic<i>."""
    nodes = [f"pe{i}" for i in range(1, prefill + 1)] + [f"de{i}" for i in range(1, decode + 1)]
    daemons = set(nodes) | {f"st{i}" for i in range(1, storage + 1)}
    links = {f"{n}-snic" for n in nodes} | {f"{n}-cnic{g}" for n in nodes for g in range(gpus)}
    return daemons, links


def problems(faults: list[Fault], prefill: int, decode: int, gpus: int, storage: int, modes: list[str],
             collectives: bool, window_s: float | None) -> list[tuple[str, str]]:
    """(field, what is wrong) of every problem of `faults` on this cluster and workload. `window_s`: the real
    seconds the workload is known to last at least (an online or trace workload's arrivals), or None."""
    daemons, links = targets(prefill, decode, gpus, storage)
    out = []
    if faults and collectives:
        out.append(("faults", "faults cannot be injected with serving.collectives (the AllToAll group has no "
                              "failure handling)"))
    for i, f in enumerate(faults):
        where = f"faults.{i}"
        known = links if f.kind == "link_down" else daemons
        if f.target not in known:
            kind = "link (<node>-snic, <node>-cnic<i>)" if f.kind == "link_down" else "daemon (st<i>, pe<i>, de<i>)"
            out.append((f"{where}.target", f"{f.target!r} is not a {kind} of this cluster; it has "
                                           f"{', '.join(sorted(known))}"))
        for m in f.modes or []:
            if m not in modes:
                out.append((f"{where}.modes", f"{m!r} is not one of serving.modes {modes}"))
        if window_s is not None and f.at >= window_s:
            out.append((f"{where}.at", f"{f.at:g} s is past the workload's {window_s:g} s of arrivals"))
    return out
