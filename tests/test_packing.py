"""Padding-free packing: packed forwards give the padded forwards' log-probs, entropies, gradients and values."""

from __future__ import annotations

import pytest
import torch

from lmmr1.data.processor import PromptProcessor
from lmmr1.modules.critic import Critic
from lmmr1.modules.packing import pack_rows, rope_positions
from lmmr1.modules.policy import Policy


def _rollout_like(path, rows, response_lengths, seed=0):
    """Left-padded prompts + right-padded responses of different lengths, as `Experience.model_inputs` gives them."""
    batch = PromptProcessor(path)(rows)
    T = max(response_lengths)
    gen = torch.Generator().manual_seed(seed)
    response = torch.randint(20, 300, (len(rows), T), generator=gen)
    response_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, n in enumerate(response_lengths):
        response_mask[i, :n] = 1
        response[i, n:] = batch.input_ids[0, 0]  # padding: any id, masked out
    images = [p for p in batch.pixel_values if p is not None]
    return dict(input_ids=torch.cat([batch.input_ids, response], 1),
                attention_mask=torch.cat([batch.attention_mask, response_mask], 1), response_len=T,
                pixel_values=torch.cat(images) if images else None,
                image_grid_thw=torch.cat([g for g in batch.image_grid_thw if g is not None]) if images else None
                ), response_mask.float()


