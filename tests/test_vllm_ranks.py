"""vLLM on many ranks, without vLLM: the `vllm.LLM` arguments each training process passes (external_launcher, seeds
per engine, tensor_parallel_size against the world size), and a bound engine on a simulated rank 1 of 2 through a
stand-in `vllm` module (what it starts, and how the ranks of one tensor-parallel engine pool their prompts)."""

from __future__ import annotations

import gc
import os
import sys
import types
import weakref
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from lmmr1.data.processor import PromptProcessor
from lmmr1.rollout.base import SamplingConfig
from lmmr1.rollout.vllm import VLLMEngine, engine_args

ROWS = [{"message": [{"role": "user", "content": text}], "answer": "1", "_where": f"mem:{i}"}
        for i, text in enumerate(["What is 4 + 7?", "how many apples are left"])]


def all_ranks(world: int, **options) -> list[dict]:
    """The arguments every rank of `world` would pass to vllm.LLM."""
    settings = VLLMEngine(seed=10, gpu_memory_utilization=0.4, **options).options
    return [engine_args(settings, rank, world) for rank in range(world)]


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("tp", [1, 2])
def test_each_rank_gets_external_launcher_and_a_seed_per_engine(world, tp):
    args = all_ranks(world, tensor_parallel_size=tp)
    for rank, a in enumerate(args):
        assert a["tensor_parallel_size"] == tp and a["gpu_memory_utilization"] == 0.4  # the user's args pass through
        assert None not in a.values()
        if world == 1:  # one process: vLLM's own executor, the user's seed
            assert "distributed_executor_backend" not in a and a["seed"] == 10
        else:
            assert a["distributed_executor_backend"] == "external_launcher"
            assert a["seed"] == 10 + rank // tp  # engine index: ranks 0..tp-1 are engine 0, the next tp engine 1, ...
    if world > 1:
        engines = [args[first : first + tp] for first in range(0, world, tp)]
        assert all(len({a["seed"] for a in engine}) == 1 for engine in engines)  # one seed within a TP group
        assert len({engine[0]["seed"] for engine in engines}) == world // tp  # different across groups


def test_a_user_set_executor_is_kept():
    for world in (1, 2, 4):
        for a in all_ranks(world, distributed_executor_backend="mp"):
            assert a["distributed_executor_backend"] == "mp" and a["seed"] == 10
    # asking for external_launcher explicitly gets the same per-engine seeds as the automatic choice
    assert [a["seed"] for a in all_ranks(4, distributed_executor_backend="external_launcher",
                                         tensor_parallel_size=2)] == [10, 10, 11, 11]


def test_tensor_parallel_size_must_divide_the_world():
    with pytest.raises(ValueError, match=r"--model\.engine\.tensor_parallel_size=4 must divide the number of "
                                         r"training processes \(6\)"):
        all_ranks(6, tensor_parallel_size=4)
    with pytest.raises(ValueError, match=r"--model\.engine\.tensor_parallel_size=2 x pipeline_parallel_size 2 must "
                                         r"divide the number of training processes \(2\)"):
        all_ranks(2, tensor_parallel_size=2, engine_kwargs={"pipeline_parallel_size": 2})
    assert len(all_ranks(6, tensor_parallel_size=3)) == 6
    assert all_ranks(1, tensor_parallel_size=4)[0]["tensor_parallel_size"] == 4  # one process: vLLM spawns its own


# ---- binding on a simulated rank 1 of 2, with a stand-in vllm ------------------------------------------------------
class FakeLLM:
    """Records its arguments; `generate` answers each request with its own first prompt token and records them."""

    created: list[dict] = []
    live: weakref.WeakSet = weakref.WeakSet()  # instances not yet garbage-collected
    live_at_start: list[int] = []  # how many other engines were alive while each one started

    def __init__(self, **kwargs) -> None:
        gc.collect()
        FakeLLM.created.append(kwargs)
        FakeLLM.live_at_start.append(len(FakeLLM.live))
        FakeLLM.live.add(self)
        self.requests: list[dict] = []

    def generate(self, requests, params, use_tqdm=False):
        assert len(requests) == len(params)
        self.requests.extend(requests)
        return [SimpleNamespace(prompt_token_ids=r["prompt_token_ids"], outputs=[
                    SimpleNamespace(token_ids=[r["prompt_token_ids"][0]],
                                    logprobs=[{r["prompt_token_ids"][0]: SimpleNamespace(logprob=-p.kwargs["seed"])}],
                                    finish_reason="length")]) for r, p in zip(requests, params)]


class FakeSamplingParams:
    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs


