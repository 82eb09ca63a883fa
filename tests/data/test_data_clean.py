"""Each cleaning step on small hand-written records, and the loader's bad-input cases."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from vicuna_exp.config import load_option
from vicuna_exp.data.clean import clean_records, in_eval_split
from vicuna_exp.data.html import html_to_markdown
from vicuna_exp.data.load import read_records, resolve_path
from vicuna_exp.data.make_sample import SAMPLE_PATH
from vicuna_exp.errors import UsageError

SAMPLE = load_option("data", "sample")  # the packaged sample, as conf/data/sample.yaml sets it

CFG = SAMPLE


def rec(rid, *turns):
    return {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}


def one(record, cfg=CFG):
    res = clean_records([record], cfg)
    return (res.conversations[0] if res.conversations else None), dict(res.dropped), dict(res.changes)


def test_role_normalisation():
    conv, dropped, _ = one(rec("a", ("user", "q"), ("chatgpt", "a"), ("human", "q2"), ("Bard", "a2"), ("bing", "x")))
    assert conv.turns == [("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2\n\nx")]
    _, dropped, _ = one(rec("b", ("human", "q"), ("robot", "a")))
    assert dropped == {"unknown_role": 1}


def test_system_policy():
    r = rec("s", ("system", "Be brief."), ("human", "q"), ("gpt", "a"), ("system", "late"))
    conv, _, changes = one(r)
    assert conv.system == "Be brief." and conv.turns == [("user", "q"), ("assistant", "a")]
    assert changes["system_prompts_used"] == 1 and changes["system_messages_dropped"] == 1
    conv, _, _ = one(r, replace(CFG, system_policy="drop"))
    assert conv.system is None


def test_edges_trimmed_or_dropped():
    r = rec("e", ("gpt", "hello"), ("human", "q"), ("gpt", "a"), ("human", "unanswered"))
    conv, _, changes = one(r)
    assert conv.turns == [("user", "q"), ("assistant", "a")] and changes["edge_turns_trimmed"] == 2
    assert one(r, replace(CFG, trim_edges=False))[1] == {"bad_edges": 1}


def test_non_alternating_merge_or_drop():
    r = rec("m", ("human", "q"), ("human", "more"), ("gpt", "a"))
    conv, _, changes = one(r)
    assert conv.turns == [("user", "q\n\nmore"), ("assistant", "a")] and changes["turns_merged"] == 1
    assert one(r, replace(CFG, non_alternating="drop"))[1] == {"non_alternating": 1}


def test_empty_messages_and_empty_records():
    conv, _, changes = one(rec("w", ("human", "q"), ("gpt", "  \n "), ("gpt", "a")))
    assert conv.turns == [("user", "q"), ("assistant", "a")] and changes["empty_messages_removed"] == 1
    assert one(rec("x", ("human", ""), ("gpt", " ")))[1] == {"too_few_pairs": 1}
    assert one({"id": "y", "conversations": []})[1] == {"too_few_pairs": 1}
    conv, _, _ = one(rec("z", ("human", "  q  "), ("gpt", " a ")), replace(CFG, strip_whitespace=False))
    assert conv.turns == [("user", "  q  "), ("assistant", " a ")]


@pytest.mark.parametrize("bad", [
    {"id": "1"}, {"id": "2", "conversations": "text"}, {"id": "3", "conversations": [{"from": "human"}]},
    {"id": "4", "conversations": [{"from": "human", "value": 7}]}, "a string", 12, {"id": [1], "conversations": []},
])
def test_malformed_records_are_counted(bad):
    assert one(bad)[1] == {"malformed": 1}


def test_duplicates_blocked_words_and_split_hash():
    recs = [rec("a", ("human", "q"), ("gpt", "a")), rec("b", ("human", "q"), ("gpt", "a")),
            rec("c", ("human", "tell me"), ("gpt", "As an AI language model, no.")), rec("d", ("human", "x"), ("gpt", "y"))]
    res = clean_records(recs, replace(CFG, blocked_words=["as an ai language model"]))
    assert [c.id for c in res.conversations] == ["a", "d"]
    assert res.dropped == {"duplicate": 1, "blocked_words": 1}
    assert len(clean_records(recs, replace(CFG, dedup=False)).conversations) == 4
    ids = [f"conv-{i}" for i in range(4000)]
    chosen = [i for i in ids if in_eval_split(i, 0, 0.1)]
    assert 300 < len(chosen) < 500 and chosen == [i for i in ids if in_eval_split(i, 0, 0.1)]
    assert chosen != [i for i in ids if in_eval_split(i, 1, 0.1)]


def test_worker_processes_give_the_same_result():
    records = [rec(str(i), ("human", f"q{i % 7}"), ("gpt", f"<p>a{i % 7}</p>")) for i in range(40)] + [{"bad": 1}]
    one, two = clean_records(records, CFG), clean_records(records, CFG, num_proc=2)
    assert [c.turns for c in one.conversations] == [c.turns for c in two.conversations]
    assert one.dropped == two.dropped == {"duplicate": 33, "malformed": 1} and one.changes == two.changes


def test_language_filter_offline():
    recs = [rec("en", ("human", "What is the weather like in the mountains during the winter months?"), ("gpt", "Cold.")),
            rec("fr", ("human", "Quel temps fait-il dans les montagnes pendant les mois d'hiver ?"), ("gpt", "Froid."))]
    res = clean_records(recs, replace(CFG, languages=["en"]))
    assert [c.id for c in res.conversations] == ["en"] and res.dropped == {"language": 1}


def test_html_to_markdown():
    html = ('1 / 1<div class="markdown prose"><p>Use <code>ls</code>:</p><pre><div class="bg-black"><div>'
            '<span>bash</span><button>Copy code</button></div><div><code class="hljs language-bash">ls -la\n'
            '</code></div></div></pre><ol><li>one</li><li>two</li></ol></div>')
    md = html_to_markdown(html)
    assert md == "Use `ls`:\n\n```bash\nls -la\n```\n\n1. one\n2. two"
    flattened = "Sure:\n```\npythonCopy code\nprint(1)\n```\nCopy 12 chars / 3 words"
    assert html_to_markdown(flattened) == "Sure:\n```python\nprint(1)\n```\n"
    kept = "Fix this: <div class='x'>hi</div>\n1 / 2 is 0.5"  # HTML as content, a fraction: untouched
    assert html_to_markdown(kept) == kept
    conv, _, changes = one(rec("h", ("human", "<p>a user's html stays</p>"), ("gpt", html)))
    assert conv.turns[0][1] == "<p>a user's html stays</p>" and conv.turns[1][1] == md
    assert changes["html_converted_messages"] == 1
    conv, _, _ = one(rec("h", ("human", "q"), ("gpt", html)), replace(CFG, html_to_markdown=False))
    assert conv.turns[1][1] == html


# --------------------------------------------------------------------------------------- loader


def test_truncated_json_reads_whole_records(tmp_path):
    recs = [rec(str(i), ("human", f"q{i}"), ("gpt", f"a{i}")) for i in range(5)]
    full = json.dumps(recs, indent=1)
    for cut in (full.index('"a3"') + 2, full.index('"id": "4"') + 3, len(full) - 1, len(full) - 3):
        path = tmp_path / "cut.json"
        path.write_text(full[:cut])
        data = read_records(path)
        assert data.truncated is not None and data.records == recs[:len(data.records)]
        assert len(data.records) in (3, 4, 5) and "whole records" in data.notes[0]
    path.write_text(full)
    assert read_records(path).truncated is None and len(read_records(path).records) == 5
    assert len(read_records(path, max_records=2).records) == 2


def test_jsonl_and_truncated_jsonl(tmp_path):
    lines = [json.dumps(rec(str(i), ("human", "q"), ("gpt", "a"))) for i in range(3)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert read_records(path).format == "jsonl" and len(read_records(path).records) == 3
    path.write_text("\n".join(lines)[:-5])
    data = read_records(path)
    assert len(data.records) == 2 and data.truncated == {"whole_records": 2, "cut_at_line": 3}


@pytest.mark.parametrize("content, match", [
    ("", "the file is empty"),
    ("hello world", r"bad\.txt:1: expected a JSON list"),
    ('[{"id": 1}, {"id": 2} {"id": 3}]', r"bad\.txt:1:\d+: expected ',' or ']' after record 1"),
    ('[{"id": 1},\n {"id": 2, x}, {"id": 3}, {"id": 4}]', r"bad\.txt:2:\d+: record 1 is not valid JSON"),
    ('{"id": 1}\nnot json\n{"id": 2}\n', r"bad\.txt:2: not a JSON record"),
    ('[{"id": 1}] trailing', "unexpected data after the end"),
])
def test_bad_files_name_path_and_line(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(UsageError, match=match):
        read_records(path)


def test_missing_paths(tmp_path):
    with pytest.raises(UsageError, match="data.path: no such file"):
        resolve_path(str(tmp_path / "none.json"), None)
    with pytest.raises(UsageError, match="data.path: not set"):
        resolve_path("???", None)
    with pytest.raises(UsageError, match="data.path: not set"):
        resolve_path(None, None)  # data=sharegpt without data.path
    assert resolve_path(None, SAMPLE.package_file) == SAMPLE_PATH
    with pytest.raises(UsageError, match="package 'no_such_pkg_xyz' is not installed"):
        resolve_path(None, "no_such_pkg_xyz:data/x.json")
