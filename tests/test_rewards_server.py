"""Reward server round trip on 127.0.0.1, and the client's behaviour when the server is down or answers garbage."""

from __future__ import annotations

import http.server
import json
import math
import threading

import pytest

from lmmr1.rewards import RemoteReward, build_reward
from lmmr1.rewards.server import create_app, main
from tests.conftest import free_port, serving

GOOD = "<think>t</think><answer>{}</answer>"
CORRIDOR = "#####\n#@$.#\n#####"


@pytest.fixture(scope="module")
def server_url():
    reward = build_reward({"routes": {"sokoban": ["format", "sokoban"], "*": "format"}})
    with serving(create_app(reward)) as url:
        yield url
    reward.close()


def test_round_trip_matches_local_scoring(server_url):
    responses = [GOOD.format("R"), GOOD.format("L"), "no tags"]
    rows = [{"datasource": "sokoban", "env": CORRIDOR}, {"datasource": "sokoban", "env": CORRIDOR}, {"answer": "1"}]
    local = build_reward({"routes": {"sokoban": ["format", "sokoban"], "*": "format"}})(responses, rows)
    remote = build_reward({"url": server_url, "timeout": 10})
    out = remote(responses, rows)
    assert out.total == local.total == [1.5, 0.5, 0.0]
    assert out.components.keys() == local.components.keys()
    assert math.isnan(out.components["solved"][2])  # NaN survives the trip (sent as null)
    assert out.row(0) == local.row(0) and out.row(2) == local.row(2)
    remote.check_rows(rows)
    with pytest.raises(ValueError, match=r"reward server .*soko.jsonl:4: 'env' is missing"):
        remote.check_rows([{"datasource": "sokoban", "_where": "soko.jsonl:4"}])
    with pytest.raises(ValueError, match="'env' is missing"):  # a row the reward rejects: 400, not retried
        remote([GOOD.format("R")], [{"datasource": "sokoban"}])
    remote.close()


def test_server_down_raises_after_retries():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    reward = RemoteReward(url, timeout=2, retries=2, backoff=0.01)
    with pytest.raises(RuntimeError, match=r"failed after 3 attempts; last problem: ConnectError"):
        reward(["x"], [{}])


class _Garbage(http.server.BaseHTTPRequestHandler):
    calls = 0
    body = b"not json"
    status = 200

    def do_POST(self):  # noqa: N802 - http.server API
        type(self).calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,body,message", [
    (200, b"not json", "malformed answer"),
    (200, json.dumps({"total": [1.0]}).encode(), r"malformed answer \(total: expected a list of 2 numbers\)"),
    (200, json.dumps({"total": ["a", 1], "components": {}}).encode(), "'a' is not a number"),
    (503, b'{"detail": "overloaded"}', "HTTP 503: overloaded"),
])
def test_garbage_answers_raise_after_retries(status, body, message):
    handler = type("H", (_Garbage,), {"calls": 0, "body": body, "status": status})
    httpd = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        reward = RemoteReward(f"http://127.0.0.1:{httpd.server_port}", timeout=5, retries=1, backoff=0.01)
        with pytest.raises(RuntimeError, match=message):
            reward(["a", "b"], [{}, {}])
        assert handler.calls == 2  # one try + one retry
    finally:
        httpd.shutdown()


def test_client_and_cli_argument_errors():
    with pytest.raises(ValueError, match="must start with http"):
        RemoteReward("127.0.0.1:8000")
    assert main(["--reward", "no-such-reward", "--port", "1"]) == 2
