"""The planner's arithmetic against cases that arithmetic settles, and against DeepSpeed's estimator."""

from __future__ import annotations

import json
import re

import pytest
from plan_helpers import make_cfg

from vicuna_exp.errors import UsageError
from vicuna_exp.hydra_app import check_composes
from vicuna_exp.plan import check_fits, flops_per_token, make_plan, mfu, predicted_state_bytes, render, table
from vicuna_exp.plan.estimate import GIB, setup_from_config
from vicuna_exp.plan.facts import model_facts


def test_llama_parameter_counts_match_published_sizes():
    assert model_facts(make_cfg("llama-7b").model).total_params == 6_738_415_616
    assert model_facts(make_cfg("llama-13b").model).total_params == 13_015_864_320


def test_adamw_full_finetuning_is_16_bytes_per_param_unsharded():
    cfg = make_cfg("llama-7b", trainer__precision="bf16_mixed", trainer__global_batch_size=128)
    state = predicted_state_bytes(cfg)
    n = model_facts(cfg.model).total_params
    assert sum(state.values()) == pytest.approx(16 * n)
    plan = make_plan(cfg)
    assert not plan.memory.fits  # 108 GB of state alone: no 80 GB GPU holds it
    assert plan.memory.model_states > 80 * GIB


def test_7b_unsharded_refused_with_breakdown_and_advice():
    cfg = make_cfg("llama-7b", trainer__precision="bf16_mixed")
    with pytest.raises(UsageError) as err:
        check_fits(cfg)
    msg = str(err.value)
    assert "does not fit" in msg and "a100-80gb" in msg and "optimizer" in msg
    assert "backend=fsdp" in msg and "plan.enforce=false" in msg
    check_fits(make_cfg("llama-7b", trainer__precision="bf16_mixed", plan__enforce=False))  # overridden: no error


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_13b_sharded_over_8x80gb_fits(backend):
    cfg = make_cfg("llama-13b", backend__name=backend, launcher__nproc_per_node=8,
                   context__length=2048, trainer__micro_batch_size=2, trainer__precision="bf16_mixed")
    plan = make_plan(cfg)
    assert plan.memory.fits, plan.memory
    n = model_facts(cfg.model).total_params
    assert plan.memory.model_states == pytest.approx((16 if backend == "fsdp" else 18) * n / 8)
    check_fits(cfg)


def test_sharding_divides_state_by_world_size_and_hybrid_by_node():
    one = predicted_state_bytes(make_cfg("llama-7b", backend__name="fsdp", launcher__nproc_per_node=1))
    eight = predicted_state_bytes(make_cfg("llama-7b", backend__name="fsdp", launcher__nproc_per_node=8))
    hybrid = predicted_state_bytes(make_cfg("llama-7b", backend__name="fsdp", backend__sharding="hybrid",
                                            launcher__nproc_per_node=8, launcher__nnodes=2))
    for key in one:
        assert eight[key] == pytest.approx(one[key] / 8)
        assert hybrid[key] == pytest.approx(eight[key])


