"""Peak host memory while `finetune=qlora` loads a pretrained base on the CPU, against the base's
bf16 size and against the bf16 load `finetune=lora` does, each in a fresh process.

    .venv/bin/python bench/bench_qlora_load.py [--hidden 768 --intermediate 2048 --layers 8] [--json out.json]

The base (about 100M parameters by default, LLaMA layout, the packaged tokenizer's vocabulary) is written
once in bf16 safetensors. Each load runs in its own process, which samples its own /proc status
every 2 ms: the peak anonymous memory (tensors the process allocated) and the peak resident size
(VmHWM, which also counts the pages of the memory-mapped safetensors files it read). Both are
reported above the process's level after its imports, so they are what the load itself costs.
Every parameter is read once after the load: transformers' bf16 load (`lora`) maps the files and
reads a weight's pages only when it is first used.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 2**20


def write_base(out: Path, hidden: int, intermediate: int, layers: int) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vicuna_exp.data.tokenizer import PACKAGED_TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(str(PACKAGED_TOKENIZER_DIR))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out), max_shard_size="200MB")
    tok.save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


CHILD = r"""
import json, sys, threading, time
def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("RssAnon", "VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    return fields
import torch
from vicuna_exp.data.tokenizer import load_tokenizer, token_ids
from vicuna_exp.hydra_app import compose
from vicuna_exp.model import make_model_spec
from vicuna_exp.quantize import import_bitsandbytes
import_bitsandbytes()
import peft, transformers  # every import before the baseline
method, path = sys.argv[1], sys.argv[2]
cfg = compose([f"finetune={method}", "model.init=pretrained", f"model.path={path}", "trainer.precision=bf16"])
tok = load_tokenizer(path)
spec = make_model_spec(cfg.model, vocab_size=len(tok), device=torch.device("cpu"), precision="bf16",
                       finetune=cfg.finetune, token_ids=token_ids(tok), seed=0)
base = status()
peak = {"anon": base["RssAnon"]}
done = False
def sample():
    while not done:
        peak["anon"] = max(peak["anon"], status()["RssAnon"])
        time.sleep(0.002)
t = threading.Thread(target=sample, daemon=True); t.start()
t0 = time.perf_counter()
model = spec.build("cpu")
seconds = time.perf_counter() - t0
for p in model.parameters():  # read every weight once: a lazily mapped one counts once it is touched
    p.detach().float().sum() if p.numel() < 2**16 else p.detach().view(-1).sum(dtype=torch.float32)
done = True; t.join()
end = status()
print(json.dumps({"method": method, "seconds": seconds, "peak_anon_bytes": peak["anon"] - base["RssAnon"],
                  "peak_rss_bytes": end["VmHWM"] - base["VmRSS"], "held_anon_bytes": end["RssAnon"] - base["RssAnon"]}))
"""


def measure(method: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(path)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-qlora-") as tmp:
        n = write_base(Path(tmp), args.hidden, args.intermediate, args.layers)
        rows = [measure(method, Path(tmp)) for method in ("qlora", "lora")]
    bf16 = 2 * n
    print(f"base: {n / 1e6:.1f}M params, {bf16 / MIB:.1f} MiB in bf16")
    print(f"{'method':8} {'load s':>7} {'peak anon MiB':>14} {'x bf16':>7} {'peak RSS MiB':>13} {'x bf16':>7} "
          f"{'held MiB':>9}")
    for r in rows:
        print(f"{r['method']:8} {r['seconds']:7.2f} {r['peak_anon_bytes'] / MIB:14.1f} {r['peak_anon_bytes'] / bf16:7.2f} "
              f"{r['peak_rss_bytes'] / MIB:13.1f} {r['peak_rss_bytes'] / bf16:7.2f} {r['held_anon_bytes'] / MIB:9.1f}")
    if args.json:
        args.json.write_text(json.dumps({"params": n, "bf16_bytes": bf16, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
