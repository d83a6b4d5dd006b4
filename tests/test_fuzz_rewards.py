"""Fuzzing the answer extractor, the format reward and math accuracy (hypothesis).

Properties: the extractors give exactly what their slow reference definitions give (the regex / rescan versions they
replaced), in time linear in the response, on any text; the format reward is 1 exactly for `<think>…</think>
<answer>…</answer>`; math accuracy over random LaTeX-ish strings (deep nesting, towers of exponents, garbage) is 0 or
1, every item is answered within the pool's per-item timeout, and a weighted total stays within the sum of weights.
The math workers are one pool for the whole module.
"""

from __future__ import annotations

import math
import re
import time

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from lmmr1.envs.sokoban import parse_plan
from lmmr1.rewards import AccuracyReward, FormatReward
from lmmr1.rewards.accuracy import choice_letter, extract_prediction, last_boxed
from lmmr1.rewards.base import tag_content
from lmmr1.rewards.composite import WeightedSum
from lmmr1.rewards.verify_pool import CRASH, LABEL_PARSE_FAILURE, OK, TIMEOUT

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ITEM_TIMEOUT = 0.5  # seconds per math item in this module's pool
WORKERS = 2
SLACK = 0.5  # seconds a loaded machine may add to an item's deadline (pipe, wake-up, kill)
RESTART = 1.5  # seconds to replace a worker killed at its deadline before it takes the next item


# ---- the extractors against their reference definitions -------------------------------------------------------------
def _tag_content_reference(response: str, tag: str) -> str | None:
    matches = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", response, flags=re.DOTALL)
    return matches[-1].strip() if matches else None


