"""Keep a vision tower in every rank's forward when only some ranks' micro-batches hold images.

Under ZeRO-3 a module's parameters are gathered by a collective when the module runs, and its gradients are
reduce-scattered in backward; under DDP every trainable parameter must receive a gradient in each backward. A rank
whose micro-batch is text-only would skip the vision tower while another rank runs it: ZeRO-3 hangs, DDP stops with
an unused-parameter error. The fix known from the field: run the tower on a tiny dummy image and add 0 x its output,
so it takes part in the forward and backward without changing any number. It runs right after the token embeddings,
the point where Qwen-VL models call their tower on real images, so the ranks' collectives stay in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lmmr1.distributed.groups import data_parallel


def dummy_image(visual: nn.Module) -> tuple[Tensor, Tensor]:
    """The smallest input the tower accepts: one merge window of blank patches. (pixel_values, grid_thw)."""
    config = visual.config
    merge = config.spatial_merge_size
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
    param = next(visual.parameters())
    pixels = torch.zeros(merge * merge, patch_dim, dtype=param.dtype, device=param.device)
    return pixels, torch.tensor([[1, merge, merge]], device=param.device)


@contextmanager
def vision_tower_in_graph(backbone: nn.Module, has_images: bool) -> Iterator[None]:
    """Within this context, the next forward of `backbone` (a Qwen-VL decoder with `.visual`) runs its vision tower
    on a dummy image when this micro-batch has none and there is more than one data-parallel rank."""
    visual = getattr(backbone, "visual", None)
    if visual is None or has_images or not data_parallel().active:
        yield
        return

    def after_embeddings(module: nn.Module, args: object, embeds: Tensor) -> Tensor:
        handle.remove()  # once per forward: generation calls the embeddings again at every decoding step
        pixels, grid = dummy_image(visual)
        out = visual(pixels, grid_thw=grid)
        features = getattr(out, "pooler_output", out)
        return embeds + 0.0 * features.sum().to(embeds.dtype)

    handle = backbone.get_input_embeddings().register_forward_hook(after_embeddings)
    try:
        yield
    finally:
        handle.remove()
