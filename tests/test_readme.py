"""Every command the README shows runs, as written, so the README cannot drift from the code.

Each ```bash block opens with a marker comment, and a marker line may switch the mode for the
commands after it:
- `# test: run`   the command runs and exits 0 (`trainer.max_steps=1` is added to training runs);
- `# test: cfg`   its `--cfg job` form composes (exit 0);
- `# test: plan`  its `plan` form prints a verdict (`train ...` -> `plan ...`, `sweep NAME ...` ->
                  `plan sweep=NAME ...`): for commands that need real weights or GPUs;
- `# test: skip: <reason>`  not run (the network, SLURM, SkyPilot, installs, the suite itself).
Leading `NAME=value` words set environment variables for the command, as the shell would.
A block without a marker, a skip without a reason, or a command other than `vicuna-exp` outside a
skip fails. The launch commands in the comments of `conf/` and `sweeps/` run in their plan form.

Stand-ins for the README's placeholders:
- a model directory (`/path/to/llama-7b-hf`, `/data/...-hf`, `/models/...-hf`, `/weights/...-hf`):
  a tiny LLaMA exported by this test with its tokenizer;
- a ShareGPT file (`/path/to/sharegpt.json`, `/data/sharegpt.json`, `data.path=...`): the packaged
  sample conversations; a lone `...` (other overrides) is dropped;
- `outputs/sweeps/context_length`: the multirun that the README's `train -m context=512,2048` made.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from vicuna_exp.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODES = ("run", "cfg", "plan", "skip")
MARKER = re.compile(r"^#\s*test:\s*(\w+)\s*(?::\s*(.*))?$")
HYDRA_COMMANDS = {"train", "prepare", "plan", "eval", "sky"}
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


@dataclass(frozen=True)
class Command:
    where: str  # file:line, for the test id and failure messages
    mode: str
    reason: str
    words: tuple[str, ...]  # the shell words: NAME=value assignments, then `vicuna-exp` and its args

    @property
    def env(self) -> dict[str, str]:
        return dict(w.split("=", 1) for w in self.words[:self._start])

    @property
    def argv(self) -> tuple[str, ...]:
        return self.words[self._start:]

    @property
    def _start(self) -> int:
        n = 0
        while n < len(self.words) and ENV_ASSIGNMENT.match(self.words[n]):
            n += 1
        return n


def _shell_commands(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(line number, command) with `\\` continuations joined; comment-only lines are kept as they are."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for lineno, line in lines:
        if pending is not None:
            pending = (pending[0], pending[1] + " " + line.strip())
        elif line.strip():
            pending = (lineno, line.strip())
        if pending is not None and not pending[1].endswith("\\"):
            out.append(pending)
            pending = None
        elif pending is not None:
            pending = (pending[0], pending[1][:-1])
    return out


def readme_blocks(path: Path = ROOT / "README.md") -> list[tuple[int, list[tuple[int, str]]]]:
    """Each ```bash block: (opening line, [(line number, command or comment)])."""
    blocks, current, start = [], None, 0
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if current is None and line.strip() == "```bash":
            current, start = [], lineno
        elif current is not None and line.strip() == "```":
            blocks.append((start, _shell_commands(current)))
            current = None
        elif current is not None:
            current.append((lineno, line))
    return blocks


def readme_commands() -> list[Command]:
    commands = []
    for start, entries in readme_blocks():
        mode, reason = None, ""
        for lineno, text in entries:
            m = MARKER.match(text)
            if m:
                mode, reason = m.group(1), (m.group(2) or "").strip()
                continue
            if text.startswith("#"):
                continue
            argv = tuple(text.split()) if mode == "skip" else tuple(shlex.split(text, comments=True))
            commands.append(Command(f"README.md:{lineno}", mode or "", reason, argv))
        assert entries and MARKER.match(entries[0][1]), f"README.md:{start}: the block has no `# test:` marker first"
    return commands


def comment_commands() -> list[Command]:
    """Launch commands in the comments of the config tree and the sweeps (`#   vicuna-exp ...`)."""
    out = []
    for path in sorted([*(ROOT / "conf").rglob("*.yaml"), *(ROOT / "sweeps").glob("*.yaml")]):
        comments = [(n, line.lstrip("#").strip()) for n, line in enumerate(path.read_text().splitlines(), 1)
                    if line.startswith("#")]
        for lineno, text in _shell_commands(comments):
            if re.match(r"^([A-Z_][A-Z0-9_]*=\S+\s+)*vicuna-exp ", text):
                out.append(Command(f"{path.relative_to(ROOT)}:{lineno}", "plan", "",
                                   tuple(shlex.split(text, comments=True))))
    return out


