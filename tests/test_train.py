"""End to end: the embedded default trains, writes a self-describing run dir, and resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vicuna_exp.cli import main
from vicuna_exp.rundir import OPTIONAL_KEYS, SUMMARY_KEYS

ENV_CPU = {**os.environ, "OMP_NUM_THREADS": "2"}


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default exactly as `make train` runs it (wandb offline), once for many checks."""
    run_dir = tmp_path_factory.mktemp("default") / "run"
    assert main(["train", f"hydra.run.dir={run_dir}"]) == 0
    return run_dir


def test_summary_is_complete(default_run: Path) -> None:
    s = json.loads((default_run / "summary.json").read_text())
    assert s["status"] == "completed" and s["error"] is None
    for key in ("steps", "final_loss", "final_eval_loss", "best_eval_loss", "tokens_seen", "wall_s",
                "overrides", "config_hash", "provenance"):
        assert s[key] is not None, key
    assert s["steps"] == s["total_steps"] > 0
    prov = s["provenance"]
    assert prov["versions"]["torch"].startswith("2.13") and prov["versions"]["transformers"] == "5.23.0"
    assert prov["data_hash"] and prov["hardware"]["cpu_count"]
    assert s["best_eval_loss"] <= s["final_eval_loss"]
    assert list(s) == [k for k in SUMMARY_KEYS if k not in OPTIONAL_KEYS]  # the keys held by test_rundir
    assert s["tflops_per_device"] > 0 and 0 < s["mfu"] < 1
    assert (s["derived"]["attn_implementation"], s["derived"]["attn_reason"]) == ("sdpa", "auto: on the CPU")


def test_loss_falls_clearly(default_run: Path) -> None:
    train, evals = read_metrics(default_run)
    assert train[-1]["loss"] < 0.8 * train[0]["loss"], (train[0]["loss"], train[-1]["loss"])
    assert evals and evals[-1]["eval_loss"] < evals[0]["eval_loss"] or len(evals) == 1


def test_metrics_lines_have_the_documented_fields(default_run: Path) -> None:
    train, evals = read_metrics(default_run)
    for row in train:
        for key in ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "supervised_tokens", "tokens_per_s",
                    "step_s", "elapsed_s"):
            assert key in row, key
    steps = [r["step"] for r in train]
    assert steps == list(range(1, len(steps) + 1))
    assert all(b["tokens"] > a["tokens"] for a, b in zip(train, train[1:], strict=False))
    assert all(b["supervised_tokens"] > a["supervised_tokens"] for a, b in zip(train, train[1:], strict=False))
    assert all(0 < r["supervised_tokens"] < r["tokens"] for r in train)
    assert all(set(r) >= {"step", "eval_loss"} for r in evals)
    assert max(r["lr"] for r in train) == pytest.approx(3e-3, rel=1e-6)  # warmup reaches the peak


def test_the_schedule_equals_the_hugging_face_trainers_over_the_whole_run(default_run: Path) -> None:
    """The lr every step of the default ran at is the reference scheduler's (the recipe's claim)."""
    from transformers import get_cosine_schedule_with_warmup

    train, _ = read_metrics(default_run)
    total = len(train)
    warmup = -(-5 * total // 100)  # the demo's optim.warmup_ratio=0.05, rounded up as the Trainer does
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)
    reference = []
    for _ in range(total):
        reference.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert [r["lr"] for r in train] == pytest.approx(reference, rel=1e-12, abs=1e-15)
    assert train[0]["lr"] == 0.0  # the reference's first update runs at lr 0


def test_run_dir_is_self_describing(default_run: Path) -> None:
    assert (default_run / ".hydra" / "config.yaml").is_file()
    assert (default_run / ".hydra" / "overrides.yaml").is_file()
    ckpts = sorted((default_run / "checkpoints").glob("step_*"))
    assert ckpts and (ckpts[-1] / "trainer_state.json").is_file()
    assert not list((default_run / "checkpoints").glob(".tmp-*"))
    assert len(ckpts) <= 2  # keep_last


