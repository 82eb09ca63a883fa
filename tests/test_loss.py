"""The chunked loss (the default) against the full-logits one, through the recipe, and its bad input.

The same equality on ddp, fsdp and deepspeed_zero3 is in tests/backends/test_loss_parity.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vicuna_exp.cli import main
from vicuna_exp.config import config_hash
from vicuna_exp.data.batching import collate, supervised_positions
from vicuna_exp.errors import UsageError
from vicuna_exp.hydra_app import compose
from vicuna_exp.loss import chunked_loss_sum, output_head
from vicuna_exp.plan.facts import ModelFacts
from vicuna_exp.plan.flops import batch_flops

SMALL = ["logger=none", "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.max_steps=1",
         "trainer.eval_max_rows=6", "trainer.save_final=false", "model.hidden_size=64",
         "model.intermediate_size=128", "model.num_hidden_layers=2", "context=512", "trainer.loss_chunk_tokens=256"]


def _recipe(overrides: list[str], run_dir: Path):
    from vicuna_exp import distributed as D
    from vicuna_exp.train import Recipe

    recipe = Recipe(compose(overrides), run_dir, overrides, D.from_env())
    recipe.setup()
    return recipe


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_gradients_and_eval_equal_the_full_logits_path(tied: bool, tmp_path: Path) -> None:
    recipe = _recipe([*SMALL, f"model.tie_word_embeddings={str(tied).lower()}"], tmp_path)
    try:
        assert recipe.loss_chunks == 4  # 2 rows x 512 positions, 256 a chunk
        rows = recipe.epoch_rows(0)[:4]
        micro = [recipe.collate(rows[i:i + 2]) for i in (0, 2)]
        chunks, out = recipe.loss_chunks, {}
        for mode in ("full", "chunked"):
            recipe.loss_chunks = chunks if mode == "chunked" else 0
            recipe.backend.zero_grad()
            loss, n_sup, _ = recipe.forward_backward(micro)
            grads = torch.cat([p.grad.flatten() for p in recipe.model.parameters()])
            out[mode] = (loss, grads, recipe.evaluate())
        assert all(b["num_supervised"] > 3 * chunks for b in micro)  # every chunk projects several positions
        assert out["chunked"][0] == pytest.approx(out["full"][0], abs=1e-5)
        torch.testing.assert_close(out["chunked"][1], out["full"][1], atol=1e-5, rtol=0)
        assert out["full"][1].abs().max() > 1e-3
        assert out["chunked"][2] == pytest.approx(out["full"][2], abs=1e-6)
    finally:
        recipe.finish("completed", None, 0)


def test_supervised_positions_are_the_shifted_labels_on_the_host() -> None:
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    positions, targets = supervised_positions(labels)
    assert positions.tolist() == [0, 1, 5, 6]  # row-major over the 4-wide rows: position t predicts t + 1
    assert targets.tolist() == [5, 6, 7, 8]
    data = {"input_ids": [[1, 2, 3], [4, 5]], "labels": [[-100, 2, 3], [-100, 5]]}
    batch = collate(_Rows(data), [[0, 1]], pad_id=0)  # one packed row
    assert batch["loss_positions"].tolist() == [0, 1, 3] and batch["loss_targets"].tolist() == [2, 3, 5]


class _Rows:
    """The `dataset[indices]` access collate uses, over plain lists."""

    def __init__(self, data: dict[str, list]) -> None:
        self.data = data

    def __getitem__(self, idx: list[int]) -> dict[str, list]:
        return {k: [v[i] for i in idx] for k, v in self.data.items()}


class _Body(torch.nn.Module):
    """A stand-in model: hidden states from a lookup, a head, and the forward keywords the loss passes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50, bias=False)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(self, input_ids, logits_to_keep, output_hidden_states, **_):
        hidden = self.embed(input_ids)
        return type("Out", (), {"hidden_states": (hidden,), "logits": self.head(hidden[:, logits_to_keep])})


def test_the_chunked_loss_never_reads_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk bounds come from the host count; no nonzero(), mask or .item() on device tensors."""
    model = _Body()
    labels = torch.randint(0, 50, (2, 30))
    labels[:, :7] = -100
    positions, targets = supervised_positions(labels)
    batch = {"input_ids": torch.randint(0, 50, (2, 30)), "position_ids": None, "loss_positions": positions,
             "loss_targets": targets, "num_supervised": len(targets)}
    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy", "nonzero"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    loss = chunked_loss_sum(model, output_head(model), batch, n_chunks=3)
    loss.backward()
    monkeypatch.undo()
    assert reads == []
    logits = model.head(model.embed(batch["input_ids"]))[:, :-1].reshape(-1, 50)
    ref = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_a_model_without_an_output_head_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(UsageError, match="Linear"):
        output_head(torch.nn.Linear(2, 2))
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "get_output_embeddings", lambda self: None)
    assert main(["train", *SMALL, f"hydra.run.dir={tmp_path / 'a'}"]) == 2
    err = capsys.readouterr().err
    assert "LlamaForCausalLM" in err and "trainer.loss_chunk_tokens=0" in err and "Traceback" not in err
    assert main(["train", *SMALL, "trainer.loss_chunk_tokens=0", f"hydra.run.dir={tmp_path / 'b'}"]) == 0


def test_a_negative_chunk_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", *SMALL, "trainer.loss_chunk_tokens=-1", f"hydra.run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "trainer.loss_chunk_tokens" in err and "Traceback" not in err


def test_the_chunk_size_stays_out_of_the_config_hash() -> None:
    """Every value trains the same model, so runs and checkpoints from before the key still match."""
    assert len({config_hash(compose([f"trainer.loss_chunk_tokens={n}"])) for n in (0, 1024, 77)}) == 1


def test_mfu_counts_the_head_where_it_is_applied() -> None:
    m = ModelFacts(name="t", vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=2)
    every = batch_flops(m, [100])
    assert batch_flops(m, [100], head_tokens=100) == every
    assert every - batch_flops(m, [100], head_tokens=40) == pytest.approx(6 * 1000 * 16 * 60)