@pytest.mark.parametrize("kind", ["vl", "text"])
def test_packed_logprobs_entropy_and_gradients_equal_padded(kind, tiny_vl_path, tiny_text_path, mixed_rows):
    path = tiny_vl_path if kind == "vl" else tiny_text_path
    rows = mixed_rows if kind == "vl" else mixed_rows[2:] + [{**mixed_rows[3], "message": [
        {"role": "user", "content": "A much longer question, so that the prompts are padded differently?"}]}]
    torch.manual_seed(0)
    padded, packed = Policy(str(path)), Policy(str(path), packing=True)
    packed.load_state_dict(padded.state_dict())
    inputs, mask = _rollout_like(path, rows, [5, 2, 7, 1][: len(rows)])
    lp, ent = padded.logprobs(**inputs)
    lp_packed, ent_packed = packed.logprobs(**inputs)
    assert (inputs["attention_mask"] == 0).any(), "the batch must contain padding for this test to mean anything"
    torch.testing.assert_close(lp_packed * mask, lp * mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_packed * mask, ent * mask, atol=1e-5, rtol=0)
    loss, loss_packed = (lp * mask).sum() + (ent * mask).sum(), (lp_packed * mask).sum() + (ent_packed * mask).sum()
    loss.backward()
    loss_packed.backward()
    for (name, p), q in zip(padded.named_parameters(), packed.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_critic_values_equal_padded(tiny_vl_path, mixed_rows):
    torch.manual_seed(0)
    padded, packed = Critic(str(tiny_vl_path)), Critic(str(tiny_vl_path), packing=True)
    packed.load_state_dict(padded.state_dict())
    inputs, mask = _rollout_like(tiny_vl_path, mixed_rows, [3, 6, 1, 4])
    torch.testing.assert_close(packed.values(**inputs) * mask, padded.values(**inputs) * mask, atol=1e-5, rtol=0)


def test_pack_rows_layout_by_hand():
    # two rows: prompt of 2 (left-padded by 1) / 3 tokens, responses of 1 / 2 tokens (first right-padded by 1)
    input_ids = torch.tensor([[0, 11, 12, 13, 0], [21, 22, 23, 24, 25]])
    attention_mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    packed = pack_rows(input_ids, attention_mask, response_len=2, positions=torch.zeros(2, 5, dtype=torch.long))
    assert packed.input_ids.tolist() == [[11, 12, 13, 21, 22, 23, 24, 25]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]  # restarts mark the sequence boundary
    # response token 13 is predicted by 12 (packed index 1); 24 by 23 (5) and 25 by 24 (6)
    assert packed.state_index[0, 0] == 1 and packed.state_index[1].tolist() == [5, 6]


def test_image_rows_get_grid_positions_text_rows_1d(tiny_vl_path, mixed_rows):
    policy = Policy(str(tiny_vl_path))
    batch = PromptProcessor(tiny_vl_path)(mixed_rows)
    grids = torch.cat([g for g in batch.image_grid_thw if g is not None])
    pos = rope_positions(policy.model.model, batch.input_ids, batch.attention_mask, grids)
    real = batch.attention_mask.bool()
    for row in (2, 3):  # text rows: the three axes are the 1-D count of real tokens
        expected = torch.arange(int(real[row].sum()))
        assert all(pos[axis, row][real[row]].tolist() == expected.tolist() for axis in range(3))
    image = batch.input_ids[0] == policy.model.config.image_token_id
    assert len(set(pos[1, 0][image].tolist())) > 1 and pos[0, 0][image].unique().numel() == 1  # 2-D grid, one frame
    packed = pack_rows(batch.input_ids, batch.attention_mask, 1, pos)
    assert packed.position_ids.shape == (4, 1, int(real.sum()))


@pytest.mark.gpu
def test_flash_attention_varlen_packing_matches_padded_sdpa(tiny_vl_path, mixed_rows):
    """On GPU, packed rows go through flash-attn's variable-length kernel (bf16: looser tolerance)."""
    pytest.importorskip("flash_attn")
    padded = Policy(str(tiny_vl_path), dtype="bfloat16").cuda()
    packed = Policy(str(tiny_vl_path), dtype="bfloat16", attn_implementation="flash_attention_2", packing=True).cuda()
    packed.load_state_dict(padded.state_dict())
    inputs, mask = _rollout_like(tiny_vl_path, mixed_rows, [5, 2, 7, 1])
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        lp, _ = padded.logprobs(**inputs)
        lp_packed, _ = packed.logprobs(**inputs)
    torch.testing.assert_close((lp_packed * mask.cuda()).cpu(), (lp * mask.cuda()).cpu(), atol=5e-2, rtol=0)


def _grouped_experience(path, rows, group_size, lengths, seed=0):
    """A rollout of `rows` x `group_size` samples with the given response lengths (0 = an empty response)."""
    from lmmr1.modules.experience import Experience
    from lmmr1.rollout.base import Completion

    gen = torch.Generator().manual_seed(seed)
    it = iter(lengths)
    groups = [[Completion(torch.randint(20, 300, (n,), generator=gen).tolist(), "", [0.0] * n, "stop")
               for n in (next(it) for _ in range(group_size))] for _ in rows]
    return Experience.from_rollout(PromptProcessor(path)(rows), groups, pad_id=0)


@pytest.mark.parametrize("kind", ["vl", "text"])
def test_shared_prompts_give_the_unshared_logprobs_gradients_and_values(kind, tiny_vl_path, tiny_text_path,
                                                                      mixed_rows):
    """Each prompt once, its G responses after it under a block mask: the packed forward's numbers, fewer tokens."""
    path = tiny_vl_path if kind == "vl" else tiny_text_path
    rows = mixed_rows if kind == "vl" else mixed_rows[2:]
    exp = _grouped_experience(path, rows, 3, [5, 2, 7, 1, 0, 4, 6, 3, 2, 1, 7, 5][: 3 * len(rows)])
    torch.manual_seed(0)
    unshared = Policy(str(path), packing=True)
    shared = Policy(str(path), packing=True, share_prompts=True)
    shared.load_state_dict(unshared.state_dict())
    tokens = []
    shared.model.get_input_embeddings().register_forward_hook(lambda m, a, out: tokens.append(a[0].numel()))
    mask = exp.response_mask
    lp, ent = unshared.logprobs(**exp.model_inputs())
    lp_shared, ent_shared = shared.logprobs(**exp.model_inputs(share_prompts=True))
    torch.testing.assert_close(lp_shared * mask, lp * mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_shared * mask, ent * mask, atol=1e-5, rtol=0)
    prompt_tokens = exp.attention_mask[:, : -exp.response_len].sum(-1)
    assert tokens == [int(exp.attention_mask.sum() - prompt_tokens[1::3].sum() - prompt_tokens[2::3].sum())]
    ((lp * mask).sum() + (ent * mask).sum()).backward()
    ((lp_shared * mask).sum() + (ent_shared * mask).sum()).backward()
    for (name, p), q in zip(unshared.named_parameters(), shared.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    if kind == "vl":
        critic = Critic(str(path), packing=True)
        torch.testing.assert_close(critic.values(**exp.model_inputs(share_prompts=True)) * mask,
                                   critic.values(**exp.model_inputs()) * mask, atol=1e-5, rtol=0)


def test_prompt_leaders_need_the_same_tokens_and_the_same_images(tiny_vl_path, mixed_rows, tmp_path):
    exp = _grouped_experience(tiny_vl_path, mixed_rows, 2, [1] * 8)
    assert exp.prompt_leaders().tolist() == [0, 0, 2, 2, 4, 4, 6, 6]
    split = exp.select([1, 2, 3])  # a micro-batch that starts inside a group
    assert split.prompt_leaders().tolist() == [0, 1, 1]
    # the same question about another picture of the same size: the same tokens, yet not one prompt
    from PIL import Image

    other = tmp_path / "other.png"
    Image.new("RGB", (84, 112), (250, 0, 0)).save(other)
    twin = {**mixed_rows[1], "message": [{"role": "user", "content": [
        {"type": "image", "image": str(other)}, mixed_rows[1]["message"][0]["content"][1]]}]}
    pair = _grouped_experience(tiny_vl_path, [mixed_rows[1], twin], 1, [1, 1])
    prompts = pair.input_ids[:, : -pair.response_len]
    assert prompts[0].tolist() == prompts[1].tolist()
    assert pair.prompt_leaders().tolist() == [0, 1]


def test_shared_prompt_layout_by_hand():
    # rows 0 and 1 share the prompt [11, 12] (left-padded by 1); row 1's response is empty
    input_ids = torch.tensor([[0, 11, 12, 31, 32], [0, 11, 12, 0, 0], [21, 22, 23, 41, 0]])
    attention_mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    packed = pack_rows(input_ids, attention_mask, 2, torch.zeros(3, 5, dtype=torch.long),
                       prompt_leaders=torch.tensor([0, 0, 2]))
    assert packed.input_ids.tolist() == [[11, 12, 31, 32, 21, 22, 23, 41]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert packed.state_index[0].tolist() == [1, 2] and packed.state_index[2].tolist() == [6, 7]
    assert packed.state_index[1, 0] == 1  # the follower's first token is predicted by the shared prompt's last
    allowed = packed.attention_mask[0, 0].int().tolist()
    assert allowed[3] == [1, 1, 1, 1, 0, 0, 0, 0]  # 32 sees the prompt and 31
    assert allowed[7] == [0, 0, 0, 0, 1, 1, 1, 1]  # the second group sees only itself


def test_share_prompts_config_errors(tiny_text_path):
    with pytest.raises(ValueError, match="share_prompts: shares each prompt inside a packed row; set "
                                         "--model.policy.init_args.packing true"):
        Policy(str(tiny_text_path), share_prompts=True)
    with pytest.raises(ValueError, match="share_prompts does not combine with .*sequence_parallel_size 2"):
        Policy(str(tiny_text_path), packing=True, share_prompts=True, sequence_parallel_size=2)
