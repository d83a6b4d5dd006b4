"""Math accuracy + format on a hand-labeled table, label/answer edge cases, pathological inputs and the worker pool."""

from __future__ import annotations

import pickle
import threading
import time

import pytest

from lmmr1.rewards import AccuracyReward, MathReward, VerifyPool, extract_prediction


def A(answer: str, think: str = "work") -> str:  # noqa: N802 - a well-formatted response with this answer
    return f"<think>{think}</think><answer>{answer}</answer>"


# (response, label, expected format, expected accuracy)  # why
CASES = [
    (A("60"), "$\\boxed{60}$", 1, 1),  # boxed gold, plain prediction
    (A("60"), "60", 1, 1),  # plain gold
    (A("60.0"), "60", 1, 1),  # decimal form of an integer
    (A("0.75"), "\\frac{3}{4}", 1, 1),  # fraction vs decimal
    (A("\\dfrac{3}{4}"), "\\frac{3}{4}", 1, 1),  # \dfrac
    (A("\\frac34"), "$\\frac{3}{4}$", 1, 1),  # brace-less \frac
    (A("3/4"), "\\frac{3}{4}", 1, 1),  # slash fraction
    (A("-\\frac{1}{2}"), "-0.5", 1, 1),  # negative fraction vs decimal
    (A("\\frac{-1}{2}"), "-\\frac{1}{2}", 1, 1),  # where the minus sits
    (A("-7"), "-7", 1, 1),  # negative integer
    (A("7"), "-7", 1, 0),  # wrong sign
    (A("-3"), "3", 1, 0),  # wrong sign the other way
    (A("61"), "60", 1, 0),  # off by one
    (A("59"), "$\\boxed{60}$", 1, 0),  # off by one, boxed gold
    (A("\\sqrt{12}"), "2\\sqrt{3}", 1, 1),  # radicals simplify
    (A("2\\sqrt3"), "2\\sqrt{3}", 1, 1),  # brace-less radical
    (A("3\\sqrt2"), "2\\sqrt3", 1, 0),  # near miss: 2√3 vs 3√2
    (A("\\frac{\\sqrt{2}}{2}"), "\\frac{1}{\\sqrt{2}}", 1, 1),  # rationalized denominator
    (A("\\dfrac{\\sqrt{3}}{2}"), "\\frac{\\sqrt3}{2}", 1, 1),  # \dfrac with radical
    (A("2\\pi"), "2\\pi", 1, 1),  # pi
    (A("\\pi \\cdot 2"), "2\\pi", 1, 1),  # pi, reordered product
    (A("\\frac{\\pi}{2}"), "\\pi/2", 1, 1),  # pi over two, two notations
    (A("\\pi"), "2\\pi", 1, 0),  # pi, wrong factor
    (A("60^\\circ"), "60", 1, 1),  # degrees in the prediction
    (A("60"), "60^{\\circ}", 1, 1),  # degrees in the label
    (A("45^\\circ"), "60^\\circ", 1, 0),  # wrong angle
    (A("1,000"), "1000", 1, 1),  # thousands separator in the prediction
    (A("1000"), "1,000", 1, 1),  # thousands separator in the label
    (A("12,345,678"), "12345678", 1, 1),  # several separators
    (A("1001"), "1,000", 1, 0),  # near miss with separator
    (A("[1,3)"), "[1,3)", 1, 1),  # half-open interval
    (A("(1,3)"), "[1,3)", 1, 0),  # interval with the wrong bracket
    (A("(2,5)"), "(2,5)", 1, 1),  # open interval
    (A("\\{2,1\\}"), "\\{1,2\\}", 1, 1),  # set order does not matter
    (A("\\{1,3\\}"), "\\{1,2\\}", 1, 0),  # different set
    (A("2,1"), "1,2", 1, 1),  # comma list of solutions, any order
    (A("x=2"), "2", 1, 1),  # equation vs value
    (A("2"), "x=2", 1, 1),  # value vs equation
    (A("x=3"), "x=2", 1, 0),  # wrong value in an equation
    (A("y=1+2x"), "y=2x+1", 1, 1),  # equivalent line equations
    (A("(x+1)^2"), "x^2+2x+1", 1, 1),  # equivalent polynomial
    (A("x^2+1"), "x^2+2x+1", 1, 0),  # different polynomial
    (A("10\\%"), "10", 1, 1),  # percent sign dropped
    (A("5 \\text{ cm}"), "5", 1, 1),  # units text ignored
    (A("B"), "B", 1, 1),  # multiple choice letter
    (A("(B)"), "B", 1, 1),  # parenthesized letter
    (A("(B) 12"), "(B)", 1, 1),  # letter with the option text
    (A("b"), "$\\boxed{B}$", 1, 1),  # lower-case letter, boxed gold
    (A("C"), "B", 1, 0),  # wrong letter
    (A("12"), "B", 1, 0),  # option text without the letter
    (A("\\frac{1}{3}"), "0.3333", 1, 0),  # truncated decimal is not one third
    (A("3.0001"), "3", 1, 0),  # close but not equal
    (A("\\infty"), "\\infty", 1, 1),  # infinity
    ("I think it is \\boxed{42}.", "42", 0, 1),  # no tags: the last \boxed is graded
    ("\\boxed{41} no wait \\boxed{42}", "42", 0, 1),  # the last \boxed wins
    ("\\boxed{\\frac{1}{2}}", "0.5", 0, 1),  # nested braces inside \boxed
    ("<think>x</think><answer>\\boxed{42}</answer>", "42", 1, 1),  # \boxed inside the answer tag
    ("<think>x</think><answer>42</answer> extra", "42", 0, 1),  # trailing text breaks format, not accuracy
    ("<think>x</think>\n\n<answer>\n42\n</answer>\n", "42", 1, 1),  # whitespace and newlines allowed
    ("<think>\nline 1\nline 2\n</think><answer>42</answer>", "42", 1, 1),  # multi-line thinking
    ("<answer>42</answer>", "42", 0, 1),  # no think block
    ("<think>x</think><answer>1</answer><answer>42</answer>", "42", 0, 1),  # two answers: format 0, last graded
    ("<think>the answer is 42</think>", "42", 0, 0),  # no answer tag, no \boxed: missing
    ("42", "42", 0, 0),  # bare text is not an answer
    (A(""), "42", 1, 0),  # empty answer
    (A("42"), "\\text{}", 1, 0),  # unparseable label scores 0 (counted), never 1
    (A("anything"), "abc\\frac{", 1, 0),  # broken label scores 0
]


