"""Where a DPO step's time goes: torch.profiler over the default path, grouped by operator.

    python benchmarks/profile_step.py --precision bf16      # SmolLM2-135M, batch 4, bench_dpo's long-prompts mix
    python benchmarks/profile_step.py --model tiny --precision fp32

Runs ``dpokit dpo`` with no speed options (as bench_dpo's ``dpokit`` configuration) for ``--steps`` optimizer
steps, profiling all but the first, and prints one JSON object: the profiled wall seconds, the matmul share,
and the operators with the most self CPU time (share of the total, calls, input dtypes seen).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_dpo import make_pairs, model_and_tokenizer, resolve_model_dir  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_scaled_dot_product")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--mix", choices=["long-prompts", "long-responses"], default="long-prompts")
    args = ap.parse_args()
    stdout, sys.stdout = sys.stdout, sys.stderr  # the run's own output goes to stderr; stdout is the JSON

    import torch
    from torch.profiler import ProfilerActivity, profile

    from dpokit.config import load_config
    from dpokit.train.dpo import build_dpo
    from dpokit.train.loop import fit

    model_dir = resolve_model_dir(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DPOKIT_CACHE"] = str(Path(tmp) / "cache")
        data = Path(tmp) / "pairs.jsonl"
        rows = make_pairs(args.batch * args.steps, 0, args.max_length, args.mix)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = load_config(None, [("model.name_or_path", model_dir), ("data.train_files", [str(data)]),
                                 ("data.max_length", args.max_length), ("train.batch_size", args.batch),
                                 ("train.max_steps", args.steps), ("train.lr", 1e-6), ("precision", args.precision),
                                 ("output_dir", str(Path(tmp) / "run"))])
        model = tokenizer = None
        if model_dir == "tiny":
            model, tokenizer = model_and_tokenizer("tiny")
        job = build_dpo(cfg, model=model, tokenizer=tokenizer)
        prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
        marks: list[float] = []

        def on_step(record: dict) -> None:  # profile from the end of step 1 to the end of the run
            marks.append(time.perf_counter())
            if len(marks) == 1:
                prof.__enter__()

        job.observers.append(on_step)
        fit(job)
        prof.__exit__(None, None, None)
    events = prof.key_averages(group_by_input_shape=False)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    dtypes: dict[str, set] = {}
    for e in prof.events():
        if e.input_dtypes:
            dtypes.setdefault(e.name, set()).update(t for t in e.input_dtypes if t)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]
    out = {
        "model": args.model, "mix": args.mix, "precision": args.precision, "batch_pairs": args.batch,
        "steps_profiled": len(marks) - 1,
        "wall_s": marks[-1] - marks[0], "torch_threads": torch.get_num_threads(),
        "matmul_share": sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMUL)) / total,
        "top_ops": [{"op": e.key, "share": round(e.self_cpu_time_total / total, 4), "calls": e.count,
                     "dtypes": sorted(dtypes.get(e.key, ()))[:4]} for e in top],
    }
    print(json.dumps(out, indent=1), file=stdout)


if __name__ == "__main__":
    main()
