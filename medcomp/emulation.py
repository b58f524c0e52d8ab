"""The numerics fingerprint on CPUs this machine is not: QEMU's user-mode emulator, one CPU model at a time.

The pinned mode (``medcomp.numerics``) is meant to give the same bits on CPUs with AVX2. A session only
ever has the CPU it was given, and the users' CPUs differ (AMD EPYC without AVX-512, Intel with AVX-512
and AMX). ``qemu-x86_64 -cpu MODEL`` runs this machine's Python, torch and libraries on an emulated
CPU: CPUID reports the model's vendor and instruction sets, so ATen, MKL, oneDNN and bitsandbytes
dispatch as they would on that CPU, and QEMU's floating point follows IEEE 754 as the hardware does.
QEMU 7.2 and later emulate AVX2 and FMA, not AVX-512, so every emulated CPU is an AVX2 one: the case
the pins exist for.

``fingerprints`` runs ``python -m medcomp.numerics kernels`` (``kernel_hashes``: the probe's training
is too slow to emulate) natively and on each emulated CPU, in each mode, and ``agreement`` says, kernel
family by family, which agree with this machine. The default mode is the control: an emulated CPU
that agreed with this machine by default as well would show nothing about the pins. Emulation is slow
(about a minute per CPU and mode) and needs ``qemu-user``; it is a check a person runs
(``python -m medcomp numerics --emulate EPYC-Rome``), not part of a run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from typing import Any, Sequence

import pandas as pd

from medcomp.numerics import numerics_environment

NATIVE = "this machine"
COMPARED_MODES = ("pinned", "portable", "default")  # the default mode last: the control


class EmulationError(RuntimeError):
    pass


def qemu_binary() -> str:
    """The user-mode emulator for x86-64, or an error that says how to install it."""
    binary = shutil.which("qemu-x86_64") or shutil.which("qemu-x86_64-static")
    if binary is None:
        raise EmulationError("qemu-x86_64 not found: install QEMU's user-mode emulator (Debian/Ubuntu: apt-get install qemu-user)")
    return binary


def fingerprint_on(cpu: str | None, mode: str, timeout: float = 3600) -> dict[str, Any]:
    """``medcomp.numerics.kernel_report`` in a fresh process started in ``mode``, natively (``cpu``
    None) or under ``qemu-x86_64 -cpu cpu``; adds the wall time in seconds."""
    command = [sys.executable, "-m", "medcomp.numerics", "kernels"]
    if cpu is not None:
        command = [qemu_binary(), "-cpu", cpu, *command]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=numerics_environment(mode), timeout=timeout)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise EmulationError(f"the fingerprint on {cpu or NATIVE} ({mode}) failed: {lines[-1] if lines else f'exit {result.returncode}'}")
    return {**json.loads(result.stdout), "seconds": round(time.perf_counter() - started, 1)}


def fingerprints(cpus: Sequence[str], modes: Sequence[str] = COMPARED_MODES) -> dict[tuple[str, str], dict[str, Any]]:
    """The fingerprint on this machine and on each emulated CPU, in each mode: {(cpu, mode): fingerprint}."""
    return {(cpu or NATIVE, mode): fingerprint_on(cpu, mode) for cpu in [None, *cpus] for mode in modes}


def agreement(measured: dict[tuple[str, str], dict[str, Any]]) -> pd.DataFrame:
    """One row per kernel family, one column per (cpu, mode): the hash, marked ``=`` where it equals this
    machine's in the same mode and ``≠`` where it does not."""
    columns = {}
    for (cpu, mode), fingerprint in measured.items():
        native = measured[(NATIVE, mode)]["kernel hashes"] if (NATIVE, mode) in measured else {}
        columns[f"{cpu}, {mode}"] = {family: digest if cpu == NATIVE else f"{'=' if native.get(family) == digest else '≠'} {digest}"
                                     for family, digest in fingerprint["kernel hashes"].items()}
    return pd.DataFrame(columns)


def cpu_summary(measured: dict[tuple[str, str], dict[str, Any]]) -> pd.DataFrame:
    """What each process ran on: the CPU, ATen's capability as CPUID showed it, the pins, the wall time."""
    return pd.DataFrame({f"{cpu}, {mode}": {"cpu": cpu if cpu == NATIVE else f"{cpu} (QEMU)", "aten capability": f["aten capability"],
                                            "pins": " ".join(f"{k}={v}" for k, v in f["pins"].items() if v) or "none", "seconds": f["seconds"]}
                         for (cpu, mode), f in measured.items()})
