"""Single-process checks of the backend plumbing: config options, generated DeepSpeed config,
hardware checks, torchrun command, failure attribution, sharded reading and the shard writer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from vicuna_exp.errors import UsageError
from vicuna_exp.hydra_app import compose

BACKEND_OPTIONS = ["single", "ddp", "fsdp", "fsdp_offload", "deepspeed_zero2", "deepspeed_zero3",
                   "deepspeed_zero3_offload"]


def cfg_for(*overrides: str):
    return compose(list(overrides))


# ---- options and the generated DeepSpeed config ------------------------------------------------------
@pytest.mark.parametrize("option", BACKEND_OPTIONS)
def test_every_backend_option_composes(option: str) -> None:
    from vicuna_exp.backends import REGISTRY

    cfg = cfg_for(f"backend={option}")
    assert cfg.backend.name in REGISTRY


def test_option_meanings() -> None:
    assert cfg_for("backend=fsdp_offload").backend.cpu_offload is True
    assert cfg_for("backend=fsdp").backend.cpu_offload is False
    z3o = cfg_for("backend=deepspeed_zero3_offload").backend
    assert (z3o.zero_stage, z3o.offload_optimizer, z3o.offload_params) == (3, True, True)
    assert cfg_for("backend=deepspeed_zero2").backend.zero_stage == 2


class _RecordsSync:
    """Stands in for the fully_shard-ed root: records what FSDP2 is told before each micro-batch."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def set_requires_gradient_sync(self, value: bool) -> None:
        self.calls.append(("gradient_sync", value))

    def set_requires_all_reduce(self, value: bool) -> None:
        self.calls.append(("all_reduce", value))


@pytest.mark.parametrize("every,want", [
    (True, [("gradient_sync", True), ("all_reduce", False), ("gradient_sync", True), ("all_reduce", True)]),
    (False, [("gradient_sync", False), ("gradient_sync", True)]),
])
def test_fsdp_accumulation_reduces_as_the_knob_says(every: bool, want: list) -> None:
    """true: reduce-scatter every micro-batch, the HSDP all-reduce on the last one only; false:
    nothing until the last. (Both compute the same gradient: tests/plan/test_plan_measured.py.)"""
    from vicuna_exp.backends.fsdp import FSDPBackend
    from vicuna_exp.choices import Precision
    from vicuna_exp.distributed import DistInfo

    cfg = cfg_for("backend=fsdp", f"backend.reduce_every_micro_batch={str(every).lower()}")
    backend = FSDPBackend(cfg, DistInfo(), torch.device("cpu"), Precision.fp32)
    backend.model = _RecordsSync()
    for is_last in (False, True):
        with backend.accumulate(is_last):
            pass
    assert backend.model.calls == want


def test_deepspeed_config_follows_the_hydra_values() -> None:
    from vicuna_exp.backends.deepspeed import deepspeed_config

    cfg = cfg_for("backend=deepspeed_zero3", "launcher.nproc_per_node=2", "trainer.micro_batch_size=2",
                  "trainer.global_batch_size=16", "trainer.grad_clip=0.5")
    ds = deepspeed_config(cfg, "fp32")
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4  # 16 rows / (2 ranks x 2 rows)
    assert ds["train_batch_size"] == 16
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and "offload_optimizer" not in ds["zero_optimization"]
    assert ds["bf16"] == {"enabled": False}
    mixed = deepspeed_config(cfg, "bf16_mixed")
    assert mixed["bf16"]["enabled"] and mixed["communication_data_type"] == "fp32"
    assert "bf16_master_weights_and_grads" not in mixed["bf16"]  # fp32 master weights, as FSDP's policy
    pure = deepspeed_config(cfg, "bf16")
    assert pure["bf16"]["bf16_master_weights_and_grads"] and pure["bf16"]["bf16_optimizer_states"]
    off = deepspeed_config(cfg_for("backend=deepspeed_zero3_offload"), "fp32")["zero_optimization"]
    assert off["offload_optimizer"]["device"] == "cpu" and off["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize(("gbs", "cap", "declared"), [(16, 2, (2, 4)), (10, 2, (1, 5)), (12, 4, (3, 2)),
                                                     (4, 16, (2, 1)), (14, 3, (1, 7))])
