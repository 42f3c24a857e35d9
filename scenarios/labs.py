"""Teaching labs: ``dpemu lab list`` and ``dpemu lab check LAB``, a lab's experiment run (or read) and the
student's predictions graded against what it measured.

A lab is a directory under the repository's ``labs/``, named ``<number>-<slug>`` (``1-storage-bottleneck``):
``README.md`` (the handout), ``scenario.yaml`` (a run or a sweep, as ``dpemu run`` takes it),
``predictions.yaml`` (the template the student fills, every key ``null``) and ``TEACHER.md``. Its grading
rules are code, one module per lab (``GRADERS``: ``scenarios/labs_storage.py``, ``labs_region.py``, ...): a
``Lab`` names the keys it takes, each with its own check of the value (a number, one of some names, or what a
later lab needs: a capture, a policy file), and a function that grades a results directory into ``Row``s,
plus one that draws the lab's picture. The rules are functions, not a schema, so a lab that grades packet
captures or a scheduler policy fits the same frame.

No answer is typed anywhere the grader reads: every expected value is measured by the run or computed from
the paper's formulas evaluated on the run's own scenario, through the functions the reports use
(``report.storage_bound_speedup``, ``fabric.region``, the run's ``summary.json`` figures).

Refuses: a prediction that is missing, null, unknown or of the wrong kind (every problem named, before
anything runs); a results directory of the wrong kind. Reads only the results directory; writes ``grade.md``,
``grade.json`` and the picture into it (or ``--out``). Called by ``scenarios.cli`` (``add_parser``).

Exit codes of ``lab check``: 0 every prediction passed; 5 some prediction failed; 3 the run is not
trustworthy and 4 turns failed in it (graded all the same, marked so); 1 error; 130 interrupted.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from emulator.errors import ConfigError

LABS_DIR = Path(__file__).resolve().parents[1] / "labs"
#: lab directory -> the module holding its ``LAB`` (imported when the lab is graded: they import this module)
GRADERS = {"1-storage-bottleneck": "scenarios.labs_storage", "2-congestion-free-region": "scenarios.labs_region",
           "3-traffic-classes": "scenarios.labs_classes",
           "4-write-the-scheduler": "scenarios.labs_scheduler"}
EXIT_FAILED_PREDICTION = 5
_FRACTION = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*/\s*([0-9]+(?:\.[0-9]*)?)\s*$")


# -- what a lab is made of ------------------------------------------------------------------------------------
def number(value: Any) -> float:
    """A prediction that is a number: an int or a float, or a fraction written "1/7" (YAML reads it as a
    string). Raises ValueError saying what is wrong."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        return float(value)
    if isinstance(value, str) and (m := _FRACTION.match(value)):
        if float(m.group(2)) == 0:
            raise ValueError(f"{value!r} divides by zero")
        return float(m.group(1)) / float(m.group(2))
    raise ValueError(f"{value!r} is not a number (write e.g. 0.5, 3 or 1/7)")


@dataclass(frozen=True)
class Key:
    """One prediction the student makes: its name in predictions.yaml, its unit and meaning (the template's
    comment), and how a value is read: a number by default, one of ``choices`` when given, or any ``parse``
    (value -> parsed value, raising ValueError with the problem) a lab needs."""
    name: str
    what: str
    choices: tuple[str, ...] = ()
    parse: Callable[[Any], Any] | None = None

    def read(self, value: Any) -> Any:
        if self.parse is not None:
            return self.parse(value)
        if self.choices:
            if value not in self.choices:
                raise ValueError(f"{value!r} is not one of {', '.join(self.choices)}")
            return value
        return number(value)


@dataclass(frozen=True)
class Row:
    """One graded prediction. ``expected`` comes from the run (``source`` "measured") or from a formula on
    the run's own scenario ("formula"); ``tolerance`` says what the check allows; ``why`` is one line."""
    key: str
    predicted: Any
    expected: Any
    source: str
    tolerance: str
    ok: bool
    why: str


