"""LoRA (`finetune=lora`) end to end, on a small pretrained directory this module exports from a
short full run: adapters alone train and are checkpointed, kill-and-resume is exact on single and
ddp, ddp matches single, and the merged and adapter exports answer alike.

Runs share: one full run (the base), one LoRA run per backend killed after step KILL_AFTER and
resumed by the same command (the steps recomputed after the resume must equal the ones logged
before the kill, exactly), and one LoRA run of the CPU demo.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from backends.backend_jobs import Job, kill_tree, run_job

from vicuna_exp.cli import main
from vicuna_exp.config import config_hash, lr_in_force
from vicuna_exp.errors import UsageError
from vicuna_exp.finetune import add_adapters, check_adapter_base, linear_layer_names
from vicuna_exp.hydra_app import compose

STEPS, SAVE_EVERY, KILL_AFTER = 10, 5, 6
LORA = ["finetune=lora", "finetune.lora_dropout=0", "finetune.r=4", "optim.lr=1e-3", "optim.warmup_ratio=0"]


# ---- configuration: the lr in force and the hash ------------------------------------------------
@pytest.mark.parametrize("overrides,lr,source", [
    ([], 3e-3, "optim.lr"),
    (["finetune=lora"], 3e-2, "optim.lr_by_method.lora"),  # the demo's LoRA lr for the tiny model
    (["experiment=vicuna-7b"], 2e-5, "optim.lr"),
    (["experiment=vicuna-7b", "finetune=lora"], 2e-4, "finetune.lr (lora default)"),
    (["experiment=vicuna-7b", "finetune=lora", "optim.lr=1e-4"], 1e-4, "optim.lr (command line)"),
    (["experiment=vicuna-7b", "optim.lr=1e-5"], 1e-5, "optim.lr (command line)"),
])
def test_the_lr_in_force_and_where_it_came_from(overrides: list[str], lr: float, source: str) -> None:
    cfg = compose(overrides)
    assert cfg.optim.lr == pytest.approx(lr) and cfg.optim.lr_source == source
    assert lr_in_force(cfg, overrides) == (pytest.approx(lr), source)  # idempotent on a composed config


def test_full_is_hash_neutral_and_lora_is_not() -> None:
    assert config_hash(compose(["finetune=full"])) == config_hash(compose([]))
    assert config_hash(compose(["finetune=lora"])) != config_hash(compose([]))
    lora = compose(["finetune=lora"])
    assert config_hash(compose(["finetune=lora", "finetune.r=8"])) != config_hash(lora)


def test_lora_keys_belong_to_the_lora_schema(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "finetune.r=8", "--cfg", "job"]) == 2  # finetune=full has no rank
    assert "unknown key 'finetune.r'" in capsys.readouterr().err


# ---- the model: what trains ---------------------------------------------------------------------
def _tiny_llama(dtype: torch.dtype = torch.float32, **shape: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(vocab_size=300, hidden_size=shape.get("h", 64), intermediate_size=shape.get("i", 160),
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=shape.get("kvh", 2),
                     max_position_embeddings=256, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(hf).to(dtype)


def test_only_the_adapters_get_gradients_and_optimizer_state() -> None:
    ft = compose(["finetune=lora"]).finetune
    model = add_adapters(_tiny_llama(), ft)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 300, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in with_grad}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # not lm_head
    assert len(opt.state) == len(with_grad)


@pytest.mark.parametrize("switch", ["use_dora", "use_rslora", "train_lm_head", "train_embeddings"])
def test_each_lora_switch_reaches_peft_and_trains_what_it_names(switch: str) -> None:
    """DoRA adds a trained magnitude per output feature; rsLoRA scales by alpha/sqrt(r) instead of
    alpha/r; the embedding switches train those modules in full beside the adapters."""
    ft = compose(["finetune=lora", "finetune.r=4", "finetune.lora_alpha=16", f"finetune.{switch}=true"]).finetune
    model = add_adapters(_tiny_llama(), ft)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    magnitudes = {n for n in trained if "lora_magnitude_vector" in n}
    assert bool(magnitudes) == (switch == "use_dora")
    assert q_proj.scaling["default"] == pytest.approx(16 / 2 if switch == "use_rslora" else 16 / 4)
    full_modules = {n for n in trained if ".lora_" not in n}
    wanted = {"train_lm_head": "lm_head", "train_embeddings": "embed_tokens"}.get(switch)
    assert bool(full_modules) == (wanted is not None) and all(wanted in n for n in full_modules)


def test_target_modules_that_match_nothing_exit_2_listing_the_linear_layers(capsys: pytest.CaptureFixture,
                                                                             tmp_path: Path) -> None:
    assert main(["train", "finetune=lora", "finetune.target_modules=[q_proj,qkv]", "logger=none",
                 f"hydra.run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "finetune.target_modules: qkv" in err
    assert ", ".join(linear_layer_names(_tiny_llama())) in err


# ---- the planner -------------------------------------------------------------------------------
def test_plan_shows_adapter_only_state_and_the_lr_in_force(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "experiment=vicuna-7b", "finetune=lora", "hardware=a100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "finetune lora (r=16): 40M trainable params" in out and "base frozen in bf16" in out
    assert "lr 0.0002 from finetune.lr (lora default)" in out and "gradients (adapters only)" in out


# ---- end to end: a pretrained base, single and ddp, kill and resume, export -------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("finetune")


@pytest.fixture(scope="module")
def pretrained(workdir: Path) -> Path:
    """The base: final/ of a 2-step full run of the tiny model (so the pretrained load is exercised)."""
    job = run_job(workdir / "base", ["logger=none", "trainer.max_steps=2", "trainer.eval_every_steps=null",
                                     "trainer.global_batch_size=4", "trainer.export_shard_mb=1"], cwd=workdir)
    assert job.rc == 0, job.stderr[-3000:]
    return workdir / "base" / "final"


@pytest.fixture(scope="module")
def common(pretrained: Path) -> list[str]:
    return ["model.init=pretrained", f"model.path={pretrained}", *LORA, "logger=none", f"trainer.max_steps={STEPS}",
            "trainer.eval_every_steps=null", f"trainer.save_every_steps={SAVE_EVERY}", "trainer.micro_batch_size=1",
            "trainer.global_batch_size=4", "trainer.precision=fp32", "trainer.export_dtype=fp32", "context=512"]


def all_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def killed_then_resumed(run_dir: Path, args: list[str], cwd: Path) -> tuple[Job, dict[int, float]]:
    """The job SIGKILLed (all its processes) once it logged step KILL_AFTER, then the same command
    again; with the losses the killed attempt logged after its last checkpoint."""
    crashed = run_job(run_dir, args, cwd=cwd, when=lambda step: step >= KILL_AFTER, action=kill_tree)
    assert crashed.stopped_after is not None
    lost = {step: loss for step, loss in all_losses(run_dir) if step > SAVE_EVERY}
    resumed = run_job(run_dir, args, cwd=cwd)
    assert resumed.rc == 0, resumed.stderr[-3000:]
    return resumed, lost


@pytest.fixture(scope="module")
def runs(common: list[str], workdir: Path) -> dict[str, tuple[Job, dict[int, float]]]:
    return {"single": killed_then_resumed(workdir / "single", common, workdir),
            "ddp": killed_then_resumed(workdir / "ddp", [*common, "backend=ddp", "launcher.nproc_per_node=2"],
                                       workdir)}


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", ["single", "ddp"])
def test_kill_and_resume_is_exact_and_checkpoints_hold_the_adapters_alone(backend: str, runs) -> None:
    job, lost = runs[backend]
    assert job.summary["resumed_from_step"] == SAVE_EVERY
    after = dict(all_losses(job.run_dir))
    assert sorted(after) == list(range(1, STEPS + 1)) and lost  # the kill came after a step past the checkpoint
    for step, loss in lost.items():  # logged before the kill, recomputed after the resume: bit for bit
        assert after[step] == loss, (step, after[step], loss)
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(job.run_dir / "checkpoints" / f"step_{STEPS:08d}" / "state")).read_metadata()
    model_keys = [k for k in meta.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    derived = job.summary["derived"]
    assert derived["finetune"] == "lora" and derived["lr"] == 1e-3 and derived["lr_source"] == "optim.lr (command line)"
    assert 0 < derived["trainable_params"] < derived["n_params"] / 10


@pytest.mark.multiprocess
def test_ddp_matches_single(runs) -> None:
    single, ddp = dict(all_losses(runs["single"][0].run_dir)), dict(all_losses(runs["ddp"][0].run_dir))
    assert single[STEPS] < single[1]  # it learns, so the comparison means something
    worst = max(abs(single[k] - ddp[k]) for k in single)
    assert worst < 1e-5, f"ddp drifts from single by {worst}"


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.multiprocess
def test_merged_export_equals_base_plus_adapter(runs, pretrained: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = runs["single"][0].run_dir
    ids = torch.randint(3, 1000, (2, 24))
    merged = AutoModelForCausalLM.from_pretrained(str(run / "final"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(pretrained), dtype=torch.float32)
    before = _logits(base, ids)
    adapted = PeftModel.from_pretrained(base, str(run / "final_adapter"))
    assert (_logits(merged, ids) - _logits(adapted, ids)).abs().max() < 1e-5
    assert (_logits(merged, ids) - before).abs().max() > 1e-3  # the adapter changed something

    # `vicuna-exp export` from the latest checkpoint: the same merged weights, and the same adapter
    assert main(["export", str(run), str(tmp_path / "merged")]) == 0
    assert main(["export", str(run), str(tmp_path / "adapter"), "--adapter"]) == 0
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert (_logits(again, ids) - _logits(merged, ids)).abs().max() < 1e-5
    fresh = AutoModelForCausalLM.from_pretrained(str(pretrained), dtype=torch.float32)
    from_ckpt = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    assert (_logits(from_ckpt, ids) - _logits(merged, ids)).abs().max() < 1e-5


@pytest.mark.multiprocess
def test_eval_generate_answers_with_the_merged_model_and_with_the_adapter(
        runs, pretrained: Path, tmp_path: Path) -> None:
    from vicuna_exp.eval import generate as gen_mod

    run = runs["single"][0].run_dir
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "writing", "turns": ["Say hi."]}) + "\n")
    common = [f"eval.questions={questions}", "eval.max_new_tokens=4", "eval.require_judge=false",
              "eval.default_temperature=0", "eval.temperature.writing=0"]
    assert gen_mod.main(compose([f"eval.run_dir={run}", *common])) == 0
    assert gen_mod.main(compose([f"model.path={pretrained}", f"eval.adapter={run / 'final_adapter'}",
                                 f"eval.out_dir={tmp_path / 'eval'}", *common])) == 0
    merged = json.loads(next((run / "eval" / "q" / "model_answer").glob("*.jsonl")).read_text())
    adapted = json.loads(next((tmp_path / "eval" / "q" / "model_answer").glob("*.jsonl")).read_text())
    assert merged["choices"][0]["turns"] == adapted["choices"][0]["turns"]  # greedy: the same model
    with pytest.raises(UsageError, match=f"adapter of {pretrained}.*model.path={tmp_path}"):
        check_adapter_base(run / "final_adapter", str(tmp_path))


@pytest.mark.multiprocess
def test_a_lora_checkpoint_is_set_aside_by_finetune_full_saying_why(runs, common: list[str],
                                                                    workdir: Path) -> None:
    import shutil

    run_dir = workdir / "switched"
    shutil.copytree(runs["single"][0].run_dir, run_dir)
    (run_dir / "summary.json").unlink()  # not completed, so the job runs and looks at the checkpoints
    full = [a for a in common if not a.startswith(("finetune", "optim.lr"))] + ["trainer.max_steps=1"]
    job = run_job(run_dir, full, cwd=workdir)
    assert job.rc == 0, job.stderr[-3000:]
    assert job.summary.get("resumed_from_step") is None
    log = (run_dir / "hydra_app.log").read_text() + job.stderr
    assert "trained with finetune=lora, this run is finetune=full" in log


# ---- the CPU demo ----------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_lora_on_the_tiny_default_learns_at_the_demo_lr(workdir: Path) -> None:
    """`vicuna-exp train finetune=lora` at the demo's LoRA lr, optim.lr_by_method.lora=3e-2, for 20
    of the demo's 36 steps, with the LM head adapted too. The random-init head is frozen, and with
    adapters on the decoder alone its logits stay near uniform: the loss plateaus at 0.92x of the
    first at every lr from 1e-2 to 3e-1. A rank-16 adapter on the head lifts that bound."""
    targets = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"
    job = run_job(workdir / "demo", ["finetune=lora", f"finetune.target_modules={targets}", "logger=none",
                                     "trainer.max_steps=20", "trainer.eval_every_steps=null",
                                     "trainer.save_final=false"], cwd=workdir)
    assert job.rc == 0, job.stderr[-3000:]
    assert job.summary["derived"]["lr"] == 3e-2
    losses = dict(all_losses(job.run_dir))
    assert sum(losses[k] for k in (18, 19, 20)) / 3 < 0.9 * losses[1], losses
