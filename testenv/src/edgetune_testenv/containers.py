"""A pod's container as an OCI runtime bundle for ``runc``: what a kubelet and its CRI runtime derive
from the pod spec and the image config, for the executor's container mode.

Covered: command/args against the image's Entrypoint/Cmd, env (the image's, then the declared one),
working directory, user and group (``runAsUser``/``runAsGroup``/``runAsNonRoot``, ``fsGroup`` and
``supplementalGroups`` as additional groups, a named image user looked up in the image's
``/etc/passwd``), ``readOnlyRootFilesystem``, capabilities (the runtime's default set, ``drop``,
``add``), ``allowPrivilegeEscalation: false`` as no_new_privs, ``seccompProfile: RuntimeDefault``,
volume mounts (read-only, subPath), the termination-message file, memory and CPU limits as cgroup
limits. Not covered: the pod network (containers share the host's network namespace, so the pod's
loopback address and every server on loopback stay reachable), user namespaces, AppArmor/SELinux.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
)  # fmt: skip
"""containerd's and CRI-O's default set for a container that asks for nothing."""

RUNTIME_DEFAULT_DENIED = (
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module", "delete_module", "finit_module",
    "get_kernel_syms", "get_mempolicy", "init_module", "ioperm", "iopl", "kcmp", "kexec_file_load", "kexec_load",
    "keyctl", "lookup_dcookie", "mbind", "mount", "move_pages", "name_to_handle_at", "nfsservctl",
    "open_by_handle_at", "perf_event_open", "pivot_root", "process_vm_readv", "process_vm_writev", "ptrace",
    "query_module", "quotactl", "reboot", "request_key", "set_mempolicy", "setns", "settimeofday", "swapoff",
    "swapon", "sysfs", "_sysctl", "umount", "umount2", "unshare", "uselib", "userfaultfd", "ustat", "vm86",
    "vm86old", "fsopen", "fsmount", "fsconfig", "move_mount", "open_tree",
)  # fmt: skip
"""``seccompProfile: RuntimeDefault``: the system calls the container runtimes' default profile
refuses a container without extra capabilities, refused here with EPERM (the runtimes' profile is an
allow-list; this deny-list of the same calls keeps the bundle readable)."""

_SHM = "/dev/shm"  # noqa: S108 - the container's own tmpfs, not a temporary file here
_STANDARD_MOUNTS: tuple[dict[str, Any], ...] = (
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
     "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
     "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
    {"destination": _SHM, "type": "tmpfs", "source": "shm",
     "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
)  # fmt: skip
_MASKED = ("/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
           "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware")  # fmt: skip
_READONLY = ("/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_CPU = re.compile(r"([0-9.]+)(m?)")


class ContainerConfigError(ValueError):
    """The pod asks for something its image cannot satisfy (the kubelet's CreateContainerConfigError)."""


@dataclass(frozen=True)
class ContainerImage:
    """A built image for the executor's container mode: its root filesystem and its OCI config."""

    rootfs: Path
    config: Mapping[str, Any] = field(default_factory=dict)


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined names are replaced, ``$$`` escapes, others stay."""
    return _VAR_REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def argv(container: Mapping[str, Any], image: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """Kubernetes' rule: ``command`` replaces the image's Entrypoint (and drops its Cmd), ``args``
    replace its Cmd; ``$(VAR)`` is expanded in both."""
    command = [expand_vars(a, env) for a in container.get("command") or []]
    args = [expand_vars(a, env) for a in container.get("args") or []]
    if command:
        return command + args
    result = list(image.get("Entrypoint") or []) + (args or list(image.get("Cmd") or []))
    if not result:
        raise ContainerConfigError("the container has no command and its image no Entrypoint or Cmd")
    return result


def image_env(image: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in image.get("Env") or []:
        key, _, value = str(item).partition("=")
        out[key] = value
    return out


def _lookup(rootfs: Path, table: str, name: str) -> int:
    try:
        for line in (rootfs / "etc" / table).read_text().splitlines():
            parts = line.split(":")
            if parts and parts[0] == name:
                return int(parts[2])
    except (OSError, IndexError, ValueError):
        pass
    raise ContainerConfigError(f"the image's user {name!r} is not in its /etc/{table}")


def user(pod_spec: Mapping[str, Any], container: Mapping[str, Any], image: ContainerImage) -> dict[str, Any]:
    """uid, gid and additional groups as the kubelet resolves them; ``runAsNonRoot`` enforced."""
    pod_sc = pod_spec.get("securityContext") or {}
    sc = {**pod_sc, **(container.get("securityContext") or {})}
    name, _, group = str(image.config.get("User") or "0").partition(":")
    uid = sc.get("runAsUser")
    if uid is None:
        uid = int(name) if name.isdigit() else _lookup(image.rootfs, "passwd", name)
    gid = sc.get("runAsGroup")
    if gid is None:
        gid = (int(group) if group.isdigit() else _lookup(image.rootfs, "group", group)) if group else 0
    if sc.get("runAsNonRoot") and int(uid) == 0:
        raise ContainerConfigError("container has runAsNonRoot and image will run as root")
    extra = [int(g) for g in pod_sc.get("supplementalGroups") or []]
    if pod_sc.get("fsGroup") is not None:
        extra.append(int(pod_sc["fsGroup"]))
    result: dict[str, Any] = {"uid": int(uid), "gid": int(gid)}
    if extra:
        result["additionalGids"] = sorted(set(extra))
    return result


def capabilities(container: Mapping[str, Any]) -> list[str]:
    caps = (container.get("securityContext") or {}).get("capabilities") or {}
    drop = {c.upper().removeprefix("CAP_") for c in caps.get("drop") or []}
    add = [f"CAP_{c.upper().removeprefix('CAP_')}" for c in caps.get("add") or []]
    kept = [] if "ALL" in drop else [c for c in DEFAULT_CAPABILITIES if c.removeprefix("CAP_") not in drop]
    return sorted(set(kept + add))


def seccomp(pod_spec: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, Any] | None:
    profile = ((container.get("securityContext") or {}).get("seccompProfile")
               or (pod_spec.get("securityContext") or {}).get("seccompProfile") or {})  # fmt: skip
    if profile.get("type") != "RuntimeDefault":
        return None  # Unconfined, or Localhost (not supported: left unconfined)
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": list(RUNTIME_DEFAULT_DENIED), "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    }


def resources(container: Mapping[str, Any], parse_bytes: Any) -> dict[str, Any]:
    limits = (container.get("resources") or {}).get("limits") or {}
    out: dict[str, Any] = {}
    if limits.get("memory"):
        limit = int(parse_bytes(str(limits["memory"])))
        out["memory"] = {"limit": limit, "swap": limit}
    if limits.get("cpu"):
        match = _CPU.fullmatch(str(limits["cpu"]))
        if match:
            cores = float(match.group(1)) / (1000 if match.group(2) else 1)
            out["cpu"] = {"period": 100000, "quota": max(1000, int(cores * 100000))}
    return out


def runtime_spec(
    *, pod: Mapping[str, Any], container: Mapping[str, Any], image: ContainerImage, env: Mapping[str, str],
    mounts: list[tuple[str, Path, bool]], rootfs: Path, readonly_root: bool, cgroup: str, parse_bytes: Any,
) -> dict[str, Any]:  # fmt: skip
    """The bundle's ``config.json``. ``env``: the container's final environment; ``mounts``:
    (path in the container, path here, read-only) for every volume mount and the termination file;
    ``rootfs``: the image's root, or a writable overlay over it."""
    spec = pod.get("spec") or {}
    sc = container.get("securityContext") or {}
    caps = capabilities(container)
    process: dict[str, Any] = {
        "terminal": False,
        "user": user(spec, container, image),
        "args": argv(container, image.config, env),
        "env": [f"{k}={v}" for k, v in env.items()],
        "cwd": container.get("workingDir") or image.config.get("WorkingDir") or "/",
        "capabilities": dict.fromkeys(("bounding", "effective", "permitted"), caps),
        "noNewPrivileges": sc.get("allowPrivilegeEscalation") is False,
    }
    bind = [
        {"destination": target, "type": "bind", "source": str(source),
         "options": ["rbind", "ro" if read_only else "rw", "nosuid", "nodev"]}
        for target, source, read_only in mounts
    ]  # fmt: skip
    linux: dict[str, Any] = {
        # No network namespace: the pod's loopback address and the servers on loopback stay reachable.
        "namespaces": [{"type": kind} for kind in ("pid", "ipc", "uts", "mount")],
        "cgroupsPath": cgroup,
        "resources": {"devices": [{"allow": False, "access": "rwm"}], **resources(container, parse_bytes)},
        "maskedPaths": list(_MASKED),
        "readonlyPaths": list(_READONLY),
    }
    profile = seccomp(spec, container)
    if profile is not None:
        linux["seccomp"] = profile
    return {
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": str(rootfs), "readonly": readonly_root},
        "hostname": str((pod.get("metadata") or {}).get("name", "pod"))[:63],
        "mounts": [*(dict(m) for m in _STANDARD_MOUNTS), *bind],
        "linux": linux,
    }
