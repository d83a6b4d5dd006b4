"""Sequence parallelism: one packed row split along the sequence over a group of ranks, attention across the split.

The world is `size` x data-parallel: ranks 0..k-1 form sequence-parallel group 0, k..2k-1 group 1, and so on; the
ranks of one group hold the same samples and each runs the decoder on a contiguous slice of every packed row. Rank r's
queries attend to the keys/values of the whole row, gathered from the group (the pattern of ring-flash-attn's
`llama3` variant): on GPU through `ring_flash_attn.llama3_flash_attn_varlen_func`, on CPU through an all-gather and
SDPA with the block-diagonal causal mask of the packed sequences. The CPU path is the reference the GPU path is
checked against; it is not a kernel.

Everything before the decoder (token embeddings, image features, M-RoPE positions) is computed on the whole row and
sliced on its way into the decoder, so positions and image placement are exactly those of the unsplit row. The final
hidden states are summed back into the whole row on every rank of the group, so the LM head, log-probs, values and
the loss see the unsplit numbers.

Gradients: each rank's loss is the whole row's loss, and both collectives below differentiate the sum of the ranks'
losses (their backward sums over the group), so each rank's parameter gradients are k x its share. DDP and DeepSpeed
average gradients over all W = data-parallel x k ranks, which leaves the sum over the group's shares averaged over
the data-parallel replicas: the gradient of the unsplit batch, with the loss scaled by the data-parallel size only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

SP_PREFIX = "lmmr1_sequence_parallel_"
"""Attention implementations that split packed rows when asked (`<prefix><base>`, base = sdpa | flash_attention_2)."""


@dataclass(frozen=True)
class SequenceParallel:
    """Rank `rank` of a sequence-parallel group of `size` ranks (`group`; `ranks` are their global ranks)."""

    rank: int = 0
    size: int = 1
    group: Any = None
    ranks: tuple[int, ...] = (0,)

    @property
    def active(self) -> bool:
        return self.size > 1


_GROUPS: dict[str, Any] = {}  # "sp": SequenceParallel, "dp": (rank, size, group) once init_sequence_parallel ran


def init_sequence_parallel(size: int, flag: str = "--model.policy.init_args.sequence_parallel_size") -> None:
    """Form the sequence- and data-parallel process groups (every rank calls this, in the same order).

    Raises ValueError when `size` does not divide the world size."""
    _GROUPS.clear()
    if size < 1:
        raise ValueError(f"{flag}: must be >= 1, got {size}")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world % size:
        raise ValueError(f"{flag}: {size} does not divide the world size {world} (--trainer.devices x "
                         f"--trainer.num_nodes); each sequence-parallel group needs {size} ranks")
    if size == 1:
        return
    rank = dist.get_rank()
    for first in range(0, world, size):  # new_group is collective: every rank creates every group
        ranks = tuple(range(first, first + size))
        group = dist.new_group(list(ranks))
        if rank in ranks:
            _GROUPS["sp"] = SequenceParallel(rank=rank - first, size=size, group=group, ranks=ranks)
    for offset in range(size):
        ranks = list(range(offset, world, size))
        group = dist.new_group(ranks) if len(ranks) > 1 else None
        if rank in ranks:
            _GROUPS["dp"] = (ranks.index(rank), len(ranks), group)


def sequence_parallel() -> SequenceParallel:
    """This process's sequence-parallel group; a lone rank of size 1 unless `init_sequence_parallel` formed groups."""
    return _GROUPS.get("sp", SequenceParallel())


def data_parallel_view() -> tuple[int, int, Any] | None:
    """(rank, size, group) among the data-parallel replicas when sequence parallelism is on, else None."""
    return _GROUPS.get("dp")


def broadcast_from_group_leader(obj: Any) -> Any:
    """`obj` of the group's first rank, on every rank of the sequence-parallel group (the identity without SP).
    The ranks of a group must train on the same samples; generation is not guaranteed to be bitwise reproducible
    across processes, so the leader's rollout is the group's."""
    sp = sequence_parallel()
    if not sp.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=sp.ranks[0], group=sp.group)
    return box[0]


