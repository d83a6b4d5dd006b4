"""Is vLLM worth it? Generation tokens/s of the HF engine vs the vLLM engine on the same model, prompts and sampling,
printed as a ratio, plus the time of one in-memory weight sync relative to one vLLM rollout, in one run.

    .venv-vllm/bin/python benchmarks/rollout.py                  # the embedded SmolLM2-135M (as a text model)
    .venv-vllm/bin/python benchmarks/rollout.py --model tiny     # the tiny random model (overhead-dominated)
    .venv-vllm/bin/python benchmarks/rollout.py --model DIR      # any local model folder vLLM can load here

On CPU vLLM cannot load Qwen2.5-VL (its image code needs torchvision), so "mini" runs the mini LMM's language model
as a Qwen2 text model: for text tokens the two compute the same function (equal mrope positions), checked below.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PROMPTS = ["What is 17 + 25? Think step by step.", "A box holds 12 apples. How many apples are in 7 boxes?",
           "Name three shapes with straight sides.", "Explain what a prime number is.",
           "If a train leaves at 3 pm and rides 2 hours, when does it arrive?", "What is the area of a 4 by 6 box?",
           "Count from one to ten in words.", "Why is the sky blue? Answer briefly."]


def mini_text_model(out: Path) -> Path:
    """The mini LMM's language model saved as a Qwen2ForCausalLM folder (same weights, plain RoPE)."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from lmmr1.models.mini import ensure_mini

    vl_dir = ensure_mini()
    vl = AutoModelForImageTextToText.from_pretrained(vl_dir, dtype=torch.float32)
    tc = vl.config.text_config
    config = Qwen2Config(vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
                         num_hidden_layers=tc.num_hidden_layers, num_attention_heads=tc.num_attention_heads,
                         num_key_value_heads=tc.num_key_value_heads, max_position_embeddings=tc.max_position_embeddings,
                         rms_norm_eps=tc.rms_norm_eps, rope_theta=tc.rope_parameters["rope_theta"],
                         tie_word_embeddings=vl.config.tie_word_embeddings, bos_token_id=tc.bos_token_id,
                         eos_token_id=tc.eos_token_id, pad_token_id=tc.pad_token_id)
    text = Qwen2ForCausalLM(config)
    prefix = "model.language_model."
    state = {("model." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in vl.state_dict().items()
             if not k.startswith("model.visual.")}
    text.load_state_dict(state, strict=True)
    ids = torch.tensor([[1, 520, 314, 1630, 30, 2]])
    with torch.no_grad():
        gap = (text(ids).logits - vl(input_ids=ids).logits).abs().max().item()
    assert gap < 1e-3, f"text-only copy of the mini LMM differs by {gap}"
    text.save_pretrained(out)
    del vl, text
    AutoTokenizer.from_pretrained(vl_dir).save_pretrained(out)
    return out


def timed(fn):  # noqa: ANN001, ANN201
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini", help="mini | tiny | a model folder")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()

    from lmmr1.callbacks.weight_sync import policy_weights
    from lmmr1.data.processor import PromptProcessor
    from lmmr1.models.tiny import build_tiny
    from lmmr1.modules.policy import Policy
    from lmmr1.rollout.base import SamplingConfig
    from lmmr1.rollout.hf import HFEngine
    from lmmr1.rollout.vllm import VLLMEngine

    root = Path(tempfile.mkdtemp())
    if args.model == "mini":
        path = mini_text_model(root / "mini-text")
    elif args.model == "tiny":
        path = build_tiny(root / "tiny-text", kind="text", seed=0)
    else:
        path = Path(args.model)
    policy, processor = Policy(str(path)), PromptProcessor(path)
    batch = processor([{"message": [{"role": "user", "content": p}], "answer": ""} for p in PROMPTS])
    sampling = SamplingConfig(n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    warmup = SamplingConfig(n=1, max_new_tokens=4)

    hf = HFEngine()
    vllm = VLLMEngine(gpu_memory_utilization=0.3, max_model_len=1024, dtype="float32",
                      kv_cache_memory_bytes=None if torch.cuda.is_available() else 512 * 2**20)
    hf.bind(policy, processor.tokenizer)
    _, start_s = timed(lambda: vllm.bind(policy, processor.tokenizer))
    results = {}
    for name, engine in (("hf", hf), ("vllm", vllm)):
        engine.generate(batch, warmup, seed=0)
        groups, seconds = timed(lambda engine=engine: engine.generate(batch, sampling, seed=1))
        tokens = sum(len(c.token_ids) for g in groups for c in g)
        results[name] = (tokens, seconds)
        print(f"{name:5s} {tokens:6d} tokens in {seconds:7.2f} s = {tokens / seconds:8.1f} tokens/s")
    (hf_tokens, hf_s), (v_tokens, v_s) = results["hf"], results["vllm"]
    print(f"vLLM / HF tokens/s: {(v_tokens / v_s) / (hf_tokens / hf_s):.2f}x  ({len(PROMPTS)} prompts x n={args.n}, "
          f"max_new_tokens={args.max_new_tokens}, temperature={args.temperature}, model {args.model})")

    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    _, sync_s = timed(lambda: vllm.update_weights(policy_weights(policy)))
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"weight sync ({n_params / 1e6:.1f} M parameters, in memory): {sync_s:.3f} s = {sync_s / v_s:.3f} of one "
          f"vLLM rollout ({v_s:.2f} s); vLLM start-up {start_s:.1f} s")


if __name__ == "__main__":
    main()