@pytest.fixture(scope="module")
def math_reward():
    reward = MathReward(timeout=5.0, workers=2)
    yield reward
    reward.close()


@pytest.fixture(scope="module")
def table_output(math_reward):
    return math_reward([c[0] for c in CASES], [{"answer": c[1], "_where": f"case:{i}"} for i, c in enumerate(CASES)])


def test_table_is_big_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{i}:{c[1][:20]}" for i, c in enumerate(CASES)])
def test_table_case(table_output, i):
    response, label, want_format, want_accuracy = CASES[i]
    assert table_output.components["format"][i] == want_format, (response, label)
    assert table_output.components["accuracy"][i] == want_accuracy, (response, label)
    assert table_output.total[i] == pytest.approx(0.5 * want_format + 1.0 * want_accuracy)  # LMM-R1 weights


def test_table_counters(table_output):
    missing = sum(extract_prediction(c[0]) is None for c in CASES)  # independent count of answer-less responses
    assert missing == 2
    assert table_output.stats["accuracy/answer_missing"] == missing
    assert table_output.stats["accuracy/label_parse_failures"] == 2  # "\text{}" and "abc\frac{"
    assert table_output.stats["accuracy/timeouts"] == 0


def test_weights_are_configurable():
    reward = MathReward(format_weight=0.0, accuracy_weight=2.0, workers=1)
    try:
        out = reward([A("7"), A("8")], [{"answer": "7"}, {"answer": "7"}])
    finally:
        reward.close()
    assert out.total == [2.0, 0.0]


