"""The planner's per-rank bytes against the tensors a real model really holds, on the CPU.

`single` backend: parameters, gradients and AdamW state after one optimizer step, and the
activations autograd saves in a forward pass (counted with saved-tensor hooks), for LLaMA and
for each other family (Llama-3, Mistral with its sliding window, Qwen2 with its q/k/v bias and
tied embeddings), each built by the trainer's own path from its tiny option. The shapes
differ from the ones the activation coefficients were fitted on, so this checks the model,
not the fit. FSDP2/DeepSpeed ranks are compared by the backend tests via
`vicuna_exp.plan.predicted_state_bytes`; the gradients FSDP2 holds between micro-batches, with
and without a reduce-scatter per micro-batch, by `bench/bench_grad_memory.py` on two gloo ranks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from plan_helpers import make_cfg

from vicuna_exp.plan import predicted_state_bytes
from vicuna_exp.plan.estimate import activation_bytes, logits_bytes, setup_from_config

SHAPE = dict(model__vocab_size=300, model__hidden_size=96, model__intermediate_size=256, model__num_hidden_layers=3,
             model__num_attention_heads=6, model__num_key_value_heads=2, model__attn_implementation="sdpa")
SEQ = 160


FAMILIES = ["tiny", "tiny-llama3", "tiny-mistral", "tiny-qwen2"]


def _model(cfg, dtype):
    """The model the trainer would build for this config (its family's class), on the CPU."""
    from vicuna_exp.model import make_model_spec

    spec = make_model_spec(cfg.model, vocab_size=cfg.model.vocab_size, device=torch.device("cpu"), precision="fp32")
    torch.manual_seed(0)
    return spec.build("cpu").to(dtype)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("precision,dtype,tied", [("fp32", torch.float32, False), ("bf16", torch.bfloat16, True)])
def test_single_state_bytes_match_tensors_after_one_adamw_step(precision, dtype, tied, family):
    cfg = make_cfg(family, "cpu", trainer__precision=precision, model__tie_word_embeddings=tied,
                   context__length=SEQ, **SHAPE)
    model = _model(cfg, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.model.vocab_size, (1, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    params = list(model.parameters())  # a tied lm_head is yielded once
    held = {
        "params": _bytes(params),
        "grads": _bytes(p.grad for p in params),
        "optim": _bytes(t for state in opt.state.values() for t in state.values() if t.numel() > 1),
    }
    predicted = predicted_state_bytes(cfg)
    for key in held:
        assert predicted[key] == pytest.approx(held[key], rel=0.05), key
    assert setup_from_config(cfg).model.total_params == sum(p.numel() for p in params)  # biases, GQA, ties


def _saved_activation_bytes(model, seq: int, autocast: bool) -> int:
    """Bytes of distinct storages autograd saves for backward, weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    ids = torch.randint(0, model.config.vocab_size, (1, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=ids)
    return sum(seen.values())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("precision,dtype,autocast", [
    ("fp32", torch.float32, False), ("bf16", torch.bfloat16, False), ("bf16_mixed", torch.float32, True)])
def test_activation_bytes_match_saved_tensors(precision, dtype, autocast, family):
    cfg = make_cfg(family, "cpu", trainer__precision=precision, context__length=SEQ, trainer__micro_batch_size=1,
                   trainer__global_batch_size=1, model__gradient_checkpointing=False, **SHAPE)
    model = _model(cfg, dtype)
    model.train()
    measured = _saved_activation_bytes(model, SEQ, autocast)
    s = setup_from_config(cfg)
    predicted = activation_bytes(s, checkpointing=False)
    if autocast:  # autograd also keeps autocast's bf16 weight copies; the planner counts them apart
        predicted += 2 * s.model.matmul_params
    assert predicted == pytest.approx(measured, rel=0.05)


LOSS_SHAPE = dict(model__vocab_size=32000, model__hidden_size=32, model__intermediate_size=64,
                  model__num_hidden_layers=1, model__num_attention_heads=4, model__num_key_value_heads=4,
                  model__attn_implementation="sdpa")


def _loss_step_peak_bytes(cfg) -> float:
    """Peak resident bytes above the start of one forward + backward through the recipe's loss, every
    position supervised (the planner's worst case), after a first step allocated the gradients."""
    import psutil

    from vicuna_exp.batch_split import loss_chunk_count
    from vicuna_exp.data.batching import supervised_positions
    from vicuna_exp.loss import chunked_loss_sum, full_loss_sum, output_head
    from vicuna_exp.memory import PeakMemory

    model = _model(cfg, torch.float32)
    rows, seq = cfg.trainer.micro_batch_size, cfg.context.length
    ids = torch.randint(3, cfg.model.vocab_size, (rows, seq))
    positions, targets = supervised_positions(ids)
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(seq).repeat(rows, 1),
             "loss_positions": positions, "loss_targets": targets, "num_supervised": len(targets)}
    chunks = loss_chunk_count(rows, seq, cfg.trainer.loss_chunk_tokens) if cfg.trainer.loss_chunk_tokens else 0

    def step() -> None:
        loss = chunked_loss_sum(model, output_head(model), batch, chunks) if chunks else full_loss_sum(model, batch)
        loss.backward()

    step()
    model.zero_grad(set_to_none=False)
    peak = PeakMemory(torch.device("cpu"))
    peak.reset()
    if peak.since_start:
        pytest.skip("the kernel refuses to reset the peak resident set (/proc/self/clear_refs)")
    before = psutil.Process().memory_info().rss
    step()
    return peak.peak_gb() * 2**30 - before


@pytest.mark.parametrize("chunk", [0, 512])
def test_logits_line_follows_the_setting_and_matches_the_measured_peak(chunk: int):
    """Each chunk's buffers (65 MB) are above glibc's largest mmap threshold, so they leave the
    resident set when freed and the high-water mark sees the loss path's true peak."""
    cfg = make_cfg("tiny", "cpu", trainer__precision="fp32", context__length=512, trainer__micro_batch_size=2,
                   trainer__global_batch_size=2, trainer__loss_chunk_tokens=chunk, **LOSS_SHAPE)
    s = setup_from_config(cfg)
    assert s.loss_tokens == (1024 if chunk == 0 else 512)
    measured = _loss_step_peak_bytes(cfg)
    assert logits_bytes(s) == pytest.approx(measured, rel=0.10)

# ---- FSDP2 gradients between micro-batches, as two gloo ranks really hold them ----------------------
BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_grad_memory.py"
BENCH_MODEL = ",".join(f"{k.replace('__', '.')}={v}" for k, v in SHAPE.items() if k != "model__attn_implementation")


@pytest.fixture(scope="module")
def held_gradients(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], dict]:
    """`bench/bench_grad_memory.py` on a tiny model: both settings of the knob, accumulation 1 and 4."""
    out = tmp_path_factory.mktemp("grad_memory") / "rows.json"
    cmd = [sys.executable, str(BENCH), "--variants", "fsdp,fsdp_sync_last", "--accumulation", "1,4", "--steps", "2",
           "--seq", "32", "--model", BENCH_MODEL, "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {(r["variant"], r["accumulation"]): r for r in json.loads(out.read_text())}


@pytest.mark.multiprocess
@pytest.mark.parametrize("variant", ["fsdp", "fsdp_sync_last"])
@pytest.mark.parametrize("accumulation", [1, 4])
def test_planner_gradient_term_matches_held_bytes(held_gradients: dict, variant: str, accumulation: int) -> None:
    row = held_gradients[(variant, accumulation)]
    assert row["planner_bytes"] == pytest.approx(row["held_bytes"], rel=0.05)
    if accumulation > 1:
        assert row["held_between_bytes"] == row["held_bytes"]  # the peak is between micro-batches


@pytest.mark.multiprocess
def test_reduce_every_micro_batch_holds_shards_and_computes_the_same_gradients(held_gradients: dict) -> None:
    every, once = held_gradients[("fsdp", 4)], held_gradients[("fsdp_sync_last", 4)]
    assert every["held_bytes"] == held_gradients[("fsdp", 1)]["held_bytes"]  # accumulation costs nothing
    assert once["held_bytes"] > 1.9 * every["held_bytes"]  # the whole model's grads on each of 2 ranks
    assert every["losses"] == pytest.approx(once["losses"], rel=1e-6)
    assert every["grad_norms"] == pytest.approx(once["grad_norms"], rel=1e-6)