def test_final_model_loads_with_its_tokenizer_and_template(default_run: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = default_run / "final"
    assert list(final.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(final))
    tok = AutoTokenizer.from_pretrained(str(final))
    assert tok.chat_template and "ASSISTANT" in tok.chat_template
    ids = tok("USER: hi ASSISTANT:", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == model.config.vocab_size
    # Any serving stack that applies the saved template sees exactly the ids training saw.
    from omegaconf import OmegaConf

    from vicuna_exp.data import encode_conversation
    from vicuna_exp.data.config import TemplateConfig

    template = OmegaConf.merge(OmegaConf.structured(TemplateConfig), OmegaConf.load(final / "vicuna_template.yaml"))
    chat = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And times 3?"}, {"role": "assistant", "content": "12."}]
    train_ids, _ = encode_conversation(chat, tok, template)
    assert tok.apply_chat_template(chat, tokenize=True, return_dict=False) == train_ids


def test_wandb_ran_offline_without_a_key(default_run: Path) -> None:
    runs = list((default_run / "wandb").glob("offline-run-*"))
    assert runs, "logger=wandb with no key must fall back to an offline run"
    for path in default_run.rglob("*"):
        if path.is_file() and path.stat().st_size < 2_000_000:
            assert b"WANDB_API_KEY=" not in path.read_bytes()


def test_rerun_of_a_completed_run_is_skipped(default_run: Path, capsys: pytest.CaptureFixture) -> None:
    before = (default_run / "summary.json").read_text()
    assert main(["train", f"hydra.run.dir={default_run}"]) == 0
    assert "already completed" in capsys.readouterr().out
    assert (default_run / "summary.json").read_text() == before


# ---------------------------------------------------------------------------------------------
# Exactness of accumulation and resume, on a small shared configuration
# ---------------------------------------------------------------------------------------------
SMALL = ["logger=none", "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.max_steps=8",
         "trainer.eval_every_steps=4", "trainer.eval_max_rows=8", "trainer.save_every_steps=2",
         "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2", "context=512"]


def _recipe(overrides: list[str], run_dir: Path):
    from vicuna_exp import distributed as D
    from vicuna_exp.hydra_app import compose
    from vicuna_exp.train import Recipe

    recipe = Recipe(compose(overrides), run_dir, overrides, D.from_env())
    recipe.setup()
    return recipe


def test_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    """k micro-batches give the same gradient as one batch of the same rows, also when the last
    micro-batch is smaller (fp32, 1e-5)."""
    recipe = _recipe(SMALL, tmp_path)
    try:
        rows = recipe.epoch_rows(0)[:4]
        grads = []
        for micro_size in (4, 1, 2, 3):  # 3: an uneven cut, [3 rows, 1 row], as a cap of 3 makes it
            recipe.backend.zero_grad()
            micro = [recipe.collate(rows[i:i + micro_size]) for i in range(0, 4, micro_size)]
            loss, n_sup, _ = recipe.forward_backward(micro)
            grads.append(torch.cat([p.grad.flatten() for p in recipe.model.parameters()]))
        assert n_sup > 0
        for g in grads[1:]:
            torch.testing.assert_close(g, grads[0], atol=1e-5, rtol=1e-5)
    finally:
        recipe.finish("completed", None, 0)


def _train_subprocess(run_dir: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vicuna_exp", "train", *SMALL, f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(cmd, env=ENV_CPU, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists():
            train, _ = read_metrics(run_dir)
            if train and train[-1]["step"] >= step:
                return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *SMALL, f"hydra.run.dir={run_dir}"]) == 0
    return [r["loss"] for r in read_metrics(run_dir)[0]]


def test_sigkill_then_resume_gives_the_same_losses(tmp_path: Path, reference_losses: list[float]) -> None:
    run_dir = tmp_path / "run"
    proc = _train_subprocess(run_dir, ["trainer.save_every_steps=2"])
    _wait_for_step(run_dir, 3, proc)
    proc.kill()  # SIGKILL: no chance to save; resume from the last periodic checkpoint
    proc.wait()
    assert main(["train", *SMALL, f"hydra.run.dir={run_dir}"]) == 0
    train, _ = read_metrics(run_dir)
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["loss"] for r in train] == pytest.approx(reference_losses, abs=1e-6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] >= 2


def test_sigterm_saves_and_exits_75(tmp_path: Path, reference_losses: list[float]) -> None:
    run_dir = tmp_path / "run"
    proc = _train_subprocess(run_dir, ["trainer.save_every_steps=100", "trainer.preempt_grace_s=600"])
    _wait_for_step(run_dir, 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["error"]
    stopped_at = summary["steps"]
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
    assert main(["train", *SMALL, f"hydra.run.dir={run_dir}", "trainer.save_every_steps=100"]) == 0
    train, _ = read_metrics(run_dir)
    assert [r["loss"] for r in train] == pytest.approx(reference_losses, abs=1e-6)


def test_max_minutes_ends_as_interrupted(tmp_path: Path) -> None:
    code = main(["train", *SMALL, f"hydra.run.dir={tmp_path}", "trainer.max_minutes=0.0001"])
    assert code == 75
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 1
    assert "max_minutes" in summary["error"]


def test_an_interrupted_run_in_the_default_dir_says_which_override_resumes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The default run dir is named by the clock, so the same command alone would start afresh: the
    last line names the `hydra.run.dir` to add, and that command resumes."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", *SMALL, "trainer.max_minutes=0.0001"]) == 75
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    assert hint.startswith(f"to resume, rerun the same command with hydra.run.dir={tmp_path / 'outputs' / 'runs'}/"), hint
    override = hint.rsplit(" ", 1)[-1]
    assert main(["train", *SMALL, "trainer.max_minutes=0.0001", override]) == 75
    assert capsys.readouterr().out.strip().splitlines()[-1] == "rerun the same command to resume"
    summary = json.loads((Path(override.partition("=")[2]) / "summary.json").read_text())
    assert summary["resumed_from_step"] == 1 and summary["steps"] == 2


