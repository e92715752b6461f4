"""The executor's container mode derives an OCI runtime bundle from a pod spec and an image config the
way a kubelet and its runtime do (the e2e tests run such bundles with runc)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgetune_testenv.containers import (
    DEFAULT_CAPABILITIES,
    ContainerConfigError,
    ContainerImage,
    argv,
    capabilities,
    image_env,
    runtime_spec,
    user,
)
from edgetune_testenv.executor import parse_quantity_bytes

IMAGE = {"Entrypoint": ["python"], "Cmd": ["-m", "edgetune_operator"], "User": "10001:10001", "WorkingDir": "/work",
         "Env": ["PATH=/opt/edgetune/bin:/usr/bin", "LANG=C.UTF-8"]}  # fmt: skip


def test_command_replaces_entrypoint_and_cmd_args_replace_only_cmd() -> None:
    env = {"NAME": "x"}
    assert argv({}, IMAGE, env) == ["python", "-m", "edgetune_operator"]
    assert argv({"args": ["-c", "print('$(NAME)')"]}, IMAGE, env) == ["python", "-c", "print('x')"]
    assert argv({"command": ["sh"]}, IMAGE, env) == ["sh"]  # the image's Cmd is dropped too
    assert argv({"command": ["sh"], "args": ["-c", "$$HOME $(MISSING)"]}, IMAGE, env) == [
        "sh",
        "-c",
        "$HOME $(MISSING)",
    ]
    with pytest.raises(ContainerConfigError, match="no command"):
        argv({}, {}, env)


def test_user_comes_from_the_pod_then_the_image_and_run_as_non_root_is_enforced(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nedgetune:x:10001:10001::/:/usr/sbin/nologin\n")
    (tmp_path / "etc/group").write_text("root:x:0:\nedgetune:x:10001:\n")
    image = ContainerImage(tmp_path, IMAGE)
    assert user({}, {}, image) == {"uid": 10001, "gid": 10001}
    pod = {"securityContext": {"runAsUser": 2000, "fsGroup": 3000, "supplementalGroups": [4000]}}
    assert user(pod, {"securityContext": {"runAsGroup": 2001}}, image) == {
        "uid": 2000, "gid": 2001, "additionalGids": [3000, 4000]}  # fmt: skip
    assert user({}, {}, ContainerImage(tmp_path, {"User": "edgetune:edgetune"})) == {"uid": 10001, "gid": 10001}
    with pytest.raises(ContainerConfigError, match="not in its /etc/passwd"):
        user({}, {}, ContainerImage(tmp_path, {"User": "nobody-here"}))
    with pytest.raises(ContainerConfigError, match="runAsNonRoot and image will run as root"):
        user({"securityContext": {"runAsNonRoot": True}}, {}, ContainerImage(tmp_path, {}))
    with pytest.raises(ContainerConfigError, match="runAsNonRoot"):
        user({"securityContext": {"runAsNonRoot": True}}, {"securityContext": {"runAsUser": 0}}, image)


def test_capabilities_drop_all_then_add() -> None:
    assert capabilities({}) == sorted(DEFAULT_CAPABILITIES)
    assert capabilities({"securityContext": {"capabilities": {"drop": ["ALL"]}}}) == []
    assert capabilities({"securityContext": {"capabilities": {"drop": ["ALL"], "add": ["chown"]}}}) == ["CAP_CHOWN"]
    kept = capabilities({"securityContext": {"capabilities": {"drop": ["NET_RAW", "CAP_KILL"]}}})
    assert "CAP_NET_RAW" not in kept and "CAP_KILL" not in kept and "CAP_CHOWN" in kept


def _spec(container: dict[str, Any], pod_spec: dict[str, Any] | None = None, *, readonly: bool = True) -> Any:
    image = ContainerImage(Path("/images/operator"), IMAGE)
    env = {**image_env(IMAGE), "EXTRA": "1"}
    return runtime_spec(
        pod={"metadata": {"name": "op-0"}, "spec": pod_spec or {}}, container=container, image=image, env=env,
        mounts=[("/etc/edgetune", Path("/sandbox/config"), True), ("/dev/termination-log", Path("/sandbox/t"), False)],
        rootfs=image.rootfs, readonly_root=readonly, cgroup="/edgetune-executor/x", parse_bytes=parse_quantity_bytes,
    )  # fmt: skip


def test_the_bundle_carries_the_pods_security_context_mounts_and_limits() -> None:
    locked = {"securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                  "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
              "resources": {"limits": {"memory": "256Mi", "cpu": "500m"}}}  # fmt: skip
    spec = _spec(locked)
    assert spec["root"] == {"path": "/images/operator", "readonly": True}
    process = spec["process"]
    assert process["user"] == {"uid": 10001, "gid": 10001}
    assert process["noNewPrivileges"] is True
    assert process["capabilities"]["effective"] == process["capabilities"]["bounding"] == []
    assert process["cwd"] == "/work" and "EXTRA=1" in process["env"] and process["args"][0] == "python"
    denied = spec["linux"]["seccomp"]["syscalls"][0]
    assert {"mount", "unshare", "ptrace", "bpf"} <= set(denied["names"]) and denied["action"] == "SCMP_ACT_ERRNO"
    assert spec["linux"]["resources"]["memory"]["limit"] == 256 * 2**20
    assert spec["linux"]["resources"]["cpu"] == {"period": 100000, "quota": 50000}
    assert {"type": "network"} not in spec["linux"]["namespaces"]  # pods reach loopback servers
    binds = {m["destination"]: m for m in spec["mounts"] if m["type"] == "bind"}
    assert binds["/etc/edgetune"]["source"] == "/sandbox/config" and "ro" in binds["/etc/edgetune"]["options"]
    assert "rw" in binds["/dev/termination-log"]["options"]
    assert spec["hostname"] == "op-0"


def test_a_container_that_asks_for_nothing_gets_the_runtime_defaults() -> None:
    spec = _spec({}, readonly=False)
    assert spec["root"]["readonly"] is False
    assert spec["process"]["noNewPrivileges"] is False
    assert spec["process"]["capabilities"]["bounding"] == sorted(DEFAULT_CAPABILITIES)
    assert "seccomp" not in spec["linux"]  # Unconfined unless asked, as in Kubernetes without the kubelet default
    assert set(spec["linux"]["resources"]) == {"devices"}
    # The pod-level seccomp profile applies when the container names none.
    assert "seccomp" in _spec({}, {"securityContext": {"seccompProfile": {"type": "RuntimeDefault"}}})["linux"]
