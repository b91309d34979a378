"""Faults on purpose, counted: SIGKILLs at random moments of training, and bytes flipped in checkpoints and in
the reference cache. Every interrupted run must end bit-identical to an uninterrupted one; every damaged file
must be caught (the run falls back or recomputes, with no traceback).

    python benchmarks/fault_loops.py                       # 8 runs killed 3 times each, 40 + 20 byte flips
    python benchmarks/fault_loops.py --runs 2 --flips 4    # a quick look

A random tiny Llama (tied embeddings) and seeded synthetic pairs, fp32, a checkpoint every step. A kill lands
a random 0-400 ms after a random step's metrics line appears (inside a step, or inside a checkpoint write);
the run is then resumed with ``--resume auto`` until it completes. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_dpo import make_pairs, model_and_tokenizer  # noqa: E402

STEPS = 10


def _argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["dpo", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", str(STEPS),
            "--save-steps", "1", "train.keep_last=3", "train.batch_size=2", "train.lr=1e-3", "precision=fp32",
            "data.max_length=128", *extra]


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def _losses(run: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def kill_cycles(model: Path, data: Path, root: Path, runs: int, kills: int, rng: random.Random, whole: Path) -> dict:
    """Each run is SIGKILLed `kills` times at random moments, resumed after each, then completed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref_w, ref_l = _weights(whole), _losses(whole)
    done = identical = killed = tracebacks = 0
    for r in range(runs):
        run = root / f"killed-{r}"
        for _ in range(kills):
            target = min(_lines(run / "metrics.jsonl") + rng.randint(1, 3), STEPS - 1)
            proc = subprocess.Popen([sys.executable, "-m", "dpokit", *_argv(model, data, run, "--resume", "auto")],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            while proc.poll() is None and _lines(run / "metrics.jsonl") < target:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed += 1
            _, err = proc.communicate()
            tracebacks += "Traceback" in err
        fin = subprocess.run([sys.executable, "-m", "dpokit", *_argv(model, data, run, "--resume", "auto")], env=env,
                             capture_output=True, text=True)
        tracebacks += "Traceback" in fin.stderr
        if fin.returncode == 0:
            done += 1
            w = _weights(run)
            identical += _losses(run) == ref_l and all(bool((w[k] == ref_w[k]).all()) for k in ref_w)
    return {"runs": runs, "sigkills": killed, "completed": done, "bit_identical": identical, "tracebacks": tracebacks}


def _flip(path: Path, rng: random.Random) -> int:
    raw = bytearray(path.read_bytes())
    at = rng.randrange(len(raw))
    raw[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(raw))
    return at


def checkpoint_flips(model: Path, data: Path, root: Path, trials: int, rng: random.Random, whole: Path) -> dict:
    """A bit flipped in a random file of the newest checkpoint; resuming must skip it and equal the whole run."""
    import contextlib
    import io

    from dpokit.cli import main

    caught = equal = tracebacks = 0
    files: dict[str, int] = {}
    for t in range(trials):
        run = root / f"flip-{t}"
        shutil.copytree(whole, run, ignore=shutil.ignore_patterns("final", ".lock"))
        newest = run / "checkpoints" / f"step-{STEPS}"
        shutil.rmtree(newest)  # resume from step STEPS-1, damaged
        victim = rng.choice(sorted(p for p in (run / "checkpoints" / f"step-{STEPS - 1}").rglob("*") if p.is_file()))
        files[victim.name] = files.get(victim.name, 0) + 1
        _flip(victim, rng)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(_argv(model, data, run, "--resume"))
        tracebacks += "Traceback" in err.getvalue()
        caught += "skipping checkpoint" in (run / "train.log").read_text()
        equal += rc == 0 and _losses(run) == _losses(whole)
        shutil.rmtree(run)
    return {"trials": trials, "caught": caught, "resumed_equal": equal, "tracebacks": tracebacks, "files_hit": files}


def cache_flips(model: Path, data: Path, root: Path, trials: int, rng: random.Random) -> dict:
    """Bits flipped in the reference cache (1-4 per trial, or the file cut short): recomputed, step 1 still ln 2."""
    import math

    from dpokit.cli import main

    os.environ["DPOKIT_CACHE"] = str(root / "cache-flips")
    base = ["--max-steps", "1", "--save-steps", "0"]
    assert main(_argv(model, data, root / "cache-fill") + base) == 0
    (cache,) = (root / "cache-flips" / "refcache").glob("*.safetensors")
    pristine = cache.read_bytes()
    caught = exact = 0
    for t in range(trials):
        if t % 5 == 4:
            cache.write_bytes(pristine[: rng.randrange(len(pristine))])
        else:
            cache.write_bytes(pristine)
            for _ in range(rng.randint(1, 4)):
                _flip(cache, rng)
        run = root / f"cache-{t}"
        rc = main(_argv(model, data, run) + base)
        caught += "recomputing it" in (run / "train.log").read_text()
        exact += rc == 0 and abs(_losses(run)[0] - math.log(2)) < 1e-7
        shutil.rmtree(run)
    return {"trials": trials, "caught": caught, "step1_ln2": exact}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--kills", type=int, default=3, help="SIGKILLs per run")
    ap.add_argument("--flips", type=int, default=40, help="checkpoint byte-flip trials")
    ap.add_argument("--cache-flips", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    stdout, sys.stdout = sys.stdout, sys.stderr  # the runs' own output goes to stderr; stdout is the JSON
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["DPOKIT_CACHE"] = str(root / "cache")
        model, tok = model_and_tokenizer("tiny")
        model.save_pretrained(root / "tiny")
        tok.save_pretrained(root / "tiny")
        data = root / "pairs.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(24, 0, 128, "long-prompts")))
        whole = root / "whole"
        from dpokit.cli import main as dpokit

        assert dpokit(_argv(root / "tiny", data, whole)) == 0
        out = {
            "kill_resume": kill_cycles(root / "tiny", data, root, args.runs, args.kills, rng, whole),
            "checkpoint_flips": checkpoint_flips(root / "tiny", data, root, args.flips, rng, whole),
            "cache_flips": cache_flips(root / "tiny", data, root, args.cache_flips, rng),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    print(json.dumps(out, indent=1), file=stdout)


if __name__ == "__main__":
    main()
