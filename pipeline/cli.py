"""The `pipeline` command: argument parsing and output only; the work is in pipeline.api.

Progress goes to stderr, data to stdout. Errors become one message and an exit code; a
traceback only with --debug.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

from pipeline import api, log, secret
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
        metavar="PATH",
        help="pipeline.yml to use, or the project folder holding it (default: ./pipeline.yml)",
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

    def add(
        group: Any, name: str, help_text: str, handler: Callable[..., int]
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(
            name,
            help=help_text,
            description=help_text,
            parents=[common],
            epilog=_exit_codes(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=handler)
        return p

    def command(name: str, help_text: str, handler: Callable[..., int]) -> argparse.ArgumentParser:
        return add(sub, name, help_text, handler)

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

    p = command(
        "promote",
        "point a channel at a verified, unrevoked version (or roll it back)",
        _cmd_promote,
    )
    p.add_argument("image")
    p.add_argument("channel")
    p.add_argument("version", nargs="?", help="default: the newest verified, unrevoked version")
    p.add_argument(
        "--rollback", action="store_true", help="move the channel back to its previous version"
    )
    p.add_argument(
        "--allow-older",
        action="store_true",
        help="move the channel to VERSION even when it is on a newer one",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = command("revoke", "revoke a version: it may no longer be promoted or deployed", _cmd_revoke)
    p.add_argument("image", help="an image or a base (see `pipeline images list`)")
    p.add_argument("version")
    p.add_argument("--reason", required=True, metavar="TEXT", help="why (shown wherever it is)")
    p.add_argument(
        "--at",
        metavar="TIME",
        help="revoked from TIME on (ISO 8601; no zone means UTC; default: now)",
    )
    p.add_argument(
        "--descendants",
        action="store_true",
        help="also revoke every version built on this one, directly or not",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = command("gc", "delete old versions' files and records (never ones in use)", _cmd_gc)
    p.add_argument(
        "--keep",
        type=int,
        default=3,
        metavar="N",
        help="usable versions kept per image and base, newest first (default 3)",
    )
    p.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = command(
        "plan", "what `run` would do, changing nothing: bake?, channel, Terraform's plan", _cmd_plan
    )
    p.add_argument("image")
    p.add_argument("--env", required=True, help="the environment whose fleet is planned")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = command("deploy", "roll an environment onto its channel's version", _cmd_deploy)
    p.add_argument("env")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = command("destroy", "destroy every instance of an environment", _cmd_destroy)
    p.add_argument("env")

    p = command("scale", "change an environment's number of instances", _cmd_scale)
    p.add_argument("env")
    p.add_argument("count", type=int, help="instances wanted (0-32)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = command("heal", "replace instances that died or fail their health check", _cmd_heal)
    p.add_argument("env")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = command(
        "finish", "end a blue/green rollout now: destroy the old fleet it kept", _cmd_finish
    )
    p.add_argument("env")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    # What a blue/green deploy starts in the background to end its kept fleet on time.
    p.add_argument("--when-due", metavar="TIME", help=argparse.SUPPRESS)

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

    p = command("images", "the registry: versions, their lineage, one version in full", _no_action)
    images = p.add_subparsers(dest="images_command", required=True, metavar="ACTION")

    def images_action(name: str, text: str, handler: Callable[..., int]) -> argparse.ArgumentParser:
        q = add(images, name, text, handler)
        q.add_argument("--json", action="store_true", help="print the result as JSON")
        return q

    q = images_action("list", "versions, oldest first, with state and channels", _cmd_images_list)
    q.add_argument("image", nargs="?", help="default: every image and base")
    q = images_action(
        "show", "one version: record, parent, channel moves, manifest summary", _cmd_show
    )
    q.add_argument("image")
    q.add_argument("version")
    q = images_action("tree", "the lineage: bases -> image versions, with channels", _cmd_tree)
    q.add_argument("image", nargs="?", help="only this image's versions and their ancestors")
    q.add_argument("--output", metavar="FILE.svg", help="also draw the lineage into an SVG file")

    p = command("schedule", "scheduled rebuilds: list, tick, run, install, resume", _no_action)
    schedule = p.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")
    q = add(schedule, "list", "each schedule: cron, next slot (UTC), last result", _cmd_sched_list)
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q = add(schedule, "tick", "run every due slot once, now (what the timer calls)", _cmd_tick)
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    add(schedule, "run", "the scheduler in the foreground, for a service manager", _cmd_sched_run)
    q = add(
        schedule,
        "install",
        "write a systemd timer and service (or a crontab line) that tick every minute",
        _cmd_sched_install,
    )
    q.add_argument(
        "--crontab", action="store_true", help="print a crontab line instead of systemd units"
    )
    q.add_argument(
        "--dir",
        metavar="DIR",
        help="write the files here (default: ~/.config/systemd/user; with --crontab: only print)",
    )
    q = add(schedule, "resume", "unpause a schedule paused by failures", _cmd_sched_resume)
    q.add_argument("image")
    return parser


def _no_action(args: argparse.Namespace) -> int:
    raise AssertionError("argparse requires an action")


def _print_json(data: Any) -> None:
    def default(value: Any) -> Any:
        if is_dataclass(value) and not isinstance(value, type):
            return asdict(value)
        return str(value)

    # No secret should reach this data; a mask is the net if one ever does.
    text = json.dumps(data, indent=2, default=default, sort_keys=True)
    sys.stdout.write(secret.redact(text) + "\n")


def _cmd_run(args: argparse.Namespace) -> int:
    result = api.run(args.image, args.env, config_path=args.config)
    if args.json:
        _print_json(result)
    else:
        _print_instances(result.deploy.get("instances", []))
        if result.deploy.get("front_door"):
            print(f"front door: {result.deploy['front_door']}")
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
    move, version = api.promote(
        args.image,
        args.channel,
        args.version,
        rollback=args.rollback,
        allow_older=args.allow_older,
        config_path=args.config,
    )
    if args.json:
        _print_json({"move": move, "version": version})
    elif move.moved:
        how = "rolled back" if move.kind == "rollback" else "moved"
        was = move.previous or "nothing"
        print(f"channel {args.channel} of {version.image} {how}: {was} -> {move.current}")
    else:
        print(f"channel {args.channel} of {version.image} stays on {move.current} ({move.note})")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    result = api.revoke(
        args.image,
        args.version,
        reason=args.reason,
        at=args.at,
        descendants=args.descendants,
        config_path=args.config,
    )
    if args.json:
        _print_json(result)
        return 0
    for item in result["revoked"]:
        revocation = item["revocation"]
        label = f"{item['image']} {item['version']}"
        if item["unchanged"]:
            print(
                f"{label} was already revoked from {revocation['effective_at']}:"
                f" {revocation['reason']} (left as it was)"
            )
            continue
        when = "from now on" if revocation["in_force"] else f"from {revocation['effective_at']}"
        print(f"revoked {label} {when}: {revocation['reason']}")
    for channel in result["channels"]:
        if channel["in_force"]:
            effect = "its environments cannot deploy until it moves"
        else:
            effect = f"its environments cannot deploy from {channel['effective_at']} on"
        if channel["rollback_to"]:
            fix = f"pipeline promote {channel['image']} {channel['channel']} --rollback"
            fix += f" (back to {channel['rollback_to']})"
        else:
            fix = f"pipeline promote {channel['image']} {channel['channel']} VERSION"
        print(
            f"warning: channel {channel['channel']} of {channel['image']} points at revoked"
            f" {channel['version']}; {effect}; move it with: {fix}",
            file=sys.stderr,
        )
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    result = api.gc(keep=args.keep, dry_run=args.dry_run, config_path=args.config)
    if args.json:
        _print_json(result)
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for item in result["deleted"]:
        print(f"{verb:<12}  {item['label']:<24} {item['status']:<9} {item['path']}")
    for item in result["kept"]:
        reasons = "; ".join(item["reasons"])
        print(f"{'kept':<12}  {item['label']:<24} {item['status']:<9} {reasons}")
    for folder in result["stray_folders"]:
        print(f"{verb:<12}  {'(no record)':<24} {'stray':<9} {folder}")
    print(f"{verb} {len(result['deleted'])} version(s), kept {len(result['kept'])}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    result = api.plan(args.image, args.env, config_path=args.config)
    if args.json:
        _print_json(result)
        return 0
    bake, move, fleet = result["bake"], result["move"], result["fleet"]
    if bake["rebuild"]:
        why = f"{bake['bump']} bump, on {bake['on']}"
        print(f"image {bake['image']}: would bake {bake['version']} ({why})")
        for reason in bake["reasons"]:
            print(f"  because {reason}")
    else:
        print(f"image {bake['image']}: unchanged, version {bake['version']} ({bake['state']})")
    if move["when"] == "stays":
        print(f"channel {result['channel']}: stays on {move['from']}")
    else:
        before = move["from"] or "(none)"
        print(f"channel {result['channel']}: {before} -> {move['to']} ({move['when']})")
    for name in fleet["drift"]:
        print(f"drift: {name} is gone")
    creates = [c for c in fleet["changes"] if c["action"] in ("create", "replace")]
    deletes = [c for c in fleet["changes"] if c["action"] in ("delete", "replace")]
    head = f"fleet {fleet['env']} ({fleet['strategy']}, {fleet['size']} instance(s)"
    if fleet["waves"]:
        head += f", {fleet['waves']} wave(s)"
    print(f"{head}): Terraform would create {len(creates)}, destroy {len(deletes)}")
    for change in fleet["changes"]:
        print(f"  {change['action']:<8} {change['name']}")
    if fleet["future"] and creates:
        print('  ("next" stands for the build id the new version gets when it is baked)')
    if fleet["note"]:
        print(f"  {fleet['note']}")
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    return _print_fleet(api.deploy(args.env, config_path=args.config), args.json)


def _cmd_scale(args: argparse.Namespace) -> int:
    return _print_fleet(api.scale(args.env, args.count, config_path=args.config), args.json)


def _cmd_heal(args: argparse.Namespace) -> int:
    return _print_fleet(api.heal(args.env, config_path=args.config), args.json)


def _cmd_finish(args: argparse.Namespace) -> int:
    result = api.finish(args.env, when_due=args.when_due, config_path=args.config)
    return _print_fleet(result, args.json)


def _print_fleet(result: dict[str, Any], as_json: bool) -> int:
    if as_json:
        _print_json(result)
    elif "instances" not in result:  # a finisher that found nothing left to do
        print(result.get("note", "nothing to do"))
    else:
        _print_instances(result["instances"])
        if result.get("front_door"):
            print(f"front door: {result['front_door']}")
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
    if result.get("front_door"):
        print(f"front door: {result['front_door']}")
    if result["size"] != result["configured_size"]:
        print(
            f"size: {result['size']}, set by `pipeline scale` (pipeline.yml says"
            f" {result['configured_size']}; changing that ends the scaled size)"
        )
    if result.get("busy"):
        print(f"in progress: another run is changing this environment ({result['busy']})")
    last = result.get("last_rollout")
    if last:
        line = f"last rollout: {last['strategy']} to {last['to']}, {last['result']}"
        if last.get("reason"):
            line += f": {last['reason']}"
        print(line)
    kept = result.get("kept")
    if kept:
        print(f"old fleet kept until {kept['until']}: {', '.join(kept['names'])}")
    for line in result.get("drift", []):
        print(f"drift: {line}")
    for line in result.get("warnings", []):
        print(f"warning: {line}")
    return 0


def _cmd_inventory(args: argparse.Namespace) -> int:
    data = api.inventory(args.env, config_path=args.config)
    if args.host:
        _print_json(data["_meta"]["hostvars"].get(args.host, {}))
    else:
        _print_json(data)
    return 0


def _cmd_images_list(args: argparse.Namespace) -> int:
    versions = api.images(args.image, config_path=args.config)
    if args.json:
        _print_json(versions)
        return 0
    if not versions:
        print("no versions yet")
        return 0
    print(f"{'IMAGE':<14} {'VERSION':<12} {'STATUS':<9} {'PARENT':<22} {'BUILD':<24} NOTES")
    for v in versions:
        print(
            f"{v['image']:<14} {v['version']:<12} {v['status']:<9} {_parent(v):<22}"
            f" {v['build_id']:<24} {_notes(v)}".rstrip()
        )
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    item = api.show(args.image, args.version, config_path=args.config)
    if args.json:
        _print_json(item)
        return 0
    print(f"{item['image']} {item['version']} ({item['kind']})")
    for key in ("status", "build_id", "fingerprint", "created_at", "path"):
        print(f"  {key + ':':<13} {item[key]}")
    print(f"  {'parent:':<13} {_parent(item) or '-'}")
    print(f"  {'children:':<13} {', '.join(item['children']) or '-'}")
    print(f"  {'channels:':<13} {', '.join(item['channels']) or '-'}")
    if item["failure"]:
        print(f"  {'failure:':<13} {item['failure']}")
    if item["revocation"]:
        rev = item["revocation"]
        state = "in force" if rev["in_force"] else "not yet in force"
        print(f"  {'revoked:':<13} from {rev['effective_at']} ({state}): {rev['reason']}")
    if item["outdated"]:
        print(f"  {'outdated:':<13} built on {_parent(item)}; {item['outdated']} is newer")
    for move in item["history"]:
        was = move.previous or "nothing"
        how = " (rollback)" if move.kind == "rollback" else ""
        print(f"  {'moved:':<13} {move.at} {move.channel} {was} -> {move.current}{how}")
    manifest = item["manifest"]
    if manifest:
        print("  manifest (all of it with --json):")
        roles = manifest.get("role_order") or list(manifest.get("roles", []))
        if roles:
            print(f"    {'roles:':<13} {', '.join(roles)}")
        for key in ("base", "tools", "disk_sha256"):
            if key in manifest:
                print(f"    {key + ':':<13} {json.dumps(manifest[key], sort_keys=True)}")
        if "packages" in manifest:
            print(f"    {'packages:':<13} {len(manifest['packages'])} Debian packages")
    return 0


def _cmd_tree(args: argparse.Namespace) -> int:
    result = api.tree(args.image, output=args.output, config_path=args.config)
    if args.json:
        _print_json(result)
        return 0
    children: dict[str, list[dict[str, Any]]] = {}
    for item in result["versions"]:
        parent = f"{item['parent_image']}@{item['parent_version']}"
        children.setdefault(parent, []).append(item)
    by_id = {f"{v['image']}@{v['version']}": v for v in result["versions"]}

    def show(node: dict[str, Any], prefix: str, last: bool, depth: int) -> None:
        branch = "" if depth == 0 else ("└── " if last else "├── ")
        kind = " (base)" if node["kind"] == "base" else ""
        line = f"{prefix}{branch}{node['image']} {node['version']}{kind} {node['status']}"
        print(f"{line} {_notes(node)}".rstrip())
        below = children.get(f"{node['image']}@{node['version']}", [])
        inner = prefix if depth == 0 else prefix + ("    " if last else "│   ")
        for index, child in enumerate(below):
            show(child, inner, index == len(below) - 1, depth + 1)

    if not result["roots"]:
        print("no versions yet")
    for root in result["roots"]:
        show(by_id[root], "", True, 0)
    if result["output"]:
        print(f"picture written to {result['output']}", file=sys.stderr)
    return 0


def _cmd_sched_list(args: argparse.Namespace) -> int:
    schedules = api.schedule_list(config_path=args.config)
    if args.json:
        _print_json(schedules)
        return 0
    if not schedules:
        print("no image has a schedule")
        return 0
    image_w = max(14, *(len(item["image"]) + 1 for item in schedules))
    cron_w = max(16, *(len(item["cron"]) + 1 for item in schedules))
    print(f"{'IMAGE':<{image_w}} {'CRON':<{cron_w}} {'DO':<10} {'NEXT SLOT (UTC)':<21} LAST")
    for item in schedules:
        do = item["do"] + (f" {item['env']}" if item["env"] else "")
        last = "never run"
        if item["last_result"]:
            last = f"{item['last_slot']} {item['last_result']}: {item['last_reason']}"
        if item["running"]:
            last += f" (running: {item['running']})"
        if item["paused"]:
            last = f"PAUSED after {item['failures']} failures in a row; last: {last}"
        print(
            f"{item['image']:<{image_w}} {item['cron']:<{cron_w}} {do:<10}"
            f" {item['next_slot']:<21} {last}"
        )
    return 0


def _cmd_tick(args: argparse.Namespace) -> int:
    outcomes = api.schedule_tick(config_path=args.config)
    if args.json:
        _print_json(outcomes)
        return 0
    for item in outcomes:
        slot = item["slot"] or "-"
        print(f"{item['image']:<14} {slot:<21} {item['result']:<10} {item['reason']}")
    return 0


def _cmd_sched_run(args: argparse.Namespace) -> int:
    api.schedule_run(config_path=args.config)
    return 0


def _cmd_sched_install(args: argparse.Namespace) -> int:
    result = api.schedule_install(directory=args.dir, crontab=args.crontab, config_path=args.config)
    if result["crontab"]:
        print(result["crontab"])
    for path in result["written"]:
        print(f"wrote {path}", file=sys.stderr)
    print(f"to enable it: {result['enable']}", file=sys.stderr)
    return 0


def _cmd_sched_resume(args: argparse.Namespace) -> int:
    state = api.schedule_resume(args.image, config_path=args.config)
    if state["was_paused"]:
        print(f"schedule of {state['image']} resumed; its next due slot runs")
    else:
        print(f"schedule of {state['image']} was not paused (its failure count is reset)")
    return 0


def _parent(item: dict[str, Any]) -> str:
    return f"{item['parent_image']} {item['parent_version']}" if item["parent_image"] else ""


def _notes(item: dict[str, Any]) -> str:
    notes = []
    if item["channels"]:
        notes.append("<- " + ", ".join(item["channels"]))
    revocation = item["revocation"]
    if revocation and revocation["in_force"]:
        notes.append(f"reason: {revocation['reason']}")
    elif revocation:
        notes.append(f"revoked from {revocation['effective_at']}: {revocation['reason']}")
    if item["outdated"]:
        notes.append(f"outdated ({item['outdated']} is newer)")
    if item["failure"]:
        notes.append(f"failed: {item['failure']}")
    return "  ".join(notes)


def _print_instances(instances: Sequence[dict[str, Any]]) -> None:
    if not instances:
        print("no instances")
        return
    print(f"{'INSTANCE':<44} {'VERSION':<10} {'HEALTH':<9} {'TRAFFIC':<8} URL")
    for item in instances:
        traffic = "in" if item.get("front_door") == "UP" else item.get("front_door", "?").lower()
        print(
            f"{item['name']:<44} {item.get('version', '?'):<10} "
            f"{item.get('health', '?'):<9} {traffic:<8} {item.get('url', '')}"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line; -v counts wherever it is given, before or after the command."""
    args = build_parser().parse_args(argv)
    args.verbose += vars(args).pop("verbose_after_command", 0)
    return args


def _terminated(_number: int, _frame: object) -> None:
    # SIGTERM (a service manager, `kill`) stops a run the way Ctrl-C does: what was started is
    # stopped and recorded as interrupted, instead of the process vanishing mid-step.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    log.setup(args.verbose)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        code = int(args.handler(args))
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader of our output went away (`pipeline images list | head`): stop quietly,
        # as other Unix tools do, and keep Python from complaining again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("pipeline: interrupted; what was started has been cleaned up", file=sys.stderr)
        return Interrupted.exit_code
    except PipelineError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"pipeline: error: {secret.redact(str(exc))}", file=sys.stderr)
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
