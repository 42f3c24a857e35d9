"""Typed errors of dpemu.

Library code raises these; only the command line (scenarios.cli) turns them
into messages and exit codes. Nothing here imports anything of ours.
"""


class DpemuError(Exception):
    """Base of every error dpemu reports to a user as a one-line message."""


class UnitError(DpemuError, ValueError):
    """A quantity string that cannot be parsed or is out of bounds."""


class ConfigError(DpemuError, ValueError):
    """Bad user input: a scenario file, a --set override or a flag.

    `where` names the file and field path, e.g. ``default.yaml: cluster.prefill.nodes``.
    """

    def __init__(self, where: str, reason: str):
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}" if where else reason)


class PlatformError(DpemuError):
    """The machine cannot do what was asked (not root, missing tool, qdisc)."""


class BusyError(DpemuError):
    """Another dpemu run holds the machine."""


class FidelityError(DpemuError):
    """A plan that this machine cannot emulate faithfully (refused before build)."""
