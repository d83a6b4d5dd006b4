"""A pool of worker processes running math-verify with a hard per-item timeout.

Why: math-verify times out with `signal.alarm`, which only works in the main thread, and some inputs (towers of
exponents, thousands of nested brackets) spin in C code for minutes. Here each worker runs math-verify with its own
timeouts disabled, fed through its own pipe; the parent waits with a deadline per item and kills + replaces a worker
that overruns, so one pathological answer costs at most `timeout` seconds and scores 0. A worker that dies on its own
(killed by the OOM killer or by hand, crashed in C code) is replaced and counted, and the item it held is verified once
more on the fresh worker, within what is left of the item's `timeout`: an outside kill must not score a right answer 0,
while an item that kills its worker twice scores 0 (status `crash`) instead of killing workers forever. The pool
starts lazily on first use, restarts after `close()`, pickles as its settings only, and `map`/`run` may be called from
any thread (calls are serialized by a lock). `concurrent.futures.ProcessPoolExecutor` cannot kill one stuck worker,
hence this small pool.

>>> verify_item("$\\\\boxed{60}$", "60.0")
(1.0, 'ok')
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import multiprocessing
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

OK, LABEL_PARSE_FAILURE, TIMEOUT, CRASH = "ok", "label_parse_failure", "timeout", "crash"
MAX_TRIES = 2  # verifications of one item whose worker died under it; the last death scores it 0 with status CRASH
MAX_STARTUP_KILLS = 3  # workers killed by a signal while starting that one call replaces before giving up
_MATH_DELIMITERS = ("$", "\\boxed", "\\(", "\\[")
DEFAULT_VERIFIER = f"{__name__}:verify_item"


def _parse(text: str) -> list:
    """math-verify parse, LaTeX first: a bare `2\\sqrt3` read as a plain expression would be just `2`."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = text.strip()
    if not text:
        return []
    if not any(d in text for d in _MATH_DELIMITERS):
        parsed = parse(f"${text}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
        if parsed:
            return parsed
    return parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)


@functools.lru_cache(maxsize=1024)
def _parse_label(label: str) -> list:
    return _parse(label)


def verify_item(label: str, prediction: str) -> tuple[float, str]:
    """(score, status) for one prediction against its label; no timeout of its own (the pool enforces one).

    A label that does not parse to a math object scores 0 with status `label_parse_failure`: scoring it 1 would
    reward every answer to a broken label (a known bug elsewhere).
    """
    from math_verify import verify
    from sympy import Basic, MatrixBase

    gold = _parse_label(label)  # cached: the G samples of a prompt share one label
    if not any(isinstance(g, Basic | MatrixBase) for g in gold):
        return 0.0, LABEL_PARSE_FAILURE
    pred = _parse(prediction)
    if not pred:
        return 0.0, OK
    return float(verify(gold, pred, timeout_seconds=None)), OK


