"""The planner's state and activation bytes for `finetune=lora` against the tensors a real LLaMA
with peft's adapters holds after one AdamW step, counted as for full fine-tuning (the shapes differ
from the five the activation terms were fitted on)."""

from __future__ import annotations

import pytest
import torch
from plan_helpers import make_cfg
from test_plan_measured import SEQ, _saved_activation_bytes

from vicuna_exp.finetune import add_adapters
from vicuna_exp.plan import predicted_state_bytes
from vicuna_exp.plan.estimate import activation_bytes, setup_from_config


def _tiny_llama(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(hf).to(dtype)


@pytest.mark.parametrize("precision,dtype,dropout,autocast", [
    ("fp32", torch.float32, 0.05, False), ("fp32", torch.float32, 0.0, False),
    ("bf16_mixed", torch.bfloat16, 0.0, True), ("bf16_mixed", torch.bfloat16, 0.05, True)])
def test_planner_state_and_activation_bytes_match_the_tensors(precision, dtype, dropout, autocast) -> None:
    shape = dict(model__vocab_size=300, model__hidden_size=64, model__intermediate_size=160,
                 model__num_hidden_layers=2, model__num_attention_heads=4, model__num_key_value_heads=2,
                 model__attn_implementation="sdpa", model__tie_word_embeddings=False)
    cfg = make_cfg("tiny", "cpu", trainer__precision=precision, context__length=SEQ, trainer__micro_batch_size=1,
                   trainer__global_batch_size=1, model__gradient_checkpointing=False, finetune="lora",
                   finetune__lora_dropout=dropout, **shape)
    model = add_adapters(_tiny_llama(dtype), cfg.finetune)  # bf16_mixed: a bf16 base, fp32 adapters
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, 300, (1, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()

    def nbytes(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    held = {"params": nbytes(model.parameters()), "grads": nbytes(p.grad for p in trainable),
            "optim": nbytes(t for s in opt.state.values() for t in s.values() if t.numel() > 1)}
    predicted = predicted_state_bytes(cfg)
    for key in held:
        assert predicted[key] == pytest.approx(held[key], rel=0.05), key
    s = setup_from_config(cfg)
    measured = _saved_activation_bytes(model, SEQ, autocast)
    expected = activation_bytes(s, checkpointing=False) + (2 * s.adapters.adapter_params if autocast else 0)
    assert expected == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("switches", [{}, {"finetune__use_dora": True}, {"finetune__train_lm_head": True},
                                      {"finetune__train_embeddings": True, "finetune__r": 8}])
def test_planner_counts_the_trainable_parameters_of_each_switch(switches: dict) -> None:
    """DoRA's magnitudes and the embeddings trained in full are counted as peft creates them."""
    cfg = make_cfg("tiny", "cpu", model__vocab_size=300, model__hidden_size=64, model__intermediate_size=160,
                   model__num_hidden_layers=2, model__num_attention_heads=4, model__num_key_value_heads=2,
                   model__tie_word_embeddings=False, finetune="lora", **switches)
    model = add_adapters(_tiny_llama(torch.float32), cfg.finetune)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert setup_from_config(cfg).adapters.trainable_params == trainable
