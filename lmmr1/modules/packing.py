"""How token rows enter a training forward: RoPE positions (as the model family assigns them) and padding-free packing.

Packing concatenates the real tokens of N padded rows into one row. Positions restart at 0 for every sequence, and
transformers reads those restarts as sequence boundaries: a block-diagonal causal mask under SDPA (CPU), variable-length
attention under flash-attn (GPU). Images need nothing extra: their patches stay in row order, as their tokens do.

Shared prompts (`prompt_leaders`): the G samples of a prompt repeat its tokens G times. Packed as [prompt, response 1,
..., response G] instead, the prompt is computed once; each response attends to the prompt and to itself through an
explicit block mask (SDPA), its positions continuing from the prompt's end as in its own row. Log-probs and gradients
are those of the unshared rows; the forward and backward are shorter by (G - 1) prompts per group.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmmr1.distributed.sequence_parallel import decoder_on_slices, split_row
from lmmr1.distributed.sequence_parallel import sequence_parallel as sequence_parallel_group
from lmmr1.distributed.vision import vision_tower_in_graph
from lmmr1.models.families import family_of


def rope_positions(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                   image_grid_thw: Tensor | None) -> Tensor:
    """Positions of left/right-padded rows as generation assigns them: (N, L) counting real tokens from 0, or
    (3, N, L) for M-RoPE families, where image tokens take 2-D grid positions. Padding gets position 0 (it is masked
    out). The family adapter decides (lmmr1/models/families/)."""
    return family_of(backbone).positions(backbone, input_ids, attention_mask, image_grid_thw)


def shared_prompt_positions(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_len: int,
                            image_grid_thw: Tensor | None, prompt_leaders: Tensor) -> Tensor:
    """`rope_positions` of rows that share prompts, when only the leading rows' images are at hand: the family places
    the leading rows; a follower takes its leader's prompt positions, and its response (text, no images: rows with
    images of their own lead) continues one position per token after the prompt's last, on every M-RoPE axis."""
    n_rows = input_ids.shape[0]
    leading = (prompt_leaders == torch.arange(n_rows, device=input_ids.device)).nonzero().squeeze(-1)
    lead_positions = rope_positions(backbone, input_ids[leading], attention_mask[leading], image_grid_thw)
    slot = torch.empty(n_rows, dtype=torch.long, device=input_ids.device)
    slot[leading] = torch.arange(len(leading), device=input_ids.device)
    positions = lead_positions[..., slot[prompt_leaders], :].clone()  # each row as its leader's
    follower = prompt_leaders != torch.arange(n_rows, device=input_ids.device)
    L = input_ids.shape[1]
    after_prompt = positions[..., L - response_len - 1 : L - response_len] + 1 + torch.arange(
        response_len, device=input_ids.device)
    positions[..., L - response_len :] = torch.where(follower.unsqueeze(-1), after_prompt,
                                                     positions[..., L - response_len :])
    return positions


@dataclass
class PackedRows:
    """N padded rows laid out as one row of S real tokens."""

    input_ids: Tensor  # (1, S) every row's real tokens, row after row
    position_ids: Tensor  # (1, S), or (4, 1, S) = per-sequence text positions stacked on the 3 M-RoPE axes
    state_index: Tensor  # (N, T) index in S of the hidden state that predicts response token t of row n
    attention_mask: Tensor | None = None  # (1, 1, S, S) bool, True = may attend; only when prompts are shared