def test_deepspeed_declares_what_is_trained_under_an_uneven_cut(gbs: int, cap: int, declared: tuple) -> None:
    """train_batch_size is the global batch; the declared accumulation is > 1 exactly when ours is."""
    from vicuna_exp.backends.deepspeed import deepspeed_config
    from vicuna_exp.config import grad_accumulation_steps

    cfg = cfg_for("backend=deepspeed_zero2", "launcher.nproc_per_node=2", f"trainer.micro_batch_size={cap}",
                  f"trainer.global_batch_size={gbs}")
    ds = deepspeed_config(cfg, "fp32")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == declared
    assert ds["train_batch_size"] == gbs == declared[0] * declared[1] * 2
    assert ds["train_micro_batch_size_per_gpu"] <= cap
    assert (ds["gradient_accumulation_steps"] > 1) == (grad_accumulation_steps(cfg) > 1)


def test_deepspeed_config_refuses_impossible_combinations() -> None:
    from vicuna_exp.backends.deepspeed import deepspeed_config

    with pytest.raises(UsageError, match="backend.zero_stage"):
        deepspeed_config(cfg_for("backend=deepspeed_zero3", "backend.zero_stage=1"), "fp32")
    with pytest.raises(UsageError, match="offload_params"):
        deepspeed_config(cfg_for("backend=deepspeed_zero2", "backend.offload_params=true"), "fp32")


# ---- hardware checks before workers start ---------------------------------------------------------------
def test_nccl_without_gpus_is_refused() -> None:
    from vicuna_exp.launch import check_hardware

    with pytest.raises(UsageError, match="launcher.dist_backend=nccl"):
        check_hardware(cfg_for("backend=fsdp", "launcher.nproc_per_node=2", "launcher.dist_backend=nccl"))


def test_cuda_device_without_gpus_is_refused() -> None:
    from vicuna_exp.launch import check_hardware

    with pytest.raises(UsageError, match="trainer.device=cuda"):
        check_hardware(cfg_for("backend=fsdp", "launcher.nproc_per_node=2", "trainer.device=cuda"))


