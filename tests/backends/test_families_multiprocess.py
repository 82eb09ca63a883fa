"""Llama-3, Mistral and Qwen2 through the one family-agnostic path, for real: each tiny family
trains under `single` (in-process), then under FSDP2 and DeepSpeed ZeRO-3 with 2 processes
(torchrun, gloo, CPU), and must match `single` within 1e-5 in fp32. The ZeRO-3 runs train with
gradient checkpointing on, so recomputation is covered too; every run packs rows (position ids
restart per example). tiny-mistral's FSDP2 run is the one killed and resumed: the steps it
recomputes after resuming must equal, exactly, those it logged before the kill.

Budget: 3 in-process and 7 two-process runs of 5 steps at context 128 (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from backend_jobs import Job, run_job, train_losses, wait_gone, workers_of

from vicuna_exp.cli import main

pytestmark = pytest.mark.multiprocess

FAMILIES = {"tiny-llama3": "LlamaForCausalLM", "tiny-mistral": "MistralForCausalLM", "tiny-qwen2": "Qwen2ForCausalLM"}
BACKENDS = ["fsdp", "deepspeed_zero3"]
STEPS, SAVE_EVERY, KILL_AFTER = 5, 2, 3
RESUMED = "tiny-mistral"  # the non-LLaMA family whose FSDP2 run is killed and resumed
COMMON = ["logger=none", f"trainer.max_steps={STEPS}", "trainer.eval_every_steps=null", "trainer.eval_max_rows=2",
          "trainer.micro_batch_size=1", "trainer.global_batch_size=4", "trainer.precision=fp32",
          "trainer.export_dtype=fp32", "context.length=128"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def single(workdir: Path) -> dict[str, Path]:
    out = {}
    for family in FAMILIES:
        run_dir = workdir / f"{family}-single"
        assert main(["train", f"model={family}", *COMMON, f"hydra.run.dir={run_dir}"]) == 0
        out[family] = run_dir
    return out


def _args(family: str, backend: str) -> list[str]:
    extra = ["model.gradient_checkpointing=true"] if backend == "deepspeed_zero3" else []
    save = [f"trainer.save_every_steps={SAVE_EVERY}"] if (family, backend) == (RESUMED, "fsdp") else []
    return [f"model={family}", *COMMON, *extra, *save, f"backend={backend}", "launcher.nproc_per_node=2"]


@pytest.fixture(scope="module")
def crashed(workdir: Path) -> tuple[Job, dict[int, float]]:
    """tiny-mistral under FSDP2, rank 1 SIGKILLed after step KILL_AFTER; the losses it logged."""
    def kill_rank1(proc: object) -> None:
        workers_of(proc.pid)[1].kill()  # type: ignore[attr-defined]

    job = run_job(workdir / f"{RESUMED}-fsdp", _args(RESUMED, "fsdp"), cwd=workdir / "cwd",
                  when=lambda step: step >= KILL_AFTER, action=kill_rank1)
    assert job.stopped_after is not None, job.stderr[-3000:]
    assert not wait_gone(job.pids), "processes outlived the job"
    return job, train_losses(job.run_dir)


@pytest.fixture(scope="module")
def runs(workdir: Path, crashed: tuple[Job, dict[int, float]]) -> dict[tuple[str, str], Job]:
    """One 2-process run per family and backend; tiny-mistral's FSDP2 one is the crashed run, resumed."""
    from vicuna_exp.backends.build_ops import use_extensions_dir

    use_extensions_dir()
    out = {}
    for family in FAMILIES:
        for backend in BACKENDS:
            job = run_job(workdir / f"{family}-{backend}", _args(family, backend), cwd=workdir / "cwd")
            assert job.rc == 0, job.stderr[-3000:]
            out[family, backend] = job
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_under_single(family: str, single: dict[str, Path]) -> None:
    summary = json.loads((single[family] / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    losses = train_losses(single[family])
    assert losses[STEPS] < losses[1]  # it learns, so the comparisons below mean something
    config = json.loads((single[family] / "final" / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[family]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_match_single(family: str, backend: str, runs: dict[tuple[str, str], Job],
                                    single: dict[str, Path]) -> None:
    job = runs[family, backend]
    assert job.summary["status"] == "completed" and job.summary["derived"]["world_size"] == 2
    mine, ref = job.losses(), train_losses(single[family])
    assert sorted(mine) == list(range(1, STEPS + 1))
    worst = max(abs(mine[k] - ref[k]) for k in ref)
    assert worst < 1e-5, f"{family} under {backend} drifts from single by {worst}"


def test_kill_and_resume_is_exact_for_a_non_llama_family(crashed: tuple[Job, dict[int, float]],
                                                         runs: dict[tuple[str, str], Job]) -> None:
    job, before = crashed
    resumed = runs[RESUMED, "fsdp"]
    start = resumed.summary["resumed_from_step"]
    assert start == SAVE_EVERY and job.rc == 1
    redone = [s for s in before if s > start]
    assert redone, "the kill came before any step after the checkpoint"
    after = resumed.losses()
    for step in redone:
        assert after[step] == before[step], (step, after[step], before[step])


def _logits(model_dir: Path) -> tuple[torch.Tensor, object]:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(model_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.arange(3, 67).reshape(2, 32) * 37 % model.config.vocab_size
    with torch.no_grad():
        return model(input_ids=ids).logits, model


@pytest.mark.parametrize("family", FAMILIES)
def test_exports_load_and_give_the_trained_logits(family: str, runs: dict[tuple[str, str], Job],
                                                   single: dict[str, Path]) -> None:
    """Each export loads as its family's class with every weight, a tied lm_head tied again, and the
    sharded exports (gathered from FSDP2 and ZeRO-3 shards) give the logits of the single run's."""
    ref, model = _logits(single[family] / "final")
    assert type(model).__name__ == FAMILIES[family]
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    for backend in BACKENDS:
        got, _ = _logits(runs[family, backend].run_dir / "final")
        assert (got - ref).abs().max().item() < 1e-4, backend