# ---- the markers themselves ------------------------------------------------------------------------
def test_every_block_and_command_is_marked() -> None:
    commands = readme_commands()
    assert len(commands) > 30
    for c in commands:
        assert c.mode in MODES, f"{c.where}: unknown marker mode {c.mode!r}; use one of {', '.join(MODES)}"
        if c.mode == "skip":
            assert c.reason, f"{c.where}: `# test: skip` needs a reason"
        else:
            assert c.argv[0] == "vicuna-exp", f"{c.where}: only vicuna-exp commands can be tested; mark it skip"
            if c.mode == "cfg":
                assert c.argv[1] in HYDRA_COMMANDS, f"{c.where}: {c.argv[1]} has no --cfg job form"


def test_a_block_without_a_marker_fails(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n```bash\nvicuna-exp train\n```\n")
    (start, entries), = readme_blocks(readme)
    assert start == 3 and not MARKER.match(entries[0][1])


# ---- running them -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model directory, the sample data and the directory the commands run in."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vicuna_exp.data.tokenizer import PACKAGED_TOKENIZER_DIR

    root = tmp_path_factory.mktemp("readme")
    model = root / "tiny-llama-hf"
    tok = AutoTokenizer.from_pretrained(str(PACKAGED_TOKENIZER_DIR))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(model))
    tok.save_pretrained(str(model))
    (root / "cwd").mkdir()
    return {"model": model, "data": ROOT / "vicuna_exp" / "assets" / "sample_sharegpt.json", "cwd": root / "cwd"}


MODEL_DIR = re.compile(r"(/path/to|/data|/models|/weights)/[\w.-]+-hf")
DATA_FILE = re.compile(r"(/path/to|/data)/sharegpt\.json")


def substitute(argv: tuple[str, ...], s: dict[str, Path]) -> list[str]:
    out = []
    for word in argv[1:]:
        if word == "...":
            continue
        if word == "data.path=...":
            word = f"data.path={s['data']}"
        word = MODEL_DIR.sub(str(s["model"]), word)
        word = DATA_FILE.sub(str(s["data"]), word)
        out.append(word)
    return out


def as_tested(c: Command, s: dict[str, Path]) -> list[str]:
    """The argv (after `vicuna-exp`) that the command's mode runs."""
    args = substitute(c.argv, s)
    if c.mode == "cfg":
        return [*args, "--cfg", "job"]
    if c.mode == "plan":
        if args[0] == "train":
            return ["plan", *args[1:]]
        if args[0] == "sweep":
            return ["plan", f"sweep={args[1]}", *args[2:]]
        return args
    if args[0] == "train" and "--help" not in args:
        args.append("trainer.max_steps=1")
    if args[0] == "report" and args[1] == "outputs/sweeps/context_length":
        _link_context_sweep(s["cwd"])
    return args


def _link_context_sweep(cwd: Path) -> None:
    """`outputs/sweeps/context_length`: the README's own `train -m context=512,2048` multirun."""
    target = cwd / "outputs" / "sweeps" / "context_length"
    if target.exists():
        return
    runs = sorted((cwd / "outputs" / "multirun").glob("*/*"))
    assert runs, "the README's `vicuna-exp train -m context=512,2048` should have run before the report"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(runs[-1], target_is_directory=True)


TESTED = [c for c in readme_commands() + comment_commands() if c.mode != "skip"]


@pytest.mark.parametrize("command", TESTED, ids=[f"{c.where}:{c.mode}" for c in TESTED])
def test_the_command_runs_as_written(command: Command, stand_ins: dict[str, Path],
                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(stand_ins["cwd"])
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    for name, value in command.env.items():  # `LLAMA_ROOT=/data vicuna-exp ...`
        monkeypatch.setenv(name, value)
    argv = as_tested(command, stand_ins)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, f"{command.where}: vicuna-exp {shlex.join(argv)} exited {code}\n{err[-3000:]}"
    if command.mode == "plan" and argv[0] == "plan":
        assert "Verdict:" in out or "jobs:" in out, out[-2000:]
