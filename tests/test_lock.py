"""requirements.lock agrees with pyproject.toml, pins every package with hashes, and is what is installed."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCKED_EXTRAS = ("test", "tools")  # the extras `make lock` compiles
FROM_PYPROJECT = "corral (pyproject.toml)"
PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>\S+)(?: ; (?P<marker>[^\\]+?))? \\$")


class Pin:
    def __init__(self, name: str, version: str, marker: str | None) -> None:
        self.name, self.version = canonicalize_name(name), version
        self.marker = Marker(marker) if marker else None
        self.hashes = 0
        self.via: list[str] = []

    def applies_here(self) -> bool:
        return self.marker is None or self.marker.evaluate()


def _pins(text: str) -> dict[str, Pin]:
    pins: dict[str, Pin] = {}
    current = None
    for line in text.splitlines():
        if match := PIN.match(line):
            current = pins.setdefault(canonicalize_name(match["name"]),
                                      Pin(match["name"], match["version"], match["marker"]))
        elif current and line.strip().startswith("--hash=sha256:"):
            current.hashes += 1
        elif current and line.strip().startswith("#"):
            current.via.append(line.strip().removeprefix("#").strip().removeprefix("via").strip())
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in LOCKED_EXTRAS:
        wanted += project["optional-dependencies"][extra]
    return [Requirement(text) for text in wanted]


PINS = _pins((ROOT / "requirements.lock").read_text())


def test_every_requirement_of_pyproject_is_pinned_in_the_lock_at_a_version_it_accepts():
    for requirement in _requirements():
        pin = PINS.get(canonicalize_name(requirement.name))
        assert pin, f"{requirement} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pin.version, prereleases=True), \
            f"the lock pins {pin.name}=={pin.version}, which {requirement} refuses: run `make lock`"
        assert FROM_PYPROJECT in pin.via, f"{pin.name} is in the lock, but not as pyproject's: run `make lock`"


def test_the_lock_holds_no_direct_requirement_that_pyproject_dropped():
    direct = {name for name, pin in PINS.items() if FROM_PYPROJECT in pin.via}
    assert direct == {canonicalize_name(r.name) for r in _requirements()}, "run `make lock`"


def test_every_pinned_package_carries_its_hashes():
    assert len(PINS) > 20
    assert not [name for name, pin in PINS.items() if pin.hashes == 0]


def test_the_installed_packages_are_the_locked_versions():
    for pin in PINS.values():
        if pin.applies_here():
            assert metadata.version(pin.name) == pin.version, \
                f"{pin.name} {metadata.version(pin.name)} is installed, the lock says {pin.version}: `make clean test`"
