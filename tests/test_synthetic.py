"""Synthetic generators: determinism, disjoint splits, answers recomputed independently, loadable rows."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from pathlib import Path

import pytest
from math_verify import parse
from PIL import Image

from lmmr1.data.records import load_rows, row_images, row_text
from lmmr1.data.synthetic import GENERATORS, levels_of, make, split_of
from lmmr1.envs.sokoban import Level, parse_plan, play, solve

KINDS = sorted(GENERATORS)
N = {"arith": 12, "image-arith": 6, "geometry": 10, "sokoban": 5, "sokoban-agent": 3, "numbers": 12, "shapes": 6,
     "pictured-arith": 6, "pictured-word": 6}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _exact(expression: str) -> Fraction:
    """Evaluate + - * / ( ) on integers exactly, with Python's own parser and precedence."""
    return eval(re.sub(r"\d+", lambda m: f"Fraction({m.group()})", expression), {"Fraction": Fraction})


def _boxed(answer: str) -> str:
    match = re.fullmatch(r"\$\\boxed\{(.*)\}\$", answer)
    assert match, answer
    return match.group(1)


@pytest.mark.parametrize("kind", KINDS)
def test_make_is_deterministic_per_seed(kind, tmp_path):
    a = make(kind, N[kind], 3, tmp_path / "a", difficulty=None)
    b = make(kind, N[kind], 3, tmp_path / "b")
    c = make(kind, N[kind], 4, tmp_path / "c")
    assert a == tmp_path / "a" / "data.jsonl"
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    longer = make(kind, N[kind] + 2, 3, tmp_path / "d")  # more rows extend the same sequence
    assert longer.read_text().splitlines()[: N[kind]] == a.read_text().splitlines()
    images_a = sorted(p.name for p in (tmp_path / "a").glob("images/*.png"))
    assert images_a == sorted(p.name for p in (tmp_path / "b").glob("images/*.png"))
    for name in images_a:
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()


@pytest.mark.parametrize("kind", KINDS)
def test_rows_load_and_follow_the_row_format(kind, tmp_path):
    path = make(kind, N[kind], 0, tmp_path)
    rows = load_rows(path)  # full validation, images opened and verified
    assert len(rows) == N[kind]
    keys = [row["problem"] for row in rows]
    assert len(set(keys)) == len(keys)  # no duplicate problems in a file
    for row, raw in zip(rows, _rows(path)):
        assert row["message"][0]["role"] == "system" and "<think>" in row["message"][0]["content"]
        assert "<answer>" in row["message"][0]["content"]
        assert row["message"][1]["role"] == "user" and row_text(row)
        assert row["datasource"] == GENERATORS[kind].datasource
        images = row_images(raw)
        if kind == "arith":
            assert images == []
        elif kind.startswith("pictured-"):  # one number picture: A
            assert len(images) == 1 and re.fullmatch(r"images/\d{6}_0\.png", images[0])
            for ref in row_images(row):
                with Image.open(ref) as image:
                    assert image.size == (168, 28)
        else:
            assert len(images) == 1 and re.fullmatch(r"images/\d{6}\.png", images[0])  # relative in the file
            with Image.open(row_images(row)[0]) as image:
                smallest = 28 if kind in ("numbers", "shapes") else 112  # perception pictures are a few tokens
                assert smallest <= min(image.size) and max(image.size) <= 224


@pytest.mark.parametrize("kind", KINDS)
def test_splits_never_share_a_problem(kind, tmp_path):
    train = _rows(make(kind, 2 * N[kind], 0, tmp_path / "train"))
    val = _rows(make(kind, N[kind], 0, tmp_path / "val", split="val"))
    test = _rows(make(kind, N[kind], 0, tmp_path / "test", split="test"))
    keys = [{row["problem"] for row in rows} for rows in (train, val, test)]
    assert not keys[0] & keys[1] and not keys[0] & keys[2] and not keys[1] & keys[2]
    for split, split_keys in zip(("train", "val", "test"), keys):
        assert {split_of(GENERATORS[kind].family, k) for k in split_keys} == {split}
    if kind == "sokoban":  # the level text itself must differ, not only the key
        assert not {r["env"] for r in train} & {r["env"] for r in val}


def test_image_arith_heldout_never_appears_as_text_training(tmp_path):
    text_train = {r["problem"] for r in _rows(make("arith", 90, 0, tmp_path / "t", difficulty=1))}
    image_val = {r["problem"] for r in _rows(make("image-arith", 10, 0, tmp_path / "v", difficulty=1, split="val"))}
    assert len(text_train) == 90 and len(image_val) == 10  # 90 of the ~100 level-1 train problems
    assert not text_train & image_val


def test_arith_answers_match_the_question(tmp_path):
    rows = _rows(make("arith", 60, 1, tmp_path))
    assert {row["difficulty"] for row in rows} == {1, 2, 3, 4, 5}
    for row in rows:
        value = _exact(row["expression"])
        assert value.denominator == 1 and value >= 0
        assert _boxed(row["answer"]) == str(value)
        question = row["message"][1]["content"]
        if row["difficulty"] == 4:  # word problem: every number of the computation is stated in the story
            assert all(number in re.findall(r"\d+", question) for number in re.findall(r"\d+", row["expression"]))
        else:  # the shown expression itself (× ÷, only needed parentheses) evaluates to the answer
            shown = question.removeprefix("Compute ").removesuffix(".").replace("×", "*").replace("÷", "/")
            assert _exact(shown) == value, question
        if row["difficulty"] == 1:
            assert all(len(n) == 1 for n in re.findall(r"\d+", row["expression"]))


