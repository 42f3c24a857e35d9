"""Quantities with units: the one place where unit strings are parsed.

Scenario files say ``400Gbit`` (a rate), ``1.3GB`` (a size) or ``50ms`` (a
duration); Python code carries plain numbers whose unit is in the identifier
(``rate_bps``, ``size_bytes``, ``t_s``). A bare number where a unit is required
is refused: Mininet's ``bw=10`` style is exactly the ambiguity we avoid.

Decimal prefixes (k, M, G, T) are powers of 1000; binary prefixes (Ki, Mi, Gi,
Ti) powers of 1024. Rates are in bits per second: ``bit`` / ``bps`` suffixes, or
``B/s`` for bytes per second.
"""

from __future__ import annotations

import math
import re

from .errors import UnitError

_PREFIX = {
    "": 1.0,
    "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
    "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40,
}
_NUM = r"(?P<num>[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)"
_RATE_RE = re.compile(_NUM + r"\s*(?P<pre>Ki|Mi|Gi|Ti|[kKMGTP]?)(?P<unit>bit/s|bit|bps|B/s)$")
_SIZE_RE = re.compile(_NUM + r"\s*(?P<pre>Ki|Mi|Gi|Ti|[kKMGTP]?)(?P<unit>B|bit)$")
_TIME_RE = re.compile(_NUM + r"\s*(?P<unit>ns|us|ms|s|min|h)$")
_TIME_UNIT = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}


_BARE_NUMBER = re.compile(r"^[-+]?" + _NUM + r"$")


def _check_text(text: object, kind: str, example: str) -> str:
    if isinstance(text, bool) or not isinstance(text, str) or _BARE_NUMBER.match(text.strip()):
        raise UnitError(f"{text!r} has no unit; write a {kind} like {example!r}")
    return text.strip()


def _positive(value: float, text: str, allow_zero: bool) -> float:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise UnitError(f"{text!r} must be {'>= 0' if allow_zero else '> 0'}")
    return value


def parse_rate(text: object, *, allow_zero: bool = False) -> float:
    """``'400Gbit'`` -> 4e11 (bits per second). ``'50GB/s'`` -> 4e11."""
    s = _check_text(text, "rate", "400Gbit")
    m = _RATE_RE.match(s)
    if not m:
        raise UnitError(f"{text!r} is not a rate; write e.g. '400Gbit', '40Mbit' or '50GB/s'")
    value = float(m["num"]) * _PREFIX[m["pre"]]
    if m["unit"] == "B/s":
        value *= 8
    return _positive(value, s, allow_zero)


def parse_size(text: object, *, allow_zero: bool = False) -> float:
    """``'1.3GB'`` -> 1.3e9 (bytes). ``'64KiB'`` -> 65536."""
    s = _check_text(text, "size", "1.3GB")
    m = _SIZE_RE.match(s)
    if not m:
        raise UnitError(f"{text!r} is not a size; write e.g. '1.3GB', '64KiB' or '512B'")
    value = float(m["num"]) * _PREFIX[m["pre"]]
    if m["unit"] == "bit":
        value /= 8
    return _positive(value, s, allow_zero)


def parse_duration(text: object, *, allow_zero: bool = False) -> float:
    """``'50ms'`` -> 0.05 (seconds)."""
    s = _check_text(text, "duration", "50ms")
    m = _TIME_RE.match(s)
    if not m:
        raise UnitError(f"{text!r} is not a duration; write e.g. '50ms', '3s' or '2min'")
    return _positive(float(m["num"]) * _TIME_UNIT[m["unit"]], s, allow_zero)


def _fmt(value: float, unit: str, steps: tuple[str, ...], digits: int) -> str:
    i = 0
    while i < len(steps) - 1 and abs(value) >= 1000.0 ** (i + 1):
        i += 1
    return f"{value / 1000.0 ** i:.{digits}g}{steps[i]}{unit}"


def _shortest(value: float, unit: str, steps: tuple[str, ...], parse) -> str:
    """The shortest text (4 significant digits or more) that parses back to `value` exactly."""
    for digits in range(4, 18):
        text = _fmt(value, unit, steps, digits)
        if parse(text, allow_zero=True) == value:
            return text
    return _fmt(value, unit, steps, 17)


_RATE_STEPS = ("", "K", "M", "G", "T")


def format_rate(rate_bps: float, digits: int | None = None) -> str:
    """4e11 -> ``'400Gbit'``. Without `digits`: the exact inverse of
    :func:`parse_rate` (for files and tc plans); with it, rounded for people."""
    if digits is not None:
        return _fmt(rate_bps, "bit", _RATE_STEPS, digits)
    return _shortest(rate_bps, "bit", _RATE_STEPS, parse_rate)


def format_size(size_bytes: float) -> str:
    """1.3e9 -> ``'1.3GB'``; the exact inverse of :func:`parse_size`."""
    return _shortest(size_bytes, "B", _RATE_STEPS, parse_size)
