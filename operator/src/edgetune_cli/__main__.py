"""``kubectl edgetune``: EdgeTrainingJobs and AdapterReleases across the fleet, from the hub.

    kubectl edgetune get [NAME] [-A] [-o json]      jobs and releases as a tree: clusters, nodes, versions
    kubectl edgetune watch [NAME]                   the same, redrawn until every one shown is finished
    kubectl edgetune status KIND/NAME [--timeout 10m] [-o json]
                                                    wait for the end; exit 0 succeeded/promoted,
                                                    1 failed/rolled back/aborted, 2 timed out
    kubectl edgetune promote NAME [--full]          continue past a pause; --full: skip every remaining step
    kubectl edgetune resume NAME                    set spec.paused back to false
    kubectl edgetune abort NAME [--yes]             roll every target back to the stable version and
                                                    revoke this version for good (asks unless --yes)
    kubectl edgetune delete KIND/NAME [--yes]       delete; an unfinished release leaves the fleet split
                                                    (says how, asks unless --yes)
    kubectl edgetune logs job/NAME [--cluster C] [--node N] [--tail N]
    kubectl edgetune logs release/NAME POD --cluster C [--tail N]
                                                    a trainer's or an agent's log, on whichever cluster it runs

KIND is job (edgetrainingjob, etj) or release (adapterrelease, ar). Global flags: --kubeconfig,
--context, -n/--namespace. Rich output on a terminal, plain text when piped.
Exit codes: 0 ok, 1 the object failed or the request was refused, 2 timed out, 3 not found or
edgetune is not installed, 64 usage.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from edgetune_api.adapter_release import served
from edgetune_api.meta import parse_duration
from edgetune_cli import view
from edgetune_cli.client import Hub, NotFoundError, NotInstalledError

KINDS = {"job": "edgetrainingjobs", "edgetrainingjob": "edgetrainingjobs", "edgetrainingjobs": "edgetrainingjobs",
         "etj": "edgetrainingjobs", "release": "adapterreleases", "adapterrelease": "adapterreleases",
         "adapterreleases": "adapterreleases", "ar": "adapterreleases"}  # fmt: skip
DONE = {"edgetrainingjobs": {"Succeeded": 0, "Failed": 1},
        "adapterreleases": {"Promoted": 0, "RolledBack": 1, "Failed": 1, "Aborted": 1}}  # fmt: skip
EXIT_FAILED, EXIT_TIMEOUT, EXIT_NOT_FOUND, EXIT_USAGE = 1, 2, 3, 64


def _duration(text: str) -> float:
    """Seconds, or a duration as the CRDs write them (90s, 10m, 1h30m)."""
    try:
        return float(text)
    except ValueError:
        return parse_duration(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubectl edgetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--kubeconfig", help="the hub's kubeconfig (default: $KUBECONFIG, ~/.kube/config)")
    p.add_argument("--context", help="the hub's context in it (default: the current one)")
    p.add_argument("-n", "--namespace", help="namespace of the jobs and releases (default: the context's)")
    sub = p.add_subparsers(dest="command", required=True, help="what to do (each has its own --help)")
    get = sub.add_parser("get", help="jobs and releases as a tree")
    get.add_argument("name", nargs="?", help="only the job or release of this name (default: all)")
    get.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    get.add_argument("-o", "--output", choices=["tree", "json"], default="tree", help="tree (default) or json")
    watch = sub.add_parser("watch", help="get, redrawn until finished")
    watch.add_argument("name", nargs="?", help="only the job or release of this name (default: all)")
    watch.add_argument("--interval", type=float, default=2.0, help="seconds between redraws (default 2)")
    status = sub.add_parser("status", help="wait for a job or release to finish; the exit code says how")
    status.add_argument("ref", help="KIND/NAME, e.g. job/meters or release/meters-rollout")
    status.add_argument("--timeout", type=_duration, default=600.0, help="e.g. 90s, 10m (default 10m)")
    status.add_argument("-o", "--output", choices=["text", "json"], default="text", help="text (default) or json")
    controls = (
        ("promote", "continue past a pause (--full: skip every remaining step)"),
        ("resume", "set spec.paused back to false"),
        ("abort", "roll every target back to the stable version and revoke this version for good: agents "
                  "refuse it afterwards, also in later releases (docs/releases.md, \"Abort\")"),
    )
    for name, text in controls:
        command = sub.add_parser(name, help=text, description=text)
        command.add_argument("name", help="the AdapterRelease")
        if name == "promote":
            command.add_argument("--full", action="store_true", help="skip every remaining step: 100 %% now")
        if name == "abort":
            command.add_argument("--yes", action="store_true", help="do not ask for confirmation (required "
                                 "when stdin is not a terminal)")  # fmt: skip
    delete = sub.add_parser("delete", help="delete a job or release; warns when a release would leave the fleet "
                            "split between versions")  # fmt: skip
    delete.add_argument("ref", help="KIND/NAME, e.g. job/meters or release/meters-rollout")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation (required when stdin is "
                        "not a terminal and a release is unfinished)")  # fmt: skip
    logs = sub.add_parser("logs", help="a trainer's or an agent's log")
    logs.add_argument("ref", help="job/NAME or release/NAME")
    logs.add_argument("pod", nargs="?", help="for a release: the agent pod")
    logs.add_argument("--cluster", help="the EdgeCluster (default: the only one that runs it)")
    logs.add_argument("--node", help="for a job: the trainer on this node")
    logs.add_argument("--tail", type=int, default=200, help="last lines to show (default 200)")
    return p


def _kind(ref: str) -> tuple[str, str]:
    kind, _, name = ref.partition("/")
    if not name or kind.lower() not in KINDS:
        raise SystemExit(f"kubectl edgetune: {ref!r}: expected KIND/NAME with KIND job or release")
    return KINDS[kind.lower()], name


def cmd_get(hub: Hub, args: argparse.Namespace, out: view.Out) -> int:
    namespace = None if args.all_namespaces else hub.namespace
    jobs = hub.list("edgetrainingjobs", namespace, args.name)
    releases = hub.list("adapterreleases", namespace, args.name)
    if args.name and not jobs and not releases:
        raise NotFoundError(f"no EdgeTrainingJob or AdapterRelease named {args.name!r} in namespace {hub.namespace}")
    if args.output == "json":
        out.json({"edgeTrainingJobs": jobs, "adapterReleases": releases})
    else:
        out.tree(jobs, releases, all_namespaces=args.all_namespaces)
    return 0


def cmd_watch(hub: Hub, args: argparse.Namespace, out: view.Out) -> int:
    def snapshot() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return hub.list("edgetrainingjobs", hub.namespace, args.name), hub.list("adapterreleases", hub.namespace,
                                                                               args.name)  # fmt: skip

    def finished(jobs: list[dict[str, Any]], releases: list[dict[str, Any]]) -> bool:
        objs = [("edgetrainingjobs", o) for o in jobs] + [("adapterreleases", o) for o in releases]
        return bool(objs) and all(_phase(o) in DONE[k] for k, o in objs)

    jobs, releases = snapshot()
    if args.name and not jobs and not releases:
        raise NotFoundError(f"no EdgeTrainingJob or AdapterRelease named {args.name!r} in namespace {hub.namespace}")
    with out.live(jobs, releases) as redraw:
        while not finished(jobs, releases):
            time.sleep(args.interval)
            jobs, releases = snapshot()
            redraw(jobs, releases)
    return 0


def _phase(obj: dict[str, Any]) -> str:
    return str((obj.get("status") or {}).get("phase") or "Pending")


def cmd_status(hub: Hub, args: argparse.Namespace, out: view.Out) -> int:
    plural, name = _kind(args.ref)
    deadline = time.monotonic() + args.timeout
    obj = hub.get(plural, name)
    while _phase(obj) not in DONE[plural] and time.monotonic() < deadline:
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
        obj = hub.get(plural, name)
    phase = _phase(obj)
    code = DONE[plural].get(phase, EXIT_TIMEOUT)
    condition = view.summary_condition(obj)
    if args.output == "json":
        out.json({"kind": obj["kind"], "name": name, "phase": phase, "exitCode": code, "condition": condition})
    else:
        verdict = {0: "finished", EXIT_FAILED: "finished", EXIT_TIMEOUT: f"still {phase} after {args.timeout:.0f} s"}
        out.line(f"{obj['kind']} {hub.namespace}/{name}: {phase} ({verdict[code]})"
                 + (f" — {condition}" if condition else ""))  # fmt: skip
    return code


def _confirm(args: argparse.Namespace, out: view.Out, name: str, *, without_terminal: str, question: str,
             declined: str) -> int | None:  # fmt: skip
    """None to go on (``--yes``, or the object's name typed at the prompt); else the exit code:
    a usage error without a terminal to ask on, a failure when the answer was not the name."""
    if args.yes:
        return None
    if not sys.stdin.isatty():
        out.error(without_terminal)
        return EXIT_USAGE
    if input(f"{question} Type its name to go on: ").strip() != name:
        out.error(declined)
        return EXIT_FAILED
    return None


def cmd_control(hub: Hub, args: argparse.Namespace, out: view.Out) -> int:
    release = hub.get("adapterreleases", args.name)
    phase = _phase(release)
    if phase in DONE["adapterreleases"]:
        out.error(f"AdapterRelease {hub.namespace}/{args.name} is already {phase}; nothing to {args.command}")
        return EXIT_FAILED
    spec = release["spec"]
    if args.command == "abort":
        version = ((release.get("status") or {}).get("canaryVersion")) or "the released version"
        refused = _confirm(args, out, args.name,
                           without_terminal=f"aborting revokes {version} for good; pass --yes to confirm",
                           question=f"Abort AdapterRelease {hub.namespace}/{args.name}: every target goes back to the "
                           f"stable version and version {version} is revoked for good.",
                           declined="not aborted")  # fmt: skip
        if refused is not None:
            return refused
        patch = {"abort": True}
    elif args.command == "promote" and args.full:
        patch = {"promote": True, "paused": False}
    else:
        if not spec.get("paused") and phase != "Paused":
            hint = "; use --full to skip every remaining step" if args.command == "promote" else ""
            out.error(f"AdapterRelease {hub.namespace}/{args.name} is {phase}, not paused{hint}")
            return EXIT_FAILED
        patch = {"paused": False}
    hub.patch_spec("adapterreleases", args.name, patch)
    out.line(f"AdapterRelease {hub.namespace}/{args.name}: {', '.join(f'spec.{k}={v}' for k, v in patch.items())}"
             .replace("True", "true").replace("False", "false"))  # fmt: skip
    return 0


def cmd_delete(hub: Hub, args: argparse.Namespace, out: view.Out) -> int:
    plural, name = _kind(args.ref)
    obj = hub.get(plural, name)
    phase, status = _phase(obj), obj.get("status") or {}
    if plural == "adapterreleases" and status.get("canary") and phase not in DONE[plural]:
        out.error(f"warning: AdapterRelease {hub.namespace}/{name} is {phase}: deleting it leaves every target on "
                  f"what it was told ({served(status.get('targetsByVersion'))}); abort it first to take them back "
                  "to the stable version")  # fmt: skip
        refused = _confirm(args, out, name, without_terminal="pass --yes to delete it anyway",
                           question=f"Delete {name} and leave the fleet split?", declined="not deleted")  # fmt: skip
        if refused is not None:
            return refused
    hub.delete(plural, name)
    out.line(f"{obj['kind']} {hub.namespace}/{name} deleted")
    return 0


def cmd_logs(hub: Hub, args: argparse.Namespace, out: view.Out) -> int:
    plural, name = _kind(args.ref)
    obj = hub.get(plural, name)
    if plural == "edgetrainingjobs":
        targets = (obj.get("status") or {}).get("targets") or []
        chosen = [t for t in targets if (not args.cluster or t["cluster"] == args.cluster)
                  and (not args.node or t.get("node") == args.node)]  # fmt: skip
        if len(chosen) != 1:
            if not targets:
                raise NotFoundError(f"EdgeTrainingJob {hub.namespace}/{name} has no trainers (yet): "
                                    f"{view.summary_condition(obj) or _phase(obj)}")  # fmt: skip
            where = ", ".join(f"--cluster {t['cluster']}" + (f" --node {t['node']}" if t.get("node") else "")
                              for t in targets)  # fmt: skip
            out.error(f"EdgeTrainingJob {hub.namespace}/{name} has {len(chosen)} matching trainers; pick one: {where}")
            return EXIT_USAGE
        target = chosen[0]
        cluster = hub.cluster(target["cluster"])
        pods = cluster.pods(hub.namespace, f"job-name={target['jobName']}") if target.get("jobName") else []
        if not pods:
            raise NotFoundError(f"the trainer pod of {target['cluster']}/{target.get('node')} is gone (or not created)")
        pod = sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"])[-1]["metadata"]["name"]
    else:
        if not args.pod or not args.cluster:
            out.error("for a release, name the agent pod and its --cluster (kubectl edgetune get shows them)")
            return EXIT_USAGE
        cluster, pod = hub.cluster(args.cluster), args.pod
    sys.stdout.write(cluster.logs(hub.namespace, pod, args.tail))
    return 0


COMMANDS = {"get": cmd_get, "watch": cmd_watch, "status": cmd_status, "promote": cmd_control,
            "resume": cmd_control, "abort": cmd_control, "delete": cmd_delete, "logs": cmd_logs}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = view.Out()
    try:
        hub = Hub(args.kubeconfig, args.context, args.namespace)
        hub.require_crds()
        return COMMANDS[args.command](hub, args, out)
    except NotInstalledError as exc:
        out.error(str(exc))
        return EXIT_NOT_FOUND
    except NotFoundError as exc:
        out.error(str(exc))
        return EXIT_NOT_FOUND
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:
        if isinstance(exc.code, str):
            out.error(exc.code.removeprefix("kubectl edgetune: "))
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
