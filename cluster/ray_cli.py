"""``kvmesh up CONFIG``, ``kvmesh status``, ``kvmesh down``: the Ray deployment's commands.

``register(subparsers)`` adds them to the ``kvmesh`` parser (``cluster.cli.build_parser``).
"""

from __future__ import annotations

import argparse
import json


def _fail(e: Exception) -> SystemExit:
    return SystemExit(f"kvmesh: {e}")


def cmd_up(args) -> None:
    from kvmesh.cluster.config import ConfigError, load_config
    from kvmesh.cluster.ray_deploy import DeployError, up

    try:
        config = load_config(args.config)
        deployment = up(config, args.address, timeout_s=args.timeout)
    except (ConfigError, DeployError) as e:
        raise _fail(e)
    print(format_table(deployment.components))
    for url in deployment.router_urls:
        print(f"kvmesh: OpenAI API at {url}/v1")
    for address in deployment.grpc_addresses:
        print(f"kvmesh: gRPC API at {address}")
    print("kvmesh: deployed; `kvmesh status` shows it, `kvmesh down` removes it", flush=True)


def cmd_status(args) -> None:
    from kvmesh.cluster.ray_deploy import DeployError, status

    try:
        rows = status(args.address)
    except DeployError as e:
        raise _fail(e)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    elif not rows:
        print("kvmesh: nothing deployed on this Ray cluster")
    else:
        print(format_table(rows))


def cmd_down(args) -> None:
    from kvmesh.cluster.ray_deploy import DeployError, down

    try:
        down(args.address, timeout_s=args.timeout, stop_local_ray=not args.keep_ray)
    except DeployError as e:
        raise _fail(e)


def format_table(rows: list[dict]) -> str:
    """What runs where: one line per component."""
    header = ("NAME", "KIND", "NODE", "ADDRESS", "STATE", "HEALTH")
    lines = [header] + [(r["name"], r["kind"], r.get("node_ip") or "?", r.get("address") or "?",
                         str(r.get("state")), str(r.get("health"))) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in lines)


def register(subparsers) -> None:
    """Add ``up``, ``status`` and ``down`` to kvmesh's argparse subparsers."""
    def address_arg(sp, help_text):
        sp.add_argument("--address", default=None, metavar="HOST:PORT", help=help_text)

    sp = subparsers.add_parser("up", help="deploy a cluster config onto Ray (actors per component)")
    sp.add_argument("config", help="cluster config file (YAML; see deploy/configs/)")
    address_arg(sp, "Ray cluster to deploy onto ('auto': the one RAY_ADDRESS or this machine "
                    "records); default: start a new local one")
    sp.add_argument("--timeout", type=float, default=600.0,
                    help="seconds to wait for every component to be healthy")
    sp.set_defaults(func=cmd_up)

    sp = subparsers.add_parser("status", help="what kvmesh runs on the Ray cluster, where, and its health")
    address_arg(sp, "Ray cluster (default: RAY_ADDRESS or the one this machine records)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_status)

    sp = subparsers.add_parser("down", help="remove every kvmesh actor and placement group from Ray")
    address_arg(sp, "Ray cluster (default: RAY_ADDRESS or the one this machine records)")
    sp.add_argument("--timeout", type=float, default=60.0,
                    help="seconds to wait for components to stop and leave")
    sp.add_argument("--keep-ray", action="store_true",
                    help="keep the local Ray cluster that `kvmesh up` started running")
    sp.set_defaults(func=cmd_down)


def main(argv: list[str] | None = None) -> None:
    """Only these three commands (until ``cluster.cli`` registers them)."""
    parser = argparse.ArgumentParser(prog="kvmesh")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
