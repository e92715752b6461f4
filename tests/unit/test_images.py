"""Image builds: what is missing is named, dependencies come from pyproject.toml alone, the cache
key follows the inputs the Dockerfiles read (the builds themselves: tests/e2e/test_containers.py)."""

from __future__ import annotations

import importlib.util
import shutil
import tomllib
from pathlib import Path

import pytest

from edgetune_testenv import images

REPO = Path(__file__).resolve().parents[2]


def test_missing_tools_are_named_with_how_to_install_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool in ("runc", "mmdebstrap") else f"/usr/bin/{tool}")
    with pytest.raises(images.ImageToolsMissingError, match=r"needs runc, mmdebstrap: apt-get install buildah"):
        images.check_tools()


def test_image_requirements_expand_the_projects_own_extras_and_leave_out_torch() -> None:
    spec = importlib.util.spec_from_file_location("image_requirements", REPO / "scripts/image_requirements.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    agent = module.requirements(project, ["agent"], {"torch"})
    trainer = module.requirements(project, ["trainer"], {"torch"})
    assert set(trainer) < set(agent)  # edgetune[trainer] inside the agent extra is expanded
    assert not any(r.startswith(("edgetune", "torch")) for r in agent)
    assert project["dependencies"][0] in agent
    with pytest.raises(SystemExit, match="no extra 'nope'"):
        module.requirements(project, ["nope"], set())


def test_the_cache_key_changes_with_what_the_dockerfile_reads_and_only_that(tmp_path: Path) -> None:
    images.copy_inputs(tmp_path)
    recipe = images.RECIPES["operator"]
    key = images.input_key(tmp_path, recipe, ["BASE_IMAGE=x"])
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("not an input")
    assert images.input_key(tmp_path, recipe, ["BASE_IMAGE=x"]) == key
    assert images.input_key(tmp_path, recipe, ["BASE_IMAGE=y"]) != key
    (tmp_path / "operator/src/edgetune_operator/settings.py").write_text("changed = True\n")
    assert images.input_key(tmp_path, recipe, ["BASE_IMAGE=x"]) != key
