"""Export a checkpoint's policy as a standard Hugging Face folder (LoRA merged) that transformers and vLLM load.

    lmmr1 model export runs/smoke/checkpoints/last.ckpt exported/
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer

from lmmr1.modules.policy import LoraSettings, Policy

_COPIED = ("preprocessor_config.json", "chat_template.jinja", "chat_template.json")


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Load the policy weights of a checkpoint written by `lmmr1 fit`; save them with the tokenizer and processor."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_file():
        raise ValueError(f"{checkpoint}: no such checkpoint file")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    settings = state.get("policy_settings")
    if settings is None:
        raise ValueError(f"{checkpoint}: not an lmmr1 checkpoint (no 'policy_settings' entry)")
    lora = settings.get("lora")
    policy = Policy(settings["path"], dtype=settings["dtype"], freeze=settings.get("freeze"),
                    lora=None if lora is None else LoraSettings(**lora))
    weights = {k.removeprefix("policy."): v for k, v in state["state_dict"].items() if k.startswith("policy.")}
    policy.load_state_dict(weights, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    policy.merged_model().save_pretrained(out)
    AutoTokenizer.from_pretrained(settings["path"]).save_pretrained(out)
    for name in _COPIED:
        if (Path(settings["path"]) / name).exists():
            shutil.copy(Path(settings["path"]) / name, out / name)
    return out