@dataclass(frozen=True)
class Lab:
    """A lab's grading rules. ``grades`` is "run" (a run directory, summary.json) or "sweep" (sweep.json);
    ``grade(results dir, answer) -> rows``; ``picture(results dir, answer, out dir) -> file name``; ``trust``:
    why the results are not to be trusted. The answer is the predictions file read by ``keys``, or, for a lab
    with ``policy``, a file the student wrote (below)."""
    title: str
    keys: tuple[Key, ...]
    grades: str
    grade: Callable[[Path, dict], list[Row]]
    picture: Callable[[Path, dict, Path], str | None]
    trust: Callable[[Path], list[str]] = field(default=lambda _d: [])
    #: a lab whose answer is a policy file (``--policy``), not predictions.yaml: (the lab, the file given or None)
    #: -> (the answer its grade reads, the file), checked before anything runs; raises ConfigError naming the problem
    policy: Callable[[Any, Path | None], tuple[dict, Path]] | None = None
    #: ``--set`` overrides the lab's scenario runs with, made from the answer (lab 4: the policies its sweep runs)
    sets: Callable[[dict], list[str]] | None = None
    #: a lab that grades a packet capture too (lab 3): ``--pcap FILE`` reaches its grade and picture as the
    #: answer's "pcap"; without it, ``capture()`` is a context manager held around the lab's own run (lab 3's
    #: takes a bounded tcpdump on a CNIC into the run directory)
    capture: Callable[[], Any] | None = None


@dataclass(frozen=True)
class LabDir:
    """A lab found under labs/: its directory and, once it has one, its grading rules."""
    path: Path
    number: int

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def scenario(self) -> Path:
        return self.path / "scenario.yaml"

    @property
    def predictions(self) -> Path:
        return self.path / "predictions.yaml"

    @property
    def title(self) -> str:
        readme = self.path / "README.md"
        first = readme.read_text().splitlines()[0] if readme.is_file() else ""
        return first.lstrip("# ").strip() or self.name

    def rules(self) -> Lab:
        if self.name not in GRADERS:
            raise ConfigError(f"lab {self.name}", "has no grader yet (scenarios/labs.py: GRADERS)")
        return importlib.import_module(GRADERS[self.name]).LAB


def all_labs(labs_dir: Path = LABS_DIR) -> list[LabDir]:
    out = []
    for d in sorted(labs_dir.iterdir()) if labs_dir.is_dir() else []:
        m = re.match(r"^(\d+)-[a-z0-9-]+$", d.name)
        if m and d.is_dir():
            out.append(LabDir(d, int(m.group(1))))
    return sorted(out, key=lambda lab: lab.number)


def find(name_or_number: str, labs_dir: Path = LABS_DIR) -> LabDir:
    """A lab by its number (``1``) or its directory's name (``1-storage-bottleneck``)."""
    labs = all_labs(labs_dir)
    for lab in labs:
        if name_or_number in (lab.name, str(lab.number)):
            return lab
    raise ConfigError(f"lab {name_or_number}", "no such lab; `dpemu lab list` shows "
                      + (", ".join(lab.name for lab in labs) or f"none (no lab under {labs_dir})"))


