"""constraints.txt pins what `make install` installs (`make lock` writes it): a dependency added to pyproject.toml
without re-locking, or a pin outside what pyproject.toml allows, fails here."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    """constraints.txt as {normalised name: version}; every line a comment or NAME==VERSION."""
    lines = [line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    found = {}
    for line in lines:
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact NAME==VERSION pin (run `make lock`)"
            found[canonicalize_name(name)] = version
    return found


def makefile_variable(name: str) -> str:
    match = re.search(rf"^{name} := (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile has no {name} := ... line"
    return match.group(1).strip()


def installed_requirements() -> list[Requirement]:
    """pyproject.toml's dependencies and those of the extras `make install` installs (Makefile EXTRAS), plus the
    Makefile's own pins (TORCH, MONGOD)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = makefile_variable("EXTRAS").split(",")
    specs = project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]
    specs += makefile_variable("TORCH").split() + makefile_variable("MONGOD").split()
    return [Requirement(spec) for spec in specs]


def test_constraints_pin_every_requirement_make_install_installs_within_pyproject():
    pinned = pins()
    requirements = installed_requirements()
    missing = sorted({r.name for r in requirements if canonicalize_name(r.name) not in pinned})
    assert not missing, f"constraints.txt pins no version of {missing}: run `make lock` and commit constraints.txt"
    outside = [f"{r} (pinned {pinned[canonicalize_name(r.name)]})" for r in requirements
               if not r.specifier.contains(pinned[canonicalize_name(r.name)], prereleases=True)]
    assert not outside, f"constraints.txt pins versions that pyproject.toml/Makefile exclude: {outside}; run `make lock`"
    assert "prelabel" not in pinned, "constraints.txt must not pin the project itself (`pip freeze --exclude-editable`)"


def test_every_make_install_pip_call_takes_the_constraints():
    recipe = (ROOT / "Makefile").read_text().split("$(STAMP): pyproject.toml constraints.txt\n", 1)[1].split("\n\n")[0]
    installs = [line for line in recipe.splitlines() if "pip install" in line]
    assert len(installs) == 4 and all("-c constraints.txt" in line for line in installs), recipe
