"""The embedded mini model: SmolLM2-135M-Instruct converted into a Qwen2.5-VL must compute what the GGUF Llama does.

The reference is the GGUF file loaded by transformers as a `LlamaForCausalLM` (an independent code path: Llama
attention, 1-D RoPE, no vision). The conversion-equivalence tests load the GGUF (~15-60 s on 2 shared cores) and are
marked slow; the folder bookkeeping tests (cache location, completeness, refusing foreign folders) run in a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from lmmr1.models import mini

PROMPTS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}],
    [{"role": "user", "content": "Write one sentence about cats, then count to five."}],
]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


@pytest.fixture(scope="module")
def reference():
    return mini.load_gguf()


@pytest.fixture(scope="module")
def mini_dir(reference, tmp_path_factory: pytest.TempPathFactory) -> Path:
    llama, tokenizer = reference
    return mini.save_mini(llama, tokenizer, tmp_path_factory.mktemp("mini") / "smollm2-vl", seed=0)


@pytest.fixture(scope="module")
def converted(mini_dir):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(mini_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(mini_dir)


@pytest.mark.slow
def test_folder_is_a_qwen2_5_vl_with_vision_tokens(reference, mini_dir, converted):
    model, tokenizer = converted
    _, gguf_tokenizer = reference
    assert len(gguf_tokenizer) == 49152  # save_mini must not add tokens to the caller's tokenizer
    assert model.config.model_type == "qwen2_5_vl" and mini.is_complete(mini_dir)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    assert ids == list(range(49152, 49156)) and len(tokenizer) == model.config.text_config.vocab_size == 49156
    assert tokenizer("a<|image_pad|>b").input_ids == [gguf_tokenizer("a").input_ids[0], ids[2],
                                                      gguf_tokenizer("b").input_ids[0]]
    assert (model.config.image_token_id, model.config.video_token_id) == (ids[2], ids[3])
    # Qwen's default ids (151643/151645) are outside this vocabulary; SmolLM2's are <|im_start|>/<|im_end|>/<|im_end|>
    im_end = gguf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for cfg in (model.config.text_config, model.generation_config):
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, im_end, im_end)
    assert sum(model.config.text_config.rope_parameters["mrope_section"]) == 64 // 2  # head_dim / 2
    vision = sum(p.numel() for p in model.model.visual.parameters())
    assert 0.5e6 < vision < 2e6, vision  # depth 2, width 128: about 1 M parameters
    processor = json.loads((mini_dir / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 4 * 28 * 28, "longest_edge": 224 * 224}
    assert tokenizer.padding_side == "left"
    for layer in model.model.language_model.layers:
        assert not layer.self_attn.q_proj.bias.any() and not layer.self_attn.v_proj.bias.any()


@pytest.mark.slow
def test_logits_and_greedy_match_gguf_llama(reference, converted):
    llama, gguf_tokenizer = reference
    model, tokenizer = converted
    for messages in PROMPTS:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # string prompts render exactly as SmolLM2's own template (including its default system prompt)
        assert text == gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        assert ids.tolist() == gguf_tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.tolist()
        with torch.no_grad():
            want = llama.generate(ids, max_new_tokens=16, do_sample=False)
            got = model.generate(input_ids=ids, max_new_tokens=16, do_sample=False)
            assert got.tolist() == want.tolist(), tokenizer.decode(got[0])
            full = want  # prompt + continuation: compares logits at generated positions too
            ref_logits = llama(full).logits
            logits = model(input_ids=full).logits
        assert logits.shape[-1] == ref_logits.shape[-1] + 4
        assert (logits[..., : ref_logits.shape[-1]] - ref_logits).abs().max().item() <= 1e-3
        # the added vision-token rows never win: their probability stays negligible
        assert logits.softmax(-1)[..., -4:].max().item() < 1e-4


@pytest.mark.slow
def test_image_prompt_runs_and_reaches_the_language_model(mini_dir, converted):
    from lmmr1.data.processor import PromptProcessor, concat_images

    model, _ = converted
    processor = PromptProcessor(mini_dir, max_pixels=224 * 224)
    rows = []
    for i, colour in enumerate([(255, 255, 255), (20, 40, 200)]):
        image = Image.new("RGB", (112, 112), colour)
        ImageDraw.Draw(image).text((40, 50), "42", fill=(0, 0, 0))
        path = mini_dir.parent / f"img{i}.png"
        image.save(path)
        rows.append({"message": [{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                              {"type": "text", "text": "What number is shown?"}]}],
                     "answer": "42", "_where": f"mem:{i + 1}"})
    last = []
    for row in rows:
        batch = processor([row])
        pixels, grid = concat_images(batch.pixel_values, batch.image_grid_thw)
        assert grid.tolist() == [[1, 8, 8]]  # 112 px / 14 = 8 patches a side, merged 2x2 -> 16 image tokens
        assert int((batch.input_ids == model.config.image_token_id).sum()) == 16
        with torch.no_grad():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels,
                        image_grid_thw=grid)
            generated = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                       pixel_values=pixels, image_grid_thw=grid, max_new_tokens=4, do_sample=False)
        assert torch.isfinite(out.logits).all() and generated.shape[1] > batch.input_ids.shape[1]
        last.append(out.logits[0, -1])
    assert not torch.allclose(last[0], last[1])  # different images give different predictions


@pytest.mark.slow
def test_cli_prepare_mini_is_deterministic(mini_dir, tmp_path):
    from safetensors.torch import load_file

    from lmmr1.models.cli import main

    out = tmp_path / "cli-mini"
    assert main(["prepare-mini", "--out", str(out)]) == 0
    assert mini.is_complete(out)
    a, b = load_file(out / "model.safetensors"), load_file(mini_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left behind


def test_default_dir_follows_lmmr1_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LMMR1_HOME", str(tmp_path))
    assert mini.default_mini_dir() == tmp_path / "models" / "smollm2-135m-vl"
    monkeypatch.delenv("LMMR1_HOME")
    assert mini.default_mini_dir() == Path.home() / ".cache" / "lmmr1" / "models" / "smollm2-135m-vl"


def _fake_complete(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in mini._REQUIRED:
        (folder / name).write_text("{}")
    (folder / mini.MARKER).write_text(json.dumps({"format_version": mini._FORMAT_VERSION}))
    return folder


def test_ensure_mini_reuses_a_complete_folder_and_rebuilds_an_incomplete_one(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(mini, "prepare_mini", lambda out, **kw: calls.append(Path(out)) or Path(out))
    done = _fake_complete(tmp_path / "done")
    assert mini.ensure_mini(done) == done and calls == []
    (done / "model.safetensors").unlink()  # e.g. a user deleted the weights
    assert not mini.is_complete(done)
    mini.ensure_mini(done)
    assert calls == [done]
    partial = _fake_complete(tmp_path / "partial")
    (partial / mini.MARKER).unlink()  # the marker is written last: without it the folder is unfinished
    assert not mini.is_complete(partial)
    monkeypatch.setenv("LMMR1_HOME", str(tmp_path / "home"))
    mini.ensure_mini()
    assert calls[-1] == tmp_path / "home" / "models" / "smollm2-135m-vl"


def test_prepare_mini_refuses_a_foreign_folder_before_loading(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a mini model folder"):
        mini.prepare_mini(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_replace_swaps_in_the_new_folder(tmp_path):
    old = _fake_complete(tmp_path / "out")
    (old / "stale.txt").write_text("old")
    new = _fake_complete(tmp_path / ".out.partial-1")
    mini._replace(new, old)
    assert mini.is_complete(old) and not (old / "stale.txt").exists() and not new.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_mrope_section_sums_to_half_head_dim():
    for head_dim in (32, 64, 128):
        section = mini.mrope_section(head_dim)
        assert sum(section) == head_dim // 2 and section[1] == section[2]
    assert mini.mrope_section(128) == [16, 24, 24]  # Qwen2.5-VL's own split for head_dim 128