def pack_rows(input_ids: Tensor, attention_mask: Tensor, response_len: int, positions: Tensor,
              prompt_leaders: Tensor | None = None) -> PackedRows:
    """Drop the padding of (N, L) rows whose last `response_len` columns are the response.

    `positions` is `rope_positions` of the padded rows. Response columns that are padding point at the row's last
    real token; their values are garbage and must stay masked, as in the padded layout.
    `prompt_leaders` (N,): row n's prompt is row `prompt_leaders[n]`'s (an earlier row, or n itself): a row led by
    another keeps only its response, which attends to its leader's prompt (`Experience.prompt_leaders`).
    """
    real = attention_mask.bool()
    n_rows, L = input_ids.shape
    prompt_column = torch.arange(L, device=input_ids.device) < L - response_len
    follower = None
    keep = real
    if prompt_leaders is not None:
        follower = prompt_leaders != torch.arange(n_rows, device=input_ids.device)
        keep = real & ~(follower.unsqueeze(-1) & prompt_column)
    lengths = keep.sum(-1)
    offsets = lengths.cumsum(0) - lengths
    packed_index = offsets.unsqueeze(-1) + (keep.long().cumsum(-1) - 1).clamp(min=0)
    if follower is not None:  # a follower's prompt columns are its leader's (same tokens, same left padding)
        packed_index = torch.where(follower.unsqueeze(-1) & prompt_column, packed_index[prompt_leaders], packed_index)
        packed_index = packed_index.clamp(max=int(lengths.sum()) - 1)  # an empty last response: masked garbage
    state_index = packed_index[:, L - response_len - 1 : L - 1]  # column c is predicted by column c - 1
    within = real.long().cumsum(-1) - 1  # index of each column among its row's real tokens: its text position
    text = within[keep].unsqueeze(0)
    if positions.dim() == 3:
        position_ids = torch.cat([text, positions[:, keep]]).unsqueeze(1)
    else:
        position_ids = text
    mask = None
    if follower is not None:
        rows = torch.arange(n_rows, device=input_ids.device).unsqueeze(-1).expand(n_rows, L)
        group = prompt_leaders.unsqueeze(-1).expand(n_rows, L)[keep]  # which prompt each packed token belongs to
        branch = torch.where(prompt_column, 0, rows + 1)[keep]  # 0 = the shared prompt, n + 1 = row n's response
        order = torch.arange(group.numel(), device=input_ids.device)
        mask = ((group.unsqueeze(-1) == group) & (order.unsqueeze(-1) >= order)
                & ((branch == 0) | (branch.unsqueeze(-1) == branch)))[None, None]
    return PackedRows(input_ids[keep].unsqueeze(0), position_ids, state_index, mask)


def response_hidden_states(
    backbone: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_len: int,
    pixel_values: Tensor | None = None,
    image_grid_thw: Tensor | None = None,
    packing: bool = False,
    sequence_parallel: bool = False,
    prompt_leaders: Tensor | None = None,
) -> Tensor:
    """(N, T, H) last hidden states at the positions that predict each of the last `response_len` tokens.

    `backbone` is the decoder without its LM head (`model.model` of a HF causal LM or image-text-to-text model).
    `image_grid_thw`: the images' grids for families that have them (Qwen-VL), else None.
    `sequence_parallel` (with packing): the decoder runs on this rank's slice of the packed row, across the
    sequence-parallel group formed by `init_sequence_parallel`; the returned states are the whole row's, on every rank.
    `prompt_leaders` (with packing): rows that share a prompt carry it once (`pack_rows`); `pixel_values` then hold
    only the leading rows' images.
    """
    family = family_of(backbone)
    extra = family.image_inputs(backbone.config, input_ids, pixel_values, image_grid_thw)
    if prompt_leaders is None:
        positions = family.positions(backbone, input_ids, attention_mask, image_grid_thw)
    else:
        positions = shared_prompt_positions(backbone, input_ids, attention_mask, response_len, image_grid_thw,
                                            prompt_leaders)
    with vision_tower_in_graph(backbone, has_images=pixel_values is not None):
        if not packing:
            out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
                           **extra)
            return out.last_hidden_state[:, -response_len - 1 : -1]
        family.check_packing()
        packed = pack_rows(input_ids, attention_mask, response_len, positions, prompt_leaders)
        extra = family.image_inputs(backbone.config, packed.input_ids, pixel_values, image_grid_thw)
        sp = sequence_parallel_group() if sequence_parallel else None
        split = None
        if sp is not None and sp.active:
            text_positions = packed.position_ids[0] if packed.position_ids.dim() == 3 else packed.position_ids
            split = split_row(text_positions, sp)
        with nullcontext() if split is None else decoder_on_slices(family.decoder(backbone), split):
            out = backbone(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                           position_ids=packed.position_ids,
                           use_cache=False, **extra)
    states = out.last_hidden_state if split is None else split.whole(out.last_hidden_state, dim=1)
    return states[0][packed.state_index]
