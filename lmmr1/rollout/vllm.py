"""Rollouts with vLLM colocated with training: its own copy of the weights, refreshed in place after each update.

    engine: {class_path: lmmr1.rollout.vllm.VLLMEngine, init_args: {gpu_memory_utilization: 0.5,
             enable_sleep_mode: true}}

`vllm` is imported when the engine is bound to the policy, never at import time, so lmmr1 works without it. Weights
travel in memory through `collective_rpc` into the worker's `reload_weights` (one path for CPU and GPU; on CPU set
VLLM_ENABLE_V1_MULTIPROCESSING=0 so the engine core is in-process). Under multi-GPU training, create the engine with
`distributed_executor_backend: external_launcher` so it shares the ranks Lightning started.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from lmmr1.data.processor import PromptBatch, load_image
from lmmr1.rollout.base import Completion, RolloutEngine, SamplingConfig
from lmmr1.rollout.hf import VISION_TOKENS

_INSTALL = ("the vLLM engine needs vllm: `pip install -e .[gpu]` on a CUDA machine, or the CPU build in a separate "
            "venv (see `make test-vllm` in the Makefile)")


class VLLMEngine(RolloutEngine):
    """`vllm.LLM` generation; `update_weights` streams new policy weights in chunks."""

    def __init__(self, gpu_memory_utilization: float = 0.3, tensor_parallel_size: int = 1,
                 enable_sleep_mode: bool = False, max_model_len: int | None = None, dtype: str = "auto",
                 enforce_eager: bool = False, distributed_executor_backend: str | None = None) -> None:
        """
        Args:
            gpu_memory_utilization: share of accelerator memory vLLM may take (weights + KV cache).
            tensor_parallel_size: GPUs per engine.
            enable_sleep_mode: release weights and KV cache while the trainer runs (`sleep`/`wake`).
            max_model_len: longest prompt + response (default: the model's).
            dtype: vLLM weight dtype ("auto" = the checkpoint's).
            enforce_eager: skip CUDA graphs (faster start, slower decode).
            distributed_executor_backend: "external_launcher" inside Lightning-launched ranks.
        """
        self.options = dict(gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                            enable_sleep_mode=enable_sleep_mode, max_model_len=max_model_len, dtype=dtype,
                            enforce_eager=enforce_eager, distributed_executor_backend=distributed_executor_backend)
        self.llm = None

    def bind(self, policy, tokenizer) -> None:  # noqa: ANN001
        super().bind(policy, tokenizer)
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError(_INSTALL) from error
        options = {k: v for k, v in self.options.items() if v is not None}
        # processed log-probs = after temperature, the distribution the trainer's ratio is computed against
        self.llm = LLM(model=policy.path, logprobs_mode="processed_logprobs", **options)
        self._banned = {i: -100.0 for i in (tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS)
                        if i is not None and i != tokenizer.unk_token_id}

    def _request(self, prompts: PromptBatch, i: int) -> dict[str, Any]:
        ids = prompts.input_ids[i][prompts.attention_mask[i].bool()].tolist()
        images = [item["image"] for m in prompts.rows[i]["message"] if isinstance(m["content"], list)
                  for item in m["content"] if item.get("type") == "image" or "image" in item]
        if not images:
            return {"prompt_token_ids": ids}
        # vLLM expands image placeholders itself: give it the text with one placeholder per image
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        pad = "<|image_pad|>"
        while pad * 2 in text:
            text = text.replace(pad * 2, pad)
        return {"prompt": text, "multi_modal_data": {"image": [load_image(ref) for ref in images]}}

    def generate(self, prompts: PromptBatch, sampling: SamplingConfig, *, seed: int = 0) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k if sampling.top_k > 0 else -1,
                                 max_tokens=sampling.max_new_tokens, stop=list(sampling.stop) or None,
                                 seed=seed * 100_003 + i, logprobs=0, logit_bias=self._banned or None)
                  for i in range(len(prompts))]
        outputs = self.llm.generate([self._request(prompts, i) for i in range(len(prompts))], params, use_tqdm=False)
        return [[Completion(list(o.token_ids), o.text, [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)],
                            "stop" if o.finish_reason == "stop" else "length") for o in out.outputs]
                for out in outputs]

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Reload HF-named weights in place through the worker's `reload_weights` (vLLM maps the names and re-runs
        its post-load processing, which plain `load_weights` cannot do once the model was processed, e.g. on CPU)."""
        weights = [(name, tensor.detach()) for name, tensor in named_tensors]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights

    def sleep(self) -> None:
        if self.options["enable_sleep_mode"]:
            self.llm.sleep(level=1)

    def wake(self) -> None:
        if self.options["enable_sleep_mode"]:
            self.llm.wake_up()