def test_checkpointing_and_micro_batch_move_activations():
    base = dict(backend__name="fsdp", launcher__nproc_per_node=8, context__length=2048)
    on = make_plan(make_cfg("llama-7b", **base)).memory
    off = make_plan(make_cfg("llama-7b", model__gradient_checkpointing=False, **base)).memory
    assert off.activations == on.activations_no_ckpt > 5 * on.activations
    mb1 = make_plan(make_cfg("llama-7b", trainer__micro_batch_size=1, **base)).memory
    assert mb1.activations == pytest.approx(on.activations / 2)
    assert mb1.logits == on.logits  # the chunked loss: one chunk's logits whatever the micro-batch
    full = dict(base, trainer__loss_chunk_tokens=0)
    full_mb1 = make_plan(make_cfg("llama-7b", trainer__micro_batch_size=1, **full)).memory
    assert full_mb1.logits == pytest.approx(make_plan(make_cfg("llama-7b", **full)).memory.logits / 2)
    eager = make_plan(make_cfg("llama-7b", model__attn_implementation="eager", model__gradient_checkpointing=False,
                               **base)).memory
    assert eager.activations > off.activations + 32 * 32 * 2048 * 4096 * 4  # the seq x seq scores


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("gpus,nodes", [(8, 1), (8, 2), (4, 1)])
def test_zero2_model_states_match_deepspeed_estimator(capsys, gpus, nodes, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    cfg = make_cfg("llama-7b", backend__name="deepspeed", backend__zero_stage=2, backend__offload_optimizer=offload,
                   launcher__nproc_per_node=gpus, launcher__nnodes=nodes, trainer__precision="bf16_mixed")
    s = setup_from_config(cfg)
    estimate_zero2_model_states_mem_needs_all_cold(s.model.total_params, num_gpus_per_node=gpus, num_nodes=nodes)
    per_gpu = _deepspeed_rows(capsys.readouterr().out)[f"offload_optimizer={'cpu' if offload else 'none'}"]
    mem = make_plan(cfg).memory
    assert mem.model_states / GIB == pytest.approx(per_gpu, rel=0.05)


@pytest.mark.parametrize("gpus,nodes", [(8, 1), (8, 4), (2, 1)])
@pytest.mark.parametrize("offload_optimizer,offload_params", [(False, False), (True, False), (True, True)])
def test_zero3_model_states_match_deepspeed_estimator(capsys, gpus, nodes, offload_optimizer, offload_params):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    cfg = make_cfg("llama-13b", backend__name="deepspeed", backend__zero_stage=3,
                   backend__offload_optimizer=offload_optimizer, backend__offload_params=offload_params,
                   launcher__nproc_per_node=gpus, launcher__nnodes=nodes, trainer__precision="bf16_mixed")
    s = setup_from_config(cfg)
    estimate_zero3_model_states_mem_needs_all_cold(s.model.total_params, s.model.largest_module_params,
                                                   num_gpus_per_node=gpus, num_nodes=nodes)
    key = (f"offload_param={'cpu' if offload_params else 'none'},"
           f"offload_optimizer={'cpu' if offload_optimizer else 'none'},zero_init=1")
    per_gpu = _deepspeed_rows(capsys.readouterr().out)[key]
    mem = make_plan(cfg).memory
    # DeepSpeed counts the gathered largest layer (params + grads) as model-state memory.
    assert (mem.model_states + mem.gathered) / GIB == pytest.approx(per_gpu, rel=0.05)
    # What the planner adds on top of DeepSpeed's figure: activations, logits, buffers, overhead.
    assert mem.total > (mem.model_states + mem.gathered) + mem.activations + mem.logits


def _deepspeed_rows(printed: str) -> dict[str, float]:
    """{options: per-GPU GB} from the table DeepSpeed's *_all_cold estimators print."""
    rows = {}
    for line in printed.splitlines():
        m = re.match(r"\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.+)$", line)
        if m:
            rows[m.group(3).replace(" ", "").replace("OffloadDeviceEnum.", "")] = float(m.group(2))
    assert rows, printed
    return rows


def test_fsdp_offload_moves_state_to_host_and_checks_host_ram():
    cfg = make_cfg("llama-13b", backend__name="fsdp", backend__cpu_offload=True, launcher__nproc_per_node=8,
                   hardware="a100-40gb")
    mem = make_plan(cfg).memory
    assert mem.params == mem.grads == mem.optim == 0
    n = model_facts(cfg.model).total_params
    assert mem.cpu_per_node == pytest.approx(16 * n * 1.1)  # all 8 ranks' shards + fragmentation
    small_host = make_cfg("llama-13b", backend__name="fsdp", backend__cpu_offload=True, launcher__nproc_per_node=8,
                          hardware="a100-40gb", hardware__cpu_memory_gb=64)
    plan = make_plan(small_host)
    assert not plan.memory.fits
    with pytest.raises(UsageError, match="host RAM"):
        check_fits(small_host)


def test_flops_per_token_is_6n_plus_attention_over_each_example():
    m = model_facts(make_cfg("llama-7b").model)
    n = m.matmul_params
    assert flops_per_token(m, [2048]) == pytest.approx(6 * n + 12 * 32 * 4096 * 2048)
    # A packed row of two 1024-token examples: attention per token at 1024, not 2048.
    assert flops_per_token(m, [1024, 1024]) == pytest.approx(6 * n + 12 * 32 * 4096 * 1024)
    mixed = flops_per_token(m, [1536, 512])
    assert mixed == pytest.approx(6 * n + 12 * 32 * 4096 * (1536**2 + 512**2) / 2048)
    # The cfg.model node works as well as ModelFacts.
    assert flops_per_token(make_cfg("llama-7b").model, [2048]) == flops_per_token(m, [2048])


def test_a_frozen_base_costs_4n_per_token_and_its_adapters_6_each():
    """LoRA computes no gradient of the base's own weights, only of their inputs: 4 FLOPs per base
    parameter and token, 6 per adapter parameter; a head trained in full (train_lm_head) costs 6. So
    the plan of a LoRA run is faster than full fine-tuning's at the same assumed MFU."""
    from vicuna_exp.plan.adapters import adapter_facts

    full = make_cfg("llama-7b", backend__name="fsdp", launcher__nproc_per_node=8, context__length=2048)
    m = model_facts(full.model)
    attention = 12 * 32 * 4096 * 2048
    for switches in ({}, {"finetune__train_lm_head": True}):
        lora = make_cfg("llama-7b", backend__name="fsdp", launcher__nproc_per_node=8, context__length=2048,
                        finetune="lora", **switches)
        a = adapter_facts(m, lora.finetune)
        head = 6 if switches else 4
        want = 4 * (m.matmul_params - m.embedding_params) + head * m.embedding_params + 6 * a.adapter_params
        assert flops_per_token(m, [2048], adapters=a) == pytest.approx(want + attention)
        assert make_plan(lora).tokens_per_s == pytest.approx(
            make_plan(full).tokens_per_s * flops_per_token(m, [2048]) / (want + attention))
    assert make_plan(lora).tokens_per_s > 1.3 * make_plan(full).tokens_per_s


def test_mfu_from_step_flops_time_and_devices():
    m = model_facts(make_cfg("llama-7b").model)
    fpt = flops_per_token(m, [2048])
    tokens_per_s_per_gpu = 0.5 * 312e12 / fpt
    step_flops = fpt * tokens_per_s_per_gpu * 8 * 2.0  # 8 GPUs for 2 s
    assert mfu(step_flops, 2.0, 8, 312) == pytest.approx(0.5)


def test_time_and_cost_follow_tokens_throughput_and_prices():
    cfg = make_cfg("llama-7b", backend__name="fsdp", launcher__nproc_per_node=8, context__length=2048,
                   plan__tokens_per_epoch=100_000_000, trainer__epochs=3)
    plan = make_plan(cfg)
    expected_tps = 0.40 * 312e12 / flops_per_token(model_facts(cfg.model), [2048]) * 8
    assert plan.tokens_per_s == pytest.approx(expected_tps)
    assert plan.hours_total == pytest.approx(3 * 100e6 / expected_tps / 3600)
    assert plan.usd_on_demand == pytest.approx(plan.hours_total * 8 * 5.07)
    assert plan.usd_spot == pytest.approx(plan.hours_total * 8 * 1.60)
    assert plan.tokens_source == "plan.tokens_per_epoch"
    assert "70,000 conversations" in make_plan(make_cfg("llama-7b", backend__name="fsdp",
                                                        launcher__nproc_per_node=8)).tokens_source
    assert make_plan(cfg, dataset_tokens=5).tokens_source == "plan.tokens_per_epoch"
    no_cfg = make_cfg("llama-7b", backend__name="fsdp", launcher__nproc_per_node=8)
    assert make_plan(no_cfg, dataset_tokens=12345).tokens_per_epoch == 12345


def test_table_has_one_row_per_config_and_totals():
    cfgs = [make_cfg("llama-7b", backend__name="fsdp", launcher__nproc_per_node=8, context__length=c)
            for c in (512, 2048)] + [make_cfg("llama-7b")]
    text = table(cfgs, labels=["context=512", "context=2048", "single"])
    lines = text.splitlines()
    assert len(lines) == 2 + 3 + 1
    assert "DOES NOT FIT" in lines[4] and "fits" in lines[2]
    assert lines[-1].startswith("3 jobs") and "1 do not fit" in lines[-1]


def test_bad_input_messages_name_the_problem():
    with pytest.raises(UsageError, match=r"trainer.global_batch_size: 128 rows .* over 3 ranks .* 126 or 129"):
        make_plan(make_cfg("llama-7b", backend__name="fsdp", launcher__nproc_per_node=3))
    with pytest.raises(UsageError, match="hardware.gpu_memory_gb"):
        make_plan(make_cfg("llama-7b", hardware__gpu_memory_gb=0))
    with pytest.raises(UsageError, match=r"hardware.device: .*expected one of \[cuda, cpu\]"):
        check_composes(["hardware.device=tpu"], multirun=False)  # the schema's Enum, at composition
    with pytest.raises(UsageError, match="gpus_per_node"):
        make_plan(make_cfg("llama-7b", backend__name="fsdp", launcher__nproc_per_node=16))
    with pytest.raises(UsageError) as err:
        make_plan(make_cfg("llama-7b", model__hidden_size=None, model__intermediate_size=None))
    assert "model.hidden_size, model.intermediate_size" in str(err.value) and "llama-7b" in str(err.value)
    with pytest.raises(UsageError, match="num_key_value_heads"):
        make_plan(make_cfg("llama-7b", model__num_key_value_heads=5))


def test_missing_facts_filled_from_local_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, '
                                          '"num_hidden_layers": 32, "num_attention_heads": 32}')
    cfg = make_cfg("llama-7b", model__hidden_size=None, model__intermediate_size=None, model__path=str(tmp_path))
    assert model_facts(cfg.model).total_params == 6_738_415_616