# -- predictions ----------------------------------------------------------------------------------------------
def read_predictions(lab: Lab, path: Path) -> dict[str, Any]:
    """The student's predictions, every key read by its own rule. Raises ConfigError naming every problem
    (a key missing, null, unknown, or a value of the wrong kind), one per line."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the predictions: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "must be a mapping of prediction keys to values "
                                     f"({', '.join(k.name for k in lab.keys)})")
    problems, out = [], {}
    for key in lab.keys:
        if key.name not in data:
            problems.append(f"{key.name}: missing (it is {key.what})")
        elif data[key.name] is None:
            problems.append(f"{key.name}: not filled in (null; it is {key.what})")
        else:
            try:
                out[key.name] = key.read(data[key.name])
            except ValueError as exc:
                problems.append(f"{key.name}: {exc} (it is {key.what})")
    known = {k.name for k in lab.keys}
    problems += [f"{k}: not a prediction of this lab (it takes {', '.join(sorted(known))})"
                 for k in data if k not in known]
    if problems:
        raise ConfigError(str(path), f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return out


# -- helpers for the labs' rules ------------------------------------------------------------------------------
def within(key: str, predicted: float, expected: float, source: str, why: str, abs_tol: float | None = None,
           rel_tol: float | None = None) -> Row:
    """A number checked against its expected value: within ``abs_tol`` or within ``rel_tol`` of it."""
    err = abs(predicted - expected)
    ok = (abs_tol is not None and err <= abs_tol + 1e-9) or (
        rel_tol is not None and err <= rel_tol * abs(expected) + 1e-9)
    parts = [f"+-{abs_tol:g}" if abs_tol is not None else "", f"+-{rel_tol:.0%}" if rel_tol is not None else ""]
    tol = "exact" if abs_tol == 0 and rel_tol is None else " or ".join(t for t in parts if t)
    return Row(key, predicted, round(expected, 4), source, tol, ok, why)


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(str(path), f"cannot be read: {exc}") from None


def results_kind(path: Path) -> str:
    if (path / "sweep.json").is_file():
        return "sweep"
    if (path / "summary.json").is_file():
        return "run"
    raise ConfigError(str(path), "neither a run directory (summary.json) nor a sweep directory (sweep.json)")


def run_trust(run: Path) -> list[str]:
    """Why a run directory is not to be trusted (its fidelity verdict, failed turns); [] when it is."""
    s = load_json(run / "summary.json")
    out = list(s.get("fidelity", {}).get("reasons", []))
    if not s.get("fidelity", {}).get("ok") and not out:
        out.append("the fidelity check failed")
    if s.get("failed_turns"):
        out.append(f"{s['failed_turns']} turns failed")
    return out


# -- grading --------------------------------------------------------------------------------------------------
@dataclass
class Grade:
    lab: str
    results: str
    predictions: str
    rows: list[Row]
    distrust: list[str]
    picture: str | None = None

    @property
    def passed(self) -> int:
        return sum(r.ok for r in self.rows)

    def as_dict(self) -> dict:
        return {"lab": self.lab, "results": self.results, "predictions": self.predictions,
                "passed": self.passed, "total": len(self.rows), "trustworthy": not self.distrust,
                "distrust": self.distrust, "picture": self.picture, "rows": [asdict(r) for r in self.rows]}


def sweep_trust(sweep_dir: Path) -> list[str]:
    """Why a sweep's points cannot be trusted: points that did not finish, and each finished run's reasons."""
    index = load_json(sweep_dir / "sweep.json")
    out = [f"{p['label']}: {p.get('status')}" for p in index["points"] if p.get("status") != "done"]
    for p in index["points"]:
        if p.get("status") == "done":
            out += [f"{p['label']}: {why}" for why in run_trust(sweep_dir / p["run_dir"])]
    return out


def cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if v != int(v) or abs(v) >= 1e4 else f"{v:g}"
    return str(v)


def grade(lab_dir: LabDir, results: Path, predictions: dict, predictions_file: Path, out: Path) -> Grade:
    """Grade `results` (a run or sweep of the lab) and write grade.md, grade.json and the picture into `out`."""
    lab = lab_dir.rules()
    kind = results_kind(results)
    if kind != lab.grades:
        raise ConfigError(str(results), f"lab {lab_dir.name} grades a {lab.grades} directory "
                                        f"({'sweep.json' if lab.grades == 'sweep' else 'summary.json'}); "
                                        f"this is a {kind} directory")
    g = Grade(lab_dir.name, str(results), str(predictions_file), lab.grade(results, predictions), lab.trust(results))
    out.mkdir(parents=True, exist_ok=True)
    g.picture = lab.picture(results, predictions, out)
    (out / "grade.json").write_text(json.dumps(g.as_dict(), indent=1) + "\n")
    (out / "grade.md").write_text("\n".join(markdown(g, lab_dir)) + "\n")
    return g


def markdown(g: Grade, lab_dir: LabDir) -> list[str]:
    lines = [f"# {lab_dir.rules().title}: grade", "", f"Results: `{g.results}`; predictions: `{g.predictions}`.", ""]
    if g.distrust:
        lines += ["**The run is NOT TRUSTWORTHY; the grades below are of an unfaithful emulation:**", ""]
        lines += [f"- {d}" for d in g.distrust] + [""]
    lines += ["| key | predicted | expected | from | tolerance | result | why |", "|---|---|---|---|---|---|---|"]
    for r in g.rows:
        lines.append(f"| {r.key} | {cell(r.predicted)} | {cell(r.expected)} | {r.source} | {r.tolerance} "
                     f"| {'pass' if r.ok else '**FAIL**'} | {r.why} |")
    lines += ["", f"{g.passed} of {len(g.rows)} predictions passed."]
    if g.picture:
        lines += ["", f"![{g.picture}]({g.picture})"]
    return lines


# -- the command line -----------------------------------------------------------------------------------------
def cmd_list(_args) -> int:
    from .terminal import console
    for lab in all_labs():
        rules = "" if lab.name in GRADERS else "  (no grader yet)"
        console.print(f"{lab.number:>3}  {lab.name:28s} {lab.title}{rules}", markup=False)
    return 0


def _run(lab_dir: LabDir, out_root: Path, sets: list[str] | None = None) -> Path:
    """Run the lab's scenario as ``dpemu run`` does (a run or a sweep, with its progress bar); its directory."""
    from . import platform, schema
    from .terminal import run_points

    points = schema.sweep_points(str(lab_dir.scenario), sets)
    platform.require_root()
    return run_points(points, out_root)[0]


