"""Prompt DataModule: datasets blended by probability into an endless, seeded, resumable stream of prompt batches.

Each dataset is a JSONL/JSON/Parquet file in the LMM-R1 row format; a dataset may carry a `make` recipe so
`prepare_data` generates it locally when the file is missing (nothing is ever downloaded). The stream is a pure
function of (seed, position), and the position of the last batch handed to training is saved in checkpoints, so a
resumed run continues with the next unseen prompt.

With several data-parallel ranks, `batch_size` is still the global batch (prompts per rollout, all ranks together):
global batch b is the positions [b*B, (b+1)*B) of the same stream, whatever the world size, and rank r of W takes the
contiguous share [b*B + r*B/W, b*B + (r+1)*B/W). A 2-rank run therefore sees exactly the prompts of the 1-rank run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lmmr1.data.processor import PromptBatch, PromptProcessor
from lmmr1.distributed import DataParallel, data_parallel


@dataclass
class DatasetSpec:
    """One dataset of prompts."""

    path: str
    """A .jsonl, .json or .parquet file of rows."""
    prob: float = 1.0
    """Relative sampling weight when several datasets are blended (normalised over the list)."""
    make: dict[str, Any] | None = None
    """Optional `lmmr1 data make` recipe ({kind, n, seed, difficulty, split}), run by prepare_data if `path` is
    missing."""
    name: str | None = None
    """Name used in metric keys (defaults to the file's folder name)."""

    @property
    def label(self) -> str:
        return self.name or Path(self.path).parent.name or Path(self.path).stem


def _check_specs(specs: list[DatasetSpec], flag: str, *, blended: bool) -> None:
    """Reject what would fail or mislead only once the stream runs: empty paths, weights that are negative, not
    finite, or (`blended`: drawn from by weight) all zero."""
    for j, spec in enumerate(specs):
        if not isinstance(spec.path, str) or not spec.path.strip():
            raise ValueError(f"{flag}[{j}].path: must be a data file path, got {spec.path!r}")
        if not (spec.prob >= 0 and math.isfinite(spec.prob)):
            raise ValueError(f"{flag}[{j}].prob: must be a finite number >= 0, got {spec.prob}")
    if blended and specs and not sum(spec.prob for spec in specs) > 0:
        raise ValueError(f"{flag}: every prob is 0; give at least one dataset a weight > 0")


class _Rows(Dataset):
    """Rows of several datasets addressed by (dataset index, row index, stream position)."""

    def __init__(self, tables: list[list[dict[str, Any]]]) -> None:
        self.tables = tables

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        dataset, row, position = key
        return {**self.tables[dataset][row], "_position": position}


class _EvalShard(DistributedSampler):
    """Rank r's rows of a held-out set: r, r+W, r+2W, ... Shares are padded to equal length by repeating a row marked
    `_pad` (excluded from metrics), so every rank runs the same number of evaluation batches (collectives under ZeRO-3
    and DDP stay paired) and no row is counted twice."""

    def __init__(self, size: int, dp: DataParallel) -> None:  # no DistributedSampler.__init__: see CurriculumSampler
        self.size, self.dp = size, dp

    def __len__(self) -> int:
        return -(-self.size // self.dp.size)

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        mine = list(range(self.dp.rank, self.size, self.dp.size))
        yield from ((i, False) for i in mine)
        yield from ((mine[0] if mine else 0, True) for _ in range(len(self) - len(mine)))


class _EvalRows(Dataset):
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, bool]) -> dict[str, Any]:
        index, pad = key
        return {**self.rows[index], "_pad": True} if pad else self.rows[index]


class _Walker:
    """Per-dataset walk: each epoch is a fresh seeded permutation of the rows."""

    def __init__(self, size: int, seed: str) -> None:
        self.size, self.seed, self.seen, self.order = size, seed, 0, []

    def next(self) -> int:
        epoch, offset = divmod(self.seen, self.size)
        if offset == 0:
            self.order = list(range(self.size))
            random.Random(f"{self.seed}:{epoch}").shuffle(self.order)
        self.seen += 1
        return self.order[offset]


