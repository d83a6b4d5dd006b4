"""Keep a vision tower in every rank's forward when only some ranks' micro-batches hold images.

Under ZeRO-3 a module's parameters are gathered by a collective when the module runs, and its gradients are
reduce-scattered in backward; under DDP every trainable parameter must receive a gradient in each backward. A rank
whose micro-batch is text-only would skip the vision tower while another rank runs it: ZeRO-3 hangs, DDP stops with
an unused-parameter error. The fix known from the field: run the tower on a tiny dummy image and add 0 x its output,
so it takes part in the forward and backward without changing any number. It must run where the model runs its
tower on real images, so that the ranks' collectives stay in the same order (a mismatch was measured as a gloo size
error under ZeRO-3): in a training forward right after the token embeddings, in Hugging Face generation before the
model's first forward (generation encodes the images up front).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lmmr1.distributed.groups import data_parallel


def _needed(backbone: nn.Module, has_images: bool) -> nn.Module | None:
    visual = getattr(backbone, "visual", None)
    return visual if visual is not None and not has_images and data_parallel().active else None


def run_on_dummy(visual: nn.Module) -> Tensor:
    """The tower's output on `dummy_image`, summed to a scalar."""
    pixels, grid = dummy_image(visual)
    out = visual(pixels, grid_thw=grid)
    return getattr(out, "pooler_output", out).sum()


def vision_tower_before_generation(backbone: nn.Module, has_images: bool) -> None:
    """Before `generate` on a text-only chunk: run the tower once, as generation does for image chunks."""
    visual = _needed(backbone, has_images)
    if visual is not None:
        with torch.no_grad():
            run_on_dummy(visual)


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
    visual = _needed(backbone, has_images)
    if visual is None:
        yield
        return

    def after_embeddings(module: nn.Module, args: object, embeds: Tensor) -> Tensor:
        handle.remove()  # once per forward
        return embeds + 0.0 * run_on_dummy(visual).to(embeds.dtype)

    handle = backbone.get_input_embeddings().register_forward_hook(after_embeddings)
    try:
        yield
    finally:
        handle.remove()
