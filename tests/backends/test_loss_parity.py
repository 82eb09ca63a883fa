"""The chunked loss equals the full-logits loss, its gradients and its eval loss, on every backend.

`single` runs in this process; ddp, fsdp and deepspeed_zero3 run in one 2-process torchrun launch
(gloo, CPU) of `loss_parity_worker.py`, tied and untied embeddings each (the tied model also
checkpoints its layers). Budget: about a minute on 2 busy cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import loss_parity_worker as worker
import pytest
from backend_jobs import ENV, TIMEOUT_S

pytestmark = pytest.mark.multiprocess

MULTI = ["ddp", "fsdp", "deepspeed_zero3"]
CASES = [f"{b}/{t}" for b in ["single", *MULTI] for t in ("untied", "tied")]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("loss_parity")
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(Path(worker.__file__)), str(out / "multi.json"), *MULTI],
                           env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert multi.returncode == 0, multi.stderr[-3000:]
    worker.main(str(out / "single.json"), ["single"])
    return {**json.loads((out / "single.json").read_text()), **json.loads((out / "multi.json").read_text())}


@pytest.mark.parametrize("case", CASES)
def test_chunked_loss_equals_full_logits_loss(case: str, results: dict[str, dict]) -> None:
    r = results[case]
    assert r["grad_max_abs"] > 1e-3  # real gradients, so a match means something
    assert abs(r["loss_chunked"] - r["loss_full"]) < 1e-5
    assert r["grad_max_diff"] < 1e-5
    assert abs(r["eval_chunked"] - r["eval_full"]) < 1e-6


def test_every_backend_sees_the_same_global_batch(results: dict[str, dict]) -> None:
    """The sharded backends agree with each other (their data is the same two ranks' data)."""
    for tied in ("untied", "tied"):
        losses = {b: results[f"{b}/{tied}"]["loss_full"] for b in MULTI}
        assert max(losses.values()) - min(losses.values()) < 1e-5, losses
