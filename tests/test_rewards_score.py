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
    for expected in [f"{src}: 5 of 6 rows are bad (--on-bad-row skip leaves them out):", f"{src}:2: response: missing",
                     f"{src}:3: bad JSON", f"{src}:4: response: not a string", f"{src}:4: answer: not a string",
                     f"{src}:5: env_path: cannot read", f"{src}:6: message: not valid JSON"]:
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


def test_rows_without_label_fail_the_file_by_default_and_are_skipped_and_counted_on_request(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"response": GOOD.format("1"), "answer": "1"},
                                              {"response": GOOD.format("2")},  # no label: accuracy cannot score it
                                              {"response": GOOD.format("3"), "answer": "3"},
                                              {"response": GOOD.format("4"), "answer": None}])  # null label = none
    with open(src, "a") as f:
        f.write("{broken\n")
    out_file = tmp_path / "o.jsonl"
    assert main(["--reward", "math", "--input", src, "--output", str(out_file)]) == 2  # the default: error
    err = capsys.readouterr().err
    # every bad row named, the reward's and the reader's alike
    assert f"{src}: 3 of 5 rows are bad (--on-bad-row skip leaves them out):" in err
    for row in (2, 4):
        assert f"{src}:{row}: 'answer' is missing or empty; the accuracy reward needs a label" in err
    assert f"{src}:5: bad JSON" in err and not out_file.exists()

    assert main(["--reward", "math", "--input", src, "--output", str(out_file), "--on-bad-row", "skip"]) == 0
    err = capsys.readouterr().err
    assert f"lmmr1 score: {src}: skipped 3 of 5 rows (--on-bad-row skip):\n{src}:2: 'answer' is missing" in err
    assert "scored 2 rows (3 bad rows skipped)" in err
    assert [(r["answer"], r["reward"]) for r in read_jsonl(out_file)] == [("1", 1.5), ("3", 1.5)]


def test_skip_with_nothing_left_is_an_error_and_parquet_nulls_are_absent_fields(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = write_jsonl(tmp_path / "in.jsonl", [{"response": "r"}])
    assert main(["--reward", "accuracy", "--input", src, "--output", str(tmp_path / "o.jsonl"),
                 "--on-bad-row", "skip"]) == 2
    assert f"{src}: all 1 rows are bad; nothing to score" in capsys.readouterr().err
    table = pa.table({"response": [GOOD.format("R"), GOOD.format("7")], "answer": [None, "7"],
                      "env": [CORRIDOR, None], "datasource": ["sokoban", "arith"]})
    pq.write_table(table, tmp_path / "in.parquet")
    (tmp_path / "r.yaml").write_text("routes: {sokoban: sokoban, '*': math}\n")
    assert main(["--reward", str(tmp_path / "r.yaml"), "--input", str(tmp_path / "in.parquet"),
                 "--output", str(tmp_path / "o.jsonl")]) == 0
    assert [r["rewards"] for r in read_jsonl(tmp_path / "o.jsonl")] == [{"format": 1.0, "solved": 1.0},
                                                                        {"format": 1.0, "accuracy": 1.0}]


def test_reward_problems_bisects_instead_of_checking_row_by_row():
    from lmmr1.rewards.base import Reward
    from lmmr1.rewards.score import reward_problems

    class NeedsLabel(Reward):
        calls = 0

        def __call__(self, responses, rows):
            raise NotImplementedError

        def check_rows(self, rows):
            type(self).calls += 1
            for row in rows:
                if "answer" not in row:
                    raise ValueError(f"{row['_where']}: no label")

    rows = [{"_where": f"f:{i}", **({} if i in (5, 40) else {"answer": "1"})} for i in range(64)]
    assert reward_problems(NeedsLabel(), rows) == {5: "f:5: no label", 40: "f:40: no label"}
    assert NeedsLabel.calls <= 1 + 2 * 2 * 6  # 2 bad rows, log2(64) = 6 levels, two halves checked per level
    NeedsLabel.calls = 0
    assert reward_problems(NeedsLabel(), rows[:5]) == {} and NeedsLabel.calls == 1