class _FakeCuda:
    """Pretend the driver reports GPUs (the machine running the tests has none)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int, bf16: bool) -> None:
        from vicuna_exp import hardware

        gpu = hardware.DeviceFacts("Tesla V100" if not bf16 else "NVIDIA A100-SXM4-80GB", 80.0, count,
                                   compute_capability=8.0 if bf16 else 7.0)
        monkeypatch.setattr(hardware, "probe_gpus", lambda: gpu)


def test_more_processes_than_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from vicuna_exp.launch import check_hardware

    _FakeCuda(monkeypatch, count=2, bf16=True)
    with pytest.raises(UsageError, match="nproc_per_node=4.*2 GPU"):
        check_hardware(cfg_for("backend=fsdp", "launcher.nproc_per_node=4"))


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from vicuna_exp.launch import check_hardware

    _FakeCuda(monkeypatch, count=2, bf16=False)
    with pytest.raises(UsageError, match="trainer.precision=bf16_mixed.*V100"):
        check_hardware(cfg_for("backend=fsdp", "launcher.nproc_per_node=2", "trainer.precision=bf16_mixed"))


def test_zero_offload_without_the_cpu_adam_op_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from vicuna_exp.backends import build_ops
    from vicuna_exp.launch import check_hardware

    monkeypatch.setattr(build_ops, "op_status", lambda name: (name != "CPUAdamBuilder", False))
    with pytest.raises(UsageError, match="CPU Adam op"):
        check_hardware(cfg_for("backend=deepspeed_zero3_offload", "launcher.nproc_per_node=2"))
    check_hardware(cfg_for("backend=deepspeed_zero3", "launcher.nproc_per_node=2"))  # no offload: fine


def test_several_nodes_need_one_shared_run_dir() -> None:
    from vicuna_exp.launch import check_run_dir_shared

    cfg = cfg_for("backend=fsdp", "launcher.nproc_per_node=2", "launcher.nnodes=2", "launcher.rdzv_endpoint=node0:29500")
    with pytest.raises(UsageError, match="hydra.run.dir"):
        check_run_dir_shared(cfg, ["hydra.verbose=true"])
    check_run_dir_shared(cfg, ["hydra.run.dir=/shared/x"])
    with pytest.raises(UsageError, match="rdzv_endpoint"):
        check_run_dir_shared(cfg_for("launcher.nnodes=2"), ["hydra.run.dir=/shared/x"])


def test_torchrun_command_single_and_multi_node(tmp_path: Path) -> None:
    from vicuna_exp.launch import torchrun_command

    one = torchrun_command(cfg_for("backend=fsdp", "launcher.nproc_per_node=2"), tmp_path)
    assert "--standalone" in one and one[-3:] == ["-m", "vicuna_exp.worker", str(tmp_path)]
    assert any(a.startswith("--signals-to-handle=") and "SIGUSR1" in a for a in one)
    two = torchrun_command(cfg_for("backend=fsdp", "launcher.nproc_per_node=8", "launcher.nnodes=2",
                                   "launcher.node_rank=1", "launcher.rdzv_endpoint=node0:29500"), tmp_path)
    assert "--standalone" not in two and "--node-rank=1" in two and "--master-addr=node0" in two
    assert "--nproc-per-node=8" in two and "--nnodes=2" in two


# ---- what the job concludes from its workers ------------------------------------------------------------
def _status(run_dir: Path, rank: int, code: int, error: str | None = None, t: float | None = None) -> None:
    from vicuna_exp.worker import write_status

    write_status(run_dir, rank, code, error)
    if t is not None:
        f = run_dir / ".workers" / f"rank_{rank}.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "time": t}))


def test_conclude_maps_worker_statuses_to_the_job_exit_code(tmp_path: Path) -> None:
    from vicuna_exp.launch import conclude
    from vicuna_exp.rundir import save_resolved_config

    cfg = cfg_for("backend=fsdp", "launcher.nproc_per_node=2")
    save_resolved_config(cfg, tmp_path, [])
    t0 = time.time() - 1
    _status(tmp_path, 0, 0)
    _status(tmp_path, 1, 0)
    assert conclude(cfg, tmp_path, 0, t0, "") == 0
    _status(tmp_path, 0, 75)
    _status(tmp_path, 1, 75)
    assert conclude(cfg, tmp_path, 0, t0, "") == 75
    assert conclude(cfg, tmp_path, 0, time.time() + 10, "") == 1  # statuses older than this launch do not count
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_the_rank_that_vanished_is_the_root_cause(tmp_path: Path) -> None:
    from vicuna_exp.launch import conclude
    from vicuna_exp.rundir import save_resolved_config

    cfg = cfg_for("backend=fsdp", "launcher.nproc_per_node=2")
    save_resolved_config(cfg, tmp_path, ["backend=fsdp"])
    t0 = time.time() - 1
    _status(tmp_path, 0, 1, "training failed: RuntimeError: Connection closed by peer")
    torchrun = ("[0]:\n  time      : x\n  host      : localhost\n  rank      : 1 (local_rank: 1)\n"
                "  exitcode  : -9 (pid: 123)\n  error_file: <N/A>\n  traceback : Signal 9 (SIGKILL) received by PID 123\n")
    assert conclude(cfg, tmp_path, 1, t0, torchrun) == 1
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "failed" and s["error"].startswith("rank 1") and "SIGKILL" in s["error"]
    assert "Connection closed" in s["worker_errors"]["0"]
    assert s["overrides"] == ["backend=fsdp"] and s["config_hash"]


def test_the_earliest_reported_failure_is_the_root_cause(tmp_path: Path) -> None:
    from vicuna_exp.launch import root_cause

    statuses = {0: {"rank": 0, "exit_code": 1, "error": "later", "time": 20.0},
                1: {"rank": 1, "exit_code": 1, "error": "ValueError: first", "time": 10.0}}
    error, errors = root_cause(2, statuses, {}, 1)
    assert error == "rank 1: ValueError: first" and set(errors) == {"0", "1"}


# ---- reading only what a rank needs ------------------------------------------------------------------
@pytest.fixture()
def st_model(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 5), "b.weight": torch.randn(11), "c.weight": torch.randn(3, 4)}
    save_file({"a.weight": tensors["a.weight"]}, str(tmp_path / "m-1.safetensors"))
    save_file({"b.weight": tensors["b.weight"], "c.weight": tensors["c.weight"]}, str(tmp_path / "m-2.safetensors"))
    index = {"weight_map": {"a.weight": "m-1.safetensors", "b.weight": "m-2.safetensors", "c.weight": "m-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path, tensors


def test_read_flat_reads_only_the_rows_it_needs(st_model: tuple[Path, dict]) -> None:
    from vicuna_exp.weights import SafetensorsModel

    path, tensors = st_model
    with SafetensorsModel(path) as src:
        for start, end in [(0, 5), (3, 12), (33, 35), (0, 35)]:
            got = src.read_flat("a.weight", start, end)
            assert torch.equal(got, tensors["a.weight"].reshape(-1)[start:end])
        before = src.elements_read
        src.read_flat("a.weight", 11, 14)  # rows 2 of 7 (elements 10..14)
        assert src.elements_read - before == 5
        assert torch.equal(src.read_flat("b.weight", 4, 9), tensors["b.weight"][4:9])


def test_full_tensor_loading_and_clear_errors(st_model: tuple[Path, dict]) -> None:
    from vicuna_exp.weights import load_full_tensors

    path, tensors = st_model

    class M(torch.nn.Module):
        def __init__(self, a_shape: tuple[int, ...] = (7, 5)) -> None:
            super().__init__()
            self.a = torch.nn.Linear(a_shape[1], a_shape[0], bias=False)
            self.c = torch.nn.Linear(4, 3, bias=False)

    m = M()
    assert load_full_tensors(m, path) == 35 + 12
    assert torch.equal(m.a.weight, tensors["a.weight"]) and torch.equal(m.c.weight, tensors["c.weight"])
    with pytest.raises(UsageError, match="a.weight has shape"):
        load_full_tensors(M((7, 6)), path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "m-1.safetensors"}}))
    with pytest.raises(UsageError, match="lacks c.weight"):
        load_full_tensors(M(), path)


def test_no_safetensors_is_a_usage_error(tmp_path: Path) -> None:
    from vicuna_exp.weights import SafetensorsModel

    with pytest.raises(UsageError, match="safetensors"):
        SafetensorsModel(tmp_path)


# ---- writing an export shard by shard ---------------------------------------------------------------
def test_writer_flushes_shards_and_writes_a_loadable_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from vicuna_exp.export import write_hf_config, write_tensors

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, use_cache=False)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg)
    total = sum(p.numel() * 2 for p in model.parameters())  # bf16 bytes
    writer = write_tensors(((n, p.detach()) for n, p in model.named_parameters()), tmp_path, torch.bfloat16,
                           is_writer=True, max_shard_bytes=total // 6)
    write_hf_config(cfg, tmp_path, "bf16")
    assert writer is not None and writer.total_bytes == total
    assert writer.peak_bytes <= total // 6 + max(p.numel() * 2 for p in model.parameters())
    files = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(files) >= 6 and not list(tmp_path.glob(".part-*"))
    assert files[0].name.endswith(f"-of-{len(files):05d}.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert loaded.dtype == torch.bfloat16 and loaded.config.use_cache is True
    for name, p in model.named_parameters():
        assert torch.equal(loaded.state_dict()[name], p.detach().to(torch.bfloat16)), name


def test_export_command_rejects_bad_paths(tmp_path: Path) -> None:
    from vicuna_exp.export import main

    with pytest.raises(UsageError, match="no such directory"):
        main([str(tmp_path / "missing"), str(tmp_path / "out")])
    (tmp_path / "run").mkdir()
    with pytest.raises(UsageError, match="no complete checkpoint"):
        main([str(tmp_path / "run"), str(tmp_path / "out")])


def test_torchruns_failure_report_stays_off_the_terminal_and_a_workers_traceback_does_not() -> None:
    from vicuna_exp.launch import TerminalFilter

    worker = ['[rank1]: loss 4.2\n', 'Traceback (most recent call last):\n', '  File "w.py", line 3, in step\n',
              '    raise ValueError("bad batch")\n', 'ValueError: bad batch\n']
    torchrun = ['Traceback (most recent call last):\n', '  File "/venv/bin/torchrun", line 8, in <module>\n',
                '    sys.exit(main())\n',
                'torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n', '=' * 60 + '\n',
                'vicuna_exp.worker FAILED\n', '-' * 60 + '\n', 'Failures:\n', '  <NO_OTHER_FAILURES>\n',
                '-' * 60 + '\n', 'Root Cause (first observed failure):\n', '[0]:\n',
                '  rank      : 1 (local_rank: 1)\n', '  exitcode  : -9 (pid: 7)\n', '=' * 60 + '\n']
    shown: list[str] = []
    f = TerminalFilter(shown.append)
    for line in [*worker, 'E1201 failed (exitcode: -9) local_rank: 1\n', *torchrun, 'after\n']:
        f.feed(line)
    f.flush()
    assert shown == [*worker, 'E1201 failed (exitcode: -9) local_rank: 1\n', 'after\n'] and f.dropped


def test_a_dead_builds_op_lock_is_removed_and_a_fresh_one_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    import os

    from vicuna_exp.backends import build_ops

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    assert build_ops.clear_stale_lock("cpu_adam") is None and lock.exists()  # a build may be running
    old = time.time() - build_ops.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    assert build_ops.clear_stale_lock("cpu_adam") == lock and not lock.exists()
    assert "did not finish" in caplog.text
    assert build_ops.clear_stale_lock("deepspeed_shm_comm") is None  # no lock, nothing to do
