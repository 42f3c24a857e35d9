"""Names of the kernel objects dpemu creates, and the rules they follow.

Every object dpemu creates in the root network namespace (bridges, the switch
side of every veth pair, named namespaces) starts with :data:`PREFIX`, so that
cleanup can tell ours from anything else on the machine. Interfaces that live
inside one of our namespaces (``pe1-snic``) die with it and need no prefix.
Linux caps interface names at 15 characters (IFNAMSIZ - 1); we check it when a
plan is made, never at build time.
"""

from __future__ import annotations

import re

from .errors import ConfigError

PREFIX = "dp-"
IFNAMSIZ_MAX = 15
_IDENT = re.compile(r"^[a-z][a-z0-9]*$")
# Our root-namespace objects: the prefix, then lowercase letters, digits, dashes.
OWNED_RE = re.compile(r"^" + re.escape(PREFIX) + r"[a-z0-9][a-z0-9-]*$")


def check_ident(name: str, where: str) -> str:
    """A node or NIC name: lowercase letter first, then lowercase letters/digits."""
    if not isinstance(name, str) or not _IDENT.match(name):
        raise ConfigError(where, f"{name!r} is not a valid name (lowercase letter, then letters/digits)")
    return name


def check_ifname(name: str, where: str = "") -> str:
    if len(name) > IFNAMSIZ_MAX:
        raise ConfigError(where, f"interface name {name!r} has {len(name)} characters; Linux allows {IFNAMSIZ_MAX}")
    return name


def owned(name: str) -> str:
    """The root-namespace name of one of our objects: ``owned('pe1')`` -> ``'dp-pe1'``."""
    return check_ifname(PREFIX + name)


def is_owned(name: str) -> bool:
    return bool(OWNED_RE.match(name))
