"""Kaggle's image, rehearsed: Python 3.12 with Kaggle's torch 2.10 (CUDA 12.8 build), protobuf 5.29, transformers
and accelerate, then scripts/kaggle_install.sh as a user runs it, then the 32-layer stand-in through 01-08
(scripts/kaggle_image_rehearsal.sh). The venv is kept in .kaggle-venv between runs (rebuilt when the image's
versions change)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_kaggles_image_installs_medcomp_and_runs_every_stage_on_the_standin(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "scripts" / "kaggle_image_rehearsal.sh"), str(tmp_path / "work"), "cpu"], capture_output=True,
                            text=True, timeout=3000, cwd=ROOT, env={**os.environ, "PYTHONPATH": ""})
    output = result.stdout + result.stderr
    if result.returncode == 2 and "no Python 3.12" in output:
        pytest.skip("no Python 3.12 on this machine (pyenv install 3.12)")
    assert result.returncode == 0, output[-4000:]
    versions = dict(re.findall(r"(torch|protobuf|transformers|accelerate) ([0-9][^,\s]*)", output.split("[kaggle-image] Python 3.12", 1)[-1].split("\n")[0]))
    assert versions == {"torch": "2.10.0", "protobuf": "5.29.6", "transformers": "5.23.0", "accelerate": "1.15.0"}, output[-3000:]  # Kaggle's kept
    assert "medcomp installed; torch 2.10.0 -> 2.10.0" in output
    assert "05 quantizes with bitsandbytes only" in output
    assert re.search(r"\[rehearsal\] 8 of 8 stages ok", output), output[-3000:]
