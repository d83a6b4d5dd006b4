"""Math accuracy throughput: the lmmr1 worker pool vs calling math-verify serially in one process.

    .venv/bin/python benchmarks/reward_pool.py                    # 1,000 items, 1% pathological, 5 s timeout
    .venv/bin/python benchmarks/reward_pool.py --n 200 --timeout 2

Both sides grade the same mixed batch with the same parsing rules. The serial side is math-verify as most trainers
call it: in the main thread, with its own signal.alarm timeouts (which only work there). The pool side is
`AccuracyReward`'s `VerifyPool` (workers started before timing; start-up is printed separately). Prints items/s of
each, their ratio, the p99 / max latency per item, and the pool's timeout count. Target: pool >= 1.6x serial on 2 cores,
and no pathological item holds the batch beyond the timeout.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time

PATHOLOGICAL = ["2^{2^{2^{2^{2^{2^{2}}}}}}", "9^{9^{9^{9}}}", "(10^{10^{10}})!", "(" * 3000 + "1" + ")" * 3000,
                "{" * 3000 + "1" + "}" * 3000]


def make_batch(n: int, pathological_rate: float, seed: int) -> list[tuple[str, str]]:
    """(label, prediction) pairs: a mix of forms, about half right, plus `pathological_rate` of stuck answers."""
    rng = random.Random(seed)
    items = []
    n_bad = round(n * pathological_rate)
    bad_at = set(rng.sample(range(n), n_bad))
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(2, 20)
        right = rng.random() < 0.5
        forms = [
            (str(a), str(a if right else a + 1)),
            (f"\\frac{{{a}}}{{{b}}}", f"{a / b:.6f}" if right else f"\\frac{{{a + 1}}}{{{b}}}"),
            (f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}" if right else f"{b}\\sqrt{{{a}}}"),
            (f"\\{{{a},{b}\\}}", f"\\{{{b},{a}\\}}" if right else f"\\{{{a},{b + 1}\\}}"),
            (f"[{a},{a + b})", f"[{a},{a + b})" if right else f"({a},{a + b})"),
            (f"x={a}", str(a) if right else str(-a)),
            (f"{a}\\pi", f"\\pi \\cdot {a}" if right else f"{a + 1}\\pi"),
            (f"x^2+{2 * a}x+{a * a}", f"(x+{a})^2" if right else f"(x-{a})^2"),
        ]
        label, pred = rng.choice(forms)
        items.append((label, PATHOLOGICAL[i % len(PATHOLOGICAL)] if i in bad_at else pred))
    return items


def serial_verify(label: str, prediction: str, timeout: int) -> float:
    """The same rules as `verify_pool.verify_item`, but with math-verify's own (main-thread only) timeouts."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    def _parse(text: str) -> list:
        if not any(d in text for d in ("$", "\\boxed", "\\(", "\\[")):
            out = parse(f"${text}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=timeout)
            if out:
                return out
        return parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                     parsing_timeout=timeout)

    gold, pred = _parse(label), _parse(prediction)
    return float(bool(gold and pred) and verify(gold, pred, timeout_seconds=timeout))


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--pathological", type=float, default=0.01)
    parser.add_argument("--timeout", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from lmmr1.rewards.verify_pool import TIMEOUT, VerifyPool

    items = make_batch(args.n, args.pathological, args.seed)
    pool = VerifyPool(workers=args.workers, timeout=args.timeout)
    start = time.perf_counter()
    pool.map([("1", "1")])
    startup = time.perf_counter() - start

    start = time.perf_counter()
    pooled = pool.map(items)
    pool_s = time.perf_counter() - start
    pool_latencies = pool.last_latencies
    pool.close()

    serial, serial_latencies = [], []
    serial_verify("1", "1", args.timeout)  # warm imports, as the pool's workers were
    start = time.perf_counter()
    for label, prediction in items:
        t = time.perf_counter()
        serial.append(serial_verify(label, prediction, args.timeout))
        serial_latencies.append(time.perf_counter() - t)
    serial_s = time.perf_counter() - start

    agree = sum(a == b for (a, _), b in zip(pooled, serial, strict=True))
    print(f"batch: {args.n} items, {round(args.n * args.pathological)} pathological, timeout {args.timeout} s, "
          f"{pool.workers} workers (start-up {startup:.1f} s, not timed)")
    print(f"serial math-verify: {args.n / serial_s:8.1f} items/s  ({serial_s:.1f} s)  p99 latency "
          f"{p99(serial_latencies) * 1000:.0f} ms  max {max(serial_latencies):.1f} s")
    print(f"lmmr1 pool:         {args.n / pool_s:8.1f} items/s  ({pool_s:.1f} s)  p99 latency "
          f"{p99(pool_latencies) * 1000:.0f} ms  max {max(pool_latencies):.1f} s  "
          f"timeouts {sum(s == TIMEOUT for _, s in pooled)}")
    print(f"ratio pool/serial: {serial_s / pool_s:.2f}x   scores agree on {agree}/{args.n} items")
    # the ratio only means "N cores" when nothing else runs: other load shares the same cores
    print(f"cpus: {os.cpu_count()}, load average during the run: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
