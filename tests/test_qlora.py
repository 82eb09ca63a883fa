"""QLoRA (`finetune=qlora`) on the CPU: a small pretrained directory quantised to 4-bit NF4 as it
loads, LoRA adapters trained over it, kill-and-resume exact on single, the adapter loadable with
peft, the merge equal to the dequantised base plus the adapter, the planner's 4-bit bytes equal to
the tensors held, and the bad inputs refused with exit 2 before anything starts.

Two runs are shared: a qlora run on single SIGKILLed after step KILL_AFTER and resumed by the same
command, and the same run on ddp with 2 processes. They compute in fp32
(`finetune.bnb_4bit_compute_dtype=fp32`) so that ddp can be held to single within 1e-5; the bf16
default is what the in-process tests build.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from backends.backend_jobs import kill_tree, run_job, save_tiny_llama, train_losses

from vicuna_exp.backends.base import storage_bytes
from vicuna_exp.cli import main
from vicuna_exp.config import config_hash
from vicuna_exp.hydra_app import compose

pytest.importorskip("bitsandbytes")

STEPS, SAVE_EVERY, KILL_AFTER = 8, 4, 5
# The LM head adapted too: over a random base with a frozen random head, adapters on the decoder alone
# barely move the loss (see tests/test_finetune.py's demo test). The head stays a plain linear.
TARGETS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"
QLORA = ["finetune=qlora", "finetune.lora_dropout=0", "finetune.r=4", f"finetune.target_modules={TARGETS}",
         "finetune.bnb_4bit_compute_dtype=fp32", "optim.lr=1e-2", "optim.warmup_ratio=0"]


# ---- configuration -------------------------------------------------------------------------------
def test_qlora_defaults_are_nf4_double_quantised_bf16_over_loras_knobs() -> None:
    qlora, lora = compose(["finetune=qlora"]).finetune, compose(["finetune=lora"]).finetune
    assert (qlora.bnb_4bit_quant_type, qlora.bnb_4bit_use_double_quant, qlora.bnb_4bit_compute_dtype) == \
        ("nf4", True, "bf16")
    assert {k: qlora[k] for k in lora if k != "name"} == {k: lora[k] for k in lora if k != "name"}
    assert config_hash(compose(["finetune=qlora"])) not in (config_hash(compose(["finetune=lora"])),
                                                           config_hash(compose([])))


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed_zero3", "deepspeed_zero2"])
def test_a_sharding_backend_refuses_qlora_naming_the_supported_ones(backend: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "finetune=qlora", f"backend={backend}", "launcher.nproc_per_node=2", "logger=none",
                 f"hydra.run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "finetune=qlora" in err and "backend=single or backend=ddp" in err
    assert not (tmp_path / "metrics.jsonl").exists()  # no worker started


def test_qlora_without_bitsandbytes_says_what_to_install(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: find_spec and import fail
    assert main(["train", "finetune=qlora", "logger=none", f"hydra.run.dir={tmp_path}"]) == 2
    assert "pip install 'vicuna-exp[qlora]'" in capsys.readouterr().err


@pytest.mark.parametrize("override,key", [("finetune.bnb_4bit_quant_type=int4", "finetune.bnb_4bit_quant_type"),
                                          ("finetune.bnb_4bit_compute_dtype=int8", "finetune.bnb_4bit_compute_dtype"),
                                          ("finetune.use_dora=true", "finetune.use_dora")])
def test_an_unsupported_quantisation_setting_exits_2_naming_the_key(override: str, key: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "finetune=qlora", override, "logger=none", f"hydra.run.dir={tmp_path}"]) == 2
    assert key in capsys.readouterr().err


# ---- the base in 4 bits, and the planner's count of it ------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qlora")


@pytest.fixture(scope="module")
def pretrained(workdir: Path) -> Path:
    return save_tiny_llama(workdir / "base", hidden=64, intermediate=192, layers=2, kv_heads=2, shard_size="100KB")


def _spec(overrides: list[str]):
    from vicuna_exp.data.tokenizer import load_tokenizer, token_ids
    from vicuna_exp.model import make_model_spec

    cfg = compose(overrides)
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    return cfg, make_model_spec(cfg.model, vocab_size=len(tok), device=torch.device("cpu"),
                                precision=str(cfg.trainer.precision), finetune=cfg.finetune,
                                token_ids=token_ids(tok), seed=int(cfg.trainer.seed))


def _held_bytes(model: torch.nn.Module) -> int:
    from vicuna_exp.quantize import quant_state_tensors

    params = list(model.parameters())
    return storage_bytes([*params, *(t for p in params for t in quant_state_tensors(p))])


@pytest.mark.parametrize("double", [True, False])
def test_planner_counts_the_4bit_base_and_its_constants_as_held(pretrained: Path, double: bool) -> None:
    from vicuna_exp.plan.estimate import predicted_state_bytes

    overrides = ["finetune=qlora", f"finetune.bnb_4bit_use_double_quant={str(double).lower()}",
                 "model.init=pretrained", f"model.path={pretrained}", "trainer.precision=bf16_mixed",
                 "hardware=cpu"]
    cfg, spec = _spec(overrides)
    model = spec.build("cpu")
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q).__name__ == "Linear4bit" and q.weight.quant_state.nested == double
    from vicuna_exp.quantize import cpu_bf16_matmul

    assert q.compute_dtype == (torch.bfloat16 if cpu_bf16_matmul() else torch.float32)  # the default, bf16
    assert model.base_model.model.lm_head.weight.dtype == torch.bfloat16  # kept in the storage dtype
    held, predicted = _held_bytes(model), predicted_state_bytes(cfg)["params"]
    assert abs(predicted - held) / held < 0.05, (predicted, held)
    lora = compose([*[o for o in overrides if "bnb" not in o and "finetune" not in o], "finetune=lora"])
    assert predicted < predicted_state_bytes(lora)["params"]  # (the tiny model is mostly its bf16 embeddings)


@pytest.mark.parametrize("method,fits", [("qlora", True), ("full", False)])
def test_vicuna_13b_fits_one_40gb_gpu_with_qlora_and_not_in_full(method: str, fits: bool,
                                                                  capsys: pytest.CaptureFixture) -> None:
    args = ["plan", "experiment=vicuna-13b", f"finetune={method}", "backend=single", "launcher.nproc_per_node=1",
            "hardware=a100-40gb"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert ("Verdict: fits" if fits else "Verdict: does not fit") in out
    if fits:
        assert "base frozen in 4-bit NF4" in out


def test_a_pretrained_base_is_quantised_as_it_is_read(pretrained: Path) -> None:
    """Every linear weight a decoder layer holds is the 4-bit form of the checkpoint's tensor."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    from safetensors import safe_open

    _, spec = _spec(["finetune=qlora", "model.init=pretrained", f"model.path={pretrained}"])
    model = spec.build("cpu")
    index = json.loads((pretrained / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    with safe_open(str(pretrained / index[name]), "pt") as f:
        want = f.get_tensor(name).float()
    packed, state = quantize_4bit(want, blocksize=64, compress_statistics=True, quant_type="nf4")
    held = model.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight
    assert torch.equal(dequantize_4bit(held.data, held.quant_state), dequantize_4bit(packed, state))
    assert not any(p.device.type == "meta" for p in model.parameters())


# ---- end to end on single: kill and resume, the adapter, the merge -----------------------------------------
@pytest.fixture(scope="module")
def args(pretrained: Path) -> list[str]:
    return ["model.init=pretrained", f"model.path={pretrained}", *QLORA, "logger=none", f"trainer.max_steps={STEPS}",
            "trainer.eval_every_steps=null", f"trainer.save_every_steps={SAVE_EVERY}", "trainer.micro_batch_size=2",
            "trainer.global_batch_size=4", "trainer.precision=fp32", "trainer.export_dtype=fp32", "context=512"]


@pytest.fixture(scope="module")
def run(args: list[str], workdir: Path):
    run_dir = workdir / "single"
    crashed = run_job(run_dir, args, cwd=workdir, when=lambda step: step >= KILL_AFTER, action=kill_tree)
    assert crashed.stopped_after is not None
    lost = {step: loss for step, loss in train_losses(run_dir).items() if step > SAVE_EVERY}
    resumed = run_job(run_dir, args, cwd=workdir)
    assert resumed.rc == 0, resumed.stderr[-3000:]
    return resumed, lost


@pytest.mark.multiprocess
def test_qlora_loss_falls_and_kill_and_resume_is_exact(run) -> None:
    job, lost = run
    assert job.summary["resumed_from_step"] == SAVE_EVERY and job.summary["derived"]["finetune"] == "qlora"
    after = job.losses()
    assert sorted(after) == list(range(1, STEPS + 1)) and lost
    for step, loss in lost.items():  # logged before the kill, recomputed after the resume: bit for bit
        assert after[step] == loss, (step, after[step], loss)
    assert after[STEPS] < 0.9 * after[1], after
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(job.run_dir / "checkpoints" / f"step_{STEPS:08d}" / "state")).read_metadata()
    model_keys = [k for k in meta.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)  # never the 4-bit base
    assert "Failed to load CPU gemm_4bit_forward" not in job.stderr


@pytest.mark.multiprocess
def test_ddp_matches_single(run, args: list[str], workdir: Path) -> None:
    ddp = run_job(workdir / "ddp", [*args, "backend=ddp", "launcher.nproc_per_node=2"], cwd=workdir)
    assert ddp.rc == 0, ddp.stderr[-3000:]
    single, both = run[0].losses(), ddp.losses()
    worst = max(abs(single[k] - both[k]) for k in single)
    assert sorted(both) == sorted(single) and worst < 1e-5, f"ddp drifts from single by {worst}"


@pytest.mark.multiprocess
def test_the_adapter_loads_with_peft_and_final_is_the_dequantised_base_merged(run, pretrained: Path,
                                                                             tmp_path: Path) -> None:
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = run[0].run_dir
    base = AutoModelForCausalLM.from_pretrained(str(pretrained), dtype=torch.float32)
    name = "model.layers.0.self_attn.v_proj.weight"
    w = dict(base.named_parameters())[name].detach().clone()
    adapted = PeftModel.from_pretrained(base, str(run_dir / "final_adapter"))
    layer = adapted.base_model.model.model.layers[0].self_attn.v_proj
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    assert delta.abs().max() > 0  # the adapter trained
    packed, state = quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    want = dequantize_4bit(packed, state) + delta
    merged = AutoModelForCausalLM.from_pretrained(str(run_dir / "final"), dtype=torch.float32)
    got = dict(merged.named_parameters())[name]
    assert (got - want).abs().max() < 1e-6
    assert (got - (w + delta)).abs().max() > 1e-4  # lossy against the unquantised base, as documented

    # `vicuna-exp export` from the latest checkpoint rebuilds the 4-bit base and merges alike
    assert main(["export", str(run_dir), str(tmp_path / "merged")]) == 0
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert (dict(again.named_parameters())[name] - got).abs().max() < 1e-6
