"""The deployment's dependency manifests agree with the project's own.

Vercel's Python builder installs the pyproject.toml nearest to each function, so the folders under
functions/ with their own manifest (external/: the widget; webhook/: Stripe's webhook) ship different
dependency sets. These checks keep them the project's, at the same versions, in an order the builder
can follow: it installs every folder into one virtualenv in turn (``uv sync``, which also removes what
a manifest lacks), and a function's bundle points at that virtualenv's files. So a package locked at
two versions, or a folder built later that lacks a package of one built earlier, would leave the
earlier function's bundle pointing at files that are gone.
"""

from __future__ import annotations

import itertools
import json
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = sorted(p.parent for p in (ROOT / "functions").glob("*/pyproject.toml"))


def manifest(folder: Path) -> dict[str, Any]:
    return tomllib.loads((folder / "pyproject.toml").read_text())


ROOT_PROJECT = manifest(ROOT)["project"]
ROOT_DEPENDENCIES = set(ROOT_PROJECT["dependencies"])


def test_the_folders_are_there() -> None:
    assert [p.name for p in FOLDERS] == ["external", "webhook"]


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_a_folder_ships_a_subset_of_the_project_without_page_extraction(folder: Path) -> None:
    project = {r.name.lower(): r for r in map(Requirement, ROOT_DEPENDENCIES)}
    for requirement in map(Requirement, manifest(folder)["project"]["dependencies"]):
        ours = project.get(requirement.name.lower())
        assert ours is not None, f"{requirement} is not one of the project's dependencies"
        assert requirement.specifier == ours.specifier, f"{requirement}: the project says {ours}"
        assert requirement.extras <= ours.extras, f"{requirement}: the project says {ours}"
        assert requirement.name.lower() not in {"trafilatura", "lxml", "supabase"}


def test_the_widget_ships_no_stripe() -> None:
    locked = {
        package["name"] for package in tomllib.loads((ROOT / "functions/external/uv.lock").read_text())["package"]
    }
    assert not locked & {"stripe", "requests", "urllib3"}


def locked_packages(folder: Path) -> set[str]:
    lock = tomllib.loads((folder / "uv.lock").read_text())
    return {p["name"] for p in lock["package"] if p.get("source", {}).get("virtual") is None}


def test_each_build_in_vercel_json_holds_every_package_of_the_builds_before_it() -> None:
    builds = [
        b["src"] for b in json.loads((ROOT / "vercel.json").read_text())["builds"] if b["use"] == "@vercel/python"
    ]
    folders = []
    for src in builds:
        folder = ROOT / Path(src).parent
        while not (folder / "pyproject.toml").is_file():
            folder = folder.parent
        folders.append(folder)
    assert set(folders) == {ROOT, *FOLDERS}, f"vercel.json builds {builds}"
    for earlier, later in itertools.pairwise(folders):
        missing = locked_packages(earlier) - locked_packages(later)
        assert not missing, f"{later.relative_to(ROOT)} is built after {earlier.relative_to(ROOT)} but lacks {missing}"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_same_python_and_no_package_of_our_own(folder: Path) -> None:
    data = manifest(folder)
    assert data["project"]["requires-python"] == ROOT_PROJECT["requires-python"]
    assert (folder / ".python-version").read_text() == (ROOT / ".python-version").read_text()
    assert data["tool"]["uv"]["package"] is False


def test_every_locked_package_has_one_version_across_the_locks() -> None:
    versions: dict[str, set[str]] = defaultdict(set)
    for folder in [ROOT, *FOLDERS]:
        lock = tomllib.loads((folder / "uv.lock").read_text())
        for package in lock["package"]:
            if "version" in package and package.get("source", {}).get("virtual") is None:
                versions[package["name"]].add(package["version"])
    split = {name: sorted(found) for name, found in versions.items() if len(found) > 1}
    assert not split, f"locked at several versions (run `uv lock --upgrade-package NAME` in each folder): {split}"
