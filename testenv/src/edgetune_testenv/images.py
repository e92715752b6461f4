"""Build the project's images from their Dockerfiles, offline, and cache them.

No container registry is reachable here, so ``FROM python:3.11-slim`` cannot be pulled. Instead:

1. a base image is made from Debian's own packages (``mmdebstrap --variant=minbase`` of bookworm
   with ``python3``, ``python3-venv``, ``python-is-python3``, ``ca-certificates``; bookworm's Python
   is 3.11, the version the images are tested with) and imported into buildah's storage as
   ``localhost/edgetune/python-base:3.11-bookworm``;
2. each Dockerfile is built unchanged by ``buildah bud`` with one build argument,
   ``BASE_IMAGE`` (the trainer's ``VARIANT=cuda``: PyTorch's CPU index is not reachable here, the
   CUDA wheels on PyPI are; the agent's ``TRAINER_IMAGE`` names the trainer just built);
3. a built image is kept as a buildah working container whose mount is the image's root
   filesystem: the pod executor's container mode (``executor.ContainerImage``) runs it with
   ``runc`` from there, read-only, so one copy on disk serves every container.

Everything lives under ``$XDG_CACHE_HOME/edgetune/images`` and is keyed by the sha256 of the
inputs (Dockerfile, the files its COPY lines read, build arguments, base): a second set-up finds
the image and does no work; a change of the sources rebuilds only the layers after the sources are
copied (``--layers``), so torch is not downloaded again.

The pip inside a build talks to PyPI through this machine's TLS-intercepting proxy: the host's CA
bundle and a ``pip.conf`` naming it are mounted into every ``RUN`` (``--volume``), never copied into
an image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetune_testenv import binaries
from edgetune_testenv.errors import EnvironmentSetupError

REPO = Path(__file__).resolve().parents[3]
TOOLS = ("buildah", "runc", "mmdebstrap")
INSTALL_HINT = "apt-get install buildah runc mmdebstrap (Debian 12)"
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
BASE_IMAGE = "localhost/edgetune/python-base:3.11-bookworm"
SOURCE_DATE_EPOCH = "1767225600"  # 2026-01-01: file times in the base image do not depend on the day it was made
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CONTEXT_INPUTS = ("pyproject.toml", "README.md", "scripts/image_requirements.py", "operator/src",
                  "trainer-image/src", "agent/src")  # fmt: skip
"""What the Dockerfiles' COPY lines read from the repository (the cache key hashes them)."""


class ImageToolsMissingError(EnvironmentSetupError):
    """buildah, runc or mmdebstrap is not installed (or cannot work on this kernel)."""


@dataclass(frozen=True)
class Recipe:
    name: str
    dockerfile: str
    build_args: Mapping[str, str] = field(default_factory=dict)
    depends_on: str | None = None
    """A recipe whose image this one's ``build_args`` name (the agent builds on the trainer)."""


RECIPES = {
    "operator": Recipe("operator", "operator/Dockerfile"),
    # The CUDA variant: the wheels PyPI serves for x86_64 (the CPU index is not reachable here).
    "trainer": Recipe("trainer", "trainer-image/Dockerfile", {"VARIANT": "cuda"}),
    "agent": Recipe("agent", "agent/Dockerfile", depends_on="trainer"),
}


@dataclass(frozen=True)
class BuiltImage:
    """An image in buildah's storage, with its root filesystem mounted for runc."""

    name: str
    reference: str
    rootfs: Path
    config: Mapping[str, Any]
    """The OCI image config: User, Env, Entrypoint, Cmd, WorkingDir."""
    size_bytes: int
    build_seconds: float
    """0 when it came from the cache."""


def cache_root() -> Path:
    return binaries.cache_root().parent / "images"


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def check_tools() -> None:
    """Raise, naming what is missing, unless buildah, runc and mmdebstrap are installed."""
    missing = missing_tools()
    if missing:
        raise ImageToolsMissingError(f"building and running images needs {', '.join(missing)}: {INSTALL_HINT}")


def input_key(repo: Path, recipe: Recipe, extra: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for item in extra:
        digest.update(item.encode() + b"\0")
    for relative in (recipe.dockerfile, ".dockerignore", *CONTEXT_INPUTS):
        root = repo / relative
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            if "__pycache__" in path.parts or not path.exists():
                continue
            digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def copy_inputs(dest: Path, repo: Path = REPO) -> None:
    """Copy what the image builds read (Dockerfiles and their COPY sources) into ``dest``: a build
    context of its own, for a benchmark or a test that changes a file."""
    dockerfiles = [r.dockerfile for r in RECIPES.values()]
    for relative in (*CONTEXT_INPUTS, ".dockerignore", *dockerfiles):
        source, target = repo / relative, dest / relative
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)


