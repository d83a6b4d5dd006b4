"""Reward server security: a shared token checked on every request (unknown paths and /health included), request-size
and batch-length limits answered 413/400 before the reward runs, and the client's clear errors for each."""

from __future__ import annotations

import json
import types

import httpx
import pytest
import uvicorn

from lmmr1.rewards import RemoteReward, build_reward
from lmmr1.rewards import remote as remote_module
from lmmr1.rewards import server as server_module
from lmmr1.rewards.score import main as score_main
from lmmr1.rewards.server import create_app, main
from tests.conftest import serving

TOKEN = "t0ken-for-tests"
GOOD = "<think>t</think><answer>1</answer>"
LIMIT_MB = 0.01  # 10 KiB
LIMIT = int(LIMIT_MB * 2**20)
MAX_BATCH = 4


class _Calls:
    """Counts the reward's calls: a refused request must never reach it."""

    def __init__(self, reward):
        self.reward, self.name, self.calls = reward, reward.name, 0

    def __call__(self, responses, rows):
        self.calls += 1
        return self.reward(responses, rows)

    def check_rows(self, rows):
        self.calls += 1
        self.reward.check_rows(rows)


@pytest.fixture(scope="module")
def served():
    reward = _Calls(build_reward("format"))
    app = create_app(reward, token=TOKEN, max_request_mb=LIMIT_MB, max_batch=MAX_BATCH)
    with serving(app) as url:
        yield url, reward


@pytest.fixture
def no_sleep(monkeypatch):
    """Records the client's backoff sleeps instead of sleeping: an answer that retrying cannot change is not retried."""
    sleeps: list[float] = []
    monkeypatch.setattr(remote_module, "time", types.SimpleNamespace(sleep=sleeps.append))  # this module's only
    return sleeps


AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENDPOINTS = [("GET", "/health"), ("POST", "/score"), ("POST", "/check_rows"), ("GET", "/openapi.json"),
             ("GET", "/docs"), ("GET", "/no-such-path")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method,path", ENDPOINTS)
def test_every_request_needs_the_token(served, method, path):
    url, reward = served
    before = reward.calls
    body = {"responses": [GOOD], "rows": [{}]} if path == "/score" else {"rows": [{}]}
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},  # no header, wrong, no "Bearer"
                    {"Authorization": f"bearer {TOKEN}x"}, {"X-Token": TOKEN}]:
        answer = httpx.request(method, url + path, headers=headers, json=body if method == "POST" else None)
        assert answer.status_code == 401, (headers, answer.status_code)
        assert "Authorization: Bearer <token>" in answer.json()["detail"]
        assert answer.headers["www-authenticate"] == "Bearer"
    assert reward.calls == before  # refused before the reward ran
    answer = httpx.request(method, url + path, headers=AUTH, json=body if method == "POST" else None)
    assert answer.status_code == (404 if path == "/no-such-path" else 200)


@pytest.mark.timeout(60)
def test_client_sends_the_token_from_argument_or_environment(served, monkeypatch, no_sleep):
    url, _ = served
    assert RemoteReward(url, token=TOKEN)([GOOD], [{}]).total == [1.0]
    monkeypatch.setenv("LMMR1_REWARD_TOKEN", TOKEN)
    assert RemoteReward(url)([GOOD], [{}]).total == [1.0]
    assert build_reward({"url": url, "timeout": 5})([GOOD], [{}]).total == [1.0]  # configs need no token in them
    with pytest.raises(ValueError, match=r"rejected the token it was sent \(HTTP 401\); set LMMR1_REWARD_TOKEN"):
        RemoteReward(url, token="wrong")([GOOD], [{}])
    monkeypatch.delenv("LMMR1_REWARD_TOKEN")
    with pytest.raises(ValueError, match=f"reward server {url} wants a token and none was sent"):
        RemoteReward(url).check_rows([{}])
    assert no_sleep == []  # a 401 is not retried


@pytest.mark.timeout(60)
def test_score_with_a_wrong_token_fails_once_not_row_by_row(served, monkeypatch, tmp_path, capsys):
    url, _ = served
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"response": GOOD}) + "\n" for _ in range(3)))
    monkeypatch.setenv("LMMR1_REWARD_TOKEN", "wrong")
    for policy in ("error", "skip"):
        assert score_main(["--reward", url, "--input", str(src), "--output", str(tmp_path / "o.jsonl"),
                           "--on-bad-row", policy]) == 2
        err = capsys.readouterr().err
        assert err.count("rejected the token it was sent") == 1 and "rows are bad" not in err, err
    monkeypatch.setenv("LMMR1_REWARD_TOKEN", TOKEN)
    assert score_main(["--reward", url, "--input", str(src), "--output", str(tmp_path / "o.jsonl")]) == 0


