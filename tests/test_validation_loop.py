"""Validation through the trainer reports what an independent computation over the same greedy responses gives."""

from __future__ import annotations

import lightning as L

from lmmr1.data.datamodule import DatasetSpec, PromptDataModule
from lmmr1.data.processor import PromptProcessor
from lmmr1.data.records import load_rows
from lmmr1.data.synthetic import make
from lmmr1.modules.evaluation import EvalConfig
from lmmr1.modules.policy import Policy
from lmmr1.modules.rl_module import RLModule
from lmmr1.rewards import RewardOutput
from lmmr1.rollout.base import SamplingConfig
from lmmr1.rollout.hf import HFEngine
from tests.test_fit_e2e import LengthReward


class EvenLength(LengthReward):
    """'accuracy' = 1 when the response has an even number of characters: varied, checkable, model-independent."""

    def __call__(self, responses, rows) -> RewardOutput:  # noqa: ANN001
        correct = [float(len(r) % 2 == 0) for r in responses]
        return RewardOutput(total=correct, components={"accuracy": correct})


def test_logged_validation_metrics_equal_an_independent_computation(tiny_vl_path, tmp_path):
    path = str(make("image-arith", n=6, seed=0, out=tmp_path / "val", difficulty=1, split="val"))
    sampling = SamplingConfig(n=2, max_new_tokens=7)
    module = RLModule(policy=Policy(str(tiny_vl_path)), reward=EvenLength(), sampling=sampling,
                      evaluation=EvalConfig(n=4, temperature=1.0, k=[1, 2]))
    data = PromptDataModule(datasets=[DatasetSpec(path)], val=[DatasetSpec(path, name="mm")], val_batch_size=4,
                            processor_path=str(tiny_vl_path))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(module, datamodule=data)[0]

    # independent: greedy-generate every prompt on its own and count
    processor, engine = PromptProcessor(tiny_vl_path), HFEngine()
    engine.bind(module.policy, processor.tokenizer)
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=7)
    rows = load_rows(path)
    texts = [engine.generate(processor([row]), greedy)[0][0].text for row in rows]
    assert logged["val/mm/accuracy"] == sum(len(t) % 2 == 0 for t in texts) / len(texts)
    assert logged["val/mm/image_arith/accuracy"] == logged["val/mm/accuracy"]
    assert 0.0 <= logged["val/mm/pass@1"] <= logged["val/mm/pass@2"] <= 1.0
    tested = trainer.test(module, datamodule=data)[0]  # `lmmr1 test`: the same evaluation under test/
    assert tested["test/mm/accuracy"] == logged["val/mm/accuracy"]
