"""A fixed run's step losses, recorded as exact floats: restructuring the step must not move a bit.

Tiny random Llama (``make_tiny(0)``), the eight conftest pairs, padded layout, fp32, batch 4 with
grad_accum 2, 5 steps across an epoch boundary, lr 1e-3. The values were recorded from the code as
it stood before the step was split into the log-prob module, the Reference object and typed
batches; the layout is pinned so that a change of the default layout cannot hide a difference.

One value was recorded again, on purpose: ipo's step 4 moved by 2 ulps when the gradient norm became
accurate (``dpokit.distributed.squared_norm``: fp32 block norms combined in float64, instead of one fp32
norm that is off by ~1e-5 on the 1.5M-element embedding gradient). ipo is the run whose gradients are
clipped hardest (norms ~20 against a limit of 1); every other value kept its bits.

Two more were recorded again when the optimizer became torch's fused AdamW (one kernel per step instead
of eight passes over the weights): dpo's steps 3 and 5 moved by one fp32 ulp (relative 9e-8); ipo, kto
and sft kept every bit.
"""

from __future__ import annotations

import json

import pytest

from dpokit.cli import main

GOLDEN = {
    "dpo": ["0x1.62e4300000000p-1", "0x1.62e4860000000p-1", "0x1.5a09ca0000000p-1", "0x1.4b73b00000000p-1",
            "0x1.4c5caa0000000p-1"],
    "ipo": ["0x1.9000000000000p+4", "0x1.90197e0000000p+4", "0x1.85aab00000000p+4", "0x1.76879b0000000p+4",
            "0x1.78c5f70000000p+4"],
    "kto": ["0x1.0000000000000p-1", "0x1.007e778000000p-1", "0x1.0072f00000000p-1", "0x1.0083e90000000p-1",
            "0x1.fbb7500000000p-2"],
    "sft": ["0x1.595f4b21642c8p+3", "0x1.59f1c1af286bdp+3", "0x1.5a027ba2e8ba3p+3", "0x1.591168ccccccdp+3",
            "0x1.598e5642c8591p+3"],
}
COMMON = ["--max-steps", "5", "train.batch_size=4", "train.grad_accum=2", "precision=fp32", "train.layout=padded"]
RUNS = {
    "dpo": ["dpo", "train.lr=1e-3"],
    "ipo": ["dpo", "train.lr=1e-3", "--loss", "ipo"],
    "kto": ["dpo", "train.lr=1e-3", "--loss", "kto"],
    "sft": ["sft"],
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_fixed_run_losses_are_bit_identical_to_the_recorded_ones(name, tmp_path, tiny_model_dir, pairs_file):
    cmd, *extra = RUNS[name]
    run = tmp_path / name
    assert main([cmd, "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir", str(run),
                 *COMMON, *extra]) == 0
    losses = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [float(x).hex() for x in losses[:5]] == GOLDEN[name]
