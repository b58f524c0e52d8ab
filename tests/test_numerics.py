"""The numerics fingerprint's kernel families, and the check on emulated CPUs (medcomp.emulation)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from medcomp import emulation, numerics

FAMILIES = {"fp32 linear (MKL GEMM)", "fp32 attention scores (MKL batched GEMM)", "conv2d (CLIP patch embedding)", "norms, activations (ATen)",
            "exp, log, erf (MKL VML)", "softmax, cross-entropy", "attention (SDPA)", "fp16 linear (AWQ search)", "int4 linear (AWQ serving)",
            "nf4 (bitsandbytes)", "fp32 GEMM, probe's shapes, forward and backward (MKL)", "autograd: GELU, LayerNorm, mean (ATen)", "sqrt (MKL VML)",
            "AdamW step, foreach (the probe's; sqrt through MKL VML)", "AdamW step, fused (training's)"}


@pytest.fixture(scope="module")
def this_cpu_in_each_mode() -> dict[str, dict]:
    """The kernel report of a fresh process in each mode on this CPU (the pins act only when torch loads)."""
    return {mode: emulation.fingerprint_on(None, mode) for mode in emulation.COMPARED_MODES}


def test_kernel_hashes_are_repeatable_and_leave_the_callers_threads():
    torch.set_num_threads(1)
    first = numerics.kernel_hashes()
    assert set(first) == FAMILIES and all(len(digest) == 16 for digest in first.values())
    assert numerics.kernel_hashes() == first
    assert torch.get_num_threads() == 1


def test_each_kernel_family_hashes_its_own_kernels_output(monkeypatch):
    """A change in one kernel's last bit shows in its family's hash and in no other: the table can name
    the kernel where two CPUs part."""
    reference = numerics.kernel_hashes()
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def one_ulp_off(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        return torch.nextafter(out, torch.full_like(out, float("inf")))

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", one_ulp_off)
    changed = numerics.kernel_hashes()
    assert {family for family in FAMILIES if changed[family] != reference[family]} == {"attention (SDPA)"}


@pytest.mark.skipif("avx512f" not in open("/proc/cpuinfo").read(), reason="on a CPU without AVX-512 the pins change no dispatch")
def test_pins_change_the_kernels_each_vendors_libraries_honour(this_cpu_in_each_mode):
    """The pins reach ATen in a fresh process on every AVX-512 CPU: its capability and SDPA part from the
    default. MKL's GEMM and exp/log/erf part only where MKL honours its AVX2 branch: Intel's CPUs, not AMD's,
    where they were the same bits pinned and by default on a real EPYC (numerics.MKL_HONOURS_AVX2_BRANCH)."""
    pinned, default = this_cpu_in_each_mode["pinned"], this_cpu_in_each_mode["default"]
    assert pinned["aten capability"] == "AVX2" and default["aten capability"] != "AVX2"
    parted = {family for family in FAMILIES if pinned["kernel hashes"][family] != default["kernel hashes"][family]}
    assert "attention (SDPA)" in parted
    mkl = {"fp32 linear (MKL GEMM)", "exp, log, erf (MKL VML)"}
    if numerics.MKL_HONOURS_AVX2_BRANCH.get(numerics.cpu_vendor()):
        assert mkl <= parted
    elif numerics.cpu_vendor() == "amd":
        assert not mkl & parted


def test_fused_adamw_is_the_same_bits_in_every_mode_and_training_uses_it(this_cpu_in_each_mode):
    """AdamW's fused step takes the square root with the CPU's IEEE instruction, so no MKL branch moves it;
    the foreach step (the shared probe's) goes through MKL's sqrt, which parts Intel from AMD under every
    pin. Training (01, 04 and the bootstrap) must take the fused one."""
    from medcomp import params as schema
    from medcomp.training import _optimizer

    fused = {mode: report["kernel hashes"]["AdamW step, fused (training's)"] for mode, report in this_cpu_in_each_mode.items()}
    assert len(set(fused.values())) == 1, fused
    if numerics.MKL_HONOURS_AVX2_BRANCH.get(numerics.cpu_vendor()):  # where MKL's sqrt follows the pins, the foreach step does too
        foreach = {mode: report["kernel hashes"]["AdamW step, foreach (the probe's; sqrt through MKL VML)"] for mode, report in this_cpu_in_each_mode.items()}
        assert foreach["portable"] != foreach["pinned"]
    model = torch.nn.ModuleDict({"lora_A": torch.nn.Linear(4, 2), "projector": torch.nn.Linear(2, 2)})
    assert _optimizer(model, schema.FinetuneParams()).defaults["fused"] is True


def test_the_vendor_decides_auto_and_the_probe_names_its_reference(tmp_path):
    for vendor_id, vendor in (("GenuineIntel", "intel"), ("AuthenticAMD", "amd"), ("HygonGenuine", "other")):
        (tmp_path / vendor).write_text(f"processor\t: 0\nvendor_id\t: {vendor_id}\nflags\t\t: avx2\n")
        assert numerics.cpu_vendor(str(tmp_path / vendor)) == vendor
    assert numerics.cpu_vendor(str(tmp_path / "missing")) == "other"
    assert [numerics.resolve_mode("auto", vendor) for vendor in ("intel", "amd", "other")] == ["pinned", "default", "default"]
    assert numerics.resolve_mode("portable", "amd") == "portable"  # asked for by name: kept on every vendor
    with pytest.raises(ValueError, match="unknown numerics mode 'fast'"):
        numerics.resolve_mode("fast")
    assert "Intel CPUs, pinned" in numerics.published_reference("cb523f34f6263620") and "Published bits" in numerics.published_reference("cb523f34f6263620")
    assert numerics.published_reference("f1391541061d0d39").endswith("AMD CPUs, portable (../shared/repro_reference.md); no artefact hashes are published for it")
    assert numerics.published_reference("0123456789abcdef").startswith("none")


def _fake_fingerprint(**kernels) -> dict:
    return {"aten capability": "AVX2", "pins": numerics.PINNED_ENV, "kernel hashes": {"fp32 linear (MKL GEMM)": "a0", "attention (SDPA)": "s0", **kernels},
            "seconds": 1.0}


def test_agreement_marks_each_family_against_this_machine_in_the_same_mode():
    measured = {(emulation.NATIVE, "pinned"): _fake_fingerprint(),
                (emulation.NATIVE, "default"): _fake_fingerprint(**{"fp32 linear (MKL GEMM)": "a1"}),
                ("EPYC-Rome", "pinned"): _fake_fingerprint(),
                ("EPYC-Rome", "default"): _fake_fingerprint(**{"fp32 linear (MKL GEMM)": "a0", "attention (SDPA)": "s1"})}
    table = emulation.agreement(measured)
    assert table.loc["fp32 linear (MKL GEMM)", "EPYC-Rome, pinned"] == "= a0"
    assert table.loc["fp32 linear (MKL GEMM)", "EPYC-Rome, default"] == "≠ a0"  # compared with this machine's default (a1), not its pinned
    assert table.loc["attention (SDPA)", "EPYC-Rome, default"] == "≠ s1" and table.loc["attention (SDPA)", "EPYC-Rome, pinned"] == "= s0"
    assert table.loc["attention (SDPA)", "this machine, default"] == "s0"
    assert emulation.cpu_summary(measured).loc["cpu", "EPYC-Rome, pinned"] == "EPYC-Rome (QEMU)"


def test_an_emulated_fingerprint_runs_under_qemu_with_the_modes_pins(monkeypatch):
    seen = {}

    def child(command, env, **kwargs):
        seen.update(command=command, env=env)
        return subprocess.CompletedProcess(command, 0, json.dumps(_fake_fingerprint()), "")

    monkeypatch.setattr(emulation.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(emulation.subprocess, "run", child)
    monkeypatch.setenv("MKL_CBWR", "AVX512")  # a shell's left-over pin must not reach a pinned or a default child
    emulation.fingerprint_on("EPYC-Rome", "pinned")
    assert seen["command"][:3] == ["/usr/bin/qemu-x86_64", "-cpu", "EPYC-Rome"] and seen["command"][-3:] == ["-m", "medcomp.numerics", "kernels"]
    assert {name: seen["env"].get(name) for name in numerics.PINNED_ENV} == numerics.PINNED_ENV
    emulation.fingerprint_on("Haswell", "default")
    assert not any(name in seen["env"] for name in numerics.PINNED_ENV)


def test_emulation_without_qemu_or_with_a_failing_child_says_what_to_do(monkeypatch):
    monkeypatch.setattr(emulation.shutil, "which", lambda name: None)
    with pytest.raises(emulation.EmulationError, match="apt-get install qemu-user"):
        emulation.fingerprint_on("EPYC-Rome", "pinned")
    monkeypatch.setattr(emulation.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(emulation.subprocess, "run",
                        lambda command, **kwargs: subprocess.CompletedProcess(command, 1, "", "qemu-x86_64: unable to find CPU model 'EPYC-Typo'"))
    with pytest.raises(emulation.EmulationError, match="EPYC-Typo.*pinned.*unable to find CPU model"):
        emulation.fingerprint_on("EPYC-Typo", "pinned")


def test_the_index_shows_each_kernel_familys_hash_from_the_manifest(tmp_path):
    from medcomp.runner import numerics_html

    kernels = {"fp32 linear (MKL GEMM)": "037969b918a1851e", "int4 linear (AWQ serving)": "25347348f26624c8"}
    reference = numerics.published_reference("cb523f34f6263620")
    (tmp_path / "manifest.json").write_text(json.dumps({"numerics": {"mode": "pinned", "asked": "auto", "comparable with": reference,
                                                                     "probe hash": "cb523f34f6263620", "kernel hashes": kernels},
                                                        "artefacts": {"01_finetune": "c5bfe5a450af5258"}}))
    page = numerics_html(tmp_path)
    for family, digest in kernels.items():
        assert f"<tr><th>kernels: {family}</th><td><code>{digest}</code></td></tr>" in page
    assert "<code>cb523f34f6263620</code>" in page and "<code>c5bfe5a450af5258</code>" in page
    assert "<tr><th>asked</th><td><code>auto</code></td></tr><tr><th>comparable with</th><td><code>the probe&#x27;s published value on Intel" in page


def test_portable_mode_moves_mkl_to_the_branch_every_x86_cpu_takes(this_cpu_in_each_mode):
    """'portable' differs from 'pinned' only in MKL's branch (SSE2, which AMD CPUs honour), and that
    reaches MKL in a fresh process: its GEMM computes other bits than the AVX2 branch."""
    portable, pinned = numerics.pinned_environment("portable"), numerics.pinned_environment("pinned")
    assert portable == {**pinned, "MKL_CBWR": "COMPATIBLE"}
    with pytest.raises(ValueError, match="unknown numerics mode 'fast'.*pinned, portable"):
        numerics.pinned_environment("fast")
    on_sse2, on_avx2 = (this_cpu_in_each_mode[mode]["kernel hashes"] for mode in ("portable", "pinned"))
    if numerics.cpu_vendor() in ("intel", "amd"):  # measured on both: on AMD MKL's own AVX2 path is not its SSE2 branch either
        assert on_sse2["fp32 linear (MKL GEMM)"] != on_avx2["fp32 linear (MKL GEMM)"]
    assert on_sse2["int4 linear (AWQ serving)"] == on_avx2["int4 linear (AWQ serving)"]  # not MKL's: the same kernel in both
