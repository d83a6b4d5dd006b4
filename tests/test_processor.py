"""Prompt processing: chat template, image-token expansion matching the vision features, clear errors."""

from __future__ import annotations

import pytest

from lmmr1.data.processor import PromptProcessor
from lmmr1.models.families.qwen_vl import IMAGE_PAD


def test_image_tokens_match_features_in_a_mixed_batch(tiny_vl_path, mixed_rows):
    proc = PromptProcessor(tiny_vl_path)
    batch = proc(mixed_rows)
    pad_id = proc.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    assert batch.input_ids.shape[0] == 4
    for ids, pixels, grid in zip(batch.input_ids, batch.pixel_values, batch.image_grid_thw):
        n_tokens = int((ids == pad_id).sum())
        if grid is None:
            assert n_tokens == 0 and pixels is None
        else:
            # one token per 2x2 merged patch; patches = t*h*w rows of pixel_values
            assert n_tokens == int(grid.prod()) // 4
            assert pixels.shape[0] == int(grid.prod())
    # left padding: every row ends with the assistant header, padding sits at the start
    assert bool((batch.attention_mask[:, -1] == 1).all())
    assert bool((batch.attention_mask[:, 0] == 0).any())


def test_text_that_contains_the_image_token_is_rejected_with_the_row(tiny_vl_path):
    row = {"message": [{"role": "user", "content": f"sneaky {IMAGE_PAD} text"}], "answer": "1", "_where": "f.jsonl:7"}
    with pytest.raises(ValueError, match=r"f\.jsonl:7: message: 1 image tokens for 0 features"):
        PromptProcessor(tiny_vl_path)([row])


def test_image_row_on_a_text_only_model_is_a_clear_error(tiny_text_path, mixed_rows):
    with pytest.raises(ValueError, match=r"mem:1: message: .*no image processor"):
        PromptProcessor(tiny_text_path)(mixed_rows[:1])


def test_pixel_bounds_are_honoured(tiny_vl_path, mixed_rows):
    small = PromptProcessor(tiny_vl_path, max_pixels=28 * 28 * 4)(mixed_rows[1:2])
    large = PromptProcessor(tiny_vl_path)(mixed_rows[1:2])
    assert int(small.image_grid_thw[0].prod()) < int(large.image_grid_thw[0].prod())
    _, h, w = small.image_grid_thw[0][0].tolist()
    assert h * 14 * w * 14 <= 28 * 28 * 4  # resized (aspect kept, 112x84 -> 56x28) to fit max_pixels


def test_system_prompt_and_few_shot_turns_are_applied(tiny_vl_path):
    row = {"message": [{"role": "system", "content": "old system"}, {"role": "user", "content": "What is 1 + 1?"}],
           "answer": "2"}
    shots = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "<answer>7</answer>"}]
    text = PromptProcessor(tiny_vl_path, system_prompt="new system", few_shot=shots).prompt_text(row)
    assert "old system" not in text
    assert text.index("new system") < text.index("What is 3 + 4?") < text.index("<answer>7</answer>") < text.index(
        "What is 1 + 1?")
    assert PromptProcessor(tiny_vl_path).prompt_text(row).count("<|im_start|>") == 3  # system, user, assistant header
