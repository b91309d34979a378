"""Runs `dpokit` in a subprocess with test-only slow-downs, so a signal can land where a test needs it.

DRIVER_STEP_SLEEP=s        sleep s seconds in every collate (each micro-batch)
DRIVER_HANG_AT_CHECKPOINT=N after writing model.safetensors of checkpoint step-N, touch DRIVER_MARKER and hang
"""

import os
import sys
import time
from pathlib import Path

import dpokit.train.checkpoint as ckpt
import dpokit.train.loop as loop
from dpokit.cli import main

sleep = float(os.environ.get("DRIVER_STEP_SLEEP", "0"))
hang_at = os.environ.get("DRIVER_HANG_AT_CHECKPOINT")

if sleep:
    real_to_device = loop.to_device

    def slow_to_device(batch, device):
        time.sleep(sleep)
        return real_to_device(batch, device)

    loop.to_device = slow_to_device

if hang_at:
    real_save_model = ckpt.save_model

    def hanging_save_model(model, filename):
        real_save_model(model, filename)
        if Path(filename).parent.name.startswith(f".step-{hang_at}.tmp"):
            Path(os.environ["DRIVER_MARKER"]).touch()
            time.sleep(600)

    ckpt.save_model = hanging_save_model

sys.exit(main(sys.argv[1:]))