def test_the_logits_line_follows_the_loss_setting():
    from vicuna_exp.plan import render

    base = dict(backend__name="fsdp", launcher__nproc_per_node=8, context__length=2048)  # 2 rows x 2048
    chunked = make_plan(make_cfg("llama-7b", trainer__loss_chunk_tokens=512, **base))
    full = make_plan(make_cfg("llama-7b", trainer__loss_chunk_tokens=0, **base))
    assert "logits + loss (32,000 x 512 tokens, one of 8 chunks of supervised positions)" in render(chunked)
    assert "logits + loss (32,000 x 4,096 tokens, full logits)" in render(full)
    assert chunked.memory.logits == pytest.approx(full.memory.logits / 8)
    assert full.memory.total - chunked.memory.total > 0.8 * (full.memory.logits - chunked.memory.logits)


def test_render_says_fits_or_does_not_fit_in_words():
    from vicuna_exp.plan import render

    text = render(make_plan(make_cfg("llama-7b", backend__name="fsdp", launcher__nproc_per_node=8)))
    assert "Verdict: fits, with" in text and "per epoch" in text and "on spot" in text
    text = render(make_plan(make_cfg("llama-7b")))
    assert "Verdict: does not fit" in text and "To make it fit" in text


def test_the_micro_batch_is_a_cap_and_the_plan_prints_the_split():
    """Peak memory follows the largest micro-batch a rank runs, however the rest is cut."""
    capped = make_plan(make_cfg("llama-7b", backend__name="fsdp", launcher__nproc_per_node=8,
                                trainer__global_batch_size=40, trainer__micro_batch_size=2))
    assert capped.setup.micro_batches == [2, 2, 1] and capped.setup.grad_accum == 3
    assert "5 rows per GPU: 2 micro-batches of 2 + 1 of 1, x 8 GPUs = 40 rows per step" in render(capped)
    even = make_plan(make_cfg("llama-7b", backend__name="fsdp", launcher__nproc_per_node=8,
                              trainer__global_batch_size=32, trainer__micro_batch_size=2))
    assert even.memory.activations == capped.memory.activations and even.memory.logits == capped.memory.logits
    roomy = make_plan(make_cfg("llama-7b", backend__name="fsdp", launcher__nproc_per_node=2,
                               trainer__global_batch_size=4, trainer__micro_batch_size=8))
    assert roomy.setup.micro_batch == 2 and "2 rows per GPU: 1 micro-batch of 2" in render(roomy)
    assert roomy.memory.activations == even.memory.activations  # 2 rows either way
    # The chunked loss cuts by the cap (an eval forward takes up to the cap's rows): 32 chunks of 128.
    assert roomy.setup.loss_chunks == 32 and roomy.memory.logits == even.memory.logits / 4
    full = dict(backend__name="fsdp", trainer__loss_chunk_tokens=0)
    assert (make_plan(make_cfg("llama-7b", launcher__nproc_per_node=2, trainer__global_batch_size=4,
                               trainer__micro_batch_size=8, **full)).memory.logits
            == make_plan(make_cfg("llama-7b", launcher__nproc_per_node=8, trainer__global_batch_size=32,
                                  trainer__micro_batch_size=2, **full)).memory.logits)