@pytest.fixture
def rank_1_of_2(monkeypatch):
    """A stand-in vllm module, torch.distributed reporting rank 1 of 2, and none of the launcher variables set."""
    FakeLLM.created, FakeLLM.live_at_start = [], []
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    for name in ("RANK", "LOCAL_RANK", "SLURM_LOCALID", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.setenv(name, "")  # recorded, so the test's changes are undone afterwards
        monkeypatch.delenv(name)
    groups: list[tuple[list[int], str]] = []
    monkeypatch.setattr(dist, "new_group", lambda ranks, backend=None: groups.append((ranks, backend)) or
                        f"group{ranks}")
    return groups


def bind(path, **options) -> tuple[VLLMEngine, PromptProcessor]:
    processor = PromptProcessor(path)
    engine = VLLMEngine(seed=5, gpu_memory_utilization=0.25, **options)
    engine.bind(SimpleNamespace(path=str(path)), processor.tokenizer)
    return engine, processor


def test_bind_on_rank_1_of_2_starts_an_external_launcher_engine(rank_1_of_2, tiny_text_path):
    engine, processor = bind(tiny_text_path)
    assert len(FakeLLM.created) == 1
    kwargs = FakeLLM.created[0]
    assert kwargs["model"] == str(tiny_text_path) and kwargs["logprobs_mode"] == "processed_logprobs"
    assert kwargs["distributed_executor_backend"] == "external_launcher"
    assert kwargs["seed"] == 6 and kwargs["tensor_parallel_size"] == 1 and kwargs["gpu_memory_utilization"] == 0.25
    # vLLM's external launcher reads RANK and LOCAL_RANK; Lightning sets neither RANK nor (here) LOCAL_RANK
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]) == ("1", "1",
                                                                                                            "0")
    assert rank_1_of_2 == [] and engine.engine_group is None  # one rank per engine: nothing to pool
    out = engine.generate(processor(ROWS), SamplingConfig(n=1, max_new_tokens=4), seed=3)
    assert len(out) == 2 and len(engine.llm.requests) == 2


def test_a_user_set_executor_reaches_vllm_unchanged(rank_1_of_2, tiny_text_path):
    bind(tiny_text_path, distributed_executor_backend="mp")
    assert FakeLLM.created[0]["distributed_executor_backend"] == "mp" and FakeLLM.created[0]["seed"] == 5


def test_tensor_parallel_ranks_pool_their_prompts_and_keep_their_own_share(rank_1_of_2, tiny_text_path, monkeypatch):
    """TP 2 on 2 ranks: one engine; rank 1 sends rank 0's requests and its own to vLLM (identical on both ranks)
    and gets back the outputs of its own prompts, sampled with its own per-request seeds."""
    engine, processor = bind(tiny_text_path, tensor_parallel_size=2)
    assert rank_1_of_2 == [([0, 1], "gloo")] and engine.engine_group == "group[0, 1]"
    assert FakeLLM.created[0]["seed"] == 5  # rank 1 // 2 = engine 0: the same seed as rank 0
    ours = processor(ROWS)
    theirs = processor([{"message": [{"role": "user", "content": "rank zero asks something else entirely"}]}])
    sampling = SamplingConfig(n=1, max_new_tokens=4)
    rank0 = ([{"prompt_token_ids": ids[mask.bool()].tolist()} for ids, mask in zip(theirs.input_ids,
                                                                                   theirs.attention_mask)],
             [FakeSamplingParams(seed=99)])

    def all_gather_object(shares, obj, group=None):
        assert group == "group[0, 1]"
        shares[0], shares[1] = rank0, obj

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    out = engine.generate(ours, sampling, seed=3)  # raises if it got another rank's prompt back
    sent = [r["prompt_token_ids"] for r in engine.llm.requests]
    own = [ids[mask.bool()].tolist() for ids, mask in zip(ours.input_ids, ours.attention_mask)]
    assert sent == [rank0[0][0]["prompt_token_ids"], *own]
    assert [g[0].token_ids for g in out] == [[ids[0]] for ids in own]
    alone = [-engine._params(sampling, 3, i).kwargs["seed"] for i in range(2)]
    assert [g[0].logprobs for g in out] == [[lp] for lp in alone]  # this rank's seeds, not rank 0's


def test_bind_refuses_a_tensor_parallel_size_the_world_cannot_hold_before_starting_vllm(rank_1_of_2, tiny_text_path):
    with pytest.raises(ValueError, match=r"--model\.engine\.tensor_parallel_size=4 must divide .* \(2\)"):
        bind(tiny_text_path, tensor_parallel_size=4)
    assert FakeLLM.created == [] and rank_1_of_2 == []


def test_binding_again_reuses_the_engine_instead_of_starting_a_second_one(rank_1_of_2, tiny_text_path, tiny_vl_path):
    """Lightning calls setup (and so bind) for fit, then again for validate/test: a second vllm.LLM beside the first
    would hold a second copy of the weights and KV cache. The same model folder keeps its engine (and its process
    groups: new_group is a collective); another folder replaces it, the old one released before the new one starts."""
    engine, processor = bind(tiny_text_path, tensor_parallel_size=2)
    first = engine.llm
    engine.bind(SimpleNamespace(path=str(tiny_text_path)), processor.tokenizer)
    assert FakeLLM.live_at_start == [0] and engine.llm is first
    assert rank_1_of_2 == [([0, 1], "gloo")]
    del first
    engine.bind(SimpleNamespace(path=str(tiny_vl_path)), PromptProcessor(tiny_vl_path).tokenizer)
    gc.collect()
    assert [c["model"] for c in FakeLLM.created] == [str(tiny_text_path), str(tiny_vl_path)]
    assert FakeLLM.live_at_start == [0, 0] and list(FakeLLM.live) == [engine.llm]