class CurriculumSampler(DistributedSampler):
    """Endless (dataset, row, position) stream over stages of blended datasets; a pure function of (seed, position).

    Position p belongs to training step p // batch_size (the global batch). Stage k covers `steps[k]` steps (the last
    stage never ends). In the last `anneal_steps` steps of a stage the next stage's datasets are mixed in with a
    linearly rising share. Within a stage a dataset is picked by its probability, then that dataset's next row in a
    shuffled epoch order. Rank r of `replicas` yields only its contiguous share of every global batch; it is a
    `DistributedSampler` so that Lightning leaves the sharding to it.
    """

    def __init__(self, stages: list[list[tuple[int, int, float]]], steps: list[int | None], batch_size: int,
                 seed: int, start: int = 0, anneal_steps: int = 0, rank: int = 0, replicas: int = 1) -> None:
        """stages[k] lists (global dataset index, dataset size, probability) of stage k."""
        # DistributedSampler.__init__ is not called: it needs a sized dataset and a process group; this stream is
        # endless and its share is fixed by (rank, replicas).
        if batch_size % replicas:
            raise ValueError(f"--data.batch_size {batch_size} (prompts per rollout, all ranks together) must be "
                             f"divisible by the {replicas} data-parallel ranks")
        self.stages, self.steps, self.batch_size = stages, steps, batch_size
        self.seed, self.start, self.anneal_steps = seed, start, anneal_steps
        self.rank, self.replicas = rank, replicas
        self.ends = []  # first step after each stage
        total = 0
        for n in steps[:-1]:
            total += n
            self.ends.append(total)

    def stage_at(self, step: int) -> int:
        return next((k for k, end in enumerate(self.ends) if step < end), len(self.stages) - 1)

    def next_stage_share(self, step: int) -> float:
        stage = self.stage_at(step)
        if not self.anneal_steps or stage >= len(self.ends):
            return 0.0
        into = step - (self.ends[stage] - self.anneal_steps)
        return max(0.0, (into + 1) / (self.anneal_steps + 1))

    def __len__(self) -> int:
        raise TypeError("the prompt stream is endless")  # what Lightning reads as an infinite dataloader

    def owns(self, position: int) -> bool:
        """True if `position` lies in this rank's share of its global batch."""
        return (position % self.batch_size) // (self.batch_size // self.replicas) == self.rank

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        pick = random.Random(f"{self.seed}:pick")
        walkers = {d: _Walker(size, f"{self.seed}:{d}") for stage in self.stages for d, size, _ in stage}
        position = 0
        while True:
            step = position // self.batch_size
            stage = self.stage_at(step)
            if pick.random() < self.next_stage_share(step):
                stage += 1
            datasets = self.stages[stage]
            d = pick.choices([d for d, _, _ in datasets], weights=[p for _, _, p in datasets])[0]
            row = walkers[d].next()
            if position >= self.start and self.owns(position):
                yield d, row, position
            position += 1


@dataclass
class Stage:
    """One curriculum stage: a blend of datasets used for a number of steps."""

    name: str
    """Stage name, logged as the current stage (e.g. fre, mgt)."""
    datasets: list[DatasetSpec]
    """The stage's datasets and their sampling weights."""
    steps: int | None = None
    """Training steps spent in this stage; None (only for the last stage) = until training ends."""


