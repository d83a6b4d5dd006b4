"""Shared fixtures: tiny models built offline once per session, image rows, and marker-based skipping."""

from __future__ import annotations

import contextlib
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app, port: int | None = None):  # noqa: ANN001, ANN201 - a FastAPI app; yields its base URL
    """Serve `app` with uvicorn in a thread on 127.0.0.1 until the block ends."""
    import threading
    import time

    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "reward server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def sample_experience(model: Path, rows: list[dict], n: int, max_new_tokens: int, seed: int):  # noqa: ANN201
    """An Experience sampled from the model folder's policy with the HF engine (what a rollout would hand over)."""
    from transformers import AutoTokenizer

    from lmmr1.data.processor import PromptProcessor
    from lmmr1.modules.experience import Experience
    from lmmr1.modules.policy import Policy
    from lmmr1.rollout.base import SamplingConfig
    from lmmr1.rollout.hf import HFEngine

    prompts = PromptProcessor(model)(rows)
    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
    engine = HFEngine()
    engine.bind(Policy(str(model)), tokenizer)
    completions = engine.generate(prompts, SamplingConfig(n=n, max_new_tokens=max_new_tokens), seed=seed)
    return Experience.from_rollout(prompts, completions, tokenizer.pad_token_id)