class _GatherSequence(torch.autograd.Function):
    """Concatenate the group's slices along `dim`; backward: the full gradient summed over the group, then this rank's
    slice (each rank's output feeds its own loss). An explicit function: `torch.distributed.nn.functional.all_gather`
    was measured to give wrong key gradients over gloo (DESIGN.md)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, sp: SequenceParallel) -> Tensor:
        ctx.dim, ctx.sp, ctx.length = dim, sp, x.shape[dim]
        pieces = [torch.empty_like(x) for _ in range(sp.size)]
        dist.all_gather(pieces, x.contiguous(), group=sp.group)
        return torch.cat(pieces, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.contiguous().clone()  # reduced in place: never the buffer autograd handed in
        dist.all_reduce(grad, group=ctx.sp.group)
        return grad.narrow(ctx.dim, ctx.sp.rank * ctx.length, ctx.length), None, None


class _SumOverGroup(torch.autograd.Function):
    """All-reduce sum whose backward is the all-reduce sum of the gradients (each rank's output feeds its own loss)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sp: SequenceParallel) -> Tensor:
        ctx.sp = sp
        out = x.contiguous().clone()
        dist.all_reduce(out, group=sp.group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.sp.group)
        return grad, None


@dataclass
class SplitRow:
    """One packed row of `length` tokens, padded to a multiple of the group size and cut into equal slices."""

    sp: SequenceParallel
    length: int
    sequence_ids: Tensor  # (padded,) the packed sequence of every token; the padding tail is a sequence of its own
    _per_forward: dict[str, Any] = field(default_factory=dict, repr=False)  # what every layer's attention shares

    @property
    def padded(self) -> int:
        return self.sequence_ids.numel()

    @property
    def chunk(self) -> int:
        return self.padded // self.sp.size

    @property
    def start(self) -> int:
        return self.sp.rank * self.chunk

    def local(self, x: Tensor, dim: int = -1) -> Tensor:
        """This rank's slice of a whole-row tensor whose `dim` runs over the row's tokens (zero-padded)."""
        dim = dim % x.dim()
        if self.padded > x.shape[dim]:
            pad = [0, 0] * (x.dim() - 1 - dim) + [0, self.padded - x.shape[dim]]
            x = F.pad(x, pad)
        return x.narrow(dim, self.start, self.chunk)

    def whole(self, local: Tensor, dim: int = 1) -> Tensor:
        """The whole row from every rank's slice of it, cut to `length`."""
        return assemble(local, self.start, self.padded, self.sp, dim).narrow(dim, 0, self.length)

    def gather(self, local: Tensor, dim: int) -> Tensor:
        """Every rank's slice concatenated along `dim` (keys/values of the whole padded row)."""
        return _GatherSequence.apply(local, dim, self.sp)

    def local_mask(self, device: torch.device) -> Tensor:
        """(chunk, padded) True where this rank's query may attend: same packed sequence and not in the future.
        Built once per forward, shared by every layer."""
        if "mask" not in self._per_forward:
            ids = self.sequence_ids.to(device)
            q = torch.arange(self.start, self.start + self.chunk, device=device)
            k = torch.arange(self.padded, device=device)
            self._per_forward["mask"] = (ids[q, None] == ids[None, :]) & (k[None, :] <= q[:, None])
        return self._per_forward["mask"]

    def cu_seqlens(self, device: torch.device) -> Tensor:
        """int32 cumulative sequence lengths of the padded row (flash-attn's varlen layout)."""
        ids = self.sequence_ids.to(device)
        starts = torch.nonzero(torch.diff(ids, prepend=ids[:1] - 1)).flatten()
        return torch.cat([starts, torch.tensor([self.padded], device=device)]).to(torch.int32)


def assemble(local: Tensor, start: int, total: int, sp: SequenceParallel, dim: int = 0) -> Tensor:
    """A tensor of `total` along `dim` from every rank's piece of it (this rank's begins at `start`; zeros elsewhere,
    summed over the group), on every rank; differentiable (see the module docstring)."""
    def zeros(size: int) -> Tensor:
        shape = list(local.shape)
        shape[dim] = size
        return local.new_zeros(shape)

    full = torch.cat([zeros(start), local, zeros(total - start - local.shape[dim])], dim=dim)
    return _SumOverGroup.apply(full, sp)


def split_row(text_positions: Tensor, sp: SequenceParallel) -> SplitRow:
    """The split of a packed row whose sequences restart their text positions at 0 (as `pack_rows` lays them out)."""
    length = text_positions.numel()
    ids = (text_positions.flatten() == 0).long().cumsum(0)
    padded = -(-length // sp.size) * sp.size
    tail = torch.full((padded - length,), int(ids[-1]) + 1 if length else 0, dtype=ids.dtype, device=ids.device)
    return SplitRow(sp=sp, length=length, sequence_ids=torch.cat([ids, tail]))


@contextmanager
def decoder_on_slices(decoder: nn.Module, split: SplitRow) -> Iterator[None]:
    """Within this context, the next call of `decoder` (the text model, called by its parent with the whole row's
    `inputs_embeds`/`input_ids` and `position_ids`) runs on this rank's slice; its attention learns the split through
    the `sequence_parallel` keyword, which Hugging Face passes down to every attention call (and into gradient
    checkpointing's recomputation)."""

    def slice_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        handle.remove()  # once per forward
        if args:
            raise RuntimeError("sequence parallelism: the decoder must be called with keyword arguments")
        for key in ("inputs_embeds", "input_ids"):
            if kwargs.get(key) is not None:
                kwargs[key] = split.local(kwargs[key], dim=1)
        kwargs["position_ids"] = split.local(kwargs["position_ids"], dim=-1)
        kwargs["attention_mask"] = None  # the split row's mask is built by the attention (packed sequences)
        kwargs["sequence_parallel"] = split
        return args, kwargs

    handle = decoder.register_forward_pre_hook(slice_inputs, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _sdpa_across_split(query: Tensor, key: Tensor, value: Tensor, split: SplitRow, scaling: float | None) -> Tensor:
    """This rank's queries (1, h, chunk, d) against the gathered keys/values of the whole row; (1, chunk, h, d)."""
    key, value = split.gather(key, dim=2), split.gather(value, dim=2)
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each key/value head serves several query heads
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=split.local_mask(query.device), scale=scaling)
    return out.transpose(1, 2).contiguous()


def _ring_flash_across_split(query: Tensor, key: Tensor, value: Tensor, split: SplitRow,
                             scaling: float | None) -> Tensor:
    """GPU: ring-flash-attn's llama3 variant (keys/values all-gathered in head strides, varlen packed sequences)."""
    from ring_flash_attn import llama3_flash_attn_prepare_cu_seqlens, llama3_flash_attn_varlen_func

    if "ring" not in split._per_forward:  # once per forward: the preparation reads lengths back from the GPU
        split._per_forward["ring"] = llama3_flash_attn_prepare_cu_seqlens(
            split.cu_seqlens(query.device), causal=True, rank=split.sp.rank, world_size=split.sp.size)
    cu_q, cu_k, max_q, max_k, k_slice = split._per_forward["ring"]
    heads_k = key.shape[1]
    out = llama3_flash_attn_varlen_func(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_q, cu_k, max_q, max_k,
        heads_k_stride=heads_k, local_k_slice=k_slice, softmax_scale=scaling, causal=True, group=split.sp.group)
    return out.unsqueeze(0)


def _dispatching(base: str) -> Any:
    """An attention function: the split-row attention when the forward carries a `sequence_parallel` split, else the
    model's own `base` implementation (generation, validation and anything else with ordinary rows)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  sequence_parallel: SplitRow | None = None, **kwargs: Any) -> tuple[Tensor, None]:
        if sequence_parallel is None:
            return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, **kwargs)
        scaling = kwargs.get("scaling")
        if base.startswith("flash_attention"):
            return _ring_flash_across_split(query, key, value, sequence_parallel, scaling), None
        return _sdpa_across_split(query, key, value, sequence_parallel, scaling), None

    return attention


def use_sequence_parallel_attention(decoder: nn.Module) -> None:
    """Switch `decoder`'s attention to the dispatching implementation over its current one (sdpa or
    flash_attention_2), registered with transformers' attention and mask interfaces."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    base = decoder.config._attn_implementation
    if base.startswith(SP_PREFIX):
        return
    if base not in ("sdpa", "flash_attention_2"):
        raise ValueError(f"--model.policy.init_args.attn_implementation: sequence parallelism needs 'sdpa' (CPU) or "
                         f"'flash_attention_2' (GPU, ring-flash-attn), not {base!r}")
    name = SP_PREFIX + base
    AttentionInterface.register(name, _dispatching(base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    decoder.config._attn_implementation = name
