"""Load and validate data rows (JSONL, JSON list, Parquet) in the LMM-R1 row format, before any training starts.

A row holds `message` (an OpenAI-style message list, or the same as a JSON string), `answer` (the label), optional
`datasource`, and optional `env` / `env_path` (a Sokoban level in XSB text, or a file holding one: XSB text, or a
gym-sokoban `.npy` grid as in LMM-R1's Sokoban data); a Sokoban row may leave `answer` empty, as LMM-R1's do. Image
items are `{"type": "image", "image": <path | file:// URL | data: URL>}`; relative paths resolve against the data
file's folder. Every row is checked up front and each problem is reported as `file:row: field: what is wrong`, so a
bad image or an empty label fails in seconds with a pointer to the line, not hours into a run.

    rows = load_rows("data/geometry/data.jsonl")                      # raises DataError listing every bad row
    rows, problems = load_rows_report("data.jsonl", on_bad_row="skip")  # bad rows dropped, problems returned
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from PIL import Image

MAX_LISTED = 20  # problems shown in one DataError before "... and K more"
_POLICIES = ("error", "skip")
_OPTIONAL = ("datasource", "env", "env_path")  # null values mean absent (Parquet stores absent fields as null)
_UNDECODED = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as the surrogateescape handler keeps them


class DataError(ValueError):
    """Bad data rows; the message lists each problem as `file:row: field: what is wrong`, one per line."""

    def __init__(self, problems: list[str], header: str | None = None) -> None:
        self.problems, self.header = list(problems), header
        lines = ([header] if header else []) + self.problems[:MAX_LISTED]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"... and {len(self.problems) - MAX_LISTED} more")
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple:  # survive pickling (DataLoader workers, spawn) with the problem list intact
        return DataError, (self.problems, self.header)


def _loads(text: str) -> tuple[Any, str | None, int]:
    """json.loads as (value, None, 0), or (None, what is wrong, line of the problem) for any text it rejects."""
    try:
        return json.loads(text), None, 0
    except json.JSONDecodeError as e:
        return None, f"bad JSON: {e.msg} (column {e.colno})", e.lineno
    except RecursionError:  # json.loads raises these two for syntactically valid text it cannot hold
        return None, "bad JSON: nested too deeply", 1
    except ValueError as e:  # an integer literal longer than Python's int/str digit limit
        return None, f"bad JSON: {str(e).split(';')[0]}", 1


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, decoded value or None, error or None) for each non-blank line."""
    with path.open(encoding="utf-8", errors="surrogateescape") as f:  # a line that is not UTF-8 is that row's problem
        for number, line in enumerate(f, start=1):
            if bad := _UNDECODED.search(line):
                byte = ord(bad.group()) - 0xDC00
                yield number, None, f"not UTF-8 text (byte {byte:#04x} at column {bad.start() + 1})"
            elif line.strip():
                value, error, _ = _loads(line)
                yield number, value, error


