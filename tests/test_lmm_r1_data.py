"""LMM-R1's data files, unchanged: DeepScaleR/VerMulti rows (a stringified message list with a system prompt, a
`$\\boxed{..}$` answer, no datasource) and Sokoban rows as its generator writes them (`answer` empty, `env_path` to a
gym-sokoban `.npy` grid, no datasource) load, route by what they hold, and score; `lmmr1 data convert-sokoban` turns a
folder of grids into XSB; `lmmr1 score --reward lmm_r1_math|lmm_r1_sokoban|lmm_r1` scores such files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmmr1.data.cli import main as data_main
from lmmr1.data.records import load_rows
from lmmr1.rewards import build_reward
from lmmr1.rewards.score import main as score_main

SYSTEM = ("Solve the question. You first think about the reasoning process and then give the answer in latex, "
          "wrapped in $...$ and \\boxed{}. The reasoning process and answer are enclosed within <think> </think> and "
          "<answer> </answer> tags, respectively.")
SOKOBAN_PROMPT = ("You should first thinks about the reasoning process in the mind and then provides the user with the "
                  "answer, the answer is a long sequence of Left, Right, Up, Down, separated by ','.")
CORRIDOR = np.array([[0, 0, 0, 0, 0, 0], [0, 5, 1, 4, 2, 0], [0, 0, 0, 0, 0, 0]])  # ######/#@ $.#/######
TWO_BOXES = np.array([[0, 0, 0, 0, 0, 0, 0], [0, 5, 4, 2, 1, 1, 0], [0, 2, 4, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0]])


def math_row(question: str, answer: str) -> dict:
    """A DeepScaleR row as LMM-R1 ships it: `message` is a JSON string, the label a boxed LaTeX answer."""
    message = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return {"question": question, "answer": answer, "message": json.dumps(message)}


def sokoban_row(name: str) -> dict:
    """A Sokoban row as LMM-R1's recipe documents it (examples/scripts/lmm_r1/train_sokoban.sh)."""
    message = [{"role": "system", "content": "You're going to play a game of Sokoban."},
               {"role": "user", "content": [{"type": "image", "image": f"file://frames/{name}.png"},
                                            {"type": "text", "text": SOKOBAN_PROMPT}]}]
    return {"message": json.dumps(message), "question": name, "answer": "", "env_path": f"levels/{name}.npy"}


@pytest.fixture
def lmm_r1_files(tmp_path):
    """A mixed data file of LMM-R1 rows (two math, two Sokoban) with the Sokoban grids and frames it points at."""
    (tmp_path / "levels").mkdir()
    (tmp_path / "frames").mkdir()
    np.save(tmp_path / "levels" / "Sokoban-small-v0-level_0.npy", CORRIDOR)
    np.save(tmp_path / "levels" / "Sokoban-small-v0-level_1.npy", TWO_BOXES)
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (32, 32)).save(tmp_path / "frames" / f"Sokoban-small-v0-level_{i}.png")
    rows = [math_row("What is 6 times 10?", "$\\boxed{60}$"), math_row("Half of 1?", "$\\boxed{\\frac{1}{2}}$"),
            sokoban_row("Sokoban-small-v0-level_0"), sokoban_row("Sokoban-small-v0-level_1")]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, rows


def test_lmm_r1_rows_load_as_written(lmm_r1_files):
    data, _ = lmm_r1_files
    rows = load_rows(data)
    assert len(rows) == 4
    assert rows[0]["message"][0] == {"role": "system", "content": SYSTEM}  # the JSON string is decoded
    assert rows[0]["answer"] == "$\\boxed{60}$" and "datasource" not in rows[0]
    sokoban = rows[2]
    assert sokoban["answer"] == "" and "datasource" not in sokoban  # an empty label is fine where there is a level
    assert sokoban["env"] == "######\n#@ $.#\n######"  # the .npy grid, converted to XSB
    assert sokoban["env_path"].endswith("levels/Sokoban-small-v0-level_0.npy")
    assert rows[3]["env"] == "#######\n#@$.  #\n#.$   #\n#######"


def test_empty_answer_still_rejected_without_a_level(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(math_row("q", "")) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:1: answer: empty"):
        load_rows(data)


def test_bad_grid_named_with_its_row(tmp_path):
    (tmp_path / "levels").mkdir()
    np.save(tmp_path / "levels" / "bad.npy", np.array([[0, 0], [5, 7]]))
    np.save(tmp_path / "levels" / "pickled.npy", np.array([{"a": 1}], dtype=object))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(sokoban_row("bad")) + "\n" + json.dumps(sokoban_row("pickled")) + "\n")
    with pytest.raises(ValueError) as info:
        load_rows(data, check_images=False)
    assert "d.jsonl:1: env_path: cannot read" in str(info.value) and "7 is not a cell code" in str(info.value)
    assert "d.jsonl:2: env_path: cannot read" in str(info.value) and "allow_pickle=False" in str(info.value)