def _table(g: Grade, lab_dir: LabDir):
    from rich import box
    from rich.table import Table
    t = Table(title=f"{lab_dir.rules().title}: {g.passed} of {len(g.rows)} predictions passed", box=box.SIMPLE_HEAD,
              pad_edge=False, collapse_padding=True, title_justify="left")
    for col, just in (("key", "left"), ("predicted", "right"), ("expected", "right"), ("from", "left"),
                      ("tolerance", "right"), ("result", "left"), ("why", "left")):
        t.add_column(col, justify=just, no_wrap=col != "why")
    for r in g.rows:
        t.add_row(r.key, cell(r.predicted), cell(r.expected), r.source, r.tolerance,
                  "[green]pass[/]" if r.ok else "[bold red]FAIL[/]", r.why)
    return t


def cmd_check(args) -> int:
    from .terminal import console
    lab_dir = find(args.lab)
    lab = lab_dir.rules()
    pfile = Path(args.predictions) if args.predictions else lab_dir.predictions
    if lab.policy is not None:  # every problem named before anything runs
        predictions, pfile = lab.policy(lab_dir, Path(args.policy) if args.policy else None)
    elif args.policy:
        raise ConfigError(f"lab {lab_dir.name}", "takes predictions (--predictions FILE), not a --policy")
    else:
        predictions = read_predictions(lab, pfile)
    if args.pcap:  # a capture to grade: the lab must take one, and the file must be there before anything runs
        if lab.capture is None:
            raise ConfigError(f"lab {lab_dir.name}", "grades no packet capture (--pcap)")
        if not Path(args.pcap).is_file():
            raise ConfigError(args.pcap, "no such capture file (--pcap)")
        predictions = {**predictions, "pcap": Path(args.pcap)}
    with (lab.capture() if lab.capture and not args.pcap and not args.results
          else contextlib.nullcontext()):
        results = Path(args.results) if args.results else _run(lab_dir, Path(args.runs),
                                                              lab.sets(predictions) if lab.sets else None)
    g = grade(lab_dir, results, predictions, pfile, Path(args.out) if args.out else results)
    console.print(_table(g, lab_dir))
    for d in g.distrust:
        console.print(f"[bold red]NOT TRUSTWORTHY[/]: {d}", markup=True)
    out = Path(args.out) if args.out else results
    console.print(f"grade: {out / 'grade.md'}, {out / 'grade.json'}"
                  + (f"; picture: {out / g.picture}" if g.picture else ""), markup=False)
    if g.distrust:
        return 4 if any("turns failed" in d for d in g.distrust) else 3
    return 0 if g.passed == len(g.rows) else EXIT_FAILED_PREDICTION


def add_parser(sub) -> None:
    lab = sub.add_parser("lab", help="teaching labs: list them, or run one and grade your predictions",
                         epilog="lab check exit codes: 0 every prediction passed, 5 some failed, 3 the run was "
                                "not trustworthy (graded all the same), 4 turns failed in it, 1 error.")
    labsub = lab.add_subparsers(dest="lab_cmd", required=True, metavar="list|check")
    labsub.add_parser("list", help="the labs under labs/").set_defaults(func=cmd_list)
    c = labsub.add_parser("check", help="run the lab's experiment (root), or read --results, and grade the "
                                        "predictions against what it measured")
    c.add_argument("lab", help="a lab's number (1) or directory name (1-storage-bottleneck)")
    c.add_argument("--results", metavar="DIR", help="grade this run or sweep directory instead of running (no root)")
    c.add_argument("--predictions", metavar="FILE", help="default: labs/<lab>/predictions.yaml")
    c.add_argument("--policy", metavar="FILE[:CLASS]", help="a lab whose answer is a scheduler policy (lab 4): "
                                                           "the policy file (default: the lab's policy.py)")
    c.add_argument("--pcap", metavar="FILE", help="a lab that grades a packet capture (lab 3): this one, e.g. "
                                                  "taken with tcpdump on a live cluster (default: the one its run "
                                                  "takes)")
    c.add_argument("--out", metavar="DIR", help="where grade.md, grade.json and the picture go (default: the "
                                                "results directory)")
    c.add_argument("--runs", default="results", metavar="DIR", help="results root of a new run (default: ./results)")
    c.set_defaults(func=cmd_check)
