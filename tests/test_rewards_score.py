"""`lmmr1 score`: reads response + data fields, writes reward and rewards, reports bad rows as file:row: field."""

from __future__ import annotations

import json

import pytest

from lmmr1.rewards.score import main

GOOD = "<think>t</think><answer>{}</answer>"
CORRIDOR = "#####\n#@$.#\n#####"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_score_math_writes_reward_and_components(tmp_path):
    rows = [{"response": GOOD.format("60"), "answer": "$\\boxed{60}$", "message": json.dumps([{"role": "user",
                                                                                             "content": "q"}])},
            {"response": "\\boxed{59}", "answer": "60", "extra": [1, 2]}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    assert main(["--reward", "math", "--input", src, "--output", str(tmp_path / "out.jsonl")]) == 0
    out = read_jsonl(tmp_path / "out.jsonl")
    assert out[0]["reward"] == 1.5 and out[0]["rewards"] == {"format": 1.0, "accuracy": 1.0}
    assert out[1]["reward"] == 0.0 and out[1]["rewards"] == {"format": 0.0, "accuracy": 0.0}
    assert out[0]["message"] == rows[0]["message"] and out[1]["extra"] == [1, 2]  # rows come back unchanged


def test_score_routes_with_env_path_and_only_applicable_components(tmp_path):
    (tmp_path / "levels").mkdir()
    (tmp_path / "levels" / "a.xsb").write_text(CORRIDOR)
    rows = [{"response": GOOD.format("R"), "datasource": "sokoban", "env_path": "levels/a.xsb"},
            {"response": GOOD.format("right"), "datasource": "sokoban", "env": CORRIDOR},
            {"response": GOOD.format("7"), "datasource": "arith", "answer": 7}]
    (tmp_path / "r.yaml").write_text("routes: {sokoban: sokoban, '*': math}\n")
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    code = main(["--reward", str(tmp_path / "r.yaml"), "--input", src, "--output", str(tmp_path / "o.jsonl")])
    assert code == 0
    out = read_jsonl(tmp_path / "o.jsonl")
    assert [r["rewards"] for r in out] == [{"format": 1.0, "solved": 1.0}, {"format": 1.0, "solved": 1.0},
                                           {"format": 1.0, "accuracy": 1.0}]
    assert [r["reward"] for r in out] == [1.5, 1.5, 1.5]
    assert "env" not in out[0]  # the level read from env_path is not written back


def test_score_with_batches_keeps_columns_aligned(tmp_path):
    rows = [{"response": GOOD.format("R"), "datasource": "sokoban", "env": CORRIDOR},
            {"response": GOOD.format("1"), "datasource": "x", "answer": "2"},
            {"response": GOOD.format("L"), "datasource": "sokoban", "env": CORRIDOR}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    (tmp_path / "r.yaml").write_text("routes: {sokoban: sokoban, '*': format}\n")
    assert main(["--reward", str(tmp_path / "r.yaml"), "--input", src, "--output", str(tmp_path / "o.jsonl"),
                 "--batch-size", "1"]) == 0
    out = read_jsonl(tmp_path / "o.jsonl")
    assert [r["rewards"] for r in out] == [{"format": 1.0, "solved": 1.0}, {"format": 1.0},
                                           {"format": 1.0, "solved": 0.0}]


def test_bad_rows_are_all_reported_with_file_row_field(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([
        json.dumps({"response": "ok", "answer": "1"}),
        json.dumps({"answer": "1"}),
        "{broken",
        json.dumps({"response": 3, "answer": ["x"]}),
        json.dumps({"response": "r", "env_path": "nope.xsb"}),
        json.dumps({"response": "r", "message": "[not json"}),
    ]) + "\n")
    assert main(["--reward", "math", "--input", str(src), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    for expected in [f"{src}:2: response: missing", f"{src}:3: not valid JSON", f"{src}:4: response: not a string",
                     f"{src}:4: answer: not a string", f"{src}:5: env_path: file", f"{src}:6: message: not valid JSON"]:
        assert expected in err
    assert f"{src}:1:" not in err
    assert not (tmp_path / "o.jsonl").exists()


def test_reward_problems_are_reported(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"response": "r", "answer": "1"}, {"response": "r"}])
    assert main(["--reward", "accuracy", "--input", src, "--output", str(tmp_path / "o.jsonl")]) == 2
    assert f"{src}:2: 'answer' is missing or empty" in capsys.readouterr().err
    assert main(["--reward", "nope", "--input", src, "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "unknown reward 'nope'" in capsys.readouterr().err


def test_lmmr1_cli_dispatches_to_score(tmp_path):
    from lmmr1.cli import main as cli_main

    src = write_jsonl(tmp_path / "in.jsonl", [{"response": GOOD.format("x")}])
    assert cli_main(["score", "--reward", "format", "--input", src, "--output", str(tmp_path / "o.jsonl")]) == 0
    assert read_jsonl(tmp_path / "o.jsonl")[0]["reward"] == 1.0


@pytest.mark.parametrize("name", ["format", "accuracy", "math", "sokoban"])
def test_every_builtin_is_selectable(tmp_path, name):
    src = write_jsonl(tmp_path / "in.jsonl", [{"response": GOOD.format("R"), "answer": "R", "env": CORRIDOR}])
    assert main(["--reward", name, "--input", src, "--output", str(tmp_path / "o.jsonl")]) == 0
    assert read_jsonl(tmp_path / "o.jsonl")[0]["reward"] >= 1.0