def test_the_plan_reads_the_real_model_when_model_path_is_set(tmp_path):
    """A preset pointed at a directory holding another model is planned from that model's config.json."""
    small = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(small))
    plan = make_plan(make_cfg("llama-7b", model__path=str(tmp_path)))
    m = plan.setup.model
    assert (m.hidden_size, m.num_hidden_layers, m.num_key_value_heads, m.tie_word_embeddings) == (64, 2, 2, True)
    assert m.total_params < 1e6 and plan.memory.fits
    assert f"facts from {tmp_path / 'config.json'}" in render(plan)
    preset = make_plan(make_cfg("llama-7b"))
    assert preset.setup.model.hidden_size == 4096 and "preset facts of model=llama-7b" in render(preset)
    missing = make_plan(make_cfg("llama-7b", model__path=str(tmp_path / "absent")))
    assert missing.setup.model.hidden_size == 4096 and "no config.json in model.path" in render(missing)


@pytest.mark.parametrize("model", ["llama-7b", "llama-13b"])
def test_fsdp_gradients_follow_reduce_every_micro_batch(model):
    """Reduce-scattered each micro-batch, a rank holds 4N/G of fp32 gradient shards; reduced once
    per step, every parameter's unsharded fp32 gradient until the last micro-batch: 4N each, on
    top of the rest, which is what puts the 13B recipe past 80 GB."""
    n = model_facts(make_cfg(model).model).total_params
    every = make_plan(make_cfg(model, backend__name="fsdp", launcher__nproc_per_node=8,
                               trainer__precision="bf16_mixed", trainer__micro_batch_size=2))
    once = make_plan(make_cfg(model, backend__name="fsdp", launcher__nproc_per_node=8,
                              trainer__precision="bf16_mixed", trainer__micro_batch_size=2,
                              backend__reduce_every_micro_batch=False))
    assert every.setup.grad_accum == 8
    assert every.memory.grads == pytest.approx(4 * n / 8) and once.memory.grads == pytest.approx(4 * n)
    assert once.memory.total - every.memory.total > 4 * n * (1 - 1 / 8)
    assert "unsharded until the last micro-batch" in render(once)
    if model == "llama-13b":
        assert every.memory.fits and not once.memory.fits
        assert render(once).index("backend.reduce_every_micro_batch=true") < render(once).index("micro_batch_size=1")
    one_step = make_plan(make_cfg(model, backend__name="fsdp", launcher__nproc_per_node=8, trainer__micro_batch_size=2,
                                  trainer__global_batch_size=16, backend__reduce_every_micro_batch=False))
    assert one_step.setup.grad_accum == 1 and one_step.memory.grads == pytest.approx(4 * n / 8)  # nothing to hold