def _read_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Raw rows of a file as (row number, value, error); raises DataError for problems with the whole file."""
    if not path.is_file():
        raise DataError([f"{path}: no such data file"])
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError([f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"]) from None
        data, error, line = _loads(text)
        if error is not None:
            raise DataError([f"{path}:{line}: {error}"])
        if not isinstance(data, list):
            raise DataError([f"{path}: a .json data file must hold a list of rows, not {type(data).__name__}"])
        for index, row in enumerate(data, start=1):
            yield index, row, None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several unrelated types for unreadable files
            raise DataError([f"{path}: cannot read Parquet: {e}"]) from None
        for index, row in enumerate(table.to_pylist(), start=1):
            yield index, row, None
    else:
        raise DataError([f"{path}: unsupported data file type {suffix or '(none)'!r}; use .jsonl, .json or .parquet"])


def check_image(ref: str) -> tuple[int, int]:
    """Open an image reference (absolute path or data: URL) with PIL and verify it; returns (width, height).

    Raises ValueError saying what is wrong (missing, unreadable, not an image, corrupt).
    """
    try:
        if ref.startswith("data:"):
            header, sep, payload = ref.partition(",")
            if not sep or ";base64" not in header:
                raise ValueError("data: URL is not base64-encoded (expected data:image/png;base64,...)")
            try:
                source: Any = io.BytesIO(base64.b64decode(payload, validate=True))
            except ValueError as e:  # binascii.Error (bad alphabet or padding), or non-ASCII text
                raise ValueError(f"data: URL has invalid base64 ({e})") from None
        else:
            path = Path(ref)
            try:
                found = path.exists()
            except OSError as e:  # e.g. a file name longer than the file system allows
                raise ValueError(f"image file cannot be opened ({e.strerror}): {_short(ref)}") from None
            if not found:
                raise ValueError(f"image file not found: {ref}")
            source = path
        with Image.open(source) as image:
            size = image.size
            image.verify()  # checks structure and checksums without decoding every pixel
        return size
    except ValueError:
        raise
    except PermissionError:
        raise ValueError(f"image file is not readable (permission denied): {ref}") from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"not an image file PIL can read: {_short(ref)}") from None
    except Exception as e:  # PIL reports corruption as SyntaxError, OSError, struct.error, ...
        raise ValueError(f"corrupt image {_short(ref)}: {e}") from None


def _short(ref: str) -> str:
    return ref if len(ref) <= 80 else ref[:60] + "..."


def _resolve_image(ref: Any, base: Path) -> str:
    """An image reference as an absolute path or a data: URL; raises ValueError for unsupported ones."""
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError(f"image reference must be a non-empty string, got {ref!r}")
    if ref.startswith("data:"):
        return ref
    if ref.startswith("file://"):
        ref = unquote(ref[len("file://"):])
    elif "://" in ref:
        raise ValueError(f"remote image {_short(ref)!r} is not supported (nothing is downloaded); use a local path")
    return str(_local_path(ref, base))


def _local_path(ref: str, base: Path) -> Path:
    """`ref` as an absolute path ('~' expanded, relative to `base`); ValueError for a path no file can have."""
    if "\0" in ref:
        raise ValueError(f"path {_short(ref)!r} contains a NUL character")
    try:
        path = Path(ref).expanduser()
    except RuntimeError as e:  # '~user' for an unknown user, or no home directory
        raise ValueError(f"cannot expand '~' in {_short(ref)!r}: {e}") from None
    return path if path.is_absolute() else (base / path).resolve()


def _normalize_item(item: Any, base: Path, where: str) -> dict[str, Any]:
    """One content item as {"type": "text", "text"} or {"type": "image", "image"}; ValueError if unsupported."""
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: content item must be an object, got {type(item).__name__}")
    item = {k: v for k, v in item.items() if v is not None}  # Parquet structs carry every field, absent ones as None
    kind = item.get("type") or ("image" if "image" in item else "text" if "text" in item else None)
    if kind == "text":
        if not isinstance(item.get("text"), str):
            raise ValueError(f"{where}: text item has no 'text' string")
        return {"type": "text", "text": item["text"]}
    try:
        if kind == "image":
            return {"type": "image", "image": _resolve_image(item.get("image"), base)}
        if kind == "image_url":  # OpenAI chat style: {"type": "image_url", "image_url": {"url": ...}}
            url = item.get("image_url")
            ref = url.get("url") if isinstance(url, Mapping) else url
            return {"type": "image", "image": _resolve_image(ref, base)}
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    raise ValueError(f"{where}: unsupported item type {kind!r} (supported: 'text', 'image', 'image_url')")


def _normalize_message(value: Any, base: Path) -> list[dict[str, Any]]:
    """The decoded, normalized message list; raises ValueError describing the first problem."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a valid JSON string ({e.msg} at column {e.colno})") from None
        except (RecursionError, ValueError) as e:  # too deeply nested; an integer beyond the int/str digit limit
            reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
            raise ValueError(f"not a valid JSON string ({reason})") from None
    if not isinstance(value, list) or not value:
        raise ValueError(f"must be a non-empty list of {{role, content}} messages, got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"[{i}] must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or not role:
            raise ValueError(f"[{i}].role must be a non-empty string")
        if isinstance(content, list):
            content = [_normalize_item(item, base, f"[{i}].content[{j}]") for j, item in enumerate(content)]
        elif not isinstance(content, str):
            raise ValueError(f"[{i}].content must be a string or a list of items, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def _normalize_row(raw: Any, base: Path, input_key: str, label_key: str,
                   check_images: bool, image_cache: dict[str, str | None]) -> tuple[dict[str, Any], list[str]]:
    """(normalized row, problems as 'field: what is wrong'); the row is only usable when problems is empty."""
    if not isinstance(raw, Mapping):
        return {}, [f"row: must be a JSON object, got {type(raw).__name__}"]
    row, problems = {k: v for k, v in raw.items() if v is not None or k not in _OPTIONAL}, []
    row.pop(input_key, None)
    row.pop(label_key, None)
    if input_key not in raw:
        problems.append(f"{input_key}: missing")
    else:
        try:
            row["message"] = _normalize_message(raw[input_key], base)
        except ValueError as e:
            problems.append(f"{input_key}{'' if str(e).startswith('[') else ': '}{e}")
    label = raw.get(label_key)
    if label_key not in raw:
        problems.append(f"{label_key}: missing")
    elif isinstance(label, bool) or not isinstance(label, str | int | float):
        problems.append(f"{label_key}: must be a string, got {type(label).__name__}")
    elif isinstance(label, float) and not math.isfinite(label):
        problems.append(f"{label_key}: must be a string or a finite number, got {label}")
    elif not str(label).strip() and row.get("env") is None and row.get("env_path") is None:
        problems.append(f"{label_key}: empty")  # a Sokoban row is scored by its level, not by a label
    else:
        row["answer"] = str(label)
    if "datasource" in row and not isinstance(row["datasource"], str):
        problems.append(f"datasource: must be a string, got {type(row['datasource']).__name__}")
    problems += _load_env(row, base)
    if check_images and "message" in row:
        for ref in row_images(row):
            if ref not in image_cache:
                try:
                    check_image(ref)
                    image_cache[ref] = None
                except ValueError as e:
                    image_cache[ref] = str(e)
            if image_cache[ref] is not None:
                problems.append(f"image: {image_cache[ref]}")
    return row, problems


def _load_env(row: dict[str, Any], base: Path) -> list[str]:
    """Resolve `env_path` (XSB text or a `.npy` grid) into `env` (XSB) and check that it is a Sokoban level."""
    from lmmr1.envs.sokoban import Level, read_level_text

    if row.get("env_path") is not None:
        if row.get("env") is not None:
            return ["env_path: row has both 'env' and 'env_path'; keep one"]
        if not isinstance(row["env_path"], str):
            return [f"env_path: must be a file path, got {type(row['env_path']).__name__}"]
        try:
            path = _local_path(row["env_path"], base)
        except ValueError as e:
            return [f"env_path: {e}"]
        try:
            row["env"] = read_level_text(path)  # a .npy grid is converted to XSB
        except (OSError, ValueError) as e:  # ValueError: the file is not UTF-8, or the name cannot be encoded
            return [f"env_path: cannot read {path}: {getattr(e, 'strerror', None) or e}"]
        row["env_path"] = str(path.resolve())
    if row.get("env") is None:
        return []
    if not isinstance(row["env"], str):
        return [f"env: must be XSB text, got {type(row['env']).__name__}"]
    try:
        Level.from_xsb(row["env"])
    except ValueError as e:
        return [f"env: not a Sokoban level: {e}"]
    return []


def load_rows_report(path: str | Path, *, input_key: str = "message", label_key: str = "answer",
                     on_bad_row: str = "error", check_images: bool = True) -> tuple[list[dict], list[str]]:
    """Like `load_rows`, also returning every problem found (`file:row: field: what is wrong`, one per entry).

    With on_bad_row="error" a file with problems raises DataError; with "skip" the bad rows are left out and their
    problems returned (and reported through `warnings.warn`).
    """
    if on_bad_row not in _POLICIES:
        raise ValueError(f"on_bad_row must be one of {_POLICIES}, got {on_bad_row!r}")
    path = Path(path)
    base, rows, problems, bad, total = path.resolve().parent, [], [], 0, 0
    image_cache: dict[str, str | None] = {}
    for number, raw, error in _read_rows(path):
        total += 1
        where = f"{path}:{number}"
        if error is not None:
            row, row_problems = {}, [error]
        else:
            row, row_problems = _normalize_row(raw, base, input_key, label_key, check_images, image_cache)
        if row_problems:
            bad += 1
            problems += [f"{where}: {p}" for p in row_problems]
            continue
        row["_where"] = where
        rows.append(row)
    if bad and on_bad_row == "error":
        raise DataError(problems, header=f"{path}: {bad} of {total} rows are bad:")
    if bad:
        message = f"{path}: skipped {bad} of {total} rows (on_bad_row='skip'); first problem: {problems[0]}"
        warnings.warn(message, stacklevel=2)
    return rows, problems


def load_rows(path: str | Path, *, input_key: str = "message", label_key: str = "answer",
              on_bad_row: str = "error", check_images: bool = True) -> list[dict]:
    """Load a .jsonl, .json (list of rows) or .parquet data file and validate every row up front.

    Args:
        path: the data file; relative image paths and `env_path` resolve against its folder.
        input_key / label_key: the columns holding the message list and the label; renamed to "message"/"answer".
        on_bad_row: "error" raises one DataError listing every bad row; "skip" drops them with a warning.
        check_images: open every image with PIL and verify it (turn off only for data you have checked).

    Returns rows with `message` a decoded list of {role, content} (content a str or a list of text/image items with
    absolute paths or data: URLs), `answer` a str, `env` read from `env_path` (XSB), and `_where` = "file:row".
    """
    rows, _ = load_rows_report(path, input_key=input_key, label_key=label_key, on_bad_row=on_bad_row,
                               check_images=check_images)
    return rows


def _messages(row: Mapping) -> list[Any]:
    message = row.get("message", [])
    if isinstance(message, str):
        try:
            message = json.loads(message)
        except json.JSONDecodeError:
            return []
    return message if isinstance(message, list) else []


def row_images(row: Mapping) -> list[str]:
    """The image references (strings) of a row's messages, in order of appearance; raw rows may hold anything."""
    refs = []
    for message in _messages(row):
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            for item in content:
                if not isinstance(item, Mapping):
                    continue
                kind, ref = item.get("type"), item.get("image")
                if (kind == "image" or kind is None) and isinstance(ref, str):
                    refs.append(ref)
    return refs


def row_text(row: Mapping) -> str:
    """The prompt text a user sees (text of every non-system message, joined by newlines), for summaries."""
    parts = []
    for message in _messages(row):
        if not isinstance(message, Mapping) or message.get("role") == "system":
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [item["text"] for item in content if isinstance(item, Mapping)
                      and item.get("type", "text") == "text" and isinstance(item.get("text"), str)]
    return "\n".join(parts)
