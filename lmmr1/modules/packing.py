"""How token rows enter a training forward: RoPE positions (as the model family assigns them) and padding-free packing.

Packing concatenates the real tokens of N padded rows into one row. Positions restart at 0 for every sequence, and
transformers reads those restarts as sequence boundaries: a block-diagonal causal mask under SDPA (CPU), variable-length
attention under flash-attn (GPU). Images need nothing extra: their patches stay in row order, as their tokens do.
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


@dataclass
class PackedRows:
    """N padded rows laid out as one row of S real tokens."""

    input_ids: Tensor  # (1, S) every row's real tokens, row after row
    position_ids: Tensor  # (1, S), or (4, 1, S) = per-sequence text positions stacked on the 3 M-RoPE axes
    state_index: Tensor  # (N, T) index in S of the hidden state that predicts response token t of row n


def pack_rows(input_ids: Tensor, attention_mask: Tensor, response_len: int, positions: Tensor) -> PackedRows:
    """Drop the padding of (N, L) rows whose last `response_len` columns are the response.

    `positions` is `rope_positions` of the padded rows. Response columns that are padding point at the row's last
    real token; their values are garbage and must stay masked, as in the padded layout.
    """
    keep = attention_mask.bool()
    lengths = keep.sum(-1)
    offsets = lengths.cumsum(0) - lengths
    within = keep.long().cumsum(-1) - 1  # index of each column among its row's real tokens
    packed_index = offsets.unsqueeze(-1) + within.clamp(min=0)
    L = input_ids.shape[1]
    state_index = packed_index[:, L - response_len - 1 : L - 1]  # column c is predicted by column c - 1
    text = within[keep].unsqueeze(0)
    if positions.dim() == 3:
        position_ids = torch.cat([text, positions[:, keep]]).unsqueeze(1)
    else:
        position_ids = text
    return PackedRows(input_ids[keep].unsqueeze(0), position_ids, state_index)


def response_hidden_states(
    backbone: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_len: int,
    pixel_values: Tensor | None = None,
    image_grid_thw: Tensor | None = None,
    packing: bool = False,
    sequence_parallel: bool = False,
) -> Tensor:
    """(N, T, H) last hidden states at the positions that predict each of the last `response_len` tokens.

    `backbone` is the decoder without its LM head (`model.model` of a HF causal LM or image-text-to-text model).
    `image_grid_thw`: the images' grids for families that have them (Qwen-VL), else None.
    `sequence_parallel` (with packing): the decoder runs on this rank's slice of the packed row, across the
    sequence-parallel group formed by `init_sequence_parallel`; the returned states are the whole row's, on every rank.
    """
    family = family_of(backbone)
    extra = family.image_inputs(backbone.config, input_ids, pixel_values, image_grid_thw)
    positions = family.positions(backbone, input_ids, attention_mask, image_grid_thw)
    with vision_tower_in_graph(backbone, has_images=pixel_values is not None):
        if not packing:
            out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
                           **extra)
            return out.last_hidden_state[:, -response_len - 1 : -1]
        family.check_packing()
        packed = pack_rows(input_ids, attention_mask, response_len, positions)
        extra = family.image_inputs(backbone.config, packed.input_ids, pixel_values, image_grid_thw)
        sp = sequence_parallel_group() if sequence_parallel else None
        split = None
        if sp is not None and sp.active:
            text_positions = packed.position_ids[0] if packed.position_ids.dim() == 3 else packed.position_ids
            split = split_row(text_positions, sp)
        with nullcontext() if split is None else decoder_on_slices(family.decoder(backbone), split):
            out = backbone(input_ids=packed.input_ids, attention_mask=None, position_ids=packed.position_ids,
                           use_cache=False, **extra)
    states = out.last_hidden_state if split is None else split.whole(out.last_hidden_state, dim=1)
    return states[0][packed.state_index]