def _geometry_value(figure: dict) -> float:
    """Textbook formulas, written independently of the generator."""
    shape, ask = figure["shape"], figure["ask"]
    if shape == "right_triangle":
        return math.hypot(figure["leg_a"], figure["leg_b"])
    if shape == "rectangle":
        w, h = figure["width"], figure["height"]
        return w * h if ask == "area" else 2 * w + 2 * h
    if shape == "triangle":
        return 180 - figure["angle_a"] - figure["angle_b"]
    if shape == "circle":
        r = figure["radius"] if "radius" in figure else figure["diameter"] / 2
        return math.pi * r * r if ask == "area" else math.pi * 2 * r
    if shape == "cylinder":
        return math.pi * figure["radius"] ** 2 * figure["height"]
    if shape == "cone":
        r, h = figure["radius"], figure["height"]
        return math.sqrt(r * r + h * h) if ask == "slant_height" else math.pi * r * r * h / 3
    raise AssertionError(shape)


def test_geometry_answers_match_a_recomputation(tmp_path):
    rows = _rows(make("geometry", 40, 2, tmp_path))
    shapes = {row["figure"]["shape"] for row in rows}
    assert shapes == {"right_triangle", "rectangle", "triangle", "circle", "cylinder", "cone"}
    for row in rows:
        parsed = parse(row["answer"])
        assert parsed, row["answer"]
        assert float(parsed[0]) == pytest.approx(_geometry_value(row["figure"]), rel=1e-12), row
        if row["figure"]["ask"] in ("area", "circumference", "volume") and row["figure"]["shape"] != "rectangle":
            assert "\\pi" in row["answer"]  # exact, in terms of π


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_every_sokoban_level_is_solved_by_its_recorded_plan(difficulty, tmp_path):
    rows = _rows(make("sokoban", 4, 5, tmp_path, difficulty=difficulty))
    for row in rows:
        level = Level.from_xsb(row["env"])
        assert len(level.boxes) == difficulty and 6 <= min(level.height, level.width) <= max(
            level.height, level.width) <= 10
        plan = parse_plan(row["answer"])
        assert plan is not None and len(plan) == row["optimal_moves"]
        assert play(level, plan).solved and not level.solved
        assert len(solve(level)) == row["optimal_moves"]  # optimal: the solver finds nothing shorter


def test_difficulty_spellings():
    assert levels_of("arith", None) == [1, 2, 3, 4, 5]
    assert levels_of("arith", "easy") == [1] and levels_of("arith", "hard") == [5]
    assert levels_of("geometry", "medium") == [2] and levels_of("sokoban", 3) == [3]
    assert levels_of("arith", "2-4") == [2, 3, 4] and levels_of("sokoban", "2") == [2]
    for bad in ("0", "4", "1-9", "extreme"):
        with pytest.raises(ValueError, match=f"--difficulty '{bad}' is not valid for sokoban"):
            levels_of("sokoban", bad)


def test_make_difficulty_is_respected(tmp_path):
    rows = _rows(make("geometry", 8, 0, tmp_path, difficulty="3"))
    assert {row["difficulty"] for row in rows} == {3}
    assert {row["figure"]["shape"] for row in rows} <= {"cone", "cylinder", "circle"}


def test_make_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic data kind 'chess'"):
        make("chess", 1, 0, tmp_path)
    with pytest.raises(ValueError, match="--split 'dev' is not valid"):
        make("arith", 1, 0, tmp_path, split="dev")
    with pytest.raises(ValueError, match="--n must be >= 1"):
        make("arith", 0, 0, tmp_path)
    # difficulty 1 has only ~126 single-digit +/- problems, about a tenth of them in val
    with pytest.raises(ValueError, match=r"only \d+ distinct val problems"):
        make("arith", 100, 0, tmp_path, difficulty=1, split="val")
    assert make("image_arith", 2, 0, tmp_path).exists()  # underscore spelling of the kind works too


def test_perception_rows_answer_their_picture(tmp_path):
    from lmmr1.data.synthetic.perception import NUMBER_SIZE, SHAPES, number_image

    rows = _rows(make("numbers", 30, seed=1, out=tmp_path / "n"))
    for row in rows:
        assert row["answer"].isdigit() and len(row["answer"]) == row["digits"] == row["difficulty"]
        value, style = row["problem"].split("/")
        assert value == row["answer"]
        image = Image.open(tmp_path / "n" / row["message"][-1]["content"][0]["image"])
        assert image.size == NUMBER_SIZE
        assert image.tobytes() == number_image(int(value), int(style)).tobytes()  # the picture shows the answer
    assert number_image(123, 7).tobytes() != number_image(124, 7).tobytes()
    assert {r["answer"] for r in _rows(make("shapes", 40, seed=1, out=tmp_path / "s"))} == set(SHAPES)