def test_the_vicuna_13b_verdict_counts_the_held_gradients(capsys):
    from vicuna_exp.cli import main

    assert main(["plan", "experiment=vicuna-13b"]) == 0
    out = capsys.readouterr().out
    assert "FSDP2" in out and "8 micro-batches" in out and "Verdict: fits" in out
    assert main(["plan", "experiment=vicuna-13b", "backend.reduce_every_micro_batch=false"]) == 0
    out = capsys.readouterr().out
    assert "gradients (unsharded until the last micro-batch)" in out and "Verdict: does not fit" in out


def test_the_plan_shows_the_attention_auto_picks_and_why(monkeypatch):
    """The planner resolves `auto` by the trainer's rule, for the profile's device and the precision."""
    from vicuna_exp import hardware
    from vicuna_exp.plan import facts

    seen = []

    def probe(**given):
        seen.append(given)
        return hardware.AttentionFacts(on_cuda=given["on_cuda"], half=given["precision"] != "fp32", flash_attn=False,
                                       torch_varlen=True, torch_flex=True)

    monkeypatch.setattr(facts, "probe_attention", probe)
    text = render(make_plan(make_cfg("llama-7b", trainer__precision="bf16_mixed")))
    assert seen[-1] == {"on_cuda": True, "precision": "bf16_mixed"}
    assert "attention varlen (auto: on CUDA in bf16, flash-attn not installed, torch has varlen attention)" in text
    fp32 = make_plan(make_cfg("llama-7b", trainer__precision="fp32"))
    assert fp32.setup.model.attn_implementation == "flex_attention"
    named = render(make_plan(make_cfg("llama-7b", model__attn_implementation="eager")))
    assert "attention eager (named by model.attn_implementation)" in named
