"""Loading and validating data rows: formats, normalization, and errors a user can act on (file:row: field)."""

from __future__ import annotations

import base64
import io
import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lmmr1.data.records import DataError, load_rows, load_rows_report, row_images, row_text

LEVEL = "#####\n#@$.#\n#####"


def _png(path: Path, size: tuple[int, int] = (32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def _user(*content) -> list[dict]:
    return [{"role": "user", "content": list(content)}]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_rows_are_normalized(tmp_path):
    _png(tmp_path / "images" / "a.png")
    absolute = _png(tmp_path / "elsewhere" / "b c.png")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    (tmp_path / "levels").mkdir()
    (tmp_path / "levels" / "1.xsb").write_text(LEVEL)
    rows = [
        {"message": json.dumps(_user({"type": "image", "image": "images/a.png"}, {"type": "text", "text": "Hi"})),
         "answer": "$\\boxed{1}$", "datasource": "geo"},
        {"message": _user({"type": "image", "image": "file://" + str(absolute).replace(" ", "%20")},
                          {"type": "image", "image": data_url}), "answer": 7},
        {"message": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Plan."}],
         "answer": "up", "env_path": "levels/1.xsb", "datasource": "sokoban"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    loaded = load_rows(path)
    assert [r["_where"] for r in loaded] == [f"{path}:1", f"{path}:3", f"{path}:4"]  # 1-based file lines
    assert loaded[0]["message"] == _user({"type": "image", "image": str(tmp_path / "images" / "a.png")},
                                         {"type": "text", "text": "Hi"})
    assert row_images(loaded[1]) == [str(absolute), data_url]  # file:// URL unquoted, data: URL kept
    assert loaded[1]["answer"] == "7" and "datasource" not in loaded[1]
    assert loaded[2]["env"] == LEVEL and loaded[2]["datasource"] == "sokoban"
    assert row_text(loaded[2]) == "Plan." and row_text(loaded[0]) == "Hi"


def test_json_parquet_and_custom_keys_agree_with_jsonl(tmp_path):
    _png(tmp_path / "x.png")
    raw = [{"prompt": _user({"type": "image", "image": "x.png"}, {"type": "text", "text": "What?"}), "label": "4",
            "datasource": None},  # null optional fields (Parquet writes them for absent values) count as absent
           {"prompt": [{"role": "user", "content": "2+2?"}], "label": "4", "datasource": "arith"}]
    _write_jsonl(tmp_path / "d.jsonl", raw)
    (tmp_path / "d.json").write_text(json.dumps(raw))
    # Parquet as LMM-R1 ships it: the message list as a JSON string column
    pq.write_table(pa.Table.from_pylist([{**r, "prompt": json.dumps(r["prompt"])} for r in raw]),
                   tmp_path / "d.parquet")
    loaded = {ext: load_rows(tmp_path / f"d.{ext}", input_key="prompt", label_key="label")
              for ext in ("jsonl", "json", "parquet")}
    strip = [[{k: v for k, v in r.items() if k != "_where"} for r in rows] for rows in loaded.values()]
    assert strip[0] == strip[1] == strip[2]
    assert set(strip[0][0]) == {"message", "answer"}  # keys renamed, originals gone, null datasource dropped
    assert strip[2][1]["datasource"] == "arith"
    assert loaded["json"][1]["_where"].endswith("d.json:2")


def test_parquet_nested_message_structs(tmp_path):
    _png(tmp_path / "x.png")
    rows = [{"message": _user({"type": "image", "image": "x.png"}, {"type": "text", "text": "Look"}), "answer": "1"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "n.parquet")  # structs: absent fields come back as None
    (row,) = load_rows(tmp_path / "n.parquet")
    assert row["message"][0]["content"] == [{"type": "image", "image": str(tmp_path / "x.png")},
                                            {"type": "text", "text": "Look"}]


def _corrupt_png(path: Path) -> Path:
    data = _png(path, (64, 64)).read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated mid-IDAT
    return path


def test_every_bad_row_is_reported_with_file_row_and_field(tmp_path):
    _png(tmp_path / "ok.png")
    _corrupt_png(tmp_path / "broken.png")
    (tmp_path / "text.png").write_text("not an image")
    good = {"message": _user({"type": "text", "text": "fine"}), "answer": "1"}
    rows = [
        good,                                                                         # 1
        '{"message": [}',                                                             # 2 bad JSON
        {"message": _user({"type": "text", "text": "q"})},                            # 3 no answer
        {"message": _user({"type": "text", "text": "q"}), "answer": "  "},            # 4 empty answer
        {"message": "{not json", "answer": "1"},                                      # 5 bad JSON string
        {"message": {"role": "user"}, "answer": "1"},                                 # 6 not a list
        {"message": _user({"type": "video", "video": "v.mp4"}), "answer": "1"},       # 7 unsupported item
        {"message": _user({"type": "image", "image": "missing.png"}), "answer": "1"},  # 8 missing image
        {"message": _user({"type": "image", "image": "broken.png"}), "answer": "1"},   # 9 corrupt PNG
        {"message": _user({"type": "image", "image": "text.png"}), "answer": "1"},     # 10 not an image
        {"answer": "1"},                                                              # 11 no message
        {**good, "env_path": "nope.xsb"},                                             # 12 unreadable env_path
        {**good, "env": "#####\n#@ .#\n#####"},                                       # 13 env is not a level
        {"message": _user({"type": "image", "image": "https://x.org/a.png"}), "answer": "1"},  # 14 remote
        [1, 2],                                                                       # 15 not an object
        {"message": _user({"type": "image", "image": "ok.png"}), "answer": "1"},      # 16 fine
    ]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_rows(path)
    message = str(info.value)
    assert message.splitlines()[0] == f"{path}: 14 of 16 rows are bad:"
    expected = [
        ":2: bad JSON", ":3: answer: missing", ":4: answer: empty", ":5: message: not a valid JSON string",
        ":6: message: must be a non-empty list", ":7: message[0].content[0]: unsupported item type 'video'",
        ":8: image: image file not found", ":9: image: corrupt image", ":10: image: not an image file",
        ":11: message: missing", ":12: env_path: cannot read", ":13: env: not a Sokoban level",
        ":14: message[0].content[0]: remote image", ":15: row: must be a JSON object",
    ]
    for fragment in expected:
        assert f"{path}{fragment}" in message, fragment
    assert f"{path}:1:" not in message and f"{path}:16:" not in message
    assert isinstance(info.value, ValueError) and len(info.value.problems) == 14
    clone = pickle.loads(pickle.dumps(info.value))  # e.g. raised inside a DataLoader worker
    assert str(clone) == message and clone.problems == info.value.problems


def test_error_listing_is_capped(tmp_path):
    path = _write_jsonl(tmp_path / "many.jsonl", [{"message": "[]", "answer": ""}] * 30)
    with pytest.raises(DataError) as info:
        load_rows(path)
    lines = str(info.value).splitlines()
    assert len(info.value.problems) == 60  # two problems per row
    assert len(lines) == 1 + 20 + 1 and lines[-1] == "... and 40 more"


def test_skip_drops_bad_rows_and_says_so(tmp_path):
    good = {"message": [{"role": "user", "content": "q"}], "answer": "1"}
    path = _write_jsonl(tmp_path / "d.jsonl", [good, {"message": "[]", "answer": "1"}, good, "{oops", good])
    with pytest.warns(UserWarning, match=r"skipped 2 of 5 rows"):
        rows = load_rows(path, on_bad_row="skip")
    assert [r["_where"] for r in rows] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    with pytest.warns(UserWarning):
        rows, problems = load_rows_report(path, on_bad_row="skip")
    assert len(rows) == 3 and [p.split(": ")[0] for p in problems] == [f"{path}:2", f"{path}:4"]


def test_check_images_false_skips_opening_images(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"message": _user({"type": "image", "image": "gone.png"}),
                                                "answer": "1"}])
    (row,) = load_rows(path, check_images=False)
    assert row_images(row) == [str(tmp_path / "gone.png")]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("d.csv", "a,b", "unsupported data file type '.csv'"),
    ("missing.jsonl", None, "no such data file"),
    ("d.json", '{"rows": []}', "must hold a list of rows"),
    ("d.json", '[{"a": 1},', "d.json:1: bad JSON"),
])
def test_file_level_errors(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        load_rows(tmp_path / name)


def test_bad_policy_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="on_bad_row must be one of"):
        load_rows(tmp_path / "x.jsonl", on_bad_row="ignore")


def test_row_helpers_on_raw_rows():
    raw = {"message": json.dumps([{"role": "system", "content": "sys"},
                                  {"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                               {"type": "text", "text": "one"},
                                                               {"type": "image", "image": "b.png"},
                                                               {"type": "text", "text": "two"}]}])}
    assert row_images(raw) == ["a.png", "b.png"]
    assert row_text(raw) == "one\ntwo"  # the system prompt is not user-visible text