def test_check_rows_names_a_row_without_label():
    with pytest.raises(ValueError, match=r"data.jsonl:3: 'answer' is missing or empty.*'gsm'"):
        AccuracyReward().check_rows([{"answer": "1"}, {"answer": "2"},
                                     {"answer": " ", "datasource": "gsm", "_where": "data.jsonl:3"}])


PATHOLOGICAL = [
    "2^{2^{2^{2^{2^{2^{2}}}}}}",  # tower of exponents: sympy evaluates it exactly
    "9^{9^{9^{9}}}",
    "(10^{10^{10}})!",
    "(" * 3000 + "1" + ")" * 3000,  # thousands of nested brackets
    "{" * 3000 + "1" + "}" * 3000,
]


def test_pathological_answers_score_zero_within_the_timeout_and_the_pool_recovers():
    timeout = 1.5
    reward = AccuracyReward(timeout=timeout, workers=2)
    try:
        reward([A("1")], [{"answer": "1"}])  # start the workers outside the timed part
        responses = [A(p) for p in PATHOLOGICAL] + [A("60"), A("\\frac{1}{2}")]
        rows = [{"answer": "2"}] * len(PATHOLOGICAL) + [{"answer": "60"}, {"answer": "0.5"}]
        start = time.monotonic()
        out = reward(responses, rows)
        elapsed = time.monotonic() - start
        assert out.total == [0.0] * len(PATHOLOGICAL) + [1.0, 1.0]
        assert out.stats["accuracy/timeouts"] == len(PATHOLOGICAL)
        # 5 stuck items on 2 workers: 3 timeout rounds plus worker restarts; far below one item's natural run time
        assert elapsed < 3 * timeout + 20, elapsed
        again = reward([A("3"), A("4")], [{"answer": "3"}, {"answer": "3"}])  # replaced workers answer normally
        assert again.total == [1.0, 0.0] and again.stats["accuracy/timeouts"] == 0
    finally:
        reward.close()


def test_reward_works_from_threads_and_after_close_and_pickling():
    reward = AccuracyReward(timeout=5.0, workers=1)
    results: list = []
    threads = [threading.Thread(target=lambda k=k: results.append((k, reward([A(str(k))], [{"answer": "2"}]).total)))
               for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [(0, [0.0]), (1, [0.0]), (2, [1.0]), (3, [0.0])]
    reward.close()
    assert reward([A("\\frac{1}{2}")], [{"answer": "0.5"}]).total == [1.0]  # restarts after close
    clone = pickle.loads(pickle.dumps(reward))  # settings travel, processes do not
    assert clone.pool.timeout == 5.0 and clone.pool._pool == []
    assert clone([A("2")], [{"answer": "2"}]).total == [1.0]
    clone.close()
    reward.close()


def test_pool_rejects_bad_settings():
    with pytest.raises(ValueError, match="timeout must be > 0"):
        VerifyPool(timeout=0)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        VerifyPool(workers=0)


def test_start_launches_the_workers_before_the_first_call():
    """`Reward.start` (called by the RL module at setup) starts math-verify workers so their imports overlap the
    first rollout; a composite reward reaches its accuracy pool."""
    reward = MathReward()
    pool = reward.rewards[1].pool
    assert pool._pool == []  # nothing starts at construction
    reward.start()
    assert len(pool._pool) == pool.workers and all(w.process.is_alive() for w in pool._pool)
    started = [w.process.pid for w in pool._pool]
    out = reward(["<think>x</think><answer>7</answer>"], [{"answer": "7", "datasource": "arith"}])
    assert out.components["accuracy"] == [1.0]
    assert [w.process.pid for w in pool._pool] == started  # the call used the workers start() launched
    reward.close()
