"""Build and cache the Go programs the test environment runs.

Everything is built from source through the Go module proxy, pinned to one version,
and cached under ``$XDG_CACHE_HOME/edgetune/bin/<component>-<version>/``. A component
directory appears atomically (built in a temporary sibling, verified by running
``--version``, then renamed), so an interrupted build never leaves a half-written
cache entry behind, and a second run does no work.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgetune_testenv.errors import EnvironmentSetupError

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.8"  # the etcd server Kubernetes v1.36.3 requires in its go.mod
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.22.0"
VERSITYGW_VERSION = "v1.8.0"

GOBUILD_MODULE = Path(__file__).resolve().parents[2] / "gobuild"

_KUBE_VERSION_PKGS = ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")


def _kube_ldflags() -> str:
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"]
    for pkg in _KUBE_VERSION_PKGS:
        flags += [
            f"-X {pkg}.gitVersion={KUBERNETES_VERSION}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    return " ".join(flags)


@dataclass(frozen=True)
class Component:
    """One cache entry: a set of binaries built together at one version."""

    name: str
    version: str
    binaries: tuple[str, ...]
    # Each (binary, expected substring of its --version output).
    version_checks: tuple[tuple[str, str], ...]
    extra_files: tuple[str, ...] = field(default=())

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.version}"


KUBE = Component(
    name="kubernetes",
    version=f"{KUBERNETES_VERSION}-etcd{ETCD_VERSION}",
    binaries=("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "etcd"),
    version_checks=(
        ("kube-apiserver", KUBERNETES_VERSION),
        ("kube-controller-manager", KUBERNETES_VERSION),
        ("kube-scheduler", KUBERNETES_VERSION),
        ("kubectl", KUBERNETES_VERSION),
        ("etcd", ETCD_VERSION.lstrip("v")),
    ),
)
KWOK = Component(
    name="kwok",
    version=KWOK_VERSION,
    binaries=("kwok",),
    version_checks=(("kwok", KWOK_VERSION.lstrip("v")),),
    # kwok's controller needs Stage definitions; we take the ones its release ships.
    extra_files=(
        "kustomize/stage/node/fast/node-initialize.yaml",
        "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
        "kustomize/stage/pod/fast/pod-ready.yaml",
        "kustomize/stage/pod/fast/pod-complete.yaml",
        "kustomize/stage/pod/fast/pod-delete.yaml",
    ),
)
HELM = Component(
    name="helm",
    version=HELM_VERSION,
    binaries=("helm",),
    version_checks=(("helm", HELM_VERSION),),
)
VERSITYGW = Component(
    name="versitygw",
    version=VERSITYGW_VERSION,
    binaries=("versitygw",),
    version_checks=(("versitygw", VERSITYGW_VERSION.lstrip("v")),),
)
ALL = (KUBE, KWOK, HELM, VERSITYGW)

# component -> (module path of the command @ version, extra linker flags)
_INSTALL_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "kwok": (f"sigs.k8s.io/kwok/cmd/kwok@{KWOK_VERSION}", ()),
    # helm's and versitygw's Makefiles stamp their versions; `go install` alone would not.
    "helm": (
        f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}",
        (f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",),
    ),
    "versitygw": (
        f"github.com/versity/versitygw/cmd/versitygw@{VERSITYGW_VERSION}",
        (f"-X main.Version={VERSITYGW_VERSION}",),
    ),
}


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgetune" / "bin"


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Serialise builds across processes (pytest-xdist workers, a demo beside a test run)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise EnvironmentSetupError(
            "the Go toolchain was not found on PATH; edgetune builds its test control plane "
            "(kube-apiserver, etcd, kwok, helm, versitygw) from Go modules and needs Go >= 1.26"
        )
    return go


def _go_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The pinned modules all accept Go 1.26; never download another toolchain behind the user's back.
    env.setdefault("GOTOOLCHAIN", "local")
    env["CGO_ENABLED"] = "0"
    env["GOFLAGS"] = "-buildvcs=false -trimpath"
    env.setdefault("GOPATH", str(Path.home() / "go"))
    env["GOBIN"] = str(workdir)
    return env


def _run_go(component: Component, args: list[str], workdir: Path, cwd: Path | None = None) -> None:
    log = workdir / "build.log"
    with log.open("w") as out:
        proc = subprocess.run(
            [_go(), *args], cwd=cwd, env=_go_env(workdir), stdout=out, stderr=subprocess.STDOUT, check=False
        )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        hint = ""
        if "proxy.golang.org" in tail or "dial tcp" in tail or "no such host" in tail:
            hint = " (the Go module proxy could not be reached: check GOPROXY and the network)"
        raise EnvironmentSetupError(
            f"building {component.name} {component.version} failed{hint}: "
            f"`go {' '.join(args)}` exited {proc.returncode}; last output:\n{tail}"
        )


def _build(component: Component, workdir: Path) -> None:
    if component is KUBE:
        if not (GOBUILD_MODULE / "go.mod").is_file():
            raise EnvironmentSetupError(f"the pinned build module is missing: {GOBUILD_MODULE}/go.mod")
        pkgs = [f"k8s.io/kubernetes/cmd/{b}" for b in component.binaries if b != "etcd"] + ["./etcd"]
        _run_go(
            component,
            ["build", "-mod=readonly", "-ldflags", _kube_ldflags(), "-o", str(workdir) + "/", *pkgs],
            workdir,
            cwd=GOBUILD_MODULE,
        )
        return
    target, ldflags = _INSTALL_TARGETS[component.name]
    _run_go(component, ["install", "-ldflags", " ".join(["-s", "-w", *ldflags]), target], workdir)
    if component.extra_files:
        modcache = subprocess.run(
            [_go(), "env", "GOMODCACHE"], capture_output=True, text=True, check=True, env=_go_env(workdir)
        ).stdout.strip()
        module = target.split("/cmd/")[0]
        src_root = Path(modcache) / f"{module}@{component.version}"
        for rel in component.extra_files:
            dest = workdir / "share" / Path(rel).name
            dest.parent.mkdir(exist_ok=True)
            shutil.copyfile(src_root / rel, dest)


def _verify(component: Component, directory: Path) -> None:
    for binary, expected in component.version_checks:
        path = directory / binary
        if not os.access(path, os.X_OK):
            raise EnvironmentSetupError(f"{component.name}: expected executable {path} after the build")
        args = [str(path), "version"] if binary == "helm" else [str(path), "--version"]
        if binary == "kubectl":
            args = [str(path), "version", "--client"]
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
        except subprocess.TimeoutExpired as exc:
            raise EnvironmentSetupError(f"{path} did not answer `{' '.join(args[1:])}` in 60 s") from exc
        text = out.stdout + out.stderr
        if expected not in text:
            raise EnvironmentSetupError(
                f"{path} reports the wrong version: expected {expected!r} in `{' '.join(args[1:])}`, "
                f"got {text.strip()[:300]!r}"
            )


def component_dir(component: Component) -> Path:
    return cache_root() / component.dirname


def is_cached(component: Component) -> bool:
    return (component_dir(component) / ".verified").is_file()


def ensure(component: Component, *, log: bool = True) -> Path:
    """Return the directory holding ``component``'s binaries, building it first if needed."""
    final = component_dir(component)
    if is_cached(component):
        return final
    root = cache_root()
    with locked(root):
        if is_cached(component):  # another process built it while we waited for the lock
            return final
        if log:
            print(f"edgetune: building {component.name} {component.version} from Go modules ...", flush=True)
        workdir = Path(tempfile.mkdtemp(prefix=f".{component.dirname}.", dir=root))
        try:
            _build(component, workdir)
            _verify(component, workdir)
            (workdir / ".verified").write_text(component.version + "\n")
            workdir.chmod(0o755)
            if final.exists():  # a stale, unverified entry from an older layout
                shutil.rmtree(final)
            workdir.rename(final)
        finally:
            if workdir.exists():
                shutil.rmtree(workdir, ignore_errors=True)
    return final


def ensure_all(components: tuple[Component, ...] = ALL) -> dict[str, Path]:
    return {c.name: ensure(c) for c in components}


def binary(component: Component, name: str) -> Path:
    if name not in component.binaries:
        raise KeyError(f"{component.name} builds {component.binaries}, not {name!r}")
    return ensure(component) / name


CHECKOV_VERSION = "3.3.30"


def python_tool(package: str, version: str, command: str) -> Path:
    """A command-line tool from PyPI in a virtual environment of its own (its pins must not meet the
    project's), cached under ``<cache>/tools/<package>-<version>/``; returns the command's path."""
    root = cache_root().parent / "tools" / f"{package}-{version}"
    exe = root / "bin" / command
    done = root / ".complete"
    with locked(root.parent):
        if done.exists() and exe.exists():
            return exe
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
        install = subprocess.run([str(root / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                                  f"{package}=={version}"], capture_output=True, text=True, check=False)  # fmt: skip
        if install.returncode != 0:
            raise EnvironmentSetupError(f"pip install {package}=={version} failed (PyPI must be reachable):\n"
                                        f"{install.stderr[-3000:]}")  # fmt: skip
        done.touch()
    return exe
