"""LoRA (`finetune=lora`) on the sharded backends, FSDP2 and DeepSpeed ZeRO-3, with 2 processes (gloo, CPU).

Runs share: one `single` LoRA run (the reference), and per sharded backend one LoRA run killed
with SIGKILL after step KILL_AFTER and resumed by the same command; the resumed run is also the
one compared with `single` over 10 fp32 steps and the one whose export is checked. One torchrun
launch of `lora_shard_worker.py` checks the set-up itself: adapters at step 0, the share of the
frozen base each rank holds, and the planner's state bytes against the tensors held.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lora_shard_worker as worker
import pytest
import torch
from backend_jobs import ENV, TIMEOUT_S, Job, kill_tree, run_job, save_tiny_llama, train_losses

from vicuna_exp.backends.shard_facts import parse_facts
from vicuna_exp.cli import main

pytestmark = pytest.mark.multiprocess

SHARDED = ["fsdp", "deepspeed_zero3"]
STEPS, SAVE_EVERY, KILL_AFTER = 10, 5, 6
LORA = ["finetune=lora", "finetune.lora_dropout=0", "finetune.r=4", "optim.lr=1e-3", "optim.warmup_ratio=0"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora_sharded")


@pytest.fixture(scope="module")
def pretrained(workdir: Path) -> Path:
    """A tiny LLaMA in Hugging Face format, in several safetensors files with an index."""
    return save_tiny_llama(workdir / "tiny-llama", hidden=64, intermediate=160, layers=2, kv_heads=2,
                           shard_size="200KB")


@pytest.fixture(scope="module")
def common(pretrained: Path) -> list[str]:
    return ["model.init=pretrained", f"model.path={pretrained}", *LORA, "logger=none", f"trainer.max_steps={STEPS}",
            "trainer.eval_every_steps=null", f"trainer.save_every_steps={SAVE_EVERY}", "trainer.micro_batch_size=1",
            "trainer.global_batch_size=4", "trainer.precision=fp32", "trainer.export_dtype=fp32",
            "trainer.export_shard_mb=1", "context=512"]


@pytest.fixture(scope="module")
def single(common: list[str], workdir: Path) -> Job:
    job = run_job(workdir / "single", common, cwd=workdir)
    assert job.rc == 0, job.stderr[-3000:]
    return job


@pytest.fixture(scope="module")
def runs(common: list[str], workdir: Path) -> dict[str, tuple[Job, dict[int, float]]]:
    """Per backend: the job SIGKILLed (all its processes) once it logged step KILL_AFTER, then the
    same command again; with the losses the killed attempt logged after its last checkpoint."""
    out = {}
    for backend in SHARDED:
        run_dir, args = workdir / backend, [*common, f"backend={backend}", "launcher.nproc_per_node=2"]
        crashed = run_job(run_dir, args, cwd=workdir, when=lambda step: step >= KILL_AFTER, action=kill_tree)
        assert crashed.stopped_after is not None, crashed.stderr[-3000:]
        lost = {step: loss for step, loss in train_losses(run_dir).items() if step > SAVE_EVERY}
        resumed = run_job(run_dir, args, cwd=workdir)
        assert resumed.rc == 0, resumed.stderr[-3000:]
        out[backend] = (resumed, lost)
    return out


@pytest.fixture(scope="module")
def setup_facts(pretrained: Path, workdir: Path) -> dict[int, dict]:
    """rank -> backend -> what lora_shard_worker.py found (one 2-process launch for both backends)."""
    out = workdir / "setup"
    launch = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(Path(worker.__file__)), str(out), str(pretrained), *SHARDED],
                            env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert launch.returncode == 0, launch.stderr[-3000:]
    return {r: json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)}


# ---- set-up: the adapters at step 0, the base sharded, the planner ----------------------------------
@pytest.mark.parametrize("backend", SHARDED)
def test_adapters_start_as_an_unsharded_run_and_the_base_stays_sharded(backend: str, setup_facts: dict,
                                                                       pretrained: Path) -> None:
    from vicuna_exp.hydra_app import compose
    from vicuna_exp.model import make_model_spec

    cfg = compose(worker.overrides("single", str(pretrained), 1))
    spec = make_model_spec(cfg.model, vocab_size=1, device=torch.device("cpu"), precision="fp32",
                           finetune=cfg.finetune, seed=int(cfg.trainer.seed))
    ref = {n: p.detach() for n, p in spec.build("cpu").named_parameters() if p.requires_grad}
    for rank in (0, 1):
        got = setup_facts[rank][backend]
        assert set(got["adapters"]) == set(ref)
        for name, value in got["adapters"].items():
            assert torch.equal(torch.tensor(value), ref[name]), (rank, name)
        share = got["frozen_local"] / got["frozen_total"]
        assert 0.4 < share < 0.6, (rank, share)  # about half of the frozen base on each rank
    assert any(v.abs().sum() > 0 for n, v in ref.items() if ".lora_A." in n)  # A is drawn, B starts at zero


@pytest.mark.parametrize("backend", SHARDED)
def test_planner_state_bytes_match_the_tensors_each_rank_holds(backend: str, setup_facts: dict) -> None:
    for rank in (0, 1):
        facts = setup_facts[rank][backend]
        for key, held in facts["held"].items():
            assert facts["predicted"][key] == pytest.approx(held, rel=0.05), (rank, key)


# ---- training: kill and resume, parity, checkpoints ------------------------------------------------
@pytest.mark.parametrize("backend", SHARDED)
def test_kill_and_resume_is_exact_and_checkpoints_hold_the_adapters_alone(backend: str, runs) -> None:
    job, lost = runs[backend]
    assert job.summary["resumed_from_step"] == SAVE_EVERY
    after = job.losses()
    assert sorted(after) == list(range(1, STEPS + 1)) and lost  # the kill came after a step past the checkpoint
    for step, loss in lost.items():  # logged before the kill, recomputed after the resume: bit for bit
        assert after[step] == loss, (step, after[step], loss)
    ckpt = job.run_dir / "checkpoints" / f"step_{STEPS:08d}"
    if backend == "fsdp":
        import torch.distributed.checkpoint as dcp

        keys = [k for k in dcp.FileSystemReader(str(ckpt / "state")).read_metadata().state_dict_metadata
                if k.startswith("model.")]
    else:
        states = [torch.load(f, map_location="cpu", weights_only=False)
                  for f in sorted((ckpt / "deepspeed").glob("*_model_states.pt"))]
        keys = [k for s in states for k in s["module"]] + [k for s in states for p in s["param_shapes"] for k in p]
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), keys[:5]


@pytest.mark.parametrize("backend", SHARDED)
def test_matches_single_lora_over_10_fp32_steps(backend: str, runs, single: Job) -> None:
    mine, ref = runs[backend][0].losses(), single.losses()
    assert sorted(mine) == sorted(ref) == list(range(1, STEPS + 1))
    assert ref[STEPS] < ref[1]  # it learns, so the comparison means something
    worst = max(abs(mine[k] - ref[k]) for k in ref)
    assert worst < 1e-5, f"{backend} LoRA drifts from single LoRA by {worst}"


# ---- export -----------------------------------------------------------------------------------------
def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("backend", SHARDED)
def test_export_equals_a_single_process_export_of_the_same_checkpoint(backend: str, runs, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job = runs[backend][0]
    f = {x["rank"]: x for x in parse_facts(job.stderr)}[0]
    assert 0 < f["export_peak_bytes"] < f["export_bytes"]  # written as gathered, never the whole model at once
    assert main(["export", str(job.run_dir), str(tmp_path / "merged")]) == 0
    assert main(["export", str(job.run_dir), str(tmp_path / "adapter"), "--adapter"]) == 0
    for sharded, one in ((job.run_dir / "final", tmp_path / "merged"),
                         (job.run_dir / "final_adapter", tmp_path / "adapter")):
        a, b = _tensors(sharded), _tensors(one)
        assert set(a) == set(b) and a
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < 1e-6, (sharded.name, worst)
    merged = AutoModelForCausalLM.from_pretrained(str(job.run_dir / "final"), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(job.run_dir.parent / "tiny-llama"), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(job.run_dir / "final_adapter")).eval()
    ids = torch.randint(3, 500, (2, 24))
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - adapted(input_ids=ids).logits).abs().max() < 1e-5


# ---- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_dora_under_sharding_exits_2_naming_the_keys(backend: str, capsys: pytest.CaptureFixture,
                                                     tmp_path: Path) -> None:
    assert main(["train", "finetune=lora", "finetune.use_dora=true", f"backend={backend}", "logger=none",
                 f"hydra.run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "finetune.use_dora=true" in err and "backend.name=" in err
    assert not (tmp_path / "launch.log").exists()  # refused before any worker started


# ---- units: peft's initialisation, peft's names ------------------------------------------------------
def _tiny_peft(seed: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    from vicuna_exp.finetune import add_adapters
    from vicuna_exp.hydra_app import compose

    hf = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    base = LlamaForCausalLM(hf)
    return base, add_adapters(base, compose(["finetune=lora", "finetune.r=4"]).finetune, seed)


def test_initial_adapters_are_what_peft_draws_from_the_same_generator_state() -> None:
    """A from kaiming-uniform (a=sqrt(5)), B zero: peft's own `reset_lora_parameters`, layer by layer,
    replayed on the global generator seeded as ours, gives the same tensors."""
    from peft.tuners.lora import LoraLayer

    _, model = _tiny_peft(seed=3)
    ours = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.manual_seed(3)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.reset_lora_parameters("default", True)
    assert all(torch.equal(p, ours[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_the_sharded_loader_reads_a_peft_model_under_the_base_names(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from vicuna_exp.errors import UsageError
    from vicuna_exp.finetune import initial_adapters
    from vicuna_exp.weights import load_full_tensors

    base, model = _tiny_peft()
    sd = {k: v.clone() for k, v in base.state_dict().items() if ".lora_" not in k}
    plain = {k.replace(".base_layer", "").removeprefix("base_model.model."): v for k, v in sd.items()}
    save_file(plain, str(tmp_path / "model.safetensors"))
    fresh = _tiny_peft()[1]
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_full_tensors(fresh, tmp_path, initial_adapters(fresh, 3))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    del plain["model.layers.1.self_attn.q_proj.weight"]
    save_file(plain, str(tmp_path / "model.safetensors"))
    with pytest.raises(UsageError, match=r"lacks model\.layers\.1\.self_attn\.q_proj\.weight "):
        load_full_tensors(fresh, tmp_path, initial_adapters(fresh, 3))
