"""`vicuna-exp eval report`: scores per model and category, win rates, relative total score.

    vicuna-exp eval report eval.run_dir=RUN [eval.reference_model=gpt-3.5-turbo]

Reads the judgment files of one question set (`RUN_DIR/eval/<bench>/model_judgment/`) and
writes a table to stdout, `report.md`, `scores.json` and `report.png` beside them.
`summarize_run_eval(run_dir)` gives the sweep report (`vicuna-exp report`) a few eval columns
per run, read from the same files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vicuna_exp.errors import EXIT_FAILED, EXIT_OK, UsageError
from vicuna_exp.eval.aggregate import (
    ModelRecord,
    ModelScores,
    pair_result,
    relative_total,
    single_scores,
    win_rates,
)
from vicuna_exp.eval.config import EvalPaths, resolve_paths, safe_name
from vicuna_exp.eval.jsonl import read_jsonl, write_json_atomic
from vicuna_exp.eval.questions import load_questions

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- reading


def judgment_files(paths: EvalPaths, judge_model: str | None) -> list[Path]:
    """The single and pairwise judgment files of one judge, or of every judge when none is named."""
    d = paths.judgments_dir
    if not d.is_dir():
        return []
    pattern = f"{safe_name(judge_model)}_" if judge_model else "*_"
    files = sorted(d.glob(f"{pattern}single.jsonl")) + sorted(d.glob(f"{pattern}pair.jsonl"))
    return [f for f in files if f.is_file()]


def load_rows(path: Path) -> list[dict[str, Any]]:
    return [row for _, row in read_jsonl(path)]


def _ungraded_rows(jfile: Path) -> list[dict[str, Any]]:
    ufile = jfile.with_name(jfile.stem + "_ungraded.jsonl")
    return load_rows(ufile) if ufile.is_file() else []


# ---------------------------------------------------------------- computing


def single_section(rows: list[dict[str, Any]], categories: Mapping[Any, str], reference: str | None) -> dict[str, Any]:
    scores = single_scores(rows, categories)
    models = sorted(scores, key=lambda m: -(scores[m].overall.value or 0.0))
    out: dict[str, Any] = {"mode": "single", "reference_model": reference, "models": {}}
    for m in models:
        ms: ModelScores = scores[m]
        entry: dict[str, Any] = {
            "score": ms.overall.value,
            "n": ms.overall.n,
            "unparseable": ms.unparseable,
            "turns": {str(t): mean.value for t, mean in sorted(ms.by_turn.items())},
            "categories": {c: mean.value for c, mean in sorted(ms.by_category.items())},
        }
        if reference and reference in scores and m != reference:
            ratio, n = relative_total(rows, m, reference)
            entry["relative_score"], entry["relative_n"] = ratio, n
        out["models"][m] = entry
    return out


def pair_section(rows: list[dict[str, Any]], categories: Mapping[Any, str], baseline: str | None) -> dict[str, Any]:
    """Win rates per model; against the baseline only, when there is one (named, or evident
    because every line has the same second model, as judging against a baseline writes them)."""
    if not baseline:
        seconds = {r["model_2"] for r in rows}
        baseline = seconds.pop() if len(seconds) == 1 else None
    has_baseline = bool(baseline) and any(baseline in (r["model_1"], r["model_2"]) for r in rows)
    records = win_rates(rows, categories, baseline if has_baseline else None)
    models = sorted(records, key=lambda m: -(records[m].overall.adjusted or 0.0))
    out: dict[str, Any] = {"mode": "pairwise", "baseline": baseline if has_baseline else None, "models": {}}
    for m in models:
        rec: ModelRecord = records[m]
        wl = rec.overall
        out["models"][m] = {
            "opponents": sorted(rec.opponents),
            "win": wl.win, "loss": wl.loss, "tie": wl.tie, "n": wl.n, "unparseable": rec.unparseable,
            "win_rate": wl.win_rate, "loss_rate": wl.loss_rate, "win_rate_adjusted": wl.adjusted,
            "categories": {c: {"win": x.win, "loss": x.loss, "tie": x.tie, "win_rate_adjusted": x.adjusted}
                           for c, x in sorted(rec.by_category.items())},
        }
    return out


def ungraded_list(rows: list[dict[str, Any]], extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items without a usable judgment: unparseable lines, and items the judge never answered."""
    out = []
    for r in rows:
        bad = not (isinstance(r.get("score"), (int, float)) and r["score"] >= 0) if "model" in r else pair_result(r) is None
        if bad:
            out.append({k: r[k] for k in ("question_id", "model", "model_1", "model_2", "turn") if k in r}
                       | {"reason": "unparseable judgment"})
    out += extra
    return out


