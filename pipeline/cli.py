"""The `pipeline` command: argument parsing and output only; the work is in pipeline.api.

Progress goes to stderr, data to stdout. Errors become one message and an exit code; a
traceback only with --debug.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

from pipeline import api, log
from pipeline.errors import EXIT_CODES, Interrupted, PipelineError


def _exit_codes() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:<4}{text}" for code, text in EXIT_CODES.items())


def _common_options(*, top: bool) -> argparse.ArgumentParser:
    # The same options work before and after the command; after it they must not reset what
    # was given before it, hence SUPPRESS as the sub-command's default.
    common = argparse.ArgumentParser(add_help=False)
    default: Any = {} if top else {"default": argparse.SUPPRESS}
    common.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="pipeline.yml to use (default: ./pipeline.yml)",
        **({"default": None} if top else default),
    )
    # argparse parses a sub-command into a fresh namespace and copies it over the top one, so a
    # count given after the command would replace, not add to, the count given before it: the
    # two are kept apart here and added up by parse_args.
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        dest="verbose" if top else "verbose_after_command",
        help="-v: show the tools' own output as it comes",
        **({"default": 0} if top else default),
    )
    common.add_argument(
        "--debug",
        action="store_true",
        help="show a traceback on errors",
        **({"default": False} if top else default),
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(top=False)

    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Bake VM images with Packer, verify them with Molecule, "
        "roll fleets onto them with Terraform.",
        epilog=_exit_codes(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common_options(top=True)],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, handler: Callable[..., int]) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            parents=[common],
            epilog=_exit_codes(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=handler)
        return p

    p = command("run", "bake -> verify -> promote -> deploy, for one environment", _cmd_run)
    p.add_argument("image")
    p.add_argument("--env", required=True, help="environment to roll out to")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = command(
        "bake", "bake a new version of an image (unless its inputs are unchanged)", _cmd_bake
    )
    p.add_argument("image")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = command("verify", "boot a version under Molecule and check it", _cmd_verify)
    p.add_argument("image")
    p.add_argument("version", nargs="?", help="default: the newest version")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = command("promote", "point a channel at a verified version", _cmd_promote)
    p.add_argument("image")
    p.add_argument("channel")
    p.add_argument("version", nargs="?", help="default: the newest version")

    p = command("deploy", "roll an environment onto its channel's version", _cmd_deploy)
    p.add_argument("env")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = command("destroy", "destroy every instance of an environment", _cmd_destroy)
    p.add_argument("env")

    p = command("status", "an environment's instances: version, health, drift", _cmd_status)
    p.add_argument("env")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = command(
        "inventory",
        "an environment's running instances as Ansible inventory JSON (see inventories/)",
        _cmd_inventory,
    )
    p.add_argument("env")
    p.add_argument("--list", action="store_true", help="the whole inventory (the default)")
    p.add_argument("--host", metavar="NAME", help="one host's variables (all are in --list)")

    p = command("images", "list the versions of an image", _cmd_images)
    p.add_argument("image")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _print_json(data: Any) -> None:
    def default(value: Any) -> Any:
        if is_dataclass(value) and not isinstance(value, type):
            return asdict(value)
        return str(value)

    json.dump(data, sys.stdout, indent=2, default=default, sort_keys=True)
    sys.stdout.write("\n")


def _cmd_run(args: argparse.Namespace) -> int:
    result = api.run(args.image, args.env, config_path=args.config)
    if args.json:
        _print_json(result)
    else:
        _print_instances(result.deploy.get("instances", []))
    return 0


def _cmd_bake(args: argparse.Namespace) -> int:
    result = api.bake(args.image, config_path=args.config)
    if args.json:
        _print_json({"version": result.version, "baked": result.baked})
    else:
        state = "baked" if result.baked else "unchanged"
        print(f"{result.version.image} {result.version.version} {state} {result.version.path}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    version = api.verify(args.image, args.version, config_path=args.config)
    if args.json:
        _print_json(version)
    else:
        print(f"{version.image} {version.version} {version.state}")
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    moved, version = api.promote(args.image, args.channel, args.version, config_path=args.config)
    state = "now points at" if moved else "already on"
    print(f"channel {args.channel} of {version.image} {state} {version.version}")
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    result = api.deploy(args.env, config_path=args.config)
    if args.json:
        _print_json(result)
    else:
        _print_instances(result.get("instances", []))
    return 0


def _cmd_destroy(args: argparse.Namespace) -> int:
    names = api.destroy(args.env, config_path=args.config)
    print(f"destroyed {len(names)} instance(s)")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    result = api.status(args.env, config_path=args.config)
    if args.json:
        _print_json(result)
        return 0
    channel = result.get("channel_version") or "none"
    print(
        f"environment {result['env']}: image {result['image']}, channel "
        f"{result['channel']} -> {channel}"
    )
    _print_instances(result.get("instances", []))
    for line in result.get("drift", []):
        print(f"drift: {line}")
    return 0


def _cmd_inventory(args: argparse.Namespace) -> int:
    data = api.inventory(args.env, config_path=args.config)
    if args.host:
        _print_json(data["_meta"]["hostvars"].get(args.host, {}))
    else:
        _print_json(data)
    return 0


def _cmd_images(args: argparse.Namespace) -> int:
    versions = api.images(args.image, config_path=args.config)
    if args.json:
        _print_json(versions)
        return 0
    print(f"{'VERSION':<12} {'STATE':<9} {'FINGERPRINT':<17} {'BUILD':<24} CREATED")
    for v in versions:
        print(f"{v.version:<12} {v.state:<9} {v.fingerprint:<17} {v.build_id:<24} {v.created_at}")
    return 0


def _print_instances(instances: Sequence[dict[str, Any]]) -> None:
    if not instances:
        print("no instances")
        return
    print(f"{'INSTANCE':<44} {'VERSION':<10} {'HEALTH':<8} URL")
    for item in instances:
        print(
            f"{item['name']:<44} {item.get('version', '?'):<10} "
            f"{item.get('health', '?'):<8} {item.get('url', '')}"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line; -v counts wherever it is given, before or after the command."""
    args = build_parser().parse_args(argv)
    args.verbose += vars(args).pop("verbose_after_command", 0)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    log.setup(args.verbose)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("pipeline: interrupted; what was started has been cleaned up", file=sys.stderr)
        return Interrupted.exit_code
    except PipelineError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"pipeline: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception:
        traceback.print_exc()
        print(
            "pipeline: internal error (a bug); please report it with the traceback above",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
