"""pyproject.toml declares ranges; constraints.txt locks the tested set; environment.yml mirrors the lock."""

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict[str, str]:
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    return {_key(name): version for name, version in (line.split("==") for line in lines)}


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(spec) for spec in project["dependencies"] + extras["test"] + extras["awq"]]


def test_pyproject_declares_ranges_not_pins():
    for requirement in _declared():
        assert not any(spec.operator == "==" for spec in requirement.specifier), f"{requirement} is pinned: pins belong in constraints.txt"
    torch = next(r for r in _declared() if r.name == "torch")
    assert not any(spec.operator in ("<", "<=", "~=") for spec in torch.specifier), "a newer torch (Kaggle's next image) must satisfy the range"
    locked = next(line.split("==")[1] for line in (Path(__file__).parent.parent / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))
    assert torch.specifier.contains(locked), "the tested torch must satisfy the declared range"


def test_every_declared_dependency_is_locked_within_its_range():
    lock = _lock()
    for requirement in _declared():
        assert _key(requirement.name) in lock, f"{requirement.name} is not in constraints.txt"
        assert requirement.specifier.contains(lock[_key(requirement.name)]), f"locked {requirement.name} outside {requirement}"


def test_environment_yml_mirrors_the_lock():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in environment["dependencies"] if isinstance(item, dict))
    mirrored = {_key(name): version for name, version in (pin.split("==") for pin in pip_section)}
    lock = _lock()
    assert set(mirrored) == {_key(r.name) for r in _declared()}
    assert all(lock[name] == version for name, version in mirrored.items())


def _installed() -> dict[str, str]:
    from importlib.metadata import distributions

    return {_key(d.metadata["Name"]): d.version for d in distributions()}


def test_setup_installs_exactly_the_lock():
    """The environment scripts/setup.sh built (uv, or pip as its fallback) is the locked set: nothing at
    another version, nothing missing, nothing unlocked (fails if the installer resolves on its own)."""
    import sys

    import pytest

    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("not the environment scripts/setup.sh builds (.venv)")
    installed, lock = _installed(), _lock()
    tools = {"pip", "setuptools", "wheel", "medcomp"}  # the venv's own tools and the project itself
    assert {name: version for name, version in installed.items() if name in lock and version != lock[name]} == {}
    assert sorted(set(lock) - set(installed)) == []
    assert sorted(set(installed) - set(lock) - tools) == []


def test_setup_install_steps_stop_at_the_first_failed_step():
    """setup.sh calls its install steps as an `if` condition (uv, else pip), where bash runs a function
    without `set -e`: a failed step must end them, so that pip redoes the work rather than uv carrying on."""
    import subprocess

    script = (ROOT / "scripts" / "setup.sh").read_text()
    function = re.search(r"^install_steps\(\) \{.*?^\}", script, re.S | re.M).group(0)

    def run(failing: str) -> list[str]:
        shell = (f"set -euo pipefail\n{function}\n"
                 f"installer() {{ echo \"call $*\"; [[ \"$*\" != *{failing}* ]]; }}\n"
                 "if install_steps installer; then echo done; else echo fallback; fi\n")
        return subprocess.run(["bash", "-c", shell], capture_output=True, text=True, check=True).stdout.split("\n")[:-1]

    assert run("torch") == ["call torch==2.14.1", "fallback"]
    assert run("constraints") == ["call torch==2.14.1", "call -c constraints.txt -e .[test,awq]", "fallback"]
    assert run("nothing")[-1] == "done" and len(run("nothing")) == 4
