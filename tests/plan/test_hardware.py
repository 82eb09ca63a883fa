"""Hardware facts from the device: profiles for known GPUs, the driver's memory for unknown ones,
the CPU profile without a GPU, and a warning (or exit 2) when a named profile contradicts the device."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from vicuna_exp import hardware as H
from vicuna_exp.errors import UsageError

H200 = H.DeviceFacts(name="NVIDIA H200", memory_gib=143_771 / 1024, count=8)
A100_80 = H.DeviceFacts(name="NVIDIA A100-SXM4-80GB", memory_gib=81_920 / 1024, count=8)


def hw(name: str, **extra: object):
    values = H.load_profile(name) if name != "auto" else {"name": "auto"}
    return OmegaConf.create({"reference": None, "strict": False, **values, **extra})


@pytest.mark.parametrize(("device", "profile"), [
    (H200, "h200"), (A100_80, "a100-80gb"),
    (H.DeviceFacts("NVIDIA A100-PCIE-40GB", 40.0, 1), "a100-40gb"),
    (H.DeviceFacts("NVIDIA H100 80GB HBM3", 79.6, 8), "h100-80gb"),
])
def test_a_known_gpu_gets_its_profile(device: H.DeviceFacts, profile: str) -> None:
    r = H.resolve(hw("auto"), on_gpu=True, device=device)
    assert r.facts["name"] == profile and r.facts["device"] == "cuda" and not r.warnings
    assert r.facts["gpu_memory_gb"] == pytest.approx(device.memory_gib, abs=0.05)  # what the card has
    assert device.name in r.source


def test_the_h200_profile_has_the_driver_figures() -> None:
    p = H.load_profile("h200")
    assert (p["gpu_memory_gb"], p["bf16_tflops"], p["gpus_per_node"]) == (140.4, 989, 8)


def test_an_unknown_gpu_takes_its_memory_from_the_driver_and_peaks_from_the_chip_table() -> None:
    l4 = H.resolve(hw("auto"), on_gpu=True, device=H.DeviceFacts("NVIDIA L4", 22.5, 1))
    assert (l4.facts["gpu_memory_gb"], l4.facts["bf16_tflops"], l4.facts["device"]) == (22.5, 121.0, "cuda")
    assert not l4.warnings
    odd = H.resolve(hw("auto"), on_gpu=True, device=H.DeviceFacts("NVIDIA Quadro X9", 47.5, 2))
    assert odd.facts["gpu_memory_gb"] == 47.5 and odd.facts["bf16_tflops"] is None
    assert "peak FLOP/s unknown" in odd.warnings[0] and "hardware.bf16_tflops" in odd.warnings[0]


def test_no_gpu_means_the_cpu_profile_or_the_presets_reference_when_planning() -> None:
    assert H.resolve(hw("auto"), on_gpu=False).facts["name"] == "cpu"
    planned = H.resolve(hw("auto", reference="a100-80gb"), on_gpu=None, device=None)
    assert planned.facts["name"] == "a100-80gb" and "reference profile" in planned.source
    assert H.resolve(hw("auto", reference="a100-80gb"), on_gpu=False).facts["name"] == "cpu"  # training on CPU


def test_a_contradicting_profile_warns_and_the_device_wins_unless_strict() -> None:
    r = H.resolve(hw("a100-40gb"), on_gpu=True, device=A100_80)
    assert r.facts["name"] == "a100-80gb" and "the device wins" in r.warnings[-1]
    with pytest.raises(UsageError, match=r"hardware=a100-40gb: the profile says 40 GiB .* 80.0 GiB"):
        H.resolve(hw("a100-40gb", strict=True), on_gpu=True, device=A100_80)
    agree = H.resolve(hw("a100-80gb"), on_gpu=True, device=A100_80)
    assert agree.facts["name"] == "a100-80gb" and not agree.warnings
    cpu = H.resolve(hw("a100-80gb"), on_gpu=False)
    assert cpu.facts["name"] == "cpu" and "trains on the CPU" in cpu.warnings[0]


def test_planning_for_other_hardware_on_a_machine_without_gpus_uses_the_profile_named() -> None:
    r = H.resolve(hw("h100-80gb"), on_gpu=None, device=None)
    assert r.facts["name"] == "h100-80gb" and r.source == "hardware=h100-80gb"


def test_the_probe_creates_no_cuda_context(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """nvidia-smi's answer, restricted to CUDA_VISIBLE_DEVICES; no torch.cuda call is made."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '0, NVIDIA H200, 143771'\necho '1, NVIDIA H200, 143771'\n"
                    "echo '2, NVIDIA H200, 143771'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    H.probe_gpus.cache_clear()
    try:
        assert H.probe_gpus() == H.DeviceFacts("NVIDIA H200", 143_771 / 1024, 2)
    finally:
        H.probe_gpus.cache_clear()