def test_non_finite_loss_stops_with_a_clear_error(tmp_path: Path) -> None:
    code = main(["train", *SMALL, f"hydra.run.dir={tmp_path}", "optim.lr=1e30", "trainer.grad_clip=0",
                 "optim.warmup_ratio=0"])
    assert code == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite loss" in summary["error"]
    for ckpt in (tmp_path / "checkpoints").glob("step_*"):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["last_loss"] is not None and state["last_loss"] == state["last_loss"]  # not NaN


def test_a_checkpoint_with_the_old_mfu_bookkeeping_resumes(tmp_path: Path) -> None:
    """Checkpoints written before TrainerState had MFU fields kept them in `extra`: they resume, and the
    accounting carries on from them."""
    stop_early = [*SMALL, f"hydra.run.dir={tmp_path}", "trainer.max_minutes=0.0001"]  # one step per attempt
    assert main(["train", *stop_early]) == 75
    state_file = tmp_path / "checkpoints" / "step_00000001" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    flops, seconds = state.pop("model_flops"), state.pop("train_s")
    assert flops > 0 and seconds > 0
    state_file.write_text(json.dumps({**state, "extra": {"model_flops": flops, "step_s": seconds}}))
    assert main(["train", *stop_early]) == 75
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from_step"] == 1 and summary["steps"] == 2 and summary["mfu"] > 0
    resumed = json.loads((tmp_path / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert "extra" not in resumed and resumed["model_flops"] > flops and resumed["train_s"] > seconds


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.tokenizer=/nonexistent/tok", "/nonexistent/tok"),
        ("model.path=/nonexistent/model", "/nonexistent/model"),
    ],
)
def test_bad_paths_exit_2_naming_key_and_path(override: str, needle: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    extra = ["model.init=pretrained"] if override.startswith("model.path") else []
    assert main(["train", *SMALL, override, *extra, f"hydra.run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert ("model.tokenizer" if "tokenizer" in override else "model.path") in err


@pytest.mark.parametrize(("attn", "why"), [
    ("varlen", "torch's varlen attention is CUDA-only"),
    ("flex_attention", "no backward on the CPU"),
    ("flash_attention_2", "no CUDA device"),
])
def test_a_kernel_that_cannot_run_here_exits_2_before_any_worker(attn: str, why: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import vicuna_exp.job
    import vicuna_exp.train

    monkeypatch.setattr(vicuna_exp.job, "launch", lambda *a: pytest.fail("a worker was started"))
    monkeypatch.setattr(vicuna_exp.train, "run", lambda *a: pytest.fail("the recipe was started"))
    code = main(["train", *SMALL, f"model.attn_implementation={attn}", "trainer.device=cpu",
                 "launcher.nproc_per_node=2", "backend=ddp", f"hydra.run.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and why in err and "auto would pick sdpa (on the CPU)" in err and "Traceback" not in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["exit_code"] == 2 and why in summary["error"]


def test_a_directory_that_is_not_a_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notamodel").mkdir()
    code = main(["train", *SMALL, "model=llama-7b", f"model.path={tmp_path / 'notamodel'}",
                 f"model.tokenizer={Path(__file__).parents[1] / 'vicuna_exp' / 'assets' / 'tokenizer'}",
                 f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err


def test_a_sharding_backend_runs_with_one_process(tmp_path: Path) -> None:
    """`train -m backend=fsdp,...` without launcher changes: one process still gets a process group."""
    assert main(["train", *SMALL, "backend=fsdp", "trainer.max_steps=2", f"hydra.run.dir={tmp_path}"]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"


def test_the_loop_reads_on_one_screen() -> None:
    """`Recipe.train` is the loop a reader lands in: at most 50 lines, the step itself in `train_step`."""
    import inspect

    from vicuna_exp.train import Recipe

    assert len(inspect.getsource(Recipe.train).splitlines()) <= 50


def test_the_micro_batch_loop_waits_for_the_device_once_per_step(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A device-to-host read (item, tolist, float(), int(), bool(), .cpu(), .numpy()) blocks until the
    GPU catches up. Counted with a stand-in for the model's loss, so only the loop's own code counts:
    one read per step, for the loss and the counts, however many micro-batches there are."""
    recipe = _recipe(SMALL, tmp_path)
    try:
        rows = recipe.epoch_rows(0)[:4]
        micro = [recipe.collate(rows[i:i + 1]) for i in range(4)]  # 4 micro-batches
        weight = next(recipe.model.parameters())
        monkeypatch.setattr(recipe, "token_loss_sum",
                            lambda batch, w=1.0: (weight ** 2).sum() * batch["input_ids"].float().mean() * w)
        reads: list[str] = []
        for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy", "nonzero"):
            original = getattr(torch.Tensor, name)

            def counted(self, *a, _name=name, _original=original, **k):
                reads.append(_name)
                return _original(self, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)
        loss, n_supervised, _ = recipe.forward_backward(micro)
        monkeypatch.undo()
        assert reads == ["tolist"], reads
        assert n_supervised == sum(b["num_supervised"] for b in micro) > 0 and loss > 0
    finally:
        recipe.finish("completed", None, 0)
