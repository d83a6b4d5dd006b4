"""Prompt DataModule: datasets blended by probability into an endless, seeded, resumable stream of prompt batches.

Each dataset is a JSONL/JSON/Parquet file in the LMM-R1 row format; a dataset may carry a `make` recipe so
`prepare_data` generates it locally when the file is missing (nothing is ever downloaded). The stream is a pure
function of (seed, position), and the position of the last batch handed to training is saved in checkpoints, so a
resumed run continues with the next unseen prompt.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset, Sampler

from lmmr1.data.processor import PromptBatch, PromptProcessor


@dataclass
class DatasetSpec:
    """One dataset of prompts."""

    path: str
    """A .jsonl, .json or .parquet file of rows."""
    prob: float = 1.0
    """Relative sampling weight when several datasets are blended (normalised over the list)."""
    make: dict[str, Any] | None = None
    """Optional `lmmr1 data make` recipe ({kind, n, seed, difficulty, split}) run by prepare_data if `path` is missing."""
    name: str | None = None
    """Name used in metric keys (defaults to the file's folder name)."""

    @property
    def label(self) -> str:
        return self.name or Path(self.path).parent.name or Path(self.path).stem


class _Rows(Dataset):
    """Rows of several datasets addressed by (dataset index, row index, stream position)."""

    def __init__(self, tables: list[list[dict[str, Any]]]) -> None:
        self.tables = tables

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        dataset, row, position = key
        return {**self.tables[dataset][row], "_position": position}


class BlendedSampler(Sampler):
    """Endless (dataset, row, position) stream: each position picks a dataset by probability, then that dataset's next
    row in a per-epoch shuffled order. Deterministic in (seed, start)."""

    def __init__(self, sizes: list[int], probs: list[float], seed: int, start: int = 0) -> None:
        self.sizes, self.seed, self.start = sizes, seed, start
        total = sum(probs)
        self.weights = [p / total for p in probs]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        pick = random.Random(f"{self.seed}:pick")
        seen = [0] * len(self.sizes)
        orders: dict[tuple[int, int], list[int]] = {}
        position = 0
        while True:
            dataset = pick.choices(range(len(self.sizes)), weights=self.weights)[0]
            epoch, offset = divmod(seen[dataset], self.sizes[dataset])
            if (dataset, epoch) not in orders:
                order = list(range(self.sizes[dataset]))
                random.Random(f"{self.seed}:{dataset}:{epoch}").shuffle(order)
                orders = {k: v for k, v in orders.items() if k[0] != dataset}  # keep one epoch per dataset
                orders[(dataset, epoch)] = order
            seen[dataset] += 1
            if position >= self.start:
                yield dataset, orders[(dataset, epoch)][offset], position
            position += 1


class PromptDataModule(L.LightningDataModule):
    """Training prompts blended from `datasets`; validation sets evaluated one by one."""

    def __init__(
        self,
        datasets: list[DatasetSpec],
        batch_size: int = 8,
        val: list[DatasetSpec] | None = None,
        val_batch_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        processor_path: str | None = None,
        min_pixels: int = 4 * 28 * 28,
        max_pixels: int = 16384 * 28 * 28,
        max_prompt_tokens: int | None = None,
        input_key: str = "message",
        label_key: str = "answer",
        on_bad_row: str = "error",
    ) -> None:
        """
        Args:
            datasets: training datasets and their sampling weights.
            batch_size: prompts per RL step (B); each yields `model.sampling.n` completions.
            val: held-out datasets, each reported under `val/<name>/...`.
            processor_path: model folder whose tokenizer / image processor build the prompts (linked from the policy).
            min_pixels / max_pixels: image resize bounds (LMM-R1 defaults 4*28*28 .. 16384*28*28).
            on_bad_row: "error" (stop, listing every bad row) or "skip" (drop and report them).
        """
        super().__init__()
        if not datasets:
            raise ValueError("--data.datasets: give at least one dataset")
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"--data.on_bad_row: unknown {on_bad_row!r}; choose from ['error', 'skip']")
        self.datasets, self.val = datasets, list(val or [])
        self.batch_size, self.val_batch_size, self.seed, self.num_workers = batch_size, val_batch_size, seed, num_workers
        self.processor_path = processor_path
        self.processor_options = dict(min_pixels=min_pixels, max_pixels=max_pixels, max_prompt_tokens=max_prompt_tokens)
        self.load_options = dict(input_key=input_key, label_key=label_key, on_bad_row=on_bad_row)
        self.consumed = 0  # stream position of the next prompt training has not seen
        self.train_rows: list[list[dict[str, Any]]] = []
        self.val_rows: list[list[dict[str, Any]]] = []

    def prepare_data(self) -> None:
        from lmmr1.data.synthetic import make

        for spec in self.datasets + self.val:
            if spec.make is not None and not Path(spec.path).exists():
                recipe = dict(spec.make)
                make(recipe.pop("kind"), out=Path(spec.path).parent, **recipe)

    def setup(self, stage: str | None = None) -> None:
        from lmmr1.data.records import load_rows

        if self.processor_path is None:
            raise ValueError("--data.processor_path is not set (normally linked from --model.policy.path)")
        self.processor = PromptProcessor(self.processor_path, **self.processor_options)
        if not self.train_rows:
            self.train_rows = [load_rows(spec.path, **self.load_options) for spec in self.datasets]
            for spec, rows in zip(self.datasets, self.train_rows):
                if not rows:
                    raise ValueError(f"{spec.path}: no usable rows")
            self.val_rows = [load_rows(spec.path, **self.load_options) for spec in self.val]

    def all_train_rows(self) -> list[dict[str, Any]]:
        return [row for rows in self.train_rows for row in rows]

    def collate(self, rows: list[dict[str, Any]]) -> PromptBatch:
        return self.processor(rows)

    def train_dataloader(self) -> DataLoader:
        sampler = BlendedSampler([len(r) for r in self.train_rows], [s.prob for s in self.datasets], self.seed,
                                 start=self.consumed)
        return DataLoader(_Rows(self.train_rows), batch_size=self.batch_size, sampler=sampler,
                          collate_fn=self.collate, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(rows, batch_size=self.val_batch_size, shuffle=False, collate_fn=self.collate,
                           num_workers=self.num_workers) for rows in self.val_rows]

    def on_after_batch_transfer(self, batch: PromptBatch, dataloader_idx: int) -> PromptBatch:
        # Runs in the main process right before training_step, so prefetched batches are not counted as consumed.
        if self.trainer is not None and self.trainer.training:
            self.consumed = max(row["_position"] for row in batch.rows) + 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = state["consumed"]
