"""Tiny random models of every supported family with a real byte-level BPE tokenizer, built offline.

Tests, smoke configs and users who want a seconds-long run use these instead of a downloaded checkpoint:
`lmmr1 model tiny --out DIR [--family NAME | --kind vl|text]` writes a folder that `from_pretrained` (and vLLM) load.
Each family's builder lives with its adapter (lmmr1/models/families/).
"""

from __future__ import annotations

from pathlib import Path

from lmmr1.models.families import family_named

KINDS = {"vl": "qwen2_5_vl", "text": "qwen2"}
"""The historical --kind names: the default VL family and the text-only model."""


def build_tiny(out: str | Path, kind: str = "vl", seed: int = 0, family: str | None = None) -> Path:
    """Write a tiny random model + tokenizer (+ image processor) to `out`, deterministically for `seed`.

    `family` (a name in lmmr1.models.families.FAMILIES) wins over `kind` (vl = qwen2_5_vl, text = qwen2)."""
    if family is None:
        if kind not in KINDS:
            raise ValueError(f"--kind must be 'vl' or 'text', got {kind!r}")
        family = KINDS[kind]
    adapter = family_named(family)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    adapter.build_tiny(out, seed)
    return out