@pytest.mark.timeout(60)
def test_oversized_requests_get_413_before_the_reward_runs(served, no_sleep):
    url, reward = served
    before = reward.calls
    big = {"responses": ["x" * (LIMIT + 100)], "rows": [{}]}
    answer = httpx.post(url + "/score", headers=AUTH, json=big)  # with Content-Length
    assert answer.status_code == 413
    assert answer.json()["detail"] == "request body over this server's limit of 0.01 MiB (--max-request-mb)"

    def chunks():  # no Content-Length: the server counts what arrives
        yield b'{"responses": ["'
        for _ in range(4):
            yield b"x" * (LIMIT // 2)
        yield b'"], "rows": [{}]}'

    answer = httpx.post(url + "/score", headers={**AUTH, "Content-Type": "application/json"}, content=chunks())
    assert answer.status_code == 413
    huge = json.dumps({"responses": ["x" * (20 * LIMIT)], "rows": [{}]})  # far over: refused on its header alone
    assert httpx.post(url + "/score", headers=AUTH, content=huge).status_code == 413
    assert reward.calls == before

    with pytest.raises(ValueError, match=r"over this server's limit of 0.01 MiB .*send fewer rows per request"):
        RemoteReward(url, token=TOKEN)(big["responses"], big["rows"])
    assert no_sleep == []  # a 413 is not retried
    just_under = "x" * (LIMIT - 200)  # the limit is the body's size, not less
    assert RemoteReward(url, token=TOKEN)([just_under], [{}]).total == [0.0]


@pytest.mark.timeout(60)
def test_batches_over_the_limit_get_400_and_check_rows_is_sent_in_chunks(served, monkeypatch, no_sleep):
    url, reward = served
    before = reward.calls
    client = RemoteReward(url, token=TOKEN)
    with pytest.raises(ValueError, match=r"batch of 5 rows is over this server's limit of 4 \(--max-batch\)"):
        client([GOOD] * 5, [{}] * 5)
    assert reward.calls == before and no_sleep == []
    assert client([GOOD] * 4, [{}] * 4).total == [1.0] * 4
    monkeypatch.setattr(remote_module, "CHECK_CHUNK", 3)
    client.check_rows([{}] * 7)  # check_rows is cheap per row: bounded by bytes, sent 3 + 3 + 1 rows
    assert reward.calls == before + 1 + 3
    client.close()


def _run_main(monkeypatch, argv):
    """main() with uvicorn.run captured instead of serving."""
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    return main(argv), seen


def test_cli_token_limits_and_warnings(monkeypatch, capsys):
    monkeypatch.delenv("LMMR1_REWARD_TOKEN", raising=False)
    code, seen = _run_main(monkeypatch, ["--reward", "format"])
    assert code == 0 and seen["host"] == "127.0.0.1" and seen["app"].expected is None  # local, no token by default
    assert seen["app"].max_request_bytes == server_module.DEFAULT_MAX_REQUEST_MB * 2**20
    assert capsys.readouterr().err == ""

    code, seen = _run_main(monkeypatch, ["--reward", "format", "--host", "0.0.0.0", "--port", "9"])
    assert code == 0
    assert "listening on 0.0.0.0 without a token: anyone who can reach port 9 can run this reward's code" in \
        capsys.readouterr().err

    monkeypatch.setenv("LMMR1_REWARD_TOKEN", "from-env")
    code, seen = _run_main(monkeypatch, ["--reward", "format", "--host", "0.0.0.0", "--max-request-mb", "2"])
    assert code == 0 and seen["app"].expected == b"Bearer from-env" and seen["app"].max_request_bytes == 2 * 2**20
    assert "warning" not in capsys.readouterr().err
    code, seen = _run_main(monkeypatch, ["--reward", "format", "--token", "from-flag"])
    assert seen["app"].expected == b"Bearer from-flag"  # the flag wins over the environment

    for argv, message in [(["--token", "has space"], "must be printable ASCII without spaces"),
                          (["--max-batch", "0"], "--max-batch must be >= 1"),
                          (["--max-request-mb", "0"], "--max-request-mb must be > 0")]:
        code, _ = _run_main(monkeypatch, ["--reward", "format", *argv])
        assert code == 2 and message in capsys.readouterr().err