class ImageBuilder:
    """Builds and caches the images; one instance per process is enough (builds are serialised
    across processes with a file lock)."""

    def __init__(self, repo: Path = REPO, root: Path | None = None, driver: str | None = None) -> None:
        self.repo = repo
        self.root = root or cache_root()
        self.driver = driver or os.environ.get("EDGETUNE_BUILDAH_DRIVER") or _default_driver()

    # -- buildah -----------------------------------------------------------------------------------

    def _command(self, *args: str) -> list[str]:
        return ["buildah", "--root", str(self.root / "storage"), "--runroot", str(self.root / "run"),
                "--storage-driver", self.driver, *args]  # fmt: skip

    def buildah(self, *args: str, log: Path | None = None) -> str:
        """Run buildah on this cache's storage; its output (or, with ``log``, nothing: it goes there)."""
        if log is not None:
            with log.open("ab") as out:
                logged = subprocess.run(self._command(*args), stdout=out, stderr=subprocess.STDOUT, check=False)
            if logged.returncode != 0:
                tail = log.read_text(errors="replace")[-3000:]
                raise EnvironmentSetupError(f"buildah {args[0]} failed (exit {logged.returncode}); log {log}:\n{tail}")
            return ""
        result = subprocess.run(self._command(*args), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise EnvironmentSetupError(f"buildah {' '.join(args[:2])} failed: {result.stderr.strip()[-2000:]}")
        return result.stdout.strip()

    def _exists(self, kind: str, name: str) -> bool:
        return subprocess.run(self._command("inspect", "--type", kind, name), capture_output=True,
                              check=False).returncode == 0  # fmt: skip

    # -- base --------------------------------------------------------------------------------------

    def base(self) -> str:
        """The offline base image (made once; ~40 s, 225 MB)."""
        check_tools()
        key = hashlib.sha256(f"{SUITE} {' '.join(BASE_PACKAGES)} {SOURCE_DATE_EPOCH}".encode()).hexdigest()[:12]
        reference = f"{BASE_IMAGE}-{key}"
        with binaries.locked(self.root):  # the same cross-process lock as the Go builds
            if self._exists("image", reference):
                return reference
            logs = self.root / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            tarball = self.root / f"base-{key}.tar"
            env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}
            with (logs / "base.log").open("wb") as out:
                result = subprocess.run(
                    ["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(tarball)],
                    stdout=out, stderr=subprocess.STDOUT, env=env, check=False,
                )  # fmt: skip
            if result.returncode != 0:
                raise EnvironmentSetupError(f"mmdebstrap failed (exit {result.returncode}); see {logs / 'base.log'}")
            container = self.buildah("from", "scratch")
            try:
                self.buildah("add", container, str(tarball), "/")
                self.buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                             "--env", "LANG=C.UTF-8", "--cmd", "python3", container)  # fmt: skip
                self.buildah("commit", "--quiet", container, reference)
                self.buildah("tag", reference, BASE_IMAGE)
            finally:
                self.buildah("rm", container)
                tarball.unlink(missing_ok=True)
            return reference

    # -- project images ----------------------------------------------------------------------------

    def build(self, name: str) -> BuiltImage:
        """The named image (``operator``, ``trainer``, ``agent``), built unless cached."""
        recipe = RECIPES[name]
        base = self.base()
        args = {"BASE_IMAGE": base, **recipe.build_args}
        if recipe.depends_on is not None:
            args["TRAINER_IMAGE"] = self.build(recipe.depends_on).reference
        key = input_key(self.repo, recipe, [f"{k}={v}" for k, v in sorted(args.items())])
        reference = f"localhost/edgetune/{name}:{key}"
        container = f"edgetune-{name}-{key}"
        started = time.monotonic()
        built = False
        with binaries.locked(self.root):
            if not self._exists("image", reference):
                self._bud(recipe, args, reference)
                built = True
                self._drop_older(name, container)
            if not self._exists("container", container):
                self.buildah("from", "--pull=never", "--quiet", "--name", container, reference)
            rootfs = Path(self.buildah("mount", container))
            if not (rootfs / "usr").is_dir():  # buildah's record says mounted, the kernel disagrees (a reboot)
                self.buildah("umount", "--all")
                rootfs = Path(self.buildah("mount", container))
            info = json.loads(self.buildah("inspect", "--type", "image", reference))
        config = (info.get("OCIv1") or {}).get("config") or {}
        layers = json.loads(info.get("Manifest") or "{}").get("layers") or []
        size = sum(int(layer.get("size") or 0) for layer in layers)  # uncompressed: what the disk holds
        return BuiltImage(name, reference, rootfs, config, size,
                          round(time.monotonic() - started, 1) if built else 0.0)  # fmt: skip

    def _bud(self, recipe: Recipe, args: Mapping[str, str], reference: str) -> None:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{recipe.name}.log"
        log.write_bytes(b"")
        pip_conf = self.root / "pip.conf"
        volumes: list[str] = []
        if HOST_CA_BUNDLE.is_file():  # the proxy's CA, for pip inside RUN; never part of an image
            pip_conf.write_text(f"[global]\ncert = {HOST_CA_BUNDLE}\n")
            volumes = ["--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro", "--volume", f"{pip_conf}:/etc/pip.conf:ro"]
        build_args = [a for k, v in sorted(args.items()) for a in ("--build-arg", f"{k}={v}")]
        self.buildah("bud", "--isolation", "chroot", "--network", "host", "--pull=never", "--layers",
                     *volumes, *build_args, "-f", recipe.dockerfile, "-t", reference, str(self.repo),
                     log=log)  # fmt: skip

    def _drop_older(self, name: str, keep: str) -> None:
        """Once a new version of an image is built, the older ones' containers (and their mounts) and
        tags go: the cache holds one version per image, plus the layers they share."""
        listed = self.buildah("containers", "--format", "{{.ContainerName}}")
        for old in (c for c in listed.splitlines() if c.startswith(f"edgetune-{name}-") and c != keep):
            subprocess.run(self._command("rm", old), capture_output=True, check=False)
            subprocess.run(self._command("rmi", f"localhost/edgetune/{name}:{old.rsplit('-', 1)[1]}"),
                           capture_output=True, check=False)  # fmt: skip

    def prune(self) -> None:
        """Remove every cached image and container (the benchmark's temporary cache)."""
        if (self.root / "storage").exists():
            subprocess.run(self._command("rm", "--all"), capture_output=True, check=False)
            subprocess.run(self._command("rmi", "--all", "--force"), capture_output=True, check=False)


def _default_driver() -> str:
    """overlay where the kernel has it (no copy per layer), vfs otherwise."""
    try:
        return "overlay" if "overlay" in Path("/proc/filesystems").read_text() else "vfs"
    except OSError:
        return "vfs"
