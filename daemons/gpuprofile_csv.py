"""The GPU layer profile's file format (`dpemu gpu profile v1`): one definition, read and written here.

A profile is a CSV file made by daemons/gpuprofile.py on one real GPU. It opens with comment lines of
provenance, then a header, then one row per op at one grid point::

    # dpemu gpu profile v1
    # gpu: NVIDIA H200
    # sm_count: 132
    # ...                        (one "# key: value" line per provenance key)
    # skipped: ds660b/attention prefill B=20 cached=65536 new=429: OutOfMemoryError: ...
    model,op,phase,batch,cached,new,ep_gpus,rows,time_ms,p10_ms,p90_ms,reps,graph,impl
    qwen32b,linear,prefill,1,0,4096,1,4096,1.234,1.220,1.251,20,0,fp8-scaled_mm

Every provenance key maps to one string, except ``skipped``: one entry per ``# skipped:`` line, as a list
(``# skipped: none`` is the empty list). Rows: phase is prefill, decode or calib; ``rows`` counts the GEMM
rows or tokens the op processed (calib rows: the matrix size or the bytes copied); times are milliseconds
(median, 10th and 90th percentile of ``reps`` timed repetitions); ``graph`` is 1 if the op was timed as a
CUDA-graph replay; ``impl`` says how it was computed (calib rows: the achieved rate, e.g. ``tflops=778.1``).

Refuses: anything but this format (a malformed line raises ValueError naming its line). Stdlib only: the
reader needs no torch, so the cost model and the unit tests can read a profile anywhere.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import astuple, dataclass, fields
from pathlib import Path

MAGIC = "# dpemu gpu profile v1"
PHASES = ("prefill", "decode", "calib")
SKIPPED = "skipped"
_INT_FIELDS = ("batch", "cached", "new", "ep_gpus", "rows", "reps", "graph")
_FLOAT_FIELDS = ("time_ms", "p10_ms", "p90_ms")


@dataclass(frozen=True)
class ProfileRow:
    """One op timed at one grid point (or one calibration microbenchmark)."""

    model: str          # ModelSpec name (qwen32b, ds660b, ds27b) or "gpu" for calib rows
    op: str             # linear, attention, layer, mla_proj, indexer, experts, dense_ffn; calib: gemm_bf16 ...
    phase: str          # prefill | decode | calib
    batch: int          # requests (prefill) or sequences (decode) of the batch
    cached: int         # cached tokens per request (decode: context per sequence)
    new: int            # new tokens per request (decode: 1)
    ep_gpus: int        # expert-parallel width assumed by the experts op (1 elsewhere)
    rows: int           # GEMM rows or tokens processed (real, before padding to multiples of 16)
    time_ms: float      # median of the timed repetitions
    p10_ms: float
    p90_ms: float
    reps: int           # timed repetitions
    graph: int          # 1: timed as a CUDA-graph replay, 0: eager
    impl: str           # how it was computed (kernel choices, fallbacks; calib: the achieved rate)

    def __post_init__(self) -> None:
        for name in ("model", "op", "phase", "impl"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, not {getattr(self, name)!r}")
        if not self.model or not self.op:
            raise ValueError("model and op must not be empty")
        if self.phase not in PHASES:
            raise ValueError(f"phase {self.phase!r} is not one of {', '.join(PHASES)}")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, not {value!r}")
        if self.graph not in (0, 1):
            raise ValueError(f"graph must be 0 or 1, not {self.graph!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")


HEADER = tuple(f.name for f in fields(ProfileRow))


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def format_profile(provenance: dict, rows: list[ProfileRow]) -> str:
    """The file's text: MAGIC, one ``# key: value`` line per provenance key (``skipped``: one line per
    entry, ``none`` if empty), the header, the rows."""
    lines = [MAGIC]
    for key, value in provenance.items():
        key = _one_line(key)
        if not key or ":" in key or key == SKIPPED:
            continue
        lines.append(f"# {key}: {_one_line(value)}")
    skipped = [_one_line(s) for s in provenance.get(SKIPPED, ())]
    if skipped:
        lines.extend(f"# {SKIPPED}: {s}" for s in skipped)
    else:
        lines.append(f"# {SKIPPED}: none")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    for row in rows:
        writer.writerow(f"{v:.6g}" if isinstance(v, float) else _one_line(v) if isinstance(v, str) else v
                        for v in astuple(row))
    return "\n".join(lines) + "\n" + out.getvalue()


def write_profile(path: str | os.PathLike, provenance: dict, rows: list[ProfileRow]) -> None:
    """Write the whole file atomically (a temporary file renamed over `path`): an interrupted run leaves the
    last complete version."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(format_profile(provenance, rows))
    os.replace(tmp, path)


def _parse_row(values: list[str]) -> ProfileRow:
    if len(values) != len(HEADER):
        raise ValueError(f"{len(values)} fields, expected {len(HEADER)}")
    kwargs: dict = dict(zip(HEADER, values))
    for name in _INT_FIELDS:
        try:
            kwargs[name] = int(kwargs[name])
        except ValueError:
            raise ValueError(f"{name} {kwargs[name]!r} is not an int") from None
    for name in _FLOAT_FIELDS:
        try:
            kwargs[name] = float(kwargs[name])
        except ValueError:
            raise ValueError(f"{name} {kwargs[name]!r} is not a number") from None
    return ProfileRow(**kwargs)


def parse_profile(text: str, source: str = "<profile>") -> tuple[dict, list[ProfileRow]]:
    """(provenance, rows) of a profile's text; ValueError naming `source` and the line when malformed."""
    provenance: dict = {SKIPPED: []}
    rows: list[ProfileRow] = []
    header_seen = False
    lines = text.splitlines()
    if not lines or lines[0].strip() != MAGIC:
        raise ValueError(f"{source}:1: not a dpemu gpu profile (first line must be {MAGIC!r})")
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        if line.startswith("#"):
            if header_seen:
                raise ValueError(f"{source}:{lineno}: comment after the header")
            key, sep, value = line[1:].partition(":")
            key, value = key.strip(), value.strip()
            if not sep or not key:
                raise ValueError(f"{source}:{lineno}: provenance line is not '# key: value'")
            if key == SKIPPED:
                if value != "none":
                    provenance[SKIPPED].append(value)
            elif key in provenance:
                raise ValueError(f"{source}:{lineno}: provenance key {key!r} repeated")
            else:
                provenance[key] = value
            continue
        values = next(csv.reader([line]))
        if not header_seen:
            if tuple(values) != HEADER:
                raise ValueError(f"{source}:{lineno}: header is not {','.join(HEADER)}")
            header_seen = True
            continue
        try:
            rows.append(_parse_row(values))
        except ValueError as err:
            raise ValueError(f"{source}:{lineno}: {err}") from None
    if not header_seen:
        raise ValueError(f"{source}:{len(lines)}: no header line")
    return provenance, rows


def read_profile(path: str | os.PathLike) -> tuple[dict, list[ProfileRow]]:
    """(provenance, rows) of the profile at `path` (see the module docstring for the format)."""
    return parse_profile(Path(path).read_text(), str(path))