def _last_boxed_reference(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    while start != -1:
        depth = 0
        for i in range(start + len("\\boxed"), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start + len("\\boxed{"):i].strip()
        start = text.rfind("\\boxed{", 0, start)
    return None


TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<a-b>", "</a-b>"]
TOKENS = [*TAGS, "\\boxed{", "\\boxed", "{", "}", "\\", "$", " ", "\n", "x", "12", "B", "(", ")", ".", "<", ">", "/",
          "answer", "think", "\\frac{1}{2}", "up", "L"]
soup = st.lists(st.sampled_from(TOKENS) | st.text(max_size=3), max_size=40).map("".join)


@settings(FUZZ, max_examples=400)
@given(soup, st.sampled_from(["answer", "think", "a-b"]))
@example("<answer>x<answer>y</answer>", "answer")  # an inner open tag belongs to the content, as with the regex
def test_tag_content_equals_regex_reference(text, tag):
    assert tag_content(text, tag) == _tag_content_reference(text, tag)


@settings(FUZZ, max_examples=400)
@given(soup)
@example("\\boxed{a} \\boxed{b")  # the last boxed is unclosed: the last closed one counts
@example("}} \\boxed{x}}")  # stray closing braces around it
def test_last_boxed_and_extract_prediction_equal_reference(text):
    assert last_boxed(text) == _last_boxed_reference(text)
    reference = _tag_content_reference(text, "answer")
    assert extract_prediction(text) == (reference if reference is not None else _last_boxed_reference(text))
    letter = choice_letter(text)
    assert letter is None or re.fullmatch("[A-J]", letter)


@settings(FUZZ, max_examples=40)
@given(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=4).map("".join), st.integers(0, 2))
@example("\\boxed{", 0)  # quadratic rescan from every unclosed \boxed{: 21 s for 42,000 characters
@example("<answer>", 0)  # the lazy regex rescanned to the end from every <answer>: 15 s for 160,000 characters
def test_extractors_run_in_linear_time(unit, shape):
    """A degenerate response (one unit repeated, or nested, to 60,000 characters) is read in well under a second."""
    reps = max(1, 60_000 // len(unit))
    text = [unit * reps, unit * (reps // 2) + "x" + "}" * (reps // 2), "<answer>" + unit * reps][shape]
    start = time.perf_counter()
    extract_prediction(text)
    choice_letter(text)
    FormatReward().score(text)
    parse_plan(text)
    assert time.perf_counter() - start < 1.0, f"{len(text)} characters of {unit!r} took too long"


# ---- format reward ---------------------------------------------------------------------------------------------------
def _free(text: str, tags: list[str]) -> bool:
    return not any(tag in text for tag in tags)


@settings(FUZZ, max_examples=200)
@given(soup, soup, st.lists(st.sampled_from([" ", "\n", "\t", "\r\n"]), max_size=3).map("".join),
       st.sampled_from(TAGS[:4]), st.integers(0, 10**6))
def test_format_reward_is_one_exactly_for_think_then_answer(think, answer, space, extra_tag, where):
    reward, tags = FormatReward(), TAGS[:4]
    good = f"{space}<think>{think}</think>{space}<answer>{answer}</answer>{space}"
    if _free(think, tags) and _free(answer, tags):
        assert reward.score(good) == 1.0
        position = where % (len(good) + 1)
        assert reward.score(good[:position] + extra_tag + good[position:]) == 0.0  # any tag twice: a hedge
        assert reward.score(good + "x") == 0.0 and reward.score("x" + good) == 0.0
    out = reward([good, think, answer], [{}, {}, {}])
    assert out.total == out.components["format"] and set(out.total) <= {0.0, 1.0}


@settings(FUZZ, max_examples=200)
@given(st.text(max_size=6), st.text(max_size=6), soup)
def test_format_reward_tag_names_are_validated_and_used(think_tag, answer_tag, content):
    try:
        reward = FormatReward(think_tag, answer_tag)
    except ValueError as e:
        assert "think_tag" in str(e) or "answer_tag" in str(e)
        return
    assert re.fullmatch(r"[A-Za-z][\w-]*", think_tag) and re.fullmatch(r"[A-Za-z][\w-]*", answer_tag)
    tags = [f"<{think_tag}>", f"</{think_tag}>", f"<{answer_tag}>", f"</{answer_tag}>"]
    if _free(content, tags):
        assert reward.score(f"<{think_tag}>{content}</{think_tag}><{answer_tag}>{content}</{answer_tag}>") == 1.0


# ---- math accuracy through the worker pool ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def accuracy():
    reward = AccuracyReward(timeout=ITEM_TIMEOUT, workers=WORKERS)
    yield reward
    reward.close()


def _latex(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    pair = st.tuples(children, children)
    return st.one_of(
        pair.map(lambda t: f"\\frac{{{t[0]}}}{{{t[1]}}}"), pair.map(lambda t: f"{t[0]}^{{{t[1]}}}"),
        st.tuples(children, st.sampled_from(["+", "-", "\\cdot", "/", ",", "=", "\\le"]), children).map(" ".join),
        children.map(lambda a: f"\\sqrt{{{a}}}"), children.map(lambda a: f"({a})"),
        children.map(lambda a: f"\\left[{a}\\right)"), children.map(lambda a: f"\\{{{a}\\}}"),
        children.map(lambda a: f"\\boxed{{{a}}}"), children.map(lambda a: f"{a}^\\circ"),
        children.map(lambda a: f"{a}\\%"), children.map(lambda a: f"\\text{{{a}}}"))


atoms = st.sampled_from(["0", "1", "2", "-3", "0.5", "1,000", "x", "y", "\\pi", "e", "\\infty", "\\alpha", "B"]) \
    | st.integers(-10**6, 10**6).map(str)
latex = st.recursive(atoms, _latex, max_leaves=8)
garbage = st.text(alphabet=list("\\{}^_$()[]+-*/=,.0123456789xabc "), max_size=30)
PATHOLOGICAL = ["10^{10^{10}}", "9^{9^{9^{9}}}", "2^{2^{2^{2^{2^{2}}}}}", "10^{10^{10^{10}}}!",
                "(" * 300 + "1" + ")" * 300, "\\frac{" * 200 + "1" + "}{2}" * 200, "x^{" * 60 + "2" + "}" * 60,
                "\\sqrt{" * 100 + "2" + "}" * 100, "{" * 2000 + "1" + "}" * 2000, "1" * 5000]
expressions = st.one_of(latex, latex, latex, latex, garbage, garbage, st.sampled_from(PATHOLOGICAL))
responses = st.one_of(expressions.map(lambda a: f"<think>w</think><answer>{a}</answer>"),
                      expressions.map(lambda a: f"so \\boxed{{{a}}}"), expressions, soup)
labels = st.one_of(expressions, st.sampled_from(["B", "(C)", "$\\boxed{D}$", "", " ", "\\boxed{}", "}{"]))


@settings(FUZZ, max_examples=25)
@given(st.lists(st.tuples(responses, labels), min_size=1, max_size=4),
       st.floats(0, 2), st.floats(0, 2))
@example([("<think>w</think><answer>10^{10^{10}}</answer>", "2")], 0.5, 1.0)  # sympy would spin for minutes
@example([("\\boxed{" + "(" * 300 + "1" + ")" * 300 + "}", "1")], 0.5, 1.0)
def test_math_reward_in_range_and_within_the_per_item_timeout(accuracy, batch, format_weight, accuracy_weight):
    reward = WeightedSum([FormatReward(), accuracy], [format_weight, accuracy_weight])
    rows = [{"answer": label} for _, label in batch]
    accuracy.pool.last_latencies = []
    start = time.perf_counter()
    out = reward([response for response, _ in batch], rows)
    elapsed = time.perf_counter() - start
    n = len(batch)
    assert set(out.components["accuracy"]) <= {0.0, 1.0} and set(out.components["format"]) <= {0.0, 1.0}
    for total, f, a in zip(out.total, out.components["format"], out.components["accuracy"], strict=True):
        assert math.isclose(total, format_weight * f + accuracy_weight * a, abs_tol=1e-12)
        assert -1e-12 <= total <= format_weight + accuracy_weight + 1e-12
    counted = {k: v for k, v in out.stats.items() if k.startswith("accuracy/")}
    assert all(0 <= v <= n and v == int(v) for v in counted.values())
    for key, value in counted.items():
        event(f"{key} > 0" if value else f"{key} = 0")
    assert counted["accuracy/timeouts"] + counted["accuracy/label_parse_failures"] \
        + counted["accuracy/answer_missing"] <= n
    assert all(latency <= ITEM_TIMEOUT + SLACK for latency in accuracy.pool.last_latencies)
    assert elapsed <= math.ceil(n / WORKERS) * (ITEM_TIMEOUT + RESTART) + SLACK


@settings(FUZZ, max_examples=12)
@given(st.lists(st.tuples(st.one_of(st.sampled_from(PATHOLOGICAL), latex, garbage),
                          st.one_of(st.sampled_from(PATHOLOGICAL), latex, garbage)), min_size=1, max_size=3))
@example([("2", "10^{10^{10}}"), ("1", "1")])  # one stuck item costs its own timeout, not the batch
def test_verify_pool_statuses_and_per_item_deadline(accuracy, items):
    results = accuracy.pool.map(items)
    assert len(results) == len(items)
    for (score, status), latency in zip(results, accuracy.pool.last_latencies, strict=True):
        assert status in (OK, LABEL_PARSE_FAILURE, TIMEOUT, CRASH)
        event(f"status {status}, score {score}")
        assert score in (0.0, 1.0) and (status == OK or score == 0.0)  # an unparseable label never scores 1
        assert latency <= ITEM_TIMEOUT + SLACK
