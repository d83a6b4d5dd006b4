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

from lmmr1.distributed.groups import world_size
from lmmr1.models.families import family_of


def _needed(backbone: nn.Module, has_images: bool) -> nn.Module | None:
    visual = family_of(backbone).vision_tower(backbone)
    return visual if visual is not None and not has_images and world_size() > 1 else None


def run_on_dummy(backbone: nn.Module) -> Tensor:
    """The image-side modules' output on the family's smallest blank image, summed to a scalar."""
    return family_of(backbone).dummy_vision_output(backbone)


def vision_tower_before_generation(backbone: nn.Module, has_images: bool) -> None:
    """Before `generate` on a text-only chunk: run the tower once, as generation does for image chunks."""
    if _needed(backbone, has_images) is not None:
        with torch.no_grad():
            run_on_dummy(backbone)


@contextmanager
def vision_tower_in_graph(backbone: nn.Module, has_images: bool) -> Iterator[None]:
    """Within this context, the next forward of `backbone` (an image-text-to-text decoder) runs its vision tower
    on a dummy image when this micro-batch has none and there is more than one process."""
    visual = _needed(backbone, has_images)
    if visual is None:
        yield
        return

    def after_embeddings(module: nn.Module, args: object, embeds: Tensor) -> Tensor:
        handle.remove()  # once per forward
        return embeds + 0.0 * run_on_dummy(backbone).to(embeds.dtype)

    handle = backbone.get_input_embeddings().register_forward_hook(after_embeddings)
    try:
        yield
    finally:
        handle.remove()
