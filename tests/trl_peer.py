"""TRL's DPOTrainer as a trusted peer for parity tests (pinned in the dev extras)."""

from __future__ import annotations

from typing import Any


def trl_trainer(policy: Any, reference: Any, tokenizer: Any, rows: list[dict], beta: float = 0.1, out: str = "/tmp/trl"):
    import datasets
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=out, report_to=[], use_cpu=True, max_length=None, beta=beta, bf16=False)
    return DPOTrainer(model=policy, ref_model=reference, args=args,
                      train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
