"""The judge against a scripted local OpenAI-compatible server: parsing, retries, timeouts,
caching, the concurrency limit, pairwise order swapping, and checks made before any request."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from eval_fake_judge import FakeJudge, Reply, prefer_stronger, rate_by_marker
from omegaconf import OmegaConf

from vicuna_exp.errors import UsageError
from vicuna_exp.eval import judge as judge_mod
from vicuna_exp.eval.client import ChatClient, Endpoint, JudgeRequestError, resolve_endpoint
from vicuna_exp.eval.config import EvalConfig, JudgeConfig, JudgeMode
from vicuna_exp.eval.verdicts import combine, parse_rating, parse_verdict, winner

KEY_ENV = "VX_TEST_JUDGE_KEY"  # never a real provider's variable

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a poem about rain.", "Make it shorter."]},
    {"question_id": 2, "category": "math", "turns": ["What is 2+2?", "Times 3?"], "reference": ["REF-4", "REF-12"]},
    {"question_id": 3, "category": "generic", "text": "Say hello."},
]
ANSWERS = {  # SCORE: what the scripted judge rates it; STRENGTH: who wins a comparison
    "alpha": {1: ["poem SCORE=8 STRENGTH=3", "short SCORE=6 STRENGTH=3"],
              2: ["four SCORE=9 STRENGTH=2", "twelve SCORE=7 STRENGTH=1"],
              3: ["hello SCORE=5 STRENGTH=1"]},
    "beta": {1: ["verse SCORE=4 STRENGTH=1", "brief SCORE=2 STRENGTH=5"],
             2: ["4 SCORE=3 STRENGTH=2", "12 SCORE=1 STRENGTH=1"],
             3: ["hi SCORE=10 STRENGTH=1"]},
}
SINGLE_KEYS = {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
PAIR_KEYS = {"question_id", "model_1", "model_2", "g1_winner", "g2_winner", "judge", "g1_user_prompt",
             "g1_judgment", "g2_user_prompt", "g2_judgment", "turn", "tstamp"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(KEY_ENV, raising=False)
    write_jsonl(tmp_path / "qs.jsonl", QUESTIONS)
    for model, answers in ANSWERS.items():
        write_jsonl(tmp_path / "eval" / "qs" / "model_answer" / f"{model}.jsonl",
                    [{"question_id": q, "answer_id": f"{model}-{q}", "model_id": model,
                      "choices": [{"index": 0, "turns": turns}], "tstamp": 0.0} for q, turns in answers.items()])
    return tmp_path


def make_cfg(ws: Path, base_url: str | None, **judge: object):
    cfg = OmegaConf.create({"eval": OmegaConf.structured(EvalConfig), "model": {"path": None}})
    cfg.eval.out_dir = str(ws / "eval")
    cfg.eval.questions = str(ws / "qs.jsonl")
    j = cfg.eval.judge
    j.base_url, j.model, j.api_key_env = base_url, "judge-x", KEY_ENV
    j.backoff_s, j.max_backoff_s, j.timeout_s, j.max_retries, j.concurrency = 0.01, 0.05, 5.0, 2, 2
    for k, v in judge.items():
        j[k] = v
    return cfg


def judgments(ws: Path, kind: str = "single") -> list[dict]:
    path = ws / "eval" / "qs" / "model_judgment" / f"judge-x_{kind}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- parsing


def test_parse_rating_and_verdict() -> None:
    assert parse_rating("Good answer.\nRating: [[7]]") == 7.0
    assert parse_rating("Rating: [[8.5]]") == 8.5
    assert parse_rating("Format is [[rating]]. Final: Rating: [[3]]") == 3.0
    assert parse_rating("I would say [[4]] at first, but Rating: [[6]]") == 6.0  # the conclusion wins
    assert parse_rating("Rating: 9") == 9.0
    assert parse_rating("Rating: [[0]]") is None  # outside 1-10
    assert parse_rating("Rating: [[11]]") is None
    assert parse_rating("A fine answer overall.") is None
    assert parse_verdict("Assistant A is better. [[A]]") == "A"
    assert parse_verdict("[[C]]") == "C"
    assert parse_verdict("Output [[A]] if ..., [[B]] if ... My verdict: [[B]]") == "B"
    assert parse_verdict("Both are good.") is None
    assert winner("A", a_is_model_1=True) == "model_1"
    assert winner("A", a_is_model_1=False) == "model_2"
    assert winner("C", a_is_model_1=False) == "tie"
    assert winner(None, a_is_model_1=True) == "error"
    assert combine("model_1", "model_1") == "model_1"
    assert combine("model_1", "model_2") == "tie"  # the two orders disagree
    assert combine("model_1", "error") is None


# ---------------------------------------------------------------- endpoint and key


def test_endpoint_checks_need_no_network() -> None:
    j = OmegaConf.structured(JudgeConfig)
    with pytest.raises(UsageError, match="eval.judge.base_url"):
        resolve_endpoint(j, environ={})
    j.base_url = "https://judge.example.com/v1"
    with pytest.raises(UsageError, match="eval.judge.model"):
        resolve_endpoint(j, environ={})
    j.model = "gpt-4"
    with pytest.raises(UsageError, match=r"\$OPENAI_API_KEY is not set"):
        resolve_endpoint(j, environ={})
    assert resolve_endpoint(j, environ={"OPENAI_API_KEY": "sk-x"}).api_key == "sk-x"
    for local in ("http://127.0.0.1:8000/v1/", "http://localhost:9/v1", "http://[::1]:8000/v1"):
        j.base_url = local
        ep = resolve_endpoint(j, environ={})
        assert ep.api_key is None and not ep.base_url.endswith("/")
    j.base_url = "ftp://127.0.0.1/v1"
    with pytest.raises(UsageError, match="http"):
        resolve_endpoint(j, environ={})


def test_no_endpoint_fails_before_any_work(workspace: Path) -> None:
    cfg = make_cfg(workspace, None)
    before = sorted(p.name for p in (workspace / "eval" / "qs").rglob("*"))
    with pytest.raises(UsageError, match="no judge endpoint"):
        judge_mod.main(cfg)
    cfg = make_cfg(workspace, "https://judge.example.com/v1")
    with pytest.raises(UsageError, match=KEY_ENV):
        judge_mod.main(cfg)
    assert sorted(p.name for p in (workspace / "eval" / "qs").rglob("*")) == before  # nothing written


# ---------------------------------------------------------------- single grading


def test_single_grading_writes_fastchat_judgments_and_caches(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    with FakeJudge(rate_by_marker) as server:
        cfg = make_cfg(workspace, server.base_url)
        assert judge_mod.main(cfg) == 0
        assert len(server.requests) == 10  # 2 models x (2 + 2 + 1) turns
        rows = judgments(workspace)
        assert len(rows) == 10 and all(set(r) == SINGLE_KEYS for r in rows)
        scores = {(r["model"], r["question_id"], r["turn"]): r["score"] for r in rows}
        assert scores[("alpha", 1, 1)] == 8 and scores[("alpha", 1, 2)] == 6 and scores[("beta", 3, 1)] == 10
        prompts = {(r["model"], r["question_id"], r["turn"]): r for r in rows}
        # reference-guided prompts for math; the second turn shows the whole conversation
        assert prompts[("alpha", 2, 1)]["judge"] == ["judge-x", "single-math-v1"]
        assert "REF-4" in prompts[("alpha", 2, 1)]["user_prompt"]
        t2 = prompts[("alpha", 2, 2)]
        assert t2["judge"][1] == "single-math-v1-multi-turn" and "REF-12" in t2["user_prompt"]
        assert "four SCORE=9" in t2["user_prompt"] and "twelve SCORE=7" in t2["user_prompt"]
        assert prompts[("beta", 1, 1)]["judge"][1] == "single-v1" and "REF" not in prompts[("beta", 1, 1)]["user_prompt"]
        assert prompts[("beta", 1, 2)]["judge"][1] == "single-v1-multi-turn"
        headers, body = server.requests[0]
        assert "authorization" not in headers  # a local endpoint without a key gets no header
        assert body["model"] == "judge-x" and body["temperature"] == 0.0 and body["messages"][0]["role"] == "system"

        # a rerun pays nothing: every reply comes from the cache
        assert judge_mod.main(cfg) == 0
        assert len(server.requests) == 10
        assert [r["judgment"] for r in judgments(workspace)] == [r["judgment"] for r in rows]
        assert "0 HTTP requests, 10 replies from the cache" in capsys.readouterr().out

        # a changed answer misses the cache for exactly its own items
        path = workspace / "eval" / "qs" / "model_answer" / "beta.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        lines[2]["choices"][0]["turns"] = ["hey SCORE=2"]
        write_jsonl(path, lines)
        assert judge_mod.main(cfg) == 0
        assert len(server.requests) == 11
        assert {(r["model"], r["question_id"]): r["score"] for r in judgments(workspace)}[("beta", 3)] == 2
        assert len(judgments(workspace)) == 10  # replaced, not duplicated


def test_key_comes_from_the_env_and_is_never_stored(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test-123")
    with FakeJudge(rate_by_marker) as server:
        assert judge_mod.main(make_cfg(workspace, server.base_url, models=["alpha"])) == 0
        assert {h["authorization"] for h, _ in server.requests} == {"Bearer sk-test-123"}
    for f in (workspace / "eval").rglob("*"):
        if f.is_file():
            assert "sk-test-123" not in f.read_text(errors="ignore"), f


def test_unparseable_replies_are_counted_listed_and_never_scored(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    def script(body: dict, n: int) -> Reply:
        if "Say hello" in body["messages"][-1]["content"]:
            return Reply("Both fine, I cannot put a number on it.")
        return rate_by_marker(body, n)

    with FakeJudge(script) as server:
        assert judge_mod.main(make_cfg(workspace, server.base_url)) == 1
    rows = judgments(workspace)
    bad = [r for r in rows if r["question_id"] == 3]
    assert len(bad) == 2 and all(r["score"] == -1 for r in bad)  # FastChat's marker, kept for inspection
    out = capsys.readouterr().out
    assert "2 unparseable" in out and "question 3 turn 1 (alpha): unparseable judgment" in out


def test_a_judge_that_keeps_failing_leaves_only_its_items_ungraded(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    def script(body: dict, n: int) -> Reply:
        if "SCORE=10" in body["messages"][-1]["content"]:
            return Reply(status=500, raw='{"error": "overloaded"}')
        return rate_by_marker(body, n)

    with FakeJudge(script) as server:
        assert judge_mod.main(make_cfg(workspace, server.base_url, max_retries=1)) == 1
        assert len(server.requests) == 9 + 2  # the failing item: first attempt + one retry
    assert len(judgments(workspace)) == 9
    ungraded = [json.loads(x) for x in (workspace / "eval/qs/model_judgment/judge-x_single_ungraded.jsonl").read_text().splitlines()]
    assert [(u["model"], u["question_id"], u["turn"]) for u in ungraded] == [("beta", 3, 1)]
    assert "HTTP 500" in ungraded[0]["reason"]
    assert "question 3 turn 1 (beta)" in capsys.readouterr().out

    # once the judge recovers, a rerun grades only what is missing and clears the list
    with FakeJudge(rate_by_marker) as server:
        assert judge_mod.main(make_cfg(workspace, server.base_url)) == 0
        assert len(server.requests) == 1
    assert len(judgments(workspace)) == 10
    assert (workspace / "eval/qs/model_judgment/judge-x_single_ungraded.jsonl").read_text() == ""


def test_rejected_endpoint_stops_judging(workspace: Path) -> None:
    with FakeJudge(lambda body, n: Reply(status=401, raw='{"error": "bad key"}')) as server:
        assert judge_mod.main(make_cfg(workspace, server.base_url, concurrency=1)) == 1
        assert len(server.requests) == 1  # no point asking again with the same key
    ungraded = (workspace / "eval/qs/model_judgment/judge-x_single_ungraded.jsonl").read_text().splitlines()
    assert len(ungraded) == 10 and "401" in ungraded[0]


def test_judging_one_model_later_keeps_the_others(workspace: Path) -> None:
    with FakeJudge(rate_by_marker) as server:
        assert judge_mod.main(make_cfg(workspace, server.base_url, models=["alpha"])) == 0
        assert judge_mod.main(make_cfg(workspace, server.base_url, models=["beta"])) == 0
        assert len(server.requests) == 10
    assert sorted({r["model"] for r in judgments(workspace)}) == ["alpha", "beta"]
    with pytest.raises(UsageError, match="gamma"):
        judge_mod.main(make_cfg(workspace, "http://127.0.0.1:9/v1", models=["gamma"]))


def test_concurrency_limit_is_respected(workspace: Path) -> None:
    with FakeJudge(lambda body, n: Reply("ok Rating: [[5]]", delay=0.15)) as server:
        t0 = time.monotonic()
        assert judge_mod.main(make_cfg(workspace, server.base_url, concurrency=3)) == 0
        elapsed = time.monotonic() - t0
    assert server.max_in_flight == 3
    assert elapsed >= 10 / 3 * 0.15 * 0.9  # at most three at a time


# ---------------------------------------------------------------- retries and timeouts


def _client(server: FakeJudge, sleeps: list[float], **kw: object) -> ChatClient:
    opts = {"timeout_s": 2.0, "max_retries": 3, "backoff_s": 0.01, "max_backoff_s": 1.0, "temperature": 0.0,
            "max_tokens": 64, "concurrency": 1, **kw}
    return ChatClient(Endpoint(server.base_url, "judge-x", None), sleep=sleeps.append, **opts)  # type: ignore[arg-type]


MSGS = [{"role": "user", "content": "rate this"}]


def test_retries_429_and_5xx_with_exponential_backoff() -> None:
    def script(body: dict, n: int) -> Reply:
        return [Reply(status=429, raw="{}"), Reply(status=503, raw="{}"), Reply(status=502, raw="{}"),
                Reply("Rating: [[6]]")][min(n, 3)]

    sleeps: list[float] = []
    with FakeJudge(script) as server, _client(server, sleeps) as client:
        assert client.complete(MSGS) == "Rating: [[6]]"
        assert len(server.requests) == 4
    assert sleeps == [0.01, 0.02, 0.04]

    sleeps.clear()  # Retry-After wins when it asks for longer; capped by max_backoff_s
    with FakeJudge(lambda b, n: Reply(status=429, raw="{}", headers={"Retry-After": "0.5"}) if n == 0
                   else Reply("ok")) as server, _client(server, sleeps, max_backoff_s=0.3) as client:
        assert client.complete(MSGS) == "ok"
    assert sleeps == [0.3]

    sleeps.clear()  # retries run out
    with FakeJudge(lambda b, n: Reply(status=500, raw="{}")) as server, _client(server, sleeps, max_retries=2) as client:
        with pytest.raises(JudgeRequestError, match=r"HTTP 500.*after 3 attempts"):
            client.complete(MSGS)
        assert len(server.requests) == 3

    sleeps.clear()  # a rejected request is not retried
    with FakeJudge(lambda b, n: Reply(status=400, raw='{"error": "too long"}')) as server, _client(server, sleeps) as client:
        with pytest.raises(JudgeRequestError, match="HTTP 400"):
            client.complete(MSGS)
        assert len(server.requests) == 1 and sleeps == []

    with FakeJudge(lambda b, n: Reply(raw="not json")) as server, _client(server, sleeps) as client:
        with pytest.raises(JudgeRequestError, match="malformed"):
            client.complete(MSGS)


def test_slow_reply_times_out_then_retries() -> None:
    sleeps: list[float] = []
    script = lambda b, n: Reply("Rating: [[4]]", delay=1.0 if n == 0 else 0.0)  # noqa: E731
    with FakeJudge(script) as server, _client(server, sleeps, timeout_s=0.3) as client:
        t0 = time.monotonic()
        assert client.complete(MSGS) == "Rating: [[4]]"
        assert time.monotonic() - t0 < 0.9  # gave up on the slow reply instead of waiting for it
        assert len(server.requests) == 2
    with FakeJudge(lambda b, n: Reply("late", delay=1.0)) as server, _client(server, sleeps, timeout_s=0.3,
                                                                              max_retries=0) as client:
        with pytest.raises(JudgeRequestError, match="timed out"):
            client.complete(MSGS)


# ---------------------------------------------------------------- pairwise


def test_pairwise_judges_both_orders_and_disagreement_is_a_tie(workspace: Path) -> None:
    with FakeJudge(prefer_stronger) as server:
        cfg = make_cfg(workspace, server.base_url, mode="pairwise", baseline_model="beta")
        assert cfg.eval.judge.mode is JudgeMode.pairwise
        assert judge_mod.main(cfg) == 0
        assert len(server.requests) == 10  # 5 items x 2 orders
        rows = {(r["question_id"], r["turn"]): r for r in judgments(workspace, "pair")}
        assert all(set(r) == PAIR_KEYS for r in rows.values())
        r = rows[(1, 1)]
        assert (r["model_1"], r["model_2"]) == ("alpha", "beta")
        assert r["g1_winner"] == r["g2_winner"] == "model_1"
        # game 2 shows the answers swapped
        assert r["g1_user_prompt"].index("poem SCORE") < r["g1_user_prompt"].index("verse SCORE")
        assert r["g2_user_prompt"].index("verse SCORE") < r["g2_user_prompt"].index("poem SCORE")
        assert rows[(1, 2)]["g1_winner"] == "model_2" and rows[(2, 1)]["g1_winner"] == "tie"
        assert rows[(2, 1)]["judge"][1] == "pair-math-v1" and "REF-4" in rows[(2, 1)]["g1_user_prompt"]
        assert rows[(2, 2)]["judge"][1] == "pair-math-v1-multi-turn"

    # a judge that always prefers the first answer: both orders disagree, so every item is a tie
    cfg.eval.judge.cache_path = str(workspace / "other_cache.jsonl")
    with FakeJudge(lambda b, n: Reply("[[A]]")) as server:
        cfg.eval.judge.base_url = server.base_url
        assert judge_mod.main(cfg) == 0
    from vicuna_exp.eval.aggregate import pair_result

    assert {pair_result(r) for r in judgments(workspace, "pair")} == {"tie"}


def test_prompt_configs_are_checked(workspace: Path, tmp_path: Path) -> None:
    from vicuna_exp.eval.prompts import load_prompt_set, prompt_path

    j = OmegaConf.structured(JudgeConfig)
    single = load_prompt_set(prompt_path(j), JudgeMode.single)
    assert single.pick(1, False).name == "single-v1" and single.pick(2, True).name == "single-math-v1-multi-turn"
    j.mode = "pairwise"
    assert load_prompt_set(prompt_path(j), JudgeMode.pairwise).pick(1, False).name == "pair-v2"
    with pytest.raises(UsageError, match="a pairwise prompt config, but eval.judge.mode=single"):
        load_prompt_set(prompt_path(j), JudgeMode.single)
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: single\nprompts:\n  default:\n    name: x\n    template: 'Q {question} A {answr}'\n")
    with pytest.raises(UsageError, match=r"unknown placeholder\(s\) \['answr'\]"):
        load_prompt_set(bad)
    j.prompt = "nonexistent"
    with pytest.raises(UsageError, match="choose one of: pairwise, single"):
        prompt_path(j)


# ---------------------------------------------------------------- through the CLI


def test_cli_routes_judge_and_report(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    from vicuna_exp.cli import main as cli

    common = [f"eval.out_dir={workspace / 'eval'}", f"eval.questions={workspace / 'qs.jsonl'}",
              f"hydra.run.dir={workspace / 'hydra'}"]
    assert cli(["eval", "judge", *common, "eval.judge.base_url=https://judge.example.com/v1",
                "eval.judge.model=gpt-4", f"eval.judge.api_key_env={KEY_ENV}"]) == 2  # no key: bad usage
    assert KEY_ENV in capsys.readouterr().err
    with FakeJudge(rate_by_marker) as server:
        assert cli(["eval", "judge", *common, f"eval.judge.base_url={server.base_url}", "eval.judge.model=judge-x",
                    f"eval.judge.api_key_env={KEY_ENV}"]) == 0
    assert cli(["eval", "report", *common, "eval.reference_model=beta"]) == 0
    out = capsys.readouterr().out
    assert "relative to beta" in out and "175.0%" in out  # alpha 35 / beta 20
    assert (workspace / "eval" / "qs" / "report.png").is_file()
