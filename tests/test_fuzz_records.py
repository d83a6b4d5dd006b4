"""Fuzzing the row loader (hypothesis): whatever a data file holds, `load_rows_report` returns the good rows normalized
and reports every bad one as `file:row: field: what is wrong` (a `DataError` under on_bad_row="error") - never another
exception type.

Rows are generated as a valid row plus at most one mutation whose field is known, so the test checks exactly which
line is reported under which field, and that good rows come back normalized (message decoded from a JSON string,
image references as absolute paths or data: URLs, the label as a string, `env` read from `env_path`). The same rows
load equally from JSONL, JSON and Parquet. Arbitrary bytes in a file give problems, never a crash.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import warnings
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from lmmr1.data.records import DataError, load_rows_report, row_images, row_text

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LEVEL = "#####\n#@$.#\n#####"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder: images good and bad, Sokoban level files, and the files the tests (re)write."""
    root = tmp_path_factory.mktemp("fuzz-records").resolve()  # the loader resolves the data file's folder
    (root / "img").mkdir()
    Image.new("RGB", (12, 8), (10, 200, 30)).save(root / "img" / "a.png")
    Image.new("RGB", (8, 8), (200, 10, 30)).save(root / "img" / "b c.png")  # a space: quoted in file:// URLs
    Image.effect_noise((64, 64), 50).save(root / "noise.png")
    png = (root / "noise.png").read_bytes()
    (root / "broken.png").write_bytes(png[: len(png) // 2])  # truncated inside the pixel data
    (root / "text.png").write_text("not an image")
    (root / "level.xsb").write_text(LEVEL)
    (root / "latin1.xsb").write_bytes("#####\n#@$.#\n#####\xff".encode("latin-1"))
    return root


def _data_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


DATA_URL = _data_url()

# ---- valid rows, and what loading must turn them into --------------------------------------------------------------
# An image reference is drawn as a form; the form is turned into the reference and its expected normalized value
# once the assets folder is known.
GOOD_IMAGES = ["relative", "relative_dot", "relative_space", "absolute", "file_url", "file_url_space", "data_url"]


def _good_image(form: str, root: Path) -> tuple[str, str]:
    """(reference written in the row, reference after loading)."""
    a, bc = root / "img" / "a.png", root / "img" / "b c.png"
    return {"relative": ("img/a.png", str(a)), "relative_dot": ("./img/../img/a.png", str(a)),
            "relative_space": ("img/b c.png", str(bc)), "absolute": (str(a), str(a)),
            "file_url": ("file://" + str(a), str(a)), "file_url_space": ("file://" + quote(str(bc)), str(bc)),
            "data_url": (DATA_URL, DATA_URL)}[form]


# (reference, field the problem is reported under, fragment of the message)
BAD_IMAGES = [
    ("missing.png", "image", "image file not found"),
    ("broken.png", "image", "corrupt image"),
    ("text.png", "image", "not an image file PIL can read"),
    ("data:image/png;base64,@@@", "image", "invalid base64"),
    ("data:image/png;base64,\u00e9", "image", "invalid base64"),
    ("data:image/png,abc", "image", "not base64-encoded"),
    ("x" * 300 + ".png", "image", "cannot be opened"),  # a file name longer than the file system allows
    ("https://example.org/a.png", "content", "remote image"),
    ("s3://bucket/a.png", "content", "remote image"),
    ("", "content", "non-empty string"),
    ("a\x00b.png", "content", "NUL character"),
    ("~no_such_user_lmmr1/a.png", "content", "cannot expand '~'"),
]

texts = st.text(max_size=12)
roles = st.sampled_from(["system", "user", "assistant"]) | st.text(min_size=1, max_size=6)


@st.composite
def items(draw: st.DrawFn) -> tuple[dict, tuple]:
    """(content item as written, expected normalized item as ("text", t) / ("image", form))."""
    if draw(st.booleans()):
        text = draw(texts)
        item = draw(st.sampled_from([{"type": "text", "text": text}, {"text": text},
                                     {"type": "text", "text": text, "image": None}]))  # Parquet: absent -> None
        return item, ("text", text)
    form = draw(st.sampled_from(GOOD_IMAGES))
    return draw(st.sampled_from(["image", "image_inferred", "image_url", "image_url_str"])), ("image", form)


def _write_item(kind: str, ref: str) -> dict:
    return {"image": {"type": "image", "image": ref}, "image_inferred": {"image": ref, "text": None},
            "image_url": {"type": "image_url", "image_url": {"url": ref}},
            "image_url_str": {"type": "image_url", "image_url": ref}}[kind]


@st.composite
def messages(draw: st.DrawFn) -> list[tuple[str, object]]:
    """[(role, content)] with content a str or a list of (written kind or item, expected) pairs."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        role = draw(roles)
        if draw(st.booleans()):
            out.append((role, draw(texts)))
        else:
            out.append((role, draw(st.lists(items(), min_size=1, max_size=3))))
    return out


def _render(spec: list, root: Path) -> tuple[list[dict], list[dict]]:
    """(message list as written, message list as loading must return it)."""
    written, expected = [], []
    for role, content in spec:
        if isinstance(content, str):
            written.append({"role": role, "content": content})
            expected.append({"role": role, "content": content})
            continue
        w_items, e_items = [], []
        for item, (kind, value) in content:
            if kind == "text":
                w_items.append(item)
                e_items.append({"type": "text", "text": value})
            else:
                ref, loaded = _good_image(value, root)
                w_items.append(_write_item(item, ref))
                e_items.append({"type": "image", "image": loaded})
        written.append({"role": role, "content": w_items})
        expected.append({"role": role, "content": e_items})
    return written, expected


labels = (st.text(min_size=1, max_size=8).filter(lambda s: s.strip()) | st.integers(-10**6, 10**6)
          | st.floats(allow_nan=False, allow_infinity=False))

# One mutation per bad row: (name, field the single problem is reported under, message fragment or None).
MUTATIONS = [
    ("drop_message", "message", "missing"), ("message_not_list", "message", "must be a non-empty list"),
    ("message_empty_list", "message", "must be a non-empty list"),
    ("message_bad_json", "message", "not a valid JSON string"),
    ("message_deep_json", "message", "nested too deeply"), ("message_huge_int", "message", "not a valid JSON string"),
    ("entry_no_role", "message[", "must be an object with 'role' and 'content'"),
    ("entry_empty_role", "message[", "role must be a non-empty string"),
    ("entry_bad_content", "message[", "content must be a string or a list"),
    ("item_not_object", "message[", "content item must be an object"),
    ("item_bad_type", "message[", "unsupported item type"), ("text_not_str", "message[", "has no 'text' string"),
    ("bad_image", None, None),
    ("drop_answer", "answer", "missing"), ("blank_answer", "answer", "empty"),
    ("answer_wrong_type", "answer", "must be a string"), ("answer_not_finite", "answer", "finite number"),
    ("datasource_not_str", "datasource", "must be a string"),
    ("env_not_level", "env", "not a Sokoban level"), ("env_not_str", "env", "must be XSB text"),
    ("env_path_missing", "env_path", "cannot read"), ("env_path_nul", "env_path", "NUL character"),
    ("env_path_not_utf8", "env_path", "cannot read"), ("env_path_and_env", "env_path", "has both"),
    ("env_path_not_str", "env_path", "must be a file path"), ("row_not_object", "row", "must be a JSON object"),
]


@st.composite
def rows(draw: st.DrawFn) -> tuple:
    """(spec for one row, mutation or None); materialized by `_materialize` once the assets folder is known."""
    spec = {"message": draw(messages()), "as_json_string": draw(st.booleans()), "answer": draw(labels),
            "datasource": draw(st.none() | texts), "env": draw(st.sampled_from([None, "env", "env_path"]))}
    mutation = draw(st.none() | st.sampled_from(MUTATIONS))
    extra = draw(st.integers(0, len(BAD_IMAGES) - 1)), draw(st.integers(0, 10**6))
    return spec, mutation, extra


def _materialize(spec: dict, mutation: tuple | None, extra: tuple, root: Path) -> tuple[object, dict | None, tuple]:
    """(raw row to write, expected loaded row or None, (field, fragment) of the expected problem or None)."""
    written, expected = _render(spec["message"], root)
    raw: dict = {"message": json.dumps(written) if spec["as_json_string"] else written, "answer": spec["answer"]}
    if spec["datasource"] is not None:
        raw["datasource"] = spec["datasource"]
    if spec["env"] == "env":
        raw["env"] = LEVEL
    elif spec["env"] == "env_path":
        raw["env_path"] = "level.xsb"
    loaded = {"message": expected, "answer": str(spec["answer"]), **{k: raw[k] for k in ("datasource",) if k in raw}}
    if spec["env"] is not None:
        loaded["env"] = LEVEL
    if spec["env"] == "env_path":
        loaded["env_path"] = str(root / "level.xsb")
    if mutation is None:
        return raw, loaded, None
    name, field, fragment = mutation
    bad_index, number = extra
    first = written[0]
    if name == "drop_message":
        del raw["message"]
    elif name == "message_not_list":
        raw["message"] = [7, {"role": "user", "content": "x"}, None, True, 2.5, "7"][number % 6]
    elif name == "message_empty_list":
        raw["message"] = "[]" if number % 2 else []
    elif name == "message_bad_json":
        raw["message"] = "{not json" + str(number)
    elif name == "message_deep_json":
        raw["message"] = "[" * (2000 + number % 100_000)
    elif name == "message_huge_int":
        raw["message"] = "[" + "9" * 5000 + "]"
    elif name == "entry_no_role":
        raw["message"] = [{"content": "x"}]
    elif name == "entry_empty_role":
        raw["message"] = [{"role": "", "content": "x"}]
    elif name == "entry_bad_content":
        raw["message"] = [{"role": "user", "content": [None, 3, {"a": 1}][number % 3]}]
    elif name == "item_not_object":
        raw["message"] = [{"role": "user", "content": ["just text"]}]
    elif name == "item_bad_type":
        raw["message"] = [{"role": "user", "content": [{"type": ["video", "audio", 3][number % 3], "video": "v"}]}]
    elif name == "text_not_str":
        raw["message"] = [{"role": "user", "content": [{"type": "text", "text": [None, 1, ["a"]][number % 3]}]}]
    elif name == "bad_image":
        ref, where, fragment = BAD_IMAGES[bad_index]
        content = first["content"] if isinstance(first["content"], list) else []
        raw["message"] = [{"role": first["role"], "content": [*content, _write_item("image", ref)]}, *written[1:]]
        field = "image" if where == "image" else "message[0].content["
    elif name == "drop_answer":
        del raw["answer"]
    elif name == "blank_answer":  # a Sokoban row (env / env_path) may have an empty answer, as LMM-R1's do
        raw.pop("env", None)
        raw.pop("env_path", None)
        raw["answer"] = ["", " ", "\n\t "][number % 3]
    elif name == "answer_wrong_type":
        raw["answer"] = [None, True, [1], {"a": 1}][number % 4]
    elif name == "answer_not_finite":
        raw["answer"] = [math.nan, math.inf, -math.inf][number % 3]
    elif name == "datasource_not_str":
        raw["datasource"] = [1, ["geo"], {"a": 1}, True][number % 4]
    elif name == "env_not_level":
        raw.pop("env_path", None)
        raw["env"] = ["#####\n#@ .#\n#####", "@@", "#\t#", "x"][number % 4]
    elif name == "env_not_str":
        raw.pop("env_path", None)
        raw["env"] = [1, ["#"], {"a": 1}][number % 3]
    elif name in ("env_path_missing", "env_path_nul", "env_path_not_utf8", "env_path_not_str"):
        raw.pop("env", None)
        raw["env_path"] = {"env_path_missing": "nope/level.xsb", "env_path_nul": "lev\x00el.xsb",
                           "env_path_not_utf8": "latin1.xsb", "env_path_not_str": [1, 2]}[name]
    elif name == "env_path_and_env":
        raw["env"], raw["env_path"] = LEVEL, "level.xsb"
    elif name == "row_not_object":
        raw = [[1, 2], 3, "row", None, True][number % 5]
    return raw, None, (field, fragment)


def _problems_by_line(problems: list[str], path: Path) -> dict[int, list[str]]:
    by_line: dict[int, list[str]] = {}
    for problem in problems:
        match = re.match(rf"{re.escape(str(path))}:(\d+): (.+)", problem, re.DOTALL)
        assert match, f"problem does not start with file:row: {problem!r}"
        by_line.setdefault(int(match.group(1)), []).append(match.group(2))
    return by_line


def _load(path: Path, **kwargs) -> tuple[list[dict], list[str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_rows_report(path, on_bad_row="skip", **kwargs)


def _check(loaded: list[dict], problems: list[str], path: Path,
           expected: list[tuple[int, dict | None, tuple | None]]) -> None:
    """Each expected (line, row, problem) is exactly matched: good rows in order, one problem per bad line."""
    by_line = _problems_by_line(problems, path)
    assert sorted(by_line) == sorted(line for line, _, bad in expected if bad is not None), by_line
    for line, _, bad in expected:
        if bad is None:
            continue
        field, fragment = bad
        (problem,) = by_line[line]
        assert problem.startswith(field), (problem, field)
        assert fragment is None or fragment in problem, (problem, fragment)
    good = [(line, row) for line, row, bad in expected if bad is None]
    assert [r["_where"] for r in loaded] == [f"{path}:{line}" for line, _ in good]
    for got, (_, want) in zip(loaded, good, strict=True):
        assert {k: v for k, v in got.items() if k != "_where"} == want


# Garbage lines between rows: (text or bytes, field, fragment).
GARBAGE = [
    (b"\xff\xfe{}", "not UTF-8", "byte 0xff"), (b'{"message": "caf\xe9"}', "not UTF-8", "byte 0xe9"),
    (b"{oops", "bad JSON", None), (b"[" * 100_000, "bad JSON", "nested too deeply"),
    (b'{"answer": ' + b"1" * 5000 + b"}", "bad JSON", "digits"), (b"NaN", "row", "must be a JSON object"),
]


@settings(FUZZ, max_examples=150)
@given(st.lists(rows(), min_size=1, max_size=5), st.lists(st.integers(0, len(GARBAGE)), max_size=5),
       st.sampled_from(["\n", "\r\n"]))
def test_jsonl_rows_load_or_name_file_row_field(assets, row_specs, garbage, newline):
    path, lines, expected = assets / "data.jsonl", [], []
    for i, (spec, mutation, extra) in enumerate(row_specs):
        if i < len(garbage) and garbage[i] < len(GARBAGE):  # index len(GARBAGE) = a blank line
            text, field, fragment = GARBAGE[garbage[i]]
            lines.append(text)
            expected.append((len(lines), None, (field, fragment)))
        elif i < len(garbage):
            lines.append(b"   ")
        raw, row, bad = _materialize(spec, mutation, extra, assets)
        lines.append(json.dumps(raw).encode())
        expected.append((len(lines), row, bad))
    path.write_bytes(newline.encode().join(lines) + newline.encode())
    loaded, problems = _load(path)
    _check(loaded, problems, path, expected)
    n_bad = len({line for line, _, bad in expected if bad is not None})
    if n_bad:
        with pytest.raises(DataError) as info:
            load_rows_report(path)
        assert str(info.value).startswith(f"{path}: {n_bad} of {len(expected)} rows are bad:")
        assert info.value.problems == problems


@settings(FUZZ, max_examples=60)
@given(st.lists(rows(), min_size=1, max_size=4))
def test_json_list_loads_like_jsonl(assets, row_specs):
    built = [_materialize(spec, mutation, extra, assets) for spec, mutation, extra in row_specs]
    path = assets / "data.json"
    path.write_text(json.dumps([raw for raw, _, _ in built]))
    loaded, problems = _load(path)
    _check(loaded, problems, path, [(i, row, bad) for i, (_, row, bad) in enumerate(built, start=1)])


@st.composite
def parquet_rows(draw: st.DrawFn) -> list[dict]:
    """Rows as LMM-R1 ships Parquet: every column a string or null (message as a JSON string)."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        message = draw(st.sampled_from([None, "", "[]", "{oops", "[" * 3000, json.dumps([{"role": "user"}]),
                                        json.dumps([{"role": "user", "content": "2+2?"}]),
                                        json.dumps([{"role": "user", "content": [{"type": "image",
                                                                                  "image": "img/a.png"}]}]),
                                        json.dumps([{"role": "user", "content": [{"type": "image",
                                                                                  "image": "missing.png"}]}])]))
        out.append({"message": message, "answer": draw(st.none() | texts),
                    "datasource": draw(st.none() | texts), "env": draw(st.sampled_from([None, LEVEL, "@@", ""]))})
    return out


@settings(FUZZ, max_examples=40)
@given(parquet_rows())
def test_parquet_loads_like_jsonl(assets, raw_rows):
    pq.write_table(pa.Table.from_pylist(raw_rows), assets / "data.parquet")
    (assets / "same.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw_rows))
    got = _load(assets / "data.parquet")
    want = _load(assets / "same.jsonl")
    strip = [{k: v for k, v in r.items() if k != "_where"} for r in got[0]]
    assert strip == [{k: v for k, v in r.items() if k != "_where"} for r in want[0]]
    assert [p.replace("data.parquet", "same.jsonl") for p in got[1]] == want[1]
    assert len(got[0]) + len(_problems_by_line(got[1], assets / "data.parquet")) == len(raw_rows)


@settings(FUZZ, max_examples=150)
@given(st.binary(max_size=300) | st.lists(st.sampled_from([b"{", b"}", b"[", b"]", b'"message"', b'"answer"', b":",
                                                            b",", b"\n", b"\r", b'"', b"\\u", b"\xff", b"1e999",
                                                            b"null", b" "]), max_size=60).map(b"".join),
       st.sampled_from([".jsonl", ".json", ".parquet"]))
@example(b"[" * 100_000, ".json")  # RecursionError escaped the loader
@example(b'[{"answer": ' + b"7" * 5000 + b"}]", ".json")  # int() digit limit: a plain ValueError escaped
@example(b'{"message": "x"}\n\xff\n', ".jsonl")  # UnicodeDecodeError escaped for the whole file
def test_any_bytes_give_rows_or_data_errors(assets, content, suffix):
    path = assets / f"bytes{suffix}"
    path.write_bytes(content)
    try:
        loaded, problems = _load(path)
    except DataError as e:  # whole-file problems: not JSON / not a list / not Parquet
        assert e.problems and all(p.startswith(str(path)) for p in e.problems)
        return
    _problems_by_line(problems, path)  # each names file:row
    assert all(r["_where"].startswith(f"{path}:") and r["answer"].strip() for r in loaded)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | texts,
                           lambda children: st.lists(children, max_size=3) | st.dictionaries(
                               st.sampled_from(["role", "content", "type", "text", "image", "image_url"]) | texts,
                               children, max_size=4), max_leaves=12)


@settings(FUZZ, max_examples=200)
@given(st.dictionaries(st.sampled_from(["message", "answer"]), json_values | json_values.map(json.dumps)))
@example({"message": [{"role": "user", "content": [{"type": "image"}]}]})  # KeyError: an image item with no image
@example({"message": [{"role": "user", "content": [{"type": "text", "text": None}]}]})  # TypeError in join
def test_row_helpers_never_raise_on_raw_rows(raw):
    refs, text = row_images(raw), row_text(raw)
    assert isinstance(refs, list) and all(isinstance(r, str) for r in refs)
    assert isinstance(text, str)
