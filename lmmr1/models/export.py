"""Export a checkpoint's policy as a standard Hugging Face folder (LoRA merged) that transformers and vLLM load.

    lmmr1 model export runs/smoke/checkpoints/last.ckpt exported/

The checkpoint is the single file Lightning writes, or the folder DeepSpeed writes under ZeRO (`last.ckpt/` holding a
`latest` file and `checkpoint/*_model_states.pt` + `*_optim_states.pt` shards); its shards are merged into full fp32
weights by DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer

from lmmr1.modules.policy import LoraSettings, Policy

_COPIED = ("preprocessor_config.json", "chat_template.jinja", "chat_template.json")


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Load the policy weights of a checkpoint written by `lmmr1 fit`; save them with the tokenizer and processor."""
    settings, state_dict = load_checkpoint(checkpoint)
    lora = settings.get("lora")
    policy = Policy(settings["path"], dtype=settings["dtype"], freeze=settings.get("freeze"),
                    lora=None if lora is None else LoraSettings(**lora))
    weights = {k.removeprefix("policy."): v for k, v in state_dict.items() if k.startswith("policy.")}
    policy.load_state_dict(weights, strict=True)
    return save_hf_folder(policy.merged_model(), settings["path"], out)


def load_checkpoint(checkpoint: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(policy settings, full LightningModule state dict) of a checkpoint file or DeepSpeed checkpoint folder."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        state = _load_deepspeed_folder(checkpoint)
    elif checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    else:
        raise ValueError(f"{checkpoint}: no such checkpoint file or DeepSpeed checkpoint folder")
    settings = state.get("policy_settings")
    if settings is None:
        raise ValueError(f"{checkpoint}: not an lmmr1 checkpoint (no 'policy_settings' entry)")
    return settings, state["state_dict"]


def _load_deepspeed_folder(folder: Path) -> dict[str, Any]:
    """Lightning's client state (policy_settings, ...) from the rank-0 model-states file, plus `state_dict`: the
    shards merged by DeepSpeed. Missing pieces are named up front instead of surfacing as DeepSpeed's own errors."""
    latest = folder / "latest"
    if not latest.is_file():
        raise ValueError(f"{folder}: not a DeepSpeed checkpoint folder (no 'latest' file naming its tag folder)")
    tag_dir = folder / latest.read_text().strip()
    if not tag_dir.is_dir():
        raise ValueError(f"{folder}: DeepSpeed checkpoint folder whose 'latest' names a missing folder {tag_dir}")
    # ZeRO-1/2 write mp_rank_00_model_states.pt, ZeRO-3 one zero_pp_rank_<r>_mp_rank_00_model_states.pt per rank
    candidates = [tag_dir / "mp_rank_00_model_states.pt", tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    model_states = next((p for p in candidates if p.is_file()), None)
    if model_states is None:
        raise ValueError(f"{tag_dir}: no mp_rank_00_model_states.pt or zero_pp_rank_0_mp_rank_00_model_states.pt "
                         f"(an incomplete DeepSpeed checkpoint?)")
    if not any(tag_dir.glob("*_optim_states.pt")):
        raise ValueError(f"{tag_dir}: no *_optim_states.pt files; DeepSpeed rebuilds the full weights of a ZeRO "
                         f"checkpoint from its optimizer shards")
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as err:
        raise ValueError(f"{folder}: a DeepSpeed checkpoint folder; reading it needs the deepspeed package") from err

    state = torch.load(model_states, map_location="cpu", weights_only=False, mmap=True)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints progress; keep stdout for the CLI's answer
        merged = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag_dir.name)
    # as Lightning's convert_zero_checkpoint_to_fp32_state_dict: old checkpoints carry the wrapper's prefix
    state["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in merged.items()}
    return state


def save_hf_folder(model: nn.Module, source: str | Path, out: str | Path,
                   state_dict: dict[str, Tensor] | None = None) -> Path:
    """Write `model` (weights: `state_dict` if given, e.g. gathered from ZeRO-3 shards) as a Hugging Face folder with
    the tokenizer and processor files of the model folder `source`.

    The folder is written beside `out` and renamed into place, so `out` never holds a half-written model; an earlier
    model folder at `out` is replaced, any other non-empty folder is refused (it may hold the user's files)."""
    source, out = Path(source), Path(out)
    target = out.resolve()  # siblings need a real name ("." has none)
    if target.is_dir() and any(target.iterdir()) and not (target / "config.json").is_file():
        raise ValueError(f"{out}: exists and is not a model folder (no config.json); not replacing it")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial, previous = (target.with_name(f".{target.name}.{suffix}") for suffix in ("partial", "previous"))
    shutil.rmtree(partial, ignore_errors=True)  # left by a crash during an earlier write
    model.save_pretrained(partial, state_dict=state_dict)
    AutoTokenizer.from_pretrained(source).save_pretrained(partial)
    for name in _COPIED:
        if (source / name).exists():
            shutil.copy(source / name, partial / name)
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        target.rename(previous)
    partial.rename(target)
    shutil.rmtree(previous, ignore_errors=True)
    return out
