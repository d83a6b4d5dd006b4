"""`lmmr1 data make|check`: exit codes, summaries, and bad rows listed for the user."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmmr1.data.cli import describe, main


def test_make_writes_the_requested_rows(tmp_path, capsys):
    out = tmp_path / "geo"
    assert main(["make", "geometry", "--n", "6", "--seed", "1", "--out", str(out), "--difficulty", "2",
                 "--split", "val"]) == 0
    assert str(out / "data.jsonl") in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["difficulty"] for r in rows} == {2}
    assert len(list((out / "images").glob("*.png"))) == 6


def test_make_reports_bad_arguments(tmp_path, capsys):
    assert main(["make", "sokoban", "--n", "2", "--out", str(tmp_path), "--difficulty", "9"]) == 2
    assert "--difficulty '9' is not valid for sokoban" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: unknown kind
        main(["make", "chess", "--n", "2", "--out", str(tmp_path)])


def test_check_summarizes_good_files(tmp_path, capsys):
    main(["make", "arith", "--n", "5", "--seed", "0", "--out", str(tmp_path / "a")])
    main(["make", "image-arith", "--n", "3", "--seed", "0", "--out", str(tmp_path / "b")])
    capsys.readouterr()
    files = [str(tmp_path / "a" / "data.jsonl"), str(tmp_path / "b" / "data.jsonl")]
    assert main(["check", *files]) == 0
    out = capsys.readouterr().out
    assert "rows: 5 ok, 0 bad" in out and "datasources: arith 5" in out
    assert "text-only rows: 5, rows with images: 0" in out
    assert "rows: 3 ok, 0 bad" in out and "datasources: image_arith 3" in out
    assert "text-only rows: 0, rows with images: 3" in out and "image width (px): min 224," in out


def test_check_lists_every_bad_row_and_fails(tmp_path, capsys):
    good = {"message": [{"role": "user", "content": "1+1?"}], "answer": "2", "datasource": "arith"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps(good), json.dumps({**good, "answer": ""}), "{oops",
                              json.dumps({**good, "message": [{"role": "user", "content": [
                                  {"type": "image", "image": "gone.png"}]}]}), json.dumps(good)]) + "\n")
    assert main(["check", str(bad)]) == 1
    captured = capsys.readouterr()
    assert "rows: 2 ok, 3 bad" in captured.out and "datasources: arith 2" in captured.out
    for fragment in (f"{bad}:2: answer: empty", f"{bad}:3: bad JSON", f"{bad}:4: image: image file not found"):
        assert fragment in captured.err
    assert main(["check", str(bad), "--no-image-check"]) == 1  # still bad: two rows remain wrong
    assert "rows: 3 ok, 2 bad" in capsys.readouterr().out


def test_check_fails_on_unreadable_files(tmp_path, capsys):
    assert main(["check", str(tmp_path / "none.jsonl")]) == 1
    assert "no such data file" in capsys.readouterr().err


def test_check_custom_keys(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "label": "x"}) + "\n")
    assert main(["check", str(path)]) == 1
    assert main(["check", str(path), "--input-key", "prompt", "--label-key", "label"]) == 0


@pytest.fixture
def word_tokenizer(tmp_path) -> Path:
    """A whitespace word-level tokenizer without a chat template: a prompt's token count is its word count."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "what is one plus two three four five six [UNK]".split()
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_check_prompt_token_stats(tmp_path, capsys, word_tokenizer):
    prompts = ["what is one plus two", "what is three", "four five six six five four what is"]  # 5, 3, 8 words
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"message": [{"role": "user", "content": p}], "answer": "1"}) + "\n"
                            for p in prompts))
    assert main(["check", str(path), "--tokenizer", str(word_tokenizer)]) == 0
    assert "prompt tokens (images as one placeholder each): min 3, mean 5.3, p50 5, p95 8, max 8" in \
        capsys.readouterr().out


@pytest.mark.parametrize("values", [[4.0], [3, 1, 2], list(range(1, 21)), [5, 5, 9, 1, 100, 7, 2]])
def test_describe_matches_numpy(values):
    expected = (f"min {min(values):g}, mean {np.mean(values):.1f}, "
                f"p50 {np.percentile(values, 50, method='inverted_cdf'):g}, "
                f"p95 {np.percentile(values, 95, method='inverted_cdf'):g}, max {max(values):g}")
    assert describe(values) == expected
    assert describe([]) == "none"
