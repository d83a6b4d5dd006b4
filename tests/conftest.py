"""Shared fixtures: tiny models built offline once per session, image rows, and marker-based skipping."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skips = {
        "gpu": (not torch.cuda.is_available(), "needs a CUDA GPU"),
        "vllm": (importlib.util.find_spec("vllm") is None, "needs vLLM (pip install -e .[gpu])"),
    }
    for item in items:
        for marker, (skip, reason) in skips.items():
            if skip and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_vl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmmr1.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny-vl"), kind="vl", seed=0)


@pytest.fixture(scope="session")
def tiny_text_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmmr1.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny-text"), kind="text", seed=0)


@pytest.fixture
def mixed_rows(tmp_path: Path) -> list[dict]:
    """Two text rows and two image rows (different image sizes), already in loaded form."""
    rows = []
    for i, size in enumerate([(56, 56), (84, 112)]):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", size, (40 * i, 100, 200)).save(path)
        rows.append({"message": [{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                              {"type": "text", "text": f"What is {i} + 2?"}]}],
                     "answer": f"$\\boxed{{{i + 2}}}$", "datasource": "image_arith", "_where": f"mem:{i + 1}"})
    for i in range(2):
        rows.append({"message": [{"role": "user", "content": f"What is {i} + 7?"}], "answer": str(i + 7),
                     "datasource": "arith", "_where": f"mem:{i + 3}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
