"""The command line of runs over several servers: ``dpemu clean --servers`` and ``dpemu testbed``.

``dpemu clean --servers [SCENARIO]`` removes what a killed run left on its other servers: each one's agent
removes, on its own machine, the objects its manifest lists and those in dpemu's name grammar (never anything
else). The servers are those the local manifest recorded, or, without one, those of SCENARIO.
``dpemu testbed up|down|status`` makes a second server on this machine (emulator.testbed), for trying a run
over two servers without a second machine; ``two_servers`` is the scenario that uses it.
"""

from __future__ import annotations

from emulator import testbed
from emulator.errors import ConfigError, DpemuError
from emulator.servers import Agent, ServerSpec

from . import schema
from .terminal import EXIT_ERROR, EXIT_OK, console, err_console

TESTBED_WORKDIR = "/tmp/dpt-{name}-testbed"  # fixed, so two_servers.yaml can name its key


def servers_to_clean(manifest_servers: list[dict], scenario: str | None) -> list[ServerSpec]:
    if manifest_servers:
        return [ServerSpec.from_dict(d) for d in manifest_servers]
    if not scenario:
        raise ConfigError("clean --servers", "no killed run recorded its servers here: name the scenario "
                                             "(dpemu clean --servers SCENARIO)")
    sc = schema.load(scenario)
    if sc.servers is None:
        raise ConfigError(scenario, "has no servers: section")
    return [s for s in sc.servers.specs() if not s.local]


def clean_servers(servers: list[ServerSpec]) -> int:
    """Each server's agent cleans its own machine; one line per server."""
    code = EXIT_OK
    for srv in servers:
        agent = None
        try:
            agent = Agent(srv, "clean")
            r = agent.call("clean", timeout_s=120)
        except DpemuError as exc:
            err_console.print(f"{srv.name}: {exc}", markup=False)
            code = EXIT_ERROR
            continue
        finally:
            if agent is not None:
                agent.close()
        removed = f"{len(r['netns'])} namespace(s), {len(r['links'])} interface(s)/bridge(s), " \
                  f"{len(r['procs'])} process(es)"
        console.print(f"{srv.name} ({srv.address}): " + ("nothing to clean" if not (r["netns"] or r["links"] or
                                                                                   r["procs"]) else
                                                         f"removed {removed}"), markup=False)
        if r["left"]:
            err_console.print(f"{srv.name}: could not remove {', '.join(r['left'])}", markup=False)
            code = EXIT_ERROR
    return code


def cmd_testbed(args) -> int:
    argv = [args.action, "--name", args.name]
    if args.action == "up":
        argv += ["--workdir", TESTBED_WORKDIR.format(name=args.name)]
    return testbed.main(argv)


def add_parser(sub) -> None:
    t = sub.add_parser("testbed", help="a second server on this machine (namespaces + sshd), for runs over two "
                                       "servers (docs/distributed.md)")
    t.add_argument("action", choices=["up", "down", "status"])
    t.add_argument("--name", default="srv2")
    t.set_defaults(func=cmd_testbed)