class PromptDataModule(L.LightningDataModule):
    """Training prompts blended from datasets, optionally in curriculum stages; validation sets one by one.

    `datasets` is shorthand for a single stage. With `stages`, training switches from one stage's datasets to the next
    exactly at the configured step (FRE text data first, then MGT multimodal data), optionally annealing the mix over
    `anneal_steps` steps before each boundary.
    """

    def __init__(
        self,
        datasets: list[DatasetSpec] | None = None,
        stages: list[Stage] | None = None,
        batch_size: int = 8,
        val: list[DatasetSpec] | None = None,
        val_batch_size: int = 8,
        anneal_steps: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        processor_path: str | None = None,
        min_pixels: int = 4 * 28 * 28,
        max_pixels: int = 16384 * 28 * 28,
        max_prompt_tokens: int | None = None,
        system_prompt: str | None = None,
        few_shot: list[dict[str, Any]] | None = None,
        input_key: str = "message",
        label_key: str = "answer",
        on_bad_row: str = "error",
        episodes: float | None = None,
    ) -> None:
        """
        Args:
            datasets: training datasets and their sampling weights (a single stage named "train").
            stages: curriculum stages, used instead of `datasets`.
            batch_size: prompts per RL step (B); each yields `model.sampling.n` completions.
            val: held-out datasets, each reported under `val/<name>/...`.
            anneal_steps: steps before each stage boundary over which the next stage is mixed in (0 = hard switch).
            processor_path: model folder whose tokenizer / image processor build the prompts (linked from the policy).
            min_pixels / max_pixels: image resize bounds (LMM-R1 defaults 4*28*28 .. 16384*28*28).
            system_prompt: replaces every row's system message (None keeps the rows' own).
            few_shot: chat turns (e.g. worked examples) placed after the system message of every prompt.
            on_bad_row: "error" (stop, listing every bad row) or "skip" (drop and report them).
            episodes: passes over the training rows (OpenRLHF's num_episodes); when `trainer.max_steps` is -1 it
                becomes ceil(episodes x rows / batch_size) once the rows are loaded (a max_steps given explicitly
                wins). Single-stage runs only.
        """
        super().__init__()
        if bool(datasets) == bool(stages):
            raise ValueError("give exactly one of --data.datasets and --data.stages")
        self.stages = list(stages) if stages else [Stage("train", list(datasets))]
        for i, stage in enumerate(self.stages):
            flag = f"--data.stages[{i}]" if stages else "--data"
            if not stage.datasets:
                raise ValueError(f"{flag} ({stage.name}): no datasets")
            if stage.steps is None and i < len(self.stages) - 1:
                raise ValueError(f"{flag} ({stage.name}): only the last stage may omit `steps`")
            if stage.steps is not None and stage.steps < 1:
                raise ValueError(f"{flag}.steps ({stage.name}): must be >= 1 or null, got {stage.steps}")
            _check_specs(stage.datasets, f"{flag}.datasets", blended=True)
        _check_specs(list(val or []), "--data.val", blended=False)
        for name, value, least in (("batch_size", batch_size, 1), ("val_batch_size", val_batch_size, 1),
                                   ("anneal_steps", anneal_steps, 0), ("num_workers", num_workers, 0),
                                   ("min_pixels", min_pixels, 1)):
            if value < least:
                raise ValueError(f"--data.{name}: must be >= {least}, got {value}")
        if max_pixels < min_pixels:
            raise ValueError(f"--data.max_pixels: must be >= --data.min_pixels ({min_pixels}), got {max_pixels}")
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"--data.on_bad_row: unknown {on_bad_row!r}; choose from ['error', 'skip']")
        if episodes is not None and not 0 < episodes < float("inf"):
            raise ValueError(f"--data.episodes: must be a number > 0 or null, got {episodes}")
        if episodes is not None and stages:
            raise ValueError("--data.episodes: counts passes over one set of datasets; with --data.stages give "
                             "each stage its `steps` instead")
        self.episodes = episodes
        self.val = list(val or [])
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.seed, self.num_workers = seed, num_workers
        self.anneal_steps = anneal_steps
        self.processor_path = processor_path
        self.processor_options = dict(min_pixels=min_pixels, max_pixels=max_pixels, max_prompt_tokens=max_prompt_tokens,
                                      system_prompt=system_prompt, few_shot=few_shot)
        self.load_options = dict(input_key=input_key, label_key=label_key, on_bad_row=on_bad_row)
        self.consumed = 0  # stream position of the next prompt training has not seen
        self.train_rows: list[list[dict[str, Any]]] = []  # one table per (stage, dataset), in order
        self.val_rows: list[list[dict[str, Any]]] = []

    @property
    def train_specs(self) -> list[DatasetSpec]:
        return [spec for stage in self.stages for spec in stage.datasets]

    def prepare_data(self) -> None:
        from lmmr1.data.synthetic import make

        for spec in self.train_specs + self.val:
            if spec.make is not None and not Path(spec.path).exists():
                recipe = dict(spec.make)
                make(recipe.pop("kind"), out=Path(spec.path).parent, **recipe)

    def setup(self, stage: str | None = None) -> None:
        from lmmr1.data.records import load_rows

        if self.processor_path is None:
            raise ValueError("--data.processor_path is not set (normally linked from --model.policy.path)")
        self.processor = PromptProcessor(self.processor_path, **self.processor_options)
        if not self.train_rows:
            cache: dict[str, list[dict[str, Any]]] = {}
            for spec in self.train_specs + self.val:
                if spec.path not in cache:
                    cache[spec.path] = load_rows(spec.path, **self.load_options)
                if not cache[spec.path]:
                    raise ValueError(f"{spec.path}: no usable rows")
            self.train_rows = [cache[spec.path] for spec in self.train_specs]
            self.val_rows = [cache[spec.path] for spec in self.val]
        if (self.episodes is not None and stage in ("fit", None) and self.trainer is not None
                and self.trainer.max_steps == -1):
            self.trainer.fit_loop.epoch_loop.max_steps = self.steps_for_episodes()  # before the loop starts

    def steps_for_episodes(self) -> int:
        """RL steps that make `episodes` passes over the training rows, `batch_size` prompts per step."""
        rows = sum(len(t) for t in self.train_rows)
        return max(1, math.ceil(self.episodes * rows / self.batch_size))

    def all_train_rows(self) -> list[dict[str, Any]]:
        return [row for rows in self.train_rows for row in rows]

    @property
    def data_parallel(self) -> DataParallel:
        """This process's share of every global batch (rank 0 of 1 outside distributed training)."""
        return data_parallel()

    def sampler(self, start: int = 0, dp: DataParallel | None = None) -> CurriculumSampler:
        stages, index = [], 0
        for stage in self.stages:
            stages.append([(index + k, len(self.train_rows[index + k]), spec.prob)
                           for k, spec in enumerate(stage.datasets)])
            index += len(stage.datasets)
        dp = dp or DataParallel()
        return CurriculumSampler(stages, [s.steps for s in self.stages], self.batch_size, self.seed, start=start,
                                 anneal_steps=self.anneal_steps, rank=dp.rank, replicas=dp.size)

    def stage_at(self, step: int) -> Stage:
        """The curriculum stage that training step `step` draws from."""
        return self.stages[self.sampler().stage_at(step)]

    def collate(self, rows: list[dict[str, Any]]) -> PromptBatch:
        return self.processor(rows)

    def train_dataloader(self) -> DataLoader:
        dp = self.data_parallel
        return DataLoader(_Rows(self.train_rows), batch_size=self.batch_size // dp.size,
                          sampler=self.sampler(self.consumed, dp),
                          collate_fn=self.collate, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> list[DataLoader]:
        dp = self.data_parallel
        return [DataLoader(_EvalRows(rows), batch_size=self.val_batch_size, sampler=_EvalShard(len(rows), dp),
                           collate_fn=self.collate, num_workers=self.num_workers) for rows in self.val_rows]

    def test_dataloader(self) -> list[DataLoader]:
        """`lmmr1 test` evaluates the held-out `val` sets."""
        return self.val_dataloader()

    def on_after_batch_transfer(self, batch: PromptBatch, dataloader_idx: int) -> PromptBatch:
        # Runs in the main process right before training_step, so prefetched batches are not counted as consumed.
        # `consumed` is global (the end of this global batch), so every rank saves and resumes the same position.
        if self.trainer is not None and self.trainer.training:
            step = max(row["_position"] for row in batch.rows) // self.batch_size
            self.consumed = (step + 1) * self.batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = state["consumed"]


CurriculumDataModule = PromptDataModule  # the name DESIGN.md uses; `stages` is what makes it a curriculum