# ---------------------------------------------------------------- rendering


def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _tables(section: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for one judgment file's section."""
    models = section["models"]
    cats = sorted({c for e in models.values() for c in e["categories"]})
    if section["mode"] == "single":
        turns = sorted({t for e in models.values() for t in e["turns"]})
        ref = section.get("reference_model")
        header = ["model", "score", *[f"turn {t}" for t in turns], "graded", "unparseable"]
        header += [f"relative to {ref}"] if ref else []
        rows = []
        for m, e in models.items():
            row = [m, _f(e["score"]), *[_f(e["turns"].get(t)) for t in turns], str(e["n"]), str(e["unparseable"])]
            if ref:
                row.append("(reference)" if m == ref else _pct(e.get("relative_score")))
            rows.append(row)
        cat_rows = [[m, *[_f(e["categories"].get(c)) for c in cats]] for m, e in models.items()]
        return [("mean score (1-10)", header, rows), ("mean score by category", ["model", *cats], cat_rows)]
    header = ["model", "vs", "win", "loss", "tie", "win rate", "loss rate", "adjusted win rate", "unparseable"]
    rows = [[m, ", ".join(e["opponents"]), str(e["win"]), str(e["loss"]), str(e["tie"]), _pct(e["win_rate"]),
             _pct(e["loss_rate"]), _pct(e["win_rate_adjusted"]), str(e["unparseable"])] for m, e in models.items()]
    cat_rows = [[m, *[_pct(e["categories"].get(c, {}).get("win_rate_adjusted")) for c in cats]]
                for m, e in models.items()]
    return [("pairwise: win / loss / tie (a disagreement between the two orders is a tie)", header, rows),
            ("adjusted win rate (win + 0.5 tie) by category", ["model", *cats], cat_rows)]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def plot(sections: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    """One panel per judgment file: mean score by category (single) or win/tie/loss bars (pairwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sections), 1, figsize=(10, 4.2 * len(sections)), squeeze=False)
    for ax, (title, sec) in zip(axes[:, 0], sections, strict=True):
        models = list(sec["models"])
        if sec["mode"] == "single":
            cats = sorted({c for e in sec["models"].values() for c in e["categories"]}) + ["overall"]
            width = 0.8 / max(1, len(models))
            for i, m in enumerate(models):
                e = sec["models"][m]
                vals = [e["categories"].get(c) if c != "overall" else e["score"] for c in cats]
                xs = [j + i * width for j in range(len(cats))]
                ax.bar(xs, [v or 0.0 for v in vals], width, label=m)
            ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(cats))], cats, rotation=30, ha="right")
            ax.set_ylim(0, 10)
            ax.set_ylabel("mean score (1-10)")
        else:
            ys = range(len(models))
            left = [0.0] * len(models)
            for part, color in (("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red")):
                vals = [sec["models"][m][part] / max(1, sec["models"][m]["n"]) for m in models]
                ax.barh(list(ys), vals, left=left, color=color, label=part)
                left = [a + b for a, b in zip(left, vals, strict=True)]
            ax.set_yticks(list(ys), models)
            ax.set_xlim(0, 1)
            ax.set_xlabel("share of judged items" + (f" vs {sec['baseline']}" if sec.get("baseline") else ""))
        ax.set_title(title)
        ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the task


def build_report(paths: EvalPaths, judge_model: str | None, reference: str | None,
                 baseline: str | None, categories: Mapping[Any, str]) -> dict[str, Any]:
    """Everything `scores.json` holds, computed from the judgment files."""
    files = judgment_files(paths, judge_model)
    if not files:
        raise UsageError(f"{paths.judgments_dir}: no judgment files{f' for judge {judge_model}' if judge_model else ''}; "
                         "run `vicuna-exp eval judge` first")
    report: dict[str, Any] = {"bench": paths.bench, "questions": str(paths.questions), "judgments": {}, "ungraded": []}
    for f in files:
        rows = load_rows(f)
        pairwise = f.stem.endswith("_pair")
        section = pair_section(rows, categories, baseline) if pairwise else single_section(rows, categories, reference)
        section["judge"] = sorted({r["judge"][0] for r in rows if isinstance(r.get("judge"), list)})
        report["judgments"][f.name] = section
        report["ungraded"] += [{"file": f.name, **u} for u in ungraded_list(rows, _ungraded_rows(f))]
    return report


def render(report: dict[str, Any]) -> tuple[str, str]:
    """(stdout text, markdown)."""
    text, md = [], [f"# Evaluation: {report['bench']}", "", f"Questions: `{report['questions']}`", ""]
    for fname, sec in report["judgments"].items():
        head = f"{fname} (judge: {', '.join(sec['judge']) or '?'})"
        text.append(f"== {head}")
        md += [f"## {head}", ""]
        for title, header, rows in _tables(sec):
            text += [title, text_table(header, rows), ""]
            md += [f"### {title}", "", markdown_table(header, rows), ""]
    if report["ungraded"]:
        lines = [f"{u['file']}: question {u['question_id']} turn {u['turn']} ({_who(u)}): {u['reason']}"
                 for u in report["ungraded"]]
        text += [f"{len(lines)} item(s) ungraded:", *(f"  {x}" for x in lines[:50])]
        text += [f"  ... and {len(lines) - 50} more"] if len(lines) > 50 else []
        md += ["## Ungraded items", "", *(f"- {x}" for x in lines), ""]
    return "\n".join(text), "\n".join(md)


def _who(row: Mapping[str, Any]) -> str:
    return str(row["model"]) if "model" in row else f"{row.get('model_1')} vs {row.get('model_2')}"


def main(cfg: DictConfig) -> int:
    """Compute, print and write the report of each judged question set; 1 when some items are
    ungraded (listed).

    With `eval.questions` (or `eval.bench_name`) set, that one set; otherwise every set under the
    eval dir that has judgments, each with the question file its answers were generated from.
    """
    ev = cfg.eval
    paths = resolve_paths(cfg)
    targets = [paths] if (ev.questions or ev.bench_name) else judged_sets(paths)
    ungraded = False
    for target in targets:
        ungraded |= _report_one(target, ev)
    return EXIT_FAILED if ungraded else EXIT_OK


def judged_sets(paths: EvalPaths) -> list[EvalPaths]:
    """Every question set under `paths.out_dir` with judgment files, with the questions each was
    generated from (its generation.json), or the default set's paths when none has judgments."""
    found = []
    out_dir = paths.out_dir
    for bench_dir in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
        candidate = EvalPaths(out_dir=out_dir, bench=bench_dir.name, questions=_questions_of(bench_dir, paths))
        if judgment_files(candidate, None):
            found.append(candidate)
    return found or [paths]  # nothing judged: the default set's own "run eval judge first" error


def _questions_of(bench_dir: Path, default: EvalPaths) -> Path:
    questions = _generation_record(bench_dir, "questions")
    return Path(questions) if questions else default.questions


def _generation_record(bench_dir: Path, key: str) -> str | None:
    """A text field of the set's generation.json (written by `eval generate`); None when absent."""
    rec = bench_dir / "generation.json"
    if not rec.is_file():
        return None
    try:
        value = json.loads(rec.read_text(encoding="utf-8")).get(key)
    except ValueError:
        return None
    return value if isinstance(value, str) and value else None


def _report_one(paths: EvalPaths, ev: Any) -> bool:
    """Print and write one set's report; True when some of its items are ungraded."""
    categories = {q.question_id: q.category for q in load_questions(paths.questions)} \
        if paths.questions.is_file() else {}
    if not categories:
        log.warning("eval report: %s not found; categories are unknown for %s", paths.questions, paths.bench)
    reference = ev.reference_model or ev.judge.baseline_model
    report = build_report(paths, ev.judge.model, safe_name(reference) if reference else None,
                          safe_name(ev.judge.baseline_model) if ev.judge.baseline_model else None, categories)
    text, md = render(report)
    print(text)
    paths.report_file("md").write_text(md + "\n", encoding="utf-8")
    write_json_atomic(paths.report_file("json"), report)
    plot([(name, sec) for name, sec in report["judgments"].items()], paths.report_file("png"))
    print(f"report: {paths.report_file('md')}, {paths.report_file('png')}")
    return bool(report["ungraded"])


# ---------------------------------------------------------------- for `vicuna-exp report`


def _run_model(bench_dir: Path) -> str | None:
    """The model a run's answers are filed under: from generation.json, else the only answer file."""
    model_id = _generation_record(bench_dir, "model_id")
    if model_id:
        return safe_name(model_id)
    answers = sorted((bench_dir / "model_answer").glob("*.jsonl"))
    return answers[0].stem if len(answers) == 1 else None


def _newest(files: list[Path]) -> Path | None:
    return max(files, key=lambda f: f.stat().st_mtime) if files else None


def summarize_run_eval(run_dir: str | Path) -> dict[str, Any] | None:
    """Eval columns for the sweep report: per question set, `<bench>/score` (mean 1-10),
    `<bench>/relative_score` (vs the reference model of the last `eval report`),
    `<bench>/win_rate_adjusted` (pairwise) and `<bench>/ungraded` (only when > 0).
    None when the run has no judged evaluation. Never raises on a damaged file: it is skipped."""
    eval_dir = Path(run_dir) / "eval"
    if not eval_dir.is_dir():
        return None
    out: dict[str, Any] = {}
    for bench_dir in sorted(p for p in eval_dir.iterdir() if (p / "model_judgment").is_dir()):
        model = _run_model(bench_dir)
        if model is None:
            continue
        bench = bench_dir.name
        try:
            out.update(_summarize_bench(bench_dir, bench, model))
        except (UsageError, KeyError, TypeError, ValueError, OSError) as e:
            log.warning("eval summary of %s skipped: %s", bench_dir, e)
    return out or None


def _summarize_bench(bench_dir: Path, bench: str, model: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    jdir = bench_dir / "model_judgment"
    ungraded = 0
    single = _newest(list(jdir.glob("*_single.jsonl")))
    if single is not None:
        rows = load_rows(single)
        ms = single_scores(rows, {}).get(model)
        if ms is not None and ms.overall.n:
            out[f"{bench}/score"] = ms.overall.value
            ungraded += ms.unparseable
            reference = _last_reference(bench_dir)
            if reference and reference != model:
                ratio, _ = relative_total(rows, model, reference)
                if ratio is not None:
                    out[f"{bench}/relative_score"] = ratio
        ungraded += sum(1 for u in _ungraded_rows(single) if u.get("model") == model)
    pair = _newest(list(jdir.glob("*_pair.jsonl")))
    if pair is not None:
        rec = win_rates(load_rows(pair), {}).get(model)
        if rec is not None and rec.overall.n:
            out[f"{bench}/win_rate_adjusted"] = rec.overall.adjusted
            ungraded += rec.unparseable
    if ungraded:
        out[f"{bench}/ungraded"] = ungraded
    return out


def _last_reference(bench_dir: Path) -> str | None:
    scores = bench_dir / "scores.json"
    if not scores.is_file():
        return None
    try:
        report = json.loads(scores.read_text(encoding="utf-8"))
    except ValueError:
        return None
    for sec in report.get("judgments", {}).values():
        if sec.get("mode") == "single" and sec.get("reference_model"):
            return str(sec["reference_model"])
    return None
