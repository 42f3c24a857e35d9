"""Scheduling policies of your own: the interface (:class:`Policy`), and how a scenario names one.

``serving.policy`` is one of the built-in names of :mod:`daemons.policy` (``paper``, ``round_robin``, ...) or a
class of your own, named by

- ``path/to/file.py:ClassName``: a Python file. A relative path is taken from the CURRENT directory (where
  ``dpemu`` runs, as every path on its command line), and the scenario keeps it absolute from then on: the
  run's resolved ``scenario.yaml`` and the scheduler's ``<mode>/scheduler.json`` name the absolute file;
- ``package.module:ClassName``: a module as Python imports it: installed, or under the current directory.

The class subclasses :class:`Policy`, implements ``read_side`` and may override ``choose_pe`` (the PE engine;
by default the paper's rule). Each is a pure function of the loads the scheduler already keeps: it gets
copies, returns a choice, and may keep state of its own on ``self`` (the scheduler makes one instance with
``ClassName()`` per serving mode, when it starts). The DE engine is always the paper's choice.

Checked when the scenario loads, before anything is built (:func:`resolve`): the file exists and imports, the
class exists, subclasses Policy, implements read_side, its methods take the arguments below, and
``ClassName()`` works; any problem is a ``ConfigError`` naming ``serving.policy`` and the problem.

During a run the scheduler calls it through :class:`Guarded`: a call that raises or returns no valid choice
(or a choose_pe that returns None while no turn runs anywhere, which would wait forever) is counted, and the
paper's choice is used for that turn, so a buggy policy never stops a run. The scheduler writes the first
fallback of each kind as a ``policy_fallback`` event in ``<mode>/scheduler-events.json`` and, when it stops,
a ``policy_fallbacks`` event with every call and fallback counted. A call that never returns does stop the
scheduler: keep them fast (they run once per turn, inside its event loop).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from collections import Counter
from pathlib import Path
from typing import Callable

from daemons import policy as paper
from daemons.policy import POLICIES, EngineLoad, NodeLoad

__all__ = ["Policy", "EngineLoad", "NodeLoad", "Guarded", "is_plugin", "resolve", "load_policy"]

SIDES = ("pe", "de")


class Policy:
    """A scheduling policy: where each turn's KV is read, and (optionally) which prefill engine computes it.

    Subclass it, implement :meth:`read_side`, optionally override :meth:`choose_pe`. Every quantity is in
    tokens: a token's KV cache has the same size everywhere in a run (DS 660B: ~41 KB), so tokens of KV to
    read over an SNIC's rate is a time, and every node's SNIC has the same rate. The loads are current: they
    include the turns placed a moment ago, before any node reported them.
    """

    def read_side(self, pe: NodeLoad, de: NodeLoad) -> str:
        """REQUIRED. Which node reads this turn's cached KV from storage, through its storage NIC (SNIC):
        ``"pe"`` or ``"de"``.

        - ``"pe"``: the prefill node reads the KV into its own DRAM and its GPU loads it from there (the PE
          read path, the only one of today's systems: Basic).
        - ``"de"``: the decode node reads it and pushes it to the prefill GPU over the compute network, layer
          chunk by layer chunk (DualPath's second path).

        Called once per turn in the ``dualpath`` mode (with ``serving.read_path: choose``), right after the
        turn got its prefill engine (:meth:`choose_pe`) and its decode engine (the paper's DE rule); ``pe`` and
        ``de`` are the loads of the two nodes those engines are on. ``basic`` always reads on the PE side and
        ``oracle`` reads nothing: they never call it.

        Each :class:`NodeLoad` has:

        - ``node`` (str): the node's name: ``pe1``, ``pe2``, ... or ``de1``, ``de2``, ...;
        - ``read_queue_tokens`` (int): tokens of KV the node still has to read from storage: what it reported
          (every 0.1 s of real time) plus what was placed on it since. Time to drain = read_queue_tokens x
          KV bytes per token / SNIC rate, the same rate on every node;
        - ``placed_tokens`` (int): every token ever placed on the node to read since the mode started (what
          the node has been given so far, drained or not).

        Return ``"pe"`` or ``"de"``. Anything else, or an exception, is a fallback: that turn the scheduler
        uses the paper's choice instead, and counts it.
        """
        raise NotImplementedError

    def choose_pe(self, engines: list[EngineLoad], nodes: dict[str, NodeLoad], alpha_tokens: float,
                  beta_tokens: float) -> EngineLoad | None:
        """OPTIONAL (default: the paper's rule, :func:`daemons.policy.choose_pe`). The prefill (PE) engine of
        the turn at the head of the scheduler's global FIFO queue, or ``None`` to let it wait.

        Called whenever the head of the queue may be placed: a turn arrived, or one finished its prefill or
        decode. While this returns None the turn (and every turn behind it) waits for the next call.

        - ``engines``: every live prefill engine (one per GPU), each an :class:`EngineLoad`: ``node`` (str,
          its node's name), ``engine`` (int, the GPU's index on that node), ``unfinished_requests`` (int,
          turns placed on it whose prefill is not done yet) and ``unfinished_tokens`` (int, the tokens those
          turns still have to prefill: their appended tokens, not the cached context they load);
        - ``nodes``: node name -> :class:`NodeLoad` of every node, prefill and decode (as in read_side);
        - ``alpha_tokens`` (float): tokens of KV one SNIC reads in 3 s (the paper's alpha): a node whose read
          queue is at most this has a new turn's KV within ~3 s;
        - ``beta_tokens`` (float): tokens one GPU prefills in 5 s (the paper's beta), at this workload's mean
          turn: an engine above it has 5 s of work queued.

        Return one of ``engines`` (that object, or an equal one) or None to wait. Anything else, an
        exception, or None while no turn runs anywhere (nothing would ever wake the queue) is a fallback: the
        paper's choice is used and counted.
        """
        return paper.choose_pe(engines, nodes, alpha_tokens, beta_tokens)


# -- naming a policy ------------------------------------------------------------------------------------------
FORMS = "a built-in name (" + ", ".join(POLICIES) + "), path/to/file.py:Class or package.module:Class"


def is_plugin(spec: str) -> bool:
    """A class of one's own (``...:Class``), not a built-in name."""
    return ":" in spec


def _split(spec: str) -> tuple[str, str, bool]:
    """(file or module, class name, is a file) of a plugin spec; raises ValueError."""
    target, _, name = spec.rpartition(":")
    if not target:
        raise ValueError("nothing before ':' (write path/to/file.py:Class or package.module:Class)")
    if not name.isidentifier():
        raise ValueError(f"{name!r} after ':' is not a class name")
    is_file = target.endswith(".py") or "/" in target
    if not is_file and not all(part.isidentifier() for part in target.split(".")):
        raise ValueError(f"{target!r} is neither a Python file (ending in .py) nor a module (package.module)")
    return target, name, is_file


def resolve(spec: str, base: Path | None = None) -> str:
    """`spec` as a scenario keeps it: a built-in name unchanged, a file path made absolute (relative to `base`,
    by default the current directory). Loads the class and makes one instance, so every problem is found
    here: raises ValueError saying what is wrong."""
    if spec in POLICIES:
        return spec
    if not is_plugin(spec):
        raise ValueError(f"{spec!r} is not a policy: give {FORMS}")
    target, name, is_file = _split(spec)
    if is_file:
        path = Path(target).expanduser()
        spec = f"{os.path.normpath((base or Path.cwd()) / path)}:{name}"
    load_policy(spec)
    return spec


def load_policy(spec: str) -> Policy:
    """An instance of the class `spec` names (``file.py:Class``, absolute, or ``module:Class``); raises
    ValueError naming the problem."""
    cls = load_class(spec)
    try:
        return cls()
    except Exception as exc:  # noqa: BLE001 - the student's constructor: any error is the problem to name
        raise ValueError(f"{cls.__name__}() failed: {one_line(exc)}") from None


def load_class(spec: str) -> type[Policy]:
    target, name, is_file = _split(spec)
    module = _import_file(Path(target)) if is_file else _import_module(target)
    where = f"{'file' if is_file else 'module'} {target}"
    cls = getattr(module, name, None)
    if cls is None:
        found = sorted(n for n, v in vars(module).items()
                       if isinstance(v, type) and issubclass(v, Policy) and v is not Policy)
        raise ValueError(f"{where} has no class {name}"
                         + (f" (its Policy subclasses: {', '.join(found)})" if found else
                            " (it defines no subclass of daemons.policyapi.Policy)"))
    if not isinstance(cls, type):
        raise ValueError(f"{name} in {where} is not a class but an object of type {type(cls).__name__}")
    if not issubclass(cls, Policy):
        raise ValueError(f"class {name} in {where} does not subclass daemons.policyapi.Policy")
    if cls.read_side is Policy.read_side:
        raise ValueError(f"class {name} in {where} does not implement read_side(self, pe, de)")
    for method, args in (("read_side", ("pe", "de")), ("choose_pe", ("engines", "nodes", "alpha_tokens",
                                                                       "beta_tokens"))):
        fn = getattr(cls, method)
        if not callable(fn):
            raise ValueError(f"{name}.{method} is not a method")
        try:
            inspect.signature(fn).bind(None, *args)
        except TypeError:
            raise ValueError(f"{name}.{method} must take (self, {', '.join(args)})") from None
        except ValueError:  # no signature to read (a builtin): called as it is
            pass
    return cls


def _import_file(path: Path):
    if not path.is_absolute():
        path = Path.cwd() / path
    if not path.is_file():
        raise ValueError(f"policy file {path} does not exist" if not path.exists() else f"{path} is not a file")
    name = "dpemu_policy_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]  # one module per file
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before it runs: dataclasses and pickling look their module up
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the student's file: any error is the problem
        sys.modules.pop(name, None)
        raise ValueError(f"importing {path} failed: {one_line(exc, str(path))}") from None
    return module


def _import_module(target: str):
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:  # the daemons run `python -m`, which puts the current directory first: the same modules here
        sys.path.append(cwd)
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
            raise ValueError(f"no module named {exc.name!r} (installed, or under the current directory "
                             f"{cwd})") from None
        raise ValueError(f"importing {target} failed: {one_line(exc)}") from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001
        raise ValueError(f"importing {target} failed: {one_line(exc)}") from None
    finally:
        if added:
            sys.path.remove(cwd)


def one_line(exc: BaseException, file: str | None = None) -> str:
    """An exception in one line: its type, message and, where known, the line of the policy's code."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} (line {exc.lineno})"
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if file is None or f.filename == file]
    if mine:
        text += f" ({Path(mine[-1].filename).name}, line {mine[-1].lineno})"
    return text


# -- calling one during a run ---------------------------------------------------------------------------------
class Guarded:
    """A policy as the scheduler calls it: each answer checked; a call that raises or returns no valid choice
    is counted in ``fallbacks`` (method -> kind -> count; kinds ``raised``, ``bad_value``, ``waits_idle``) and
    answered with the paper's choice. ``calls`` counts every call. ``on_first(method, kind, detail)`` is told
    the first time each (method, kind) happens."""

    def __init__(self, policy: Policy, on_first: Callable[[str, str, str], None] = lambda *_: None):
        self.policy = policy
        self.on_first = on_first
        self.calls: Counter[str] = Counter()
        self.fallbacks: dict[str, dict[str, int]] = {}

    def _fallback(self, method: str, kind: str, detail: str) -> None:
        per = self.fallbacks.setdefault(method, {})
        per[kind] = per.get(kind, 0) + 1
        if per[kind] == 1:
            self.on_first(method, kind, detail)

    def read_side(self, pe: NodeLoad, de: NodeLoad) -> str:
        self.calls["read_side"] += 1
        try:
            side = self.policy.read_side(pe, de)
        except Exception as exc:  # noqa: BLE001 - any error of the policy falls back
            self._fallback("read_side", "raised", one_line(exc))
        else:
            if isinstance(side, str) and side in SIDES:
                return side
            self._fallback("read_side", "bad_value", f"returned {side!r:.80} (not 'pe' or 'de')")
        return paper.choose_read_side(pe, de)

    def choose_pe(self, engines: list[EngineLoad], nodes: dict[str, NodeLoad], alpha_tokens: float,
                  beta_tokens: float, idle: bool) -> EngineLoad | None:
        """The policy's engine; `idle`: no turn runs anywhere (None then would wait forever)."""
        self.calls["choose_pe"] += 1
        offered = {(e.node, e.engine): e for e in engines}
        try:
            got = self.policy.choose_pe(list(engines), dict(nodes), alpha_tokens, beta_tokens)
        except Exception as exc:  # noqa: BLE001
            self._fallback("choose_pe", "raised", one_line(exc))
        else:
            if got is None and not idle:
                return None
            if got is None:
                self._fallback("choose_pe", "waits_idle", "returned None while no turn was running: the queue "
                                                          "would wait forever")
            elif isinstance(got, EngineLoad) and (got.node, got.engine) in offered:
                return offered[(got.node, got.engine)]
            else:
                self._fallback("choose_pe", "bad_value", f"returned {got!r:.120} (not one of the engines offered)")
        return paper.choose_pe(engines, nodes, alpha_tokens, beta_tokens)

    def totals(self) -> dict:
        """What the scheduler reports when it stops: calls and fallbacks per method."""
        return {"calls": dict(self.calls), "fallbacks": self.fallbacks,
                "fallbacks_total": sum(n for per in self.fallbacks.values() for n in per.values())}
