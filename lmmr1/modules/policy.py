"""The trained model: a Hugging Face causal LM or image-text-to-text model plus what RL needs from it.

`Policy.logprobs` returns per-token log-probabilities and entropy of the response tokens given prompt + images; the
same class serves as the frozen reference model.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from lmmr1.distributed.sequence_parallel import assemble, sequence_parallel, use_sequence_parallel_attention
from lmmr1.models.families import family_of
from lmmr1.models.recipe import ModelRecipe
from lmmr1.modules.packing import response_hidden_states

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_hf_model(path: str, dtype: str, attn_implementation: str = "sdpa", flag: str = "--model.policy") -> nn.Module:
    """Load a local model folder with the Auto class its config calls for (image-text-to-text or causal LM)."""
    if dtype not in _DTYPES:
        raise ValueError(f"{flag}.dtype: unknown {dtype!r}; choose from {sorted(_DTYPES)}")
    if not Path(path).is_dir():
        raise ValueError(f"{flag}.path: {path!r} is not a folder (run `lmmr1 model tiny --out {path}`?)")
    config = AutoConfig.from_pretrained(path)
    model_class = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    return model_class.from_pretrained(path, dtype=_DTYPES[dtype], attn_implementation=attn_implementation)


VISION = "vision"
"""The freeze alias for the model family's vision tower (and projector): its `vision_prefixes`."""


def apply_freeze(model: nn.Module, prefixes: list[str], flag: str = "--model.policy") -> None:
    """Turn off gradients for parameters whose names match `prefixes`; an unmatched prefix is a config error.

    `vision` stands for the family's image-side modules (Qwen-VL `visual.`, Gemma 3 / LLaVA `vision_tower.` and
    `multi_modal_projector.`)."""
    prefixes = resolve_freeze(model, prefixes, flag)
    if prefixes and not any(_matches(n, prefixes) for n, _ in model.named_parameters()):
        raise ValueError(f"{flag}.freeze: {prefixes} matches no parameter")
    for name, param in model.named_parameters():
        param.requires_grad_(not _matches(name, prefixes))


def resolve_freeze(model: nn.Module, prefixes: list[str], flag: str = "--model.policy") -> list[str]:
    """`prefixes` with the `vision` alias replaced by the model family's vision prefixes."""
    if VISION not in prefixes:
        return list(prefixes)
    vision = list(family_of(model.config).vision_prefixes)
    if not vision:
        raise ValueError(f"{flag}.freeze: {VISION!r} names the vision tower, but {model.config.model_type!r} is a "
                         f"text-only model")
    return [p for p in prefixes if p != VISION] + vision


def _matches(name: str, prefixes: list[str]) -> bool:
    """True if a dotted part of `name` starts with one of `prefixes` ("visual." matches "model.visual.x")."""
    dotted = "." + name
    return any(("." + prefix) in dotted for prefix in prefixes)


def enable_sequence_parallel(backbone: nn.Module, size: int, packing: bool,
                             flag: str = "--model.policy.init_args") -> None:
    """Refuse what sequence parallelism cannot split, then route the decoder's attention (of `backbone`, the model
    without its LM head) through the split-row attention, which falls back to the model's own kernel for ordinary
    forwards such as generation."""
    if size < 1:
        raise ValueError(f"{flag}.sequence_parallel_size: must be >= 1, got {size}")
    if not packing:
        raise ValueError(f"{flag}.sequence_parallel_size: {size} splits packed rows; set {flag}.packing true")
    family = family_of(backbone.config)
    family.check_sequence_parallel(f"{flag}.sequence_parallel_size")
    use_sequence_parallel_attention(family.decoder(backbone))


@dataclass
class LoraSettings:
    """LoRA adapters through peft (arXiv:2106.09685); only adapter weights train."""

    rank: int = 8
    """Adapter rank r."""
    alpha: int = 16
    """Scaling numerator: updates are scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module-name suffixes that get adapters (e.g. add gate_proj, up_proj, down_proj for the MLPs)."""


def check_share_prompts(packing: bool, attn_implementation: str, sequence_parallel_size: int,
                        flag: str = "--model.policy.init_args") -> None:
    """Shared prompts are a packed layout under an explicit block mask: SDPA only, no split rows."""
    if not packing:
        raise ValueError(f"{flag}.share_prompts: shares each prompt inside a packed row; set {flag}.packing true")
    if attn_implementation != "sdpa":
        raise ValueError(f"{flag}.share_prompts needs {flag}.attn_implementation sdpa (it attends through a block "
                         f"mask; {attn_implementation} takes none)")
    if sequence_parallel_size > 1:
        raise ValueError(f"{flag}.share_prompts does not combine with {flag}.sequence_parallel_size "
                         f"{sequence_parallel_size}; use one or the other")


