"""Unit tests of the test environment's own logic: no servers, no Go builds."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from edgetune_testenv import binaries
from edgetune_testenv.cluster import EXECUTOR_LABEL, _kwok_stages
from edgetune_testenv.errors import ComponentCrashedError, EnvironmentSetupError
from edgetune_testenv.executor import expand_vars, parse_quantity_bytes, rewrite_paths
from edgetune_testenv.nodes import GPU_RESOURCE, NPU_RESOURCE, gpu_node, npu_node, scale_fleet
from edgetune_testenv.procs import ManagedProcess, free_port

# -- executor helpers ------------------------------------------------------------------------


def test_expand_vars_follows_kubernetes_rules() -> None:
    env = {"A": "1", "DIR": "/data"}
    assert expand_vars("$(A)-$(DIR)/x", env) == "1-/data/x"
    assert expand_vars("$$(A)", env) == "$(A)"  # $$ escapes
    assert expand_vars("$(UNDEFINED)", env) == "$(UNDEFINED)"  # unknown names stay as written


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/data", "/L/data"),
        ("/data/x.csv", "/L/data/x.csv"),
        ("--dir=/data/a", "--dir=/L/data/a"),
        ("open('/dev/termination-log','w')", "open('/L/t','w')"),
        ("/data/sub/y", "/L/sub/y"),  # the longest mount wins
        ("/database", "/database"),  # not a path under /data
        ("x/data", "x/data"),  # not at the start of a path
        ("/data.bak", "/data.bak"),
    ],
)
def test_rewrite_paths(text: str, expected: str) -> None:
    mounts = {"/data": Path("/L/data"), "/data/sub": Path("/L/sub"), "/dev/termination-log": Path("/L/t")}
    assert rewrite_paths(text, mounts) == expected


def test_parse_quantity_bytes() -> None:
    assert parse_quantity_bytes("128Mi") == 128 * 2**20
    assert parse_quantity_bytes("1G") == 10**9
    assert parse_quantity_bytes("1500") == 1500
    with pytest.raises(ValueError, match="not a memory quantity"):
        parse_quantity_bytes("12 parsecs")


def test_kwok_stages_leave_executor_pods_alone(tmp_path: Path) -> None:
    for name in ("node-initialize", "node-heartbeat-with-lease", "pod-ready", "pod-complete", "pod-delete"):
        stage = {"kind": "Stage", "metadata": {"name": name}, "spec": {"selector": {"matchExpressions": []}}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(stage))
    stages = {s["metadata"]["name"]: s["spec"]["selector"]["matchExpressions"] for s in _kwok_stages(tmp_path)}
    excluded = {"key": f'.metadata.labels["{EXECUTOR_LABEL}"]', "operator": "DoesNotExist"}
    assert stages["pod-ready"] == [excluded]
    assert stages["pod-complete"] == [excluded]
    # Deletion stays kwok's job for every pod; nodes are untouched.
    assert stages["pod-delete"] == stages["node-initialize"] == []


def test_node_specs_advertise_accelerators() -> None:
    gpu = gpu_node("g", gpus=2).to_manifest()
    assert gpu["status"]["allocatable"][GPU_RESOURCE] == "2"
    assert gpu["metadata"]["annotations"] == {"kwok.x-k8s.io/node": "fake"}
    npu = npu_node("n").to_manifest()
    assert npu["status"]["capacity"][NPU_RESOURCE] == "1"
    assert GPU_RESOURCE not in npu["status"]["capacity"]
    fleet = scale_fleet(1000)
    assert len({n.name for n in fleet}) == 1000


# -- binaries cache --------------------------------------------------------------------------

FAKE = binaries.Component("fake", "v9.9.9", ("tool",), (("tool", "9.9.9"),))


def _fake_binary(directory: Path, prints: str) -> None:
    tool = directory / "tool"
    tool.write_text(f"#!/bin/sh\necho '{prints}'\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "edgetune" / "bin"


def test_second_ensure_does_no_work(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def build(component: binaries.Component, workdir: Path) -> None:
        calls.append(workdir)
        _fake_binary(workdir, "tool version 9.9.9")

    monkeypatch.setattr(binaries, "_build", build)
    first = binaries.ensure(FAKE, log=False)
    second = binaries.ensure(FAKE, log=False)
    assert first == second == cache / "fake-v9.9.9"
    assert len(calls) == 1
    assert (first / "tool").exists()


def test_interrupted_build_leaves_cache_consistent(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def build(component: binaries.Component, workdir: Path) -> None:
        (workdir / "tool").write_text("half a binary")
        raise KeyboardInterrupt

    monkeypatch.setattr(binaries, "_build", build)
    with pytest.raises(KeyboardInterrupt):
        binaries.ensure(FAKE, log=False)
    assert not binaries.is_cached(FAKE)
    assert sorted(p.name for p in cache.iterdir()) == [".lock"]  # no final dir, no temp dir


def test_wrong_version_is_rejected_and_not_cached(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(binaries, "_build", lambda c, w: _fake_binary(w, "tool version 1.0.0"))
    with pytest.raises(EnvironmentSetupError, match=r"wrong version: expected '9\.9\.9'"):
        binaries.ensure(FAKE, log=False)
    assert not binaries.is_cached(FAKE)


def test_missing_go_is_named(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(cache))  # no go here
    with pytest.raises(EnvironmentSetupError, match=r"Go toolchain was not found.*Go >= 1\.26"):
        binaries.ensure(binaries.KWOK, log=False)


def test_failed_go_build_reports_component_and_output(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_go = tmp_path / "bin" / "go"
    fake_go.parent.mkdir()
    fake_go.write_text("#!/bin/sh\necho 'dial tcp: lookup proxy.golang.org: no such host' >&2\nexit 1\n")
    fake_go.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_go.parent}:/usr/bin:/bin")
    with pytest.raises(EnvironmentSetupError, match=r"building kwok v0\.8\.0 failed \(the Go module proxy could not"):
        binaries.ensure(binaries.KWOK, log=False)
    assert not binaries.is_cached(binaries.KWOK)


def test_kube_binaries_are_stamped_with_the_pinned_version() -> None:
    flags = binaries._kube_ldflags()
    assert "-X k8s.io/component-base/version.gitVersion=v1.36.3" in flags
    assert "-X k8s.io/component-base/version.gitMinor=36" in flags


# -- processes -------------------------------------------------------------------------------


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = ManagedProcess("web", ["sleep", "5"], tmp_path / "log", ports=(port,))
        with pytest.raises(EnvironmentSetupError, match=rf"web: port\(s\) \[{port}\] .* already in use"):
            proc.start()
        assert proc.proc is None


def test_crash_during_startup_fails_fast_with_log(tmp_path: Path) -> None:
    proc = ManagedProcess(
        "flaky", ["sh", "-c", "echo 'bind: address already in use'; exit 7"], tmp_path / "log"
    ).start()
    started = time.monotonic()
    with pytest.raises(ComponentCrashedError, match=r"flaky exited with status 7 \(address already in use\)"):
        proc.wait_until(lambda: False, timeout=60, what="ready")
    assert time.monotonic() - started < 10  # noticed the death, did not sit out the timeout


def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    script = "trap '' TERM; sleep 300 & echo $! > child.pid; wait"
    proc = ManagedProcess("stubborn", ["sh", "-c", script], tmp_path / "log", cwd=tmp_path).start()
    pid_file = tmp_path / "child.pid"
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    proc.stop(grace=0.5)
    assert not proc.alive()
    _assert_gone(child)


def test_servers_die_with_their_parent(tmp_path: Path) -> None:
    """A test run killed with SIGKILL must not leave its servers behind."""
    launcher = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from edgetune_testenv.procs import ManagedProcess
        p = ManagedProcess("sleeper", ["sleep", "300"], Path({str(tmp_path / "log")!r})).start()
        print(p.pid, flush=True)
        time.sleep(300)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    server_pid = int(parent.stdout.readline())
    os.kill(server_pid, 0)  # running
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    _assert_gone(server_pid)


def _assert_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # A zombie awaiting its reaper counts as gone.
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z":
                return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still running after {timeout} s")


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_the_quickstart_script_is_its_sh_blocks_in_order_and_nothing_else() -> None:
    from edgetune_testenv.localenv import QUICKSTART, quickstart_script, shell_blocks  # noqa: PLC0415

    doc = "# t\n```text\nnot run\n```\n```sh\necho one\n```\ntext\n```sh\necho two\necho three\n```\n"
    assert shell_blocks(doc) == ["echo one\n", "echo two\necho three\n"]
    script = quickstart_script(doc)
    assert "not run" not in script and script.index("echo one") < script.index("echo three")
    assert script.startswith("set -euo pipefail\n")
    assert len(shell_blocks(QUICKSTART.read_text())) >= 8  # the real one parses too


def test_the_demo_plots_phase_labels_of_close_moments_apart() -> None:
    from edgetune_testenv.demo.report import label_heights  # noqa: PLC0415

    # RollingBack and RolledBack 3 s apart on a 120 s axis: once drawn at one height, over each other.
    heights = label_heights([40.0, 43.0, 45.0, 100.0], 120.0)
    assert len(set(heights[:3])) == 3  # three close moments, three heights
    assert heights[3] == heights[0]  # a moment far away goes back to the top
    assert label_heights([10.0], 120.0) == [1.02]
