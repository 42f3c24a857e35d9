"""Remove what a killed run left behind - only objects that are provably ours.

Ours means: listed in the manifest the run wrote before creating anything, or
named with the project prefix grammar (:data:`emulator.names.OWNED_RE`), or a
process running inside one of our named namespaces. Nothing else is touched:
no ``mn -c``, no killall, no pattern match on command lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import dequeue, kernel
from .registry import Registry, proc_start_time


@dataclass
class CleanReport:
    procs: list[int] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    tracing: list[str] = field(default_factory=list)  # our tracefs instance (dequeue timing)

    @property
    def empty(self) -> bool:
        return not (self.procs or self.netns or self.links or self.left or self.tracing)


def clean(registry: Registry) -> CleanReport:
    """Call with `registry` acquired (so no live run is cleaned from under itself)."""
    report = CleanReport()
    manifest = registry.leftover()
    found = kernel.owned_root_objects()
    if manifest:
        live = [(pid, start) for pid, start in manifest.procs if proc_start_time(pid) == start]
        kernel.kill_pids(live)
        report.procs += [pid for pid, _ in live]
    netns = sorted(set(found["netns"]) | set(manifest.netns if manifest else []))
    for name in netns:
        if name in kernel.list_netns():
            report.procs += kernel.netns_pids(name)
            kernel.delete_netns(name)
            report.netns.append(name)
    links = sorted(set(found["links"]) | set(manifest.links if manifest else []))
    present = set(kernel.root_link_names())
    report.links = [n for n in links if n in present]
    report.left = kernel.delete_links(report.links, grace_s=0.5)
    report.left += [n for n in kernel.list_netns() if n in netns]
    try:
        if dequeue.remove_instance():
            report.tracing.append(dequeue.INSTANCE)
    except OSError as exc:
        report.left.append(f"tracefs instance {dequeue.INSTANCE} ({exc})")
    if not report.left:
        registry.end()
    return report
