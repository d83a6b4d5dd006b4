"""Faults on the reward side, injected for real: math-verify workers killed with SIGKILL mid-batch, between batches and
while starting; a reward server process killed mid-run (and brought back). Each batch completes with the right scores
or fails with an error naming what failed: never a silent 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import pytest

from lmmr1.rewards import AccuracyReward, RemoteReward
from lmmr1.rewards.remote import RewardServerError
from lmmr1.rewards.score import main as score_main

A = "<think>t</think><answer>{}</answer>".format
SLOW = A("\\frac{2 \\cdot 400000!}{400000!}")  # equals 2, but math-verify needs about a second to see it


def _kill_worker_holding(reward: AccuracyReward, job: int, skip: set[int], deadline: float = 30.0) -> int:
    """SIGKILL the worker process that holds `job` (waiting until one does, ignoring pids in `skip`); its pid."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        for worker in list(reward.pool._pool):
            if worker.job == job and worker.process.pid not in skip:
                os.kill(worker.process.pid, signal.SIGKILL)
                return worker.process.pid
        time.sleep(0.002)
    raise AssertionError(f"no worker picked up job {job} within {deadline} s")


def _score_in_thread(reward, responses, rows):
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("out", reward(responses, rows)), daemon=True)
    thread.start()
    return thread, box


@pytest.fixture
def reward():
    reward = AccuracyReward(timeout=30.0, workers=2)
    reward([A("1")], [{"answer": "1"}])  # start the workers
    yield reward
    reward.close()


@pytest.mark.timeout(60)
def test_worker_killed_mid_item_is_counted_and_the_item_verified_again(reward):
    responses = [SLOW] + [A(k) for k in range(5)]
    rows = [{"answer": "2"}] + [{"answer": "3"}] * 5
    start = time.monotonic()
    thread, box = _score_in_thread(reward, responses, rows)
    _kill_worker_holding(reward, 0, skip=set())
    thread.join(40)
    elapsed = time.monotonic() - start
    out = box["out"]
    # the killed item scores what it deserves (1: 2·400000!/400000! = 2), not 0, and the batch did not wait a timeout
    assert out.total == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert out.stats["accuracy/worker_deaths"] == 1 and out.stats["accuracy/crashes"] == 0
    assert out.stats["accuracy/timeouts"] == 0
    assert elapsed < reward.timeout, elapsed
    again = reward([A("3"), A("4")], [{"answer": "3"}] * 2)  # the pool is whole again: nothing new dies
    assert again.total == [1.0, 0.0] and again.stats["accuracy/worker_deaths"] == 0
    assert len(reward.pool._pool) == 2 and all(w.process.is_alive() for w in reward.pool._pool)


@pytest.mark.timeout(60)
def test_item_that_kills_two_workers_scores_zero_and_the_batch_completes(reward):
    thread, box = _score_in_thread(reward, [SLOW, A("7")], [{"answer": "2"}, {"answer": "7"}])
    first = _kill_worker_holding(reward, 0, skip=set())
    _kill_worker_holding(reward, 0, skip={first})  # the retry, on a fresh worker, dies too
    thread.join(40)
    out = box["out"]
    assert out.total == [0.0, 1.0]  # bounded: two deaths and the item is given up, scored 0 and counted
    assert out.stats["accuracy/worker_deaths"] == 2 and out.stats["accuracy/crashes"] == 1


@pytest.mark.timeout(60)
def test_a_worker_that_said_ready_and_died_before_it_was_read_gets_no_item(reward):
    """The warm-up call needed one worker; the other's "ready" is still unread in its pipe when both die. Reading that
    message must not make a dead worker eligible: the item retried after the first death would die with it too and be
    scored 0 as a crash it did not cause."""
    late = [w for w in reward.pool._pool if not w.ready]
    if not late:
        pytest.skip("both workers were ready after the warm-up call")
    assert late[0].conn.poll(20)  # its "ready" is waiting, unread
    for worker in reward.pool._pool:
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.join(5)
    out = reward([A(k) for k in range(4)], [{"answer": "2"}] * 4)
    assert out.total == [0.0, 0.0, 1.0, 0.0]
    assert out.stats["accuracy/worker_deaths"] == 2 and out.stats["accuracy/crashes"] == 0