def test_auto_is_the_default_and_the_presets_plan_on_their_reference(capsys: pytest.CaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from vicuna_exp.cli import main
    from vicuna_exp.hydra_app import compose

    monkeypatch.setattr(H, "probe_gpus", lambda: None)  # this machine: no GPU
    assert compose([]).hardware.name == "auto" and compose(["experiment=vicuna-7b"]).hardware.name == "auto"
    assert main(["plan", "experiment=vicuna-7b", "hardware=h200", "launcher.nproc_per_node=8"]) == 0
    out = capsys.readouterr().out
    assert "on 8 x h200" in out and "hardware: hardware=h200" in out and "Verdict: fits" in out
    assert main(["plan", "experiment=vicuna-13b"]) == 0
    assert "a100-80gb, the preset's reference profile (no GPU here)" in capsys.readouterr().out
    assert main(["plan"]) == 0
    assert "hardware: hardware=cpu (no GPU here)" in capsys.readouterr().out


def test_planning_on_a_gpu_machine_uses_the_device(capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from vicuna_exp.cli import main

    monkeypatch.setattr(H, "probe_gpus", lambda: H200)
    assert main(["plan", "experiment=vicuna-7b"]) == 0
    out = capsys.readouterr().out
    assert "on 8 x h200" in out and "from the device found, NVIDIA H200 (140.4 GiB)" in out


def test_a_gpu_rank_without_nvidia_smi_asks_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Some containers have no nvidia-smi: a rank training on a GPU still gets its GPU's profile."""
    monkeypatch.setattr(H, "probe_gpus", lambda: None)
    monkeypatch.setattr(H, "device_from_torch", lambda: H200)
    assert H.resolve(hw("auto"), on_gpu=True).facts["name"] == "h200"
    assert H.resolve(hw("auto"), on_gpu=None).facts["name"] == "cpu"  # the planner never asks torch


# ---- attention: what `auto` picks, and what cannot run here ----------------------------------------
def facts(on_cuda: bool = True, half: bool = True, flash_attn: bool = False, torch_varlen: bool = True,
          torch_flex: bool = True) -> H.AttentionFacts:
    return H.AttentionFacts(on_cuda=on_cuda, half=half, flash_attn=flash_attn, torch_varlen=torch_varlen,
                            torch_flex=torch_flex)


@pytest.mark.parametrize(("given", "picked"), [
    (facts(flash_attn=True), "flash_attention_2"),
    (facts(), "varlen"),
    (facts(torch_varlen=False), "flex_attention"),
    (facts(torch_varlen=False, torch_flex=False), "sdpa"),
    (facts(half=False, flash_attn=True), "flex_attention"),  # fp32 on CUDA: the varlen kernels are half only
    (facts(half=False, torch_flex=False), "sdpa"),
    (facts(on_cuda=False, flash_attn=True), "sdpa"),
    (facts(on_cuda=False, half=False), "sdpa"),
])
def test_auto_picks_by_device_packages_and_precision(given: H.AttentionFacts, picked: str) -> None:
    choice = H.resolve_attention("auto", given)
    assert choice.impl == picked and choice.reason.startswith("auto: ")


@pytest.mark.parametrize(("requested", "given", "why", "auto"), [
    ("varlen", facts(on_cuda=False, half=False), "CUDA-only", "sdpa"),
    ("varlen", facts(half=False), "bf16/fp16 only, and this run is fp32", "flex_attention"),
    ("varlen", facts(torch_varlen=False), "no torch.nn.attention.varlen", "flex_attention"),
    ("flex_attention", facts(torch_flex=False, torch_varlen=False), "no torch.nn.attention.flex_attention", "sdpa"),
    ("flex_attention", facts(on_cuda=False), "no backward on the CPU", "sdpa"),
    ("flash_attention_2", facts(), "the flash-attn package is not installed", "varlen"),
    ("flash_attention_2", facts(on_cuda=False, flash_attn=True), "no CUDA device", "sdpa"),
])
def test_a_kernel_that_cannot_run_here_is_refused_with_what_auto_would_pick(requested: str, given: H.AttentionFacts,
                                                                            why: str, auto: str) -> None:
    with pytest.raises(UsageError) as e:
        H.resolve_attention(requested, given)
    assert f"model.attn_implementation={requested} cannot run here" in str(e.value)
    assert why in str(e.value) and f"auto would pick {auto} (" in str(e.value)


@pytest.mark.parametrize(("requested", "given"), [
    ("varlen", facts()), ("flex_attention", facts(half=False)), ("flash_attention_2", facts(flash_attn=True)),
    ("sdpa", facts(on_cuda=False)), ("eager", facts(on_cuda=False, torch_flex=False, torch_varlen=False)),
])
def test_a_kernel_that_can_run_is_kept_as_named(requested: str, given: H.AttentionFacts) -> None:
    assert H.resolve_attention(requested, given) == H.AttentionChoice(requested, "named by model.attn_implementation")


def test_the_probe_reads_precision_and_this_torch() -> None:
    probed = H.probe_attention(on_cuda=True, precision="bf16_mixed")
    assert probed.half and probed.torch_varlen and probed.torch_flex  # torch 2.13 ships both
    assert not H.probe_attention(on_cuda=True, precision="fp32").half


def test_the_job_decides_from_the_driver_before_any_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(H, "probe_gpus", lambda: H.DeviceFacts("NVIDIA H200", 140.0, 8, 9.0))
    monkeypatch.setattr(H, "probe_attention", lambda **k: facts(on_cuda=k["on_cuda"], half=k["precision"] != "fp32"))
    cfg = OmegaConf.create({"trainer": {"device": "auto", "precision": "auto"},
                            "model": {"attn_implementation": "auto"}})
    assert H.attention_before_launch(cfg).impl == "varlen"  # auto precision on a bf16 GPU: bf16_mixed
    cfg.trainer.precision = "fp32"
    cfg.model.attn_implementation = "varlen"
    with pytest.raises(UsageError, match="this run is fp32; auto would pick flex_attention"):
        H.attention_before_launch(cfg)
    cfg.trainer.device = "cpu"
    with pytest.raises(UsageError, match="CUDA-only; auto would pick sdpa"):
        H.attention_before_launch(cfg)