def is_lora_layer(module: nn.Module) -> bool:
    """A peft LoRA layer: a `base_layer` plus adapters whose update `get_delta_weight` computes."""
    return hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")


def lora_merged_weight(layer: nn.Module) -> Tensor:
    """A new tensor holding the layer's base weight plus its active adapters' updates (B @ A * alpha / r,
    arXiv:2106.09685), summed in float32 and rounded to the base dtype once; the layer itself is not modified.

    Under ZeRO-3 call it inside a gather of the layer's parameters."""
    base = layer.get_base_layer().weight
    weight = base.detach().to(torch.float32, copy=True)
    if not layer.disable_adapters and not layer.merged:  # merged: the base weight already holds the update
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                weight += layer.get_delta_weight(adapter).float()  # float32 when peft keeps adapters in float32
    return weight.to(base.dtype)


class Policy(nn.Module):
    """A local Hugging Face model folder loaded for RL (no hub access)."""

    def __init__(
        self,
        path: str,
        dtype: str = "float32",
        freeze: list[str] | None = None,
        gradient_checkpointing: bool = False,
        attn_implementation: str = "sdpa",
        logprob_chunk: int = 256,
        lora: LoraSettings | None = None,
        packing: bool = False,
        make: ModelRecipe | None = None,
        sequence_parallel_size: int = 1,
        share_prompts: bool = False,
    ) -> None:
        """
        Args:
            path: local folder written by `save_pretrained` (or `lmmr1 model tiny|prepare-mini`).
            dtype: float32 | bfloat16 | float16 for the weights.
            freeze: parameter-name prefixes that get no gradient; "vision" = the family's vision tower (e.g.
                "visual." for Qwen-VL, "vision_tower." + "multi_modal_projector." for Gemma 3 / LLaVA).
            gradient_checkpointing: recompute activations in backward to save memory.
            attn_implementation: "sdpa" (CPU and GPU) or "flash_attention_2" (GPU, flash-attn installed).
            logprob_chunk: response positions per LM-head chunk; the (N, chunk, vocab) logits of one chunk are the
                only ones alive at a time (recomputed in backward). 0 = all positions at once.
            lora: train LoRA adapters instead of the full weights (None = full fine-tuning).
            packing: padding-free forwards: the real tokens of a micro-batch in one row, attention kept within each
                sequence (SDPA block-diagonal mask on CPU, flash-attn varlen on GPU). Same log-probs, less compute
                when lengths vary.
            make: how to build `path` locally if it holds no model yet (e.g. {kind: tiny-vl}); see models/recipe.py.
            sequence_parallel_size: k > 1 splits every packed row along the sequence over k ranks that share samples
                (ring attention; needs packing, k must divide the world size). The reference model and the critic
                follow it.
            share_prompts: with packing, a prompt's G samples carry it once: [prompt, response 1, ..., response G]
                under a block mask (SDPA only, no sequence parallelism). Same log-probs; fewer tokens in every
                training, reference and critic forward, most where prompts are long (few-shot, images).
        """
        super().__init__()
        path = os.path.expanduser(path)  # configs may point into ~/.cache/lmmr1
        if make is not None:
            make.build_if_missing(path)
        self.path, self.dtype, self.logprob_chunk, self.packing = path, dtype, logprob_chunk, packing
        self.attn_implementation = attn_implementation
        self.model = load_hf_model(path, dtype, attn_implementation).train()  # from_pretrained returns eval mode
        self.family = family_of(self.model.config)
        if packing:
            self.family.check_packing("--model.policy.packing")
        self.sequence_parallel_size = sequence_parallel_size
        self.share_prompts = share_prompts
        if share_prompts:
            check_share_prompts(packing, attn_implementation, sequence_parallel_size)
        if sequence_parallel_size > 1:
            enable_sequence_parallel(self.model.model, sequence_parallel_size, packing)
        self.freeze = list(freeze or [])
        apply_freeze(self.model, self.freeze)
        self.lora = lora
        if lora is not None:
            from peft import LoraConfig, get_peft_model

            # peft injects adapters into self.model in place; the wrapper is kept only for merging at export
            self._peft = [get_peft_model(self.model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                                                                lora_dropout=lora.dropout,
                                                                target_modules=lora.target_modules))]
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def settings(self) -> dict:
        """What rebuilds this policy (stored in checkpoints so `lmmr1 model export` can load them)."""
        return {"path": self.path, "dtype": self.dtype, "freeze": self.freeze,
                "lora": None if self.lora is None else asdict(self.lora)}

    def weights_for_sync(self) -> dict[str, Tensor]:
        """HF-named weights for a rollout engine that holds its own copy. LoRA: each adapted weight is merged into a
        new tensor (`lora_merged_weight`) and the model is never touched; merging in place and back would move the
        frozen base weights on every sync, since in bf16 (W + delta) - delta != W."""
        state = {k: v.detach() for k, v in self.model.state_dict().items()}
        if self.lora is None:
            return state
        merged = {f"{name}.weight": lora_merged_weight(module) for name, module in self.model.named_modules()
                  if is_lora_layer(module)}
        weights = {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
        return {**weights, **merged}

    def merged_model(self) -> nn.Module:
        """The HF model with LoRA adapters folded into the base weights (the model itself without LoRA), for export.

        It consumes the adapters: peft's `merge_and_unload` rewrites this policy's own model, which cannot train on
        afterwards. Nothing at training time may call it; rollout engines get `weights_for_sync` (copies)."""
        if self.lora is None:
            return self.model
        return self._peft[0].merge_and_unload()

    @property
    def is_multimodal(self) -> bool:
        return hasattr(self.model.config, "vision_config")

    def logprobs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_len: int,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        temperature: float = 1.0,
        entropy: bool = True,
        prompt_leaders: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Log-probabilities and entropy of the last `response_len` tokens.

        Args:
            input_ids: (N, P+T) left-padded prompt followed by the right-padded response.
            attention_mask: (N, P+T).
            response_len: T.
            pixel_values / image_grid_thw: flat image patches and grids of the images in these N rows.
            temperature: the sampling temperature; logits are divided by it so ratios match the sampler.
            entropy: False skips the entropy (None in its place): one full-vocabulary softmax pass less per chunk.
            prompt_leaders: (N,) rows sharing a prompt carry it once (`Experience.model_inputs(share_prompts=True)`).
        Returns:
            (logprobs, entropy), each (N, T), float32.
        """
        states = response_hidden_states(self.model.model, input_ids, attention_mask, response_len, pixel_values,
                                        image_grid_thw, packing=self.packing,
                                        sequence_parallel=self.sequence_parallel_size > 1,
                                        prompt_leaders=prompt_leaders)
        targets = input_ids[:, -response_len:]
        sp = sequence_parallel()
        if self.sequence_parallel_size == 1 or not sp.active:
            return self._head_stats(states, targets, temperature, self.logprob_chunk or response_len, entropy)
        # the LM head's vocabulary-wide logits are the largest activations: split them too. Each rank scores an equal
        # share of the response positions (the states are whole on every rank), and the shares are summed back.
        n, t = targets.shape
        lo, hi = sp.rank * n * t // sp.size, (sp.rank + 1) * n * t // sp.size
        mine = self._head_stats(states.reshape(n * t, -1)[lo:hi].unsqueeze(0), targets.reshape(1, n * t)[:, lo:hi],
                                temperature, n * (self.logprob_chunk or t), entropy)
        return tuple(None if x is None else assemble(x[0], lo, n * t, sp).view(n, t) for x in mine)

    def _head_stats(self, states: Tensor, targets: Tensor, temperature: float, chunk: int,
                    entropy: bool = True) -> tuple[Tensor, Tensor | None]:
        """(logprobs, entropy or None) of (N, T) targets from (N, T, H) states, `chunk` positions of each row at a
        time."""
        head = self.model.get_output_embeddings()
        pieces = []
        for start in range(0, targets.shape[1], chunk):
            # the head is called as a module, never read as `head.weight`: under ZeRO-3 the weight is an empty shard
            # outside the module's forward, which is what gathers it (and re-gathers it for the backward)
            args = (states[:, start : start + chunk].contiguous(), targets[:, start : start + chunk], head, temperature,
                    entropy)
            if torch.is_grad_enabled() and states.requires_grad:
                pieces.append(checkpoint(_token_stats, *args, use_reentrant=False))
            else:
                pieces.append(_token_stats(*args))
        return (torch.cat([p[0] for p in pieces], dim=1),
                torch.cat([p[1] for p in pieces], dim=1) if entropy else None)


def _token_stats(states: Tensor, targets: Tensor, head: nn.Module, temperature: float,
                 entropy: bool = True) -> tuple[Tensor, Tensor | None]:
    """Log-prob of each target token and (if `entropy`) the entropy of its distribution, from hidden states via the
    LM head, in float32 whatever the model's dtype.

    The chunk's logits are cast to float32 once and never normalised as a whole: log p = logit - logsumexp(logits),
    entropy = logsumexp - E_p[logit], so no full-vocabulary log-softmax (or its exp) is materialised beside them."""
    logits = head(states).float()  # (N, t, V)
    if temperature != 1.0:
        logits = logits / temperature
    normaliser = torch.logsumexp(logits, dim=-1)  # (N, t)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normaliser
    if not entropy:
        return logprobs, None
    return logprobs, normaliser - torch.linalg.vecdot(torch.softmax(logits, dim=-1), logits)
