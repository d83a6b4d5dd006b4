"""lmmr1 imports without vLLM; asking for the vLLM engine without it is an error that says how to install it."""

from __future__ import annotations

import sys

import pytest

from lmmr1.rollout.vllm import VLLMEngine


def test_binding_without_vllm_says_how_to_install(monkeypatch, tiny_text_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    engine = VLLMEngine()  # constructing (e.g. from YAML) needs no vllm
    with pytest.raises(ImportError, match=r"pip install -e \.\[gpu\].*make test-vllm"):
        engine.bind(type("P", (), {"path": str(tiny_text_path)})(), None)


def test_bad_options_name_the_flag():
    with pytest.raises(ValueError, match=r"--model.engine.gpu_memory_utilization must be in \(0, 1\], got 1.5"):
        VLLMEngine(gpu_memory_utilization=1.5)
    with pytest.raises(RuntimeError, match="not bound"):
        VLLMEngine().update_weights([])
