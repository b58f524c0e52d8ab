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
    """What the venv's site-packages holds. Not every folder on sys.path: importing setuptools (GPTQModel's
    extension builder does) appends its own vendored packages (platformdirs, ...) to it."""
    import sysconfig
    from importlib.metadata import distributions

    return {_key(d.metadata["Name"]): d.version for d in distributions(path=[sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])}


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


def _kaggle_install(tmp_path, *args, driver: str | None, torch_version: str = "2.10.0"):
    """scripts/kaggle_install.sh as a Kaggle user runs it, with --dry-run (pip's downloads are printed, not
    run), a Python whose torch is ``torch_version`` (a dist-info first on its path, as Kaggle's image has
    one) and an nvidia-smi on PATH that reports ``driver`` (none on PATH when None)."""
    import os
    import subprocess
    import sys

    site, bin_dir = tmp_path / "site", tmp_path / "bin"
    (site / f"torch-{torch_version}.dist-info").mkdir(parents=True, exist_ok=True)
    (site / f"torch-{torch_version}.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\n")
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.unlink(missing_ok=True)
    if driver is not None:
        smi.write_text(f"#!/bin/sh\necho '{driver}'\n")
        smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(site), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "scripts" / "kaggle_install.sh"), *args, "--dry-run"], capture_output=True, text=True, env=env, timeout=120)


def test_kaggle_install_upgrades_torch_to_the_locks_release_in_the_build_the_driver_runs(tmp_path):
    lock = _lock()
    old_driver = _kaggle_install(tmp_path, "--awq", "--upgrade-torch", driver="550.54.15")
    assert old_driver.returncode == 0, old_driver.stderr
    assert (f"pip install --quiet --index-url https://download.pytorch.org/whl/cu126 torch=={lock['torch']} triton=={lock['triton']}"
            in old_driver.stdout)
    new_driver = _kaggle_install(tmp_path, "--awq", "--upgrade-torch", driver="580.65.06")
    assert new_driver.returncode == 0, new_driver.stderr
    assert f"pip install --quiet torch=={lock['torch']} triton=={lock['triton']}" in new_driver.stdout and "index-url" not in new_driver.stdout
    for result in (old_driver, new_driver):  # medcomp and GPTQModel's stack then install against the lock
        assert f"    torch=={lock['torch']}" in result.stdout and f"    protobuf=={lock['protobuf']}" in result.stdout
        assert f"    GPTQModel=={lock['gptqmodel']}" in result.stdout
    too_old = _kaggle_install(tmp_path, "--awq", "--upgrade-torch", driver="470.82.01")
    assert too_old.returncode == 4 and "older than 525" in too_old.stdout + too_old.stderr
    no_gpu = _kaggle_install(tmp_path, "--awq", "--upgrade-torch", driver=None)
    assert no_gpu.returncode == 4 and "nvidia-smi" in no_gpu.stderr


def test_kaggle_install_keeps_kaggles_torch_by_its_distribution_version(tmp_path):
    """Kaggle's torch says 2.10.0+cu128 in torch.__version__ but is the distribution 2.10.0: pinning the former
    made pip's resolver refuse every install (ResolutionImpossible)."""
    kept = _kaggle_install(tmp_path, driver="550.54.15")
    assert kept.returncode == 0, kept.stderr
    assert "    torch==2.10.0\n" in kept.stdout and "download.pytorch.org" not in kept.stdout and "protobuf==" not in kept.stdout
    refused = _kaggle_install(tmp_path, "--awq", driver="550.54.15")
    assert refused.returncode == 3 and "--upgrade-torch" in refused.stderr
