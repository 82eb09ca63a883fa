"""Collectives: every one goes through `vicuna_exp.distributed`, on the process group's device."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from vicuna_exp import distributed as D

PACKAGE = Path(D.__file__).resolve().parent
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "gather", "scatter",
               "reduce", "all_to_all", "monitored_barrier", "gather_object", "scatter_object_list"}
DIST_MODULES = {"torch.distributed", "deepspeed.comm"}


def collective_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls of a torch.distributed (or deepspeed.comm) collective, under any name it was imported as."""
    aliases: set[str] = set()
    direct: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name in DIST_MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module in DIST_MODULES:
            direct |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "deepspeed"):
            aliases |= {a.asname or a.name for a in node.names if a.name in ("distributed", "comm")}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in direct:
            found.append((node.lineno, f.id))
        elif isinstance(f, ast.Attribute) and f.attr in COLLECTIVES:
            owner = ast.unparse(f.value)
            if owner in aliases or owner in DIST_MODULES:
                found.append((node.lineno, f"{owner}.{f.attr}"))
    return found


def test_no_collective_outside_the_distributed_module() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == Path(D.__file__).resolve():
            continue
        for lineno, name in collective_calls(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{path.relative_to(PACKAGE.parent)}:{lineno}: {name}")
    assert not offenders, "collectives outside vicuna_exp/distributed.py (route them through it):\n" + "\n".join(offenders)


def test_the_static_check_sees_every_way_of_calling_a_collective() -> None:
    code = ("import torch.distributed as dist\nimport torch\nfrom torch.distributed import all_reduce as ar\n"
            "dist.all_reduce(t)\ntorch.distributed.barrier()\nar(t)\nx.all_reduce(t)\n")
    assert [name for _, name in collective_calls(ast.parse(code))] == [
        "dist.all_reduce", "torch.distributed.barrier", "ar"]


def test_collective_device_is_cuda_under_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(D.dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(D.torch.cuda, "current_device", lambda: 3)
    assert D.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(D.dist, "get_backend", lambda *a: "gloo")
    assert D.collective_device() == torch.device("cpu")


def test_all_reduce_moves_a_host_tensor_to_the_collective_device_and_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under nccl a CPU tensor is reduced on the GPU; the caller's tensor holds the result."""
    seen = []

    def fake_all_reduce(t: torch.Tensor, op: object) -> None:
        seen.append(t.device)
        t.mul_(2)

    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(D.dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(D.dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(D, "collective_device", lambda: torch.device("meta"))
    host = torch.tensor([1.0, 2.0])
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device: self.clone())  # stands in for the copy to the GPU
    assert D.all_reduce(host) is host and host.tolist() == [2.0, 4.0]
    assert len(seen) == 1


def test_each_worker_gets_its_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from vicuna_exp.launch import threads_per_worker, worker_env

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert threads_per_worker(8) == 2 and threads_per_worker(32) == 1
    assert worker_env({}, procs_per_node=4)["OMP_NUM_THREADS"] == "4"
    assert worker_env({"OMP_NUM_THREADS": "7"}, procs_per_node=4)["OMP_NUM_THREADS"] == "7"  # the user's wins
