"""Is collation a bottleneck? Multimodal DataModule batches/s (image processing in 2 worker processes) vs the time of
one RL training step on the tiny model, measured side by side in one run.

    .venv/bin/python benchmarks/collate.py            # prints batches/s, step seconds and the headroom ratio
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from lmmr1.data.datamodule import DatasetSpec, PromptDataModule
    from lmmr1.data.synthetic import make
    from lmmr1.models.tiny import build_tiny
    from lmmr1.modules.policy import Policy
    from lmmr1.modules.rl_module import RLModule
    from lmmr1.rollout.base import SamplingConfig

    root = Path(tempfile.mkdtemp())
    model = str(build_tiny(root / "tiny-vl"))
    kinds = ("image-arith", "geometry")
    data = [DatasetSpec(str(make(kind, n=64, seed=0, out=root / kind))) for kind in kinds]
    dm = PromptDataModule(datasets=data, batch_size=args.batch_size, num_workers=args.workers, processor_path=model)
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    next(loader)  # start the workers
    start = time.perf_counter()
    for _ in range(args.batches):
        next(loader)
    collate_s = (time.perf_counter() - start) / args.batches

    module = RLModule(policy=Policy(model), reward="math", sampling=SamplingConfig(n=4, max_new_tokens=32))
    batches = [dm.collate([dm.train_rows[0][i] for i in range(args.batch_size)]) for _ in range(3)]
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    step_s = (time.perf_counter() - start) / 3
    print(f"collation: {1 / collate_s:.1f} batches/s ({args.workers} workers, {args.batch_size} image prompts/batch)")
    print(f"training step (tiny model, n=4, 32 new tokens): {step_s:.2f} s")
    print(f"headroom: {step_s / collate_s:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