@pytest.mark.timeout(60)
def test_workers_killed_between_batches_or_while_starting_are_replaced(reward):
    for worker in reward.pool._pool:  # whether idle or still starting, both die before the next batch
        os.kill(worker.process.pid, signal.SIGKILL)
    time.sleep(0.2)
    out = reward([A(k) for k in range(4)], [{"answer": "2"}] * 4)
    assert out.total == [0.0, 0.0, 1.0, 0.0]  # no item scored 0 for a death it did not cause
    assert out.stats["accuracy/worker_deaths"] == 2 and out.stats["accuracy/crashes"] == 0


@pytest.mark.timeout(60)
def test_pool_recovers_after_a_call_that_failed():
    reward = AccuracyReward(timeout=10.0, workers=1)
    try:
        reward.pool.startup_timeout = 1e-3  # no worker starts that fast: the call fails with a clear error
        with pytest.raises(RuntimeError, match="did not start within"):
            reward([A("1")], [{"answer": "1"}])
        reward.pool.startup_timeout = 120.0
        assert reward([A("1")], [{"answer": "1"}]).total == [1.0]  # a clean pool, not a closed pipe
    finally:
        reward.close()


# --- the reward server process dies mid-run ---

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLOW_PLUGIN = """
import time
import types

def slow(responses, rows):  # a reward that takes its time on 'slow', so a request can be in flight when the server dies
    if "slow" in responses:
        time.sleep(0.6)
    return [float(len(r)) for r in responses]
"""


def _start_server(port: int, reward: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmmr1.rewards.server", "--reward", reward, "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_up(url: str, process: subprocess.Popen, timeout: float = 20.0) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert process.poll() is None, f"reward server exited with {process.returncode}"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise AssertionError(f"reward server at {url} did not come up within {timeout} s")


@pytest.fixture
def servers():
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def _kill(process: subprocess.Popen) -> None:
    process.kill()  # SIGKILL: no goodbye; the client's pooled connection is dead
    process.wait(10)


@pytest.mark.timeout(90)
def test_server_killed_mid_run_retries_then_raises_naming_url(servers, tmp_path, capsys):
    (tmp_path / "slow.py").write_text(SLOW_PLUGIN)
    plugin = f"{tmp_path / 'slow.py'}:slow"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    servers.append(_start_server(port, plugin))
    _wait_up(url, servers[-1])
    remote = RemoteReward(url, timeout=5, retries=8, backoff=0.25)
    assert remote(["ab", "c"], [{}, {}]).total == [2.0, 1.0]

    # killed while a request is in flight, back while the client retries: the call returns the right scores
    thread, box = _score_in_thread(remote, ["slow", "c"], [{}, {}])
    time.sleep(0.3)
    _kill(servers[-1])
    servers.append(_start_server(port, plugin))
    thread.join(60)
    assert box["out"].total == [4.0, 1.0]

    # killed for good: bounded retries with exponential backoff, then an error naming the URL and what failed
    _kill(servers[-1])
    brief = RemoteReward(url, timeout=5, retries=3, backoff=0.1)
    start = time.monotonic()
    with pytest.raises(RewardServerError) as info:
        brief(["ab"], [{}])
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert f"reward server {url}/score failed after 4 attempts" in message and "ConnectError" in message
    assert "Is `lmmr1 serve-reward` running" in message  # says what to check
    assert 0.1 + 0.2 + 0.4 <= elapsed < 5, elapsed

    # `lmmr1 score` against the dead server: exit 2 and a readable message, no traceback, no output file
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"response": A("1")}) + "\n")
    config = tmp_path / "remote.yaml"
    config.write_text(f"url: {url}\nretries: 1\nbackoff: 0.01\n")
    assert score_main(["--reward", str(config), "--input", str(src), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"reward server {url}/check_rows failed after 2 attempts" in err and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()
    for client in (remote, brief):
        client.close()


def test_backoff_doubles_up_to_a_cap(monkeypatch):
    from lmmr1.rewards import remote as remote_module

    sleeps: list[float] = []
    monkeypatch.setattr(remote_module, "time", types.SimpleNamespace(sleep=sleeps.append))
    dead = RemoteReward(f"http://127.0.0.1:{_free_port()}", timeout=2, retries=6, backoff=10)  # nothing listens
    with pytest.raises(RewardServerError, match="failed after 7 attempts; last problem: ConnectError"):
        dead(["x"], [{}])
    assert sleeps == [10, 20, 30, 30, 30, 30]  # bounded: at most MAX_BACKOFF = 30 s per wait
