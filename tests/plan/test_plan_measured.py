"""The planner's per-rank bytes against the tensors a real LLaMA really holds, on the CPU.

`single` backend: parameters, gradients and AdamW state after one optimizer step, and the
activations autograd saves in a forward pass (counted with saved-tensor hooks). The shapes
differ from the ones the activation coefficients were fitted on, so this checks the model,
not the fit. FSDP2/DeepSpeed ranks are compared by the backend tests via
`vicuna_exp.plan.predicted_state_bytes`.
"""

from __future__ import annotations

import pytest
import torch
from plan_helpers import make_cfg

from vicuna_exp.plan import predicted_state_bytes
from vicuna_exp.plan.estimate import activation_bytes, setup_from_config

SHAPE = dict(model__vocab_size=300, model__hidden_size=96, model__intermediate_size=256, model__num_hidden_layers=3,
             model__num_attention_heads=6, model__num_key_value_heads=2, model__attn_implementation="sdpa")
SEQ = 160


def _model(cfg, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    hf = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                     num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
                     num_key_value_heads=m.num_key_value_heads, max_position_embeddings=SEQ,
                     tie_word_embeddings=m.tie_word_embeddings, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(hf).to(dtype)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("precision,dtype,tied", [("fp32", torch.float32, False), ("bf16", torch.bfloat16, True)])
def test_single_state_bytes_match_tensors_after_one_adamw_step(precision, dtype, tied):
    cfg = make_cfg("tiny", "cpu", trainer__precision=precision, model__tie_word_embeddings=tied,
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


@pytest.mark.parametrize("precision,dtype,autocast", [
    ("fp32", torch.float32, False), ("bf16", torch.bfloat16, False), ("bf16_mixed", torch.float32, True)])
def test_activation_bytes_match_saved_tensors(precision, dtype, autocast):
    cfg = make_cfg("tiny", "cpu", trainer__precision=precision, context__length=SEQ, trainer__micro_batch_size=1,
                   trainer__global_batch_size=1, model__gradient_checkpointing=False, **SHAPE)
    model = _model(cfg, dtype)
    model.train()
    measured = _saved_activation_bytes(model, SEQ, autocast)
    s = setup_from_config(cfg)
    predicted = activation_bytes(s, checkpointing=False)
    if autocast:  # autograd also keeps autocast's bf16 weight copies; the planner counts them apart
        predicted += 2 * s.model.matmul_params
    assert predicted == pytest.approx(measured, rel=0.05)