@pytest.mark.timeout(60)
def test_lmm_r1_rows_route_by_what_they_hold_and_score(lmm_r1_files):
    data, _ = lmm_r1_files
    rows = load_rows(data)
    reward = build_reward({"routes": {"has:env": "lmm_r1_sokoban", "*": "lmm_r1_math"},
                           "options": {"lmm_r1_math": {"workers": 1}}})
    reward.check_rows(rows)  # math rows need their label, Sokoban rows their level: both have them
    responses = ["<think>6*10</think><answer>$\\boxed{60}$</answer>",  # format 0.5 + accuracy 1.0
                 "<think>half</think> <answer>$\\boxed{0.5}$</answer>",  # right (1/2 = 0.5), space between blocks
                 "<think>push the box right</think><answer>Right, Right</answer>",  # solves: 11.404, clipped to 10
                 "<think>push right twice</think><answer>Right, Right</answer>"]  # 0.9 + 0.5 + 0.1 + 0.003
    out = reward(responses, rows)
    assert out.total == pytest.approx([1.5, 1.0, 10.0, 1.503])
    assert out.row(0) == {"format": 1.0, "accuracy": 1.0}
    assert out.row(2)["solved"] == 1.0 and "accuracy" not in out.row(2)
    assert build_reward("lmm_r1").routes.keys() == {"has:env", "*"}  # the same routing by one name
    reward.close()


def test_has_route_wins_over_datasource_patterns_in_order():
    reward = build_reward({"routes": {"has:env": "lmm_r1_sokoban", "sokoban": "sokoban", "*": "format"}})
    level = "#####\n#@$.#\n#####"
    assert reward.route({"env": level}) == "has:env"
    assert reward.route({"env": level, "datasource": "sokoban"}) == "has:env"  # first matching rule wins
    assert reward.route({"datasource": "sokoban"}) == "sokoban"
    assert reward.route({"env": "", "datasource": "x"}) == "*"  # an empty field is not held


def test_convert_sokoban_folder(tmp_path, capsys):
    levels, out = tmp_path / "levels", tmp_path / "xsb"
    levels.mkdir()
    np.save(levels / "a.npy", CORRIDOR)
    np.save(levels / "b.npy", TWO_BOXES.astype(np.float64))  # codes stored as floats still convert
    assert data_main(["convert-sokoban", str(levels), str(out)]) == 0
    assert (out / "a.xsb").read_text() == "######\n#@ $.#\n######\n"
    assert (out / "b.xsb").read_text() == "#######\n#@$.  #\n#.$   #\n#######\n"
    assert "converted 2 of 2 levels" in capsys.readouterr().out
    np.save(levels / "c.npy", np.array([[0, 5, 4, 0]]))  # a box and no target
    assert data_main(["convert-sokoban", str(levels), str(out)]) == 1
    assert "c.npy: XSB level has 1 boxes but 0 goals" in capsys.readouterr().err
    assert data_main(["convert-sokoban", str(tmp_path / "missing"), str(out)]) == 2


@pytest.mark.timeout(60)
def test_score_cli_by_lmm_r1_names(lmm_r1_files, capsys):
    data, raw = lmm_r1_files
    scored = data.parent / "in.jsonl"
    responses = ["<think>6*10</think><answer>$\\boxed{60}$</answer>", "<think>x</think><answer>$\\boxed{2}$</answer>",
                 "<think>go</think><answer>left</answer>",
                 "<think>push right twice</think><answer>Right, Right</answer>"]
    scored.write_text("".join(json.dumps({**row, "response": r}) + "\n" for row, r in zip(raw, responses)))
    output = data.parent / "out.jsonl"
    assert score_main(["--reward", "lmm_r1", "--input", str(scored), "--output", str(output)]) == 0
    got = [json.loads(line) for line in output.read_text().splitlines()]
    assert [g["reward"] for g in got] == pytest.approx([1.5, 0.5, 0.551, 1.503])
    assert got[2]["env_path"] == raw[2]["env_path"] and got[2]["rewards"]["format"] == 1.0  # rows written back as read
    lines = scored.read_text().splitlines()
    for name, part, rewards in [("lmm_r1_math", lines[:2], [1.5, 0.5]), ("lmm_r1_sokoban", lines[2:], [0.551, 1.503])]:
        single = data.parent / f"{name}.jsonl"
        single.write_text("".join(line + "\n" for line in part))
        assert score_main(["--reward", name, "--input", str(single), "--output", str(output)]) == 0
        assert [json.loads(line)["reward"] for line in output.read_text().splitlines()] == pytest.approx(rewards)
    capsys.readouterr()