def _resolve(verifier: str):  # noqa: ANN202 - the (label, prediction) -> (score, status) function
    module, _, name = verifier.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker_main(conn: Connection, verifier: str = DEFAULT_VERIFIER) -> None:
    """Worker loop: import and warm up the verifier, say "ready", then answer (job_id, label, pred) messages."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warnings are expected here
    verify = _resolve(verifier)
    verify("1", "1")
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        job_id, label, prediction = message
        try:
            result = verify(label, prediction)
        except Exception:  # noqa: BLE001 - any failure inside math-verify/sympy scores 0, never kills the batch
            result = (0.0, OK)
        conn.send((job_id, result))


class _Worker:
    def __init__(self, context: multiprocessing.context.BaseContext, verifier: str) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, verifier), daemon=True, name="lmmr1-verify")
        self.process.start()
        child.close()
        self.started = time.monotonic()
        self.ready = False
        self.job: int | None = None
        self.deadline = float("inf")

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


@dataclass
class PoolRun:
    """What one `VerifyPool.run` call produced."""

    results: list[tuple[float, str]]  # (score, status) per item, in order
    latencies: list[float]  # seconds from an item's first dispatch to its result
    worker_deaths: int  # workers that died without being asked (killed, crashed) and were replaced during the call


def _shutdown(workers: list[_Worker]) -> None:
    for worker in workers:
        try:
            worker.conn.send(None)
        except (OSError, ValueError):
            pass
    for worker in workers:
        worker.process.join(1)
        worker.kill()
    workers.clear()


class VerifyPool:
    """`workers` processes verifying (label, prediction) pairs with a hard `timeout` in seconds per item.

    `verifier` ("module:function") is the function the workers run, `verify_item` by default; any other must take
    (label, prediction) and return (score, status) like it, e.g. LMM-R1's rules in `lmm_r1_math.verify_reference`.
    """

    def __init__(self, workers: int | None = None, timeout: float = 5.0, start_method: str | None = None,
                 startup_timeout: float = 120.0, verifier: str = DEFAULT_VERIFIER) -> None:
        if workers is None:
            workers = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not 0 < timeout < math.inf:  # NaN or inf would never time out
            raise ValueError(f"timeout must be > 0 seconds and finite, got {timeout}")
        if start_method is None:  # forkserver: replacements fork from a server that has math-verify imported already
            start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        if not isinstance(verifier, str) or ":" not in verifier:
            raise ValueError(f"verifier must be 'module:function', got {verifier!r}")
        self.workers, self.timeout = workers, timeout
        self.start_method, self.startup_timeout, self.verifier = start_method, startup_timeout, verifier
        self._setup()

    def _setup(self) -> None:
        self._lock = threading.Lock()
        self._pool: list[_Worker] = []
        self.last_latencies: list[float] = []  # seconds from dispatch to result, per item of the last `map`
        self._finalizer = weakref.finalize(self, _shutdown, self._pool)

    def __getstate__(self) -> dict:
        return {k: self.__dict__[k] for k in ("workers", "timeout", "start_method", "startup_timeout", "verifier")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setup()

    def close(self) -> None:
        """Stop the workers; a later `map` starts fresh ones."""
        with self._lock:
            _shutdown(self._pool)

    def start(self) -> None:
        """Start the workers without waiting for them: their imports run while the caller goes on (a `run` waits
        for any that are not ready yet)."""
        with self._lock:
            while len(self._pool) < self.workers:
                self._pool.append(self._start_worker())

    def map(self, items: Sequence[tuple[str, str]]) -> list[tuple[float, str]]:
        """(score, status) per (label, prediction); status is ok, label_parse_failure, timeout or crash."""
        return self.run(items).results

    def run(self, items: Sequence[tuple[str, str]]) -> PoolRun:
        """Like `map`, also reporting latencies and how many workers died during the call. If the call fails (a
        worker cannot start), every worker is stopped, so the next call starts from a clean pool."""
        with self._lock:
            try:
                return self._run(list(items))
            except BaseException:  # a half-finished call would leave workers holding its jobs
                _shutdown(self._pool)
                raise

    def _start_worker(self) -> _Worker:
        context = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":  # only takes effect if this process has not started its forkserver yet
            context.set_forkserver_preload(["math_verify", "sympy", __name__, self.verifier.partition(":")[0]])
        return _Worker(context, self.verifier)

    def _run(self, items: list[tuple[str, str]]) -> PoolRun:
        while len(self._pool) < self.workers:
            self._pool.append(self._start_worker())
        n = len(items)
        results: list[tuple[float, str] | None] = [None] * n
        sent, deadline, latencies, tries = [0.0] * n, [0.0] * n, [0.0] * n, [0] * n
        pending, retry = deque(range(n)), deque()  # retry: items whose worker died under them, sent again first
        remaining, deaths, startup_kills = n, 0, 0

        def finish(job: int, result: tuple[float, str]) -> None:
            nonlocal remaining
            results[job], latencies[job], remaining = result, time.monotonic() - sent[job], remaining - 1

        while remaining:
            for job in [j for j in retry if time.monotonic() >= deadline[j]]:  # no time left to verify it again
                retry.remove(job)
                finish(job, (0.0, CRASH))
            for worker in self._pool:
                # is_alive: a worker can die after its "ready" was sent and before it was read; its sentinel fires below
                if worker.ready and worker.job is None and (retry or pending) and worker.process.is_alive():
                    job = worker.job = (retry or pending).popleft()
                    if not tries[job]:
                        sent[job] = time.monotonic()
                        deadline[job] = sent[job] + self.timeout  # retries included: an item never costs more
                    tries[job] += 1
                    worker.deadline = deadline[job]
                    try:
                        worker.conn.send((job, *items[job]))
                    except OSError:  # died since its last answer; its sentinel fires below and the job goes again
                        pass
            waits = [w.deadline if w.job is not None else w.started + self.startup_timeout
                     for w in self._pool if w.job is not None or not w.ready] + [deadline[j] for j in retry]
            if not remaining:
                break
            budget = max(0.0, min(waits, default=time.monotonic() + 1.0) - time.monotonic())
            ready = set(wait([w.conn for w in self._pool] + [w.process.sentinel for w in self._pool], budget))
            for i, worker in enumerate(self._pool):
                outcome = None
                if worker.conn in ready:
                    try:
                        job_id, result = worker.conn.recv()
                    except (EOFError, OSError):
                        outcome = CRASH
                    else:
                        if job_id == "ready":
                            worker.ready = True
                        else:
                            worker.job = None
                            finish(job_id, result)
                        continue
                elif worker.process.sentinel in ready:
                    outcome = CRASH
                elif worker.job is not None and time.monotonic() > worker.deadline:
                    outcome = TIMEOUT
                elif not worker.ready and time.monotonic() > worker.started + self.startup_timeout:
                    raise RuntimeError(f"math-verify worker did not start within {self.startup_timeout:.0f} s; is the "
                                       f"machine overloaded? (VerifyPool startup_timeout)")
                if outcome is None:
                    continue
                if outcome == CRASH:  # let a worker that is exiting by itself finish, so its exit code is its own
                    worker.process.join(1)
                worker.kill()  # reaps it, so exitcode is known
                code = worker.process.exitcode
                if outcome == CRASH and not worker.ready:
                    startup_kills += 1
                    if code is None or code >= 0:  # exited by itself while importing: a retry fails the same way
                        raise RuntimeError(f"math-verify worker exited during start-up (exit code {code}); is "
                                           f"math-verify installed in this environment?")
                    if startup_kills > MAX_STARTUP_KILLS:
                        raise RuntimeError(f"math-verify workers were killed by a signal while starting "
                                           f"{startup_kills} times (last: signal {-code}); if the machine is out of "
                                           f"memory, lower the accuracy reward's `workers`")
                deaths += outcome == CRASH
                if worker.job is not None:
                    if outcome == CRASH and tries[worker.job] < MAX_TRIES:  # maybe killed from outside: once more
                        retry.append(worker.job)
                    else:
                        finish(worker.job, (0.0, outcome))
                self._pool[i] = self._start_worker()
        self.last_latencies = latencies
        return PoolRun(results, latencies, deaths)  # type: ignore[arg-type]
