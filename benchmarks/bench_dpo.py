"""dpokit vs TRL's DPOTrainer: DPO steps on the same model, data, batch, max length and precision.

    python benchmarks/bench_dpo.py                         # SmolLM2-135M, fp32 and bf16, both data mixes
    python benchmarks/bench_dpo.py --precision bf16 --mix long-responses --steps 4
    python benchmarks/bench_dpo.py --model tiny --steps 2  # a seconds-long smoke run on a random tiny model

Each configuration runs in its own subprocess (clean peak resident memory), on the same seeded
synthetic pairs. Two data mixes: ``long-prompts`` (prompts 24-240 words, responses 8-200: prompts are
about half the tokens) and ``long-responses`` (prompts 8-40 words, responses 100-240: responses longer
than their prompts). Configurations:

* dpokit          ``dpokit dpo`` with no speed options: what a user gets (layout auto, reference cache on)
* dpokit-padded   the plain path: padded rows and a frozen reference model in memory
* dpokit-packed   fixed layouts (with the reference cache), to see where each layout wins
* dpokit-shared
* trl-default     TRL 1.16 DPOTrainer at its defaults (gradient checkpointing on, reference model in memory)
* trl-tuned       TRL without gradient checkpointing and with precomputed reference log-probs

Prints one JSON object: per configuration pairs/s, tokens/s (tokens of the sequences, prompt counted
for both responses, as TRL counts them), peak RSS, step-1 loss, setup seconds; the ratios dpokit/TRL;
each configuration's matmul FLOPs per step from the positions it computed (``step_flops``), its
achieved FLOP/s against a matmul peak measured here, and ``flop_ratio``: TRL's FLOPs over dpokit's,
the speed-up equal FLOP/s would give. Step 1 is a warm-up and is not timed. ``--set KEY=VALUE``
passes a config override to the dpokit configurations.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the film story actor scene music camera light dark quiet loud fast slow city river night morning "
         "house friend family war love fear hope time world voice face hand road dream memory winter summer "
         "stranger letter island train window garden secret promise journey storm silence laughter").split()

OURS = ("dpokit", "dpokit-padded", "dpokit-packed", "dpokit-shared")
CONFIGS = (*OURS, "trl-default", "trl-tuned")
MIXES = {"long-prompts": ((24, 240), (8, 200)), "long-responses": ((8, 40), (100, 240))}  # words: prompt, response


def make_pairs(n: int, seed: int, max_length: int, mix: str = "long-prompts") -> list[dict]:
    """Seeded synthetic pairs with the mix's prompt and response lengths in words (about 1.3 tokens a word),
    capped so prompt + response fits max_length."""
    rng = random.Random(seed)
    (p_lo, p_hi), (r_lo, r_hi) = MIXES[mix]

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    rows = []
    for _ in range(n):
        p = rng.randint(p_lo, min(p_hi, max_length // 3))
        room = max(r_lo + 1, int((max_length - p * 1.3) / 1.3))
        rows.append({"prompt": text(p), "chosen": " " + text(rng.randint(r_lo, min(r_hi, room))),
                     "rejected": " " + text(rng.randint(r_lo, min(r_hi, room)))})
    return rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def model_and_tokenizer(name: str):
    import torch

    from dpokit.models import load_model, load_tokenizer

    if name == "tiny":
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          bos_token_id=1, eos_token_id=2, pad_token_id=2)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), load_tokenizer("smollm2")
    return load_model(name), load_tokenizer(name)


def resolve_model_dir(name: str) -> str:
    """The embedded GGUF is converted once to a HF directory so both frameworks load the same files fast."""
    if name in ("tiny",):
        return name
    if name.lower() in ("smollm2", "embedded"):
        from dpokit.demo import cache_root, embedded_hf_dir

        return str(embedded_hf_dir(cache_root(None)))
    return name


# ----------------------------------------------------------------------------------- workers
def run_dpokit(args: argparse.Namespace, data: Path, mode: str) -> dict:
    import torch

    from dpokit.config import load_config
    from dpokit.logprobs import LogProbs
    from dpokit.train.dpo import build_dpo
    from dpokit.train.loop import fit

    t0 = time.perf_counter()
    overrides = [("model.name_or_path", args.model_dir), ("data.train_files", [str(data)]),
                 ("data.max_length", args.max_length), ("train.batch_size", args.batch),
                 ("train.max_steps", args.steps), ("train.lr", 1e-6), ("train.warmup_ratio", 0.0),
                 ("precision", args.precision), ("output_dir", args.out)]
    if mode == "dpokit-padded":
        overrides += [("train.layout", "padded"), ("train.ref_cache", False)]
    elif mode != "dpokit":
        overrides += [("train.layout", mode.split("-")[1].replace("shared", "shared_prompt"))]
    overrides += [(k, v) for k, _, v in (kv.partition("=") for kv in args.set)]
    os.environ["DPOKIT_CACHE"] = f"{args.out}-cache"  # a cold cache beside the run: its fill counts as setup
    cfg = load_config(None, overrides)
    times: list[float] = []
    records: list[dict] = []
    positions = {"policy": 0, "reference": 0, "policy_head": 0, "reference_head": 0}

    def on_step(record: dict) -> None:
        times.append(time.perf_counter())
        records.append({**record, **positions})
        positions.update(policy=0, reference=0, policy_head=0, reference_head=0)

    model = tokenizer = None
    if args.model_dir == "tiny":
        model, tokenizer = model_and_tokenizer("tiny")
    torch.manual_seed(0)
    job = build_dpo(cfg, model=model, tokenizer=tokenizer)
    job.observers.append(on_step)
    real_forward = LogProbs.forward

    def counting(self: LogProbs, batch, **kw):  # token positions each forward computes, for the FLOP estimate
        mine = "policy" if self is job.policy else "reference"
        positions[mine] += batch.positions
        positions[f"{mine}_head"] += int(batch.targets.numel())  # completion positions: the LM head's rows
        return real_forward(self, batch, **kw)

    LogProbs.forward = counting  # type: ignore[method-assign]
    positions.update(policy=0, reference=0, policy_head=0, reference_head=0)
    fit(job)
    return _summary(times, records, t0, tokens_key="tokens", pairs=args.batch)


def run_trl(args: argparse.Namespace, data: Path, tuned: bool) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    t0 = time.perf_counter()
    policy, tok = model_and_tokenizer(args.model_dir)
    ref = None
    if args.model_dir == "tiny":
        import copy

        ref = copy.deepcopy(policy)
    rows = [json.loads(ln) for ln in data.read_text().splitlines()]
    cfg = DPOConfig(output_dir=args.out, per_device_train_batch_size=args.batch, max_length=args.max_length,
                    max_steps=args.steps, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0,
                    logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                    bf16=args.precision == "bf16", gradient_checkpointing=not tuned,
                    precompute_ref_log_probs=tuned, dataloader_num_workers=0, seed=0)
    times: list[float] = []
    tokens: list[int] = []
    padded: list[int] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter())

    trainer = DPOTrainer(model=policy, ref_model=ref, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok, callbacks=[Clock()])
    real = trainer._compute_loss

    def counting(model, inputs, return_outputs):
        tokens.append(int(inputs["attention_mask"].sum()))
        padded.append(int(inputs["attention_mask"].numel()))  # chosen and rejected rows, padded: what is computed
        return real(model, inputs, return_outputs)

    trainer._compute_loss = counting
    torch.manual_seed(0)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    records = [{"loss": loss, "tokens": n, "padded": m} for loss, n, m in zip(losses, tokens, padded)]
    out = _summary(times, records, t0, tokens_key="tokens", pairs=args.batch)
    out["padded_positions_per_step"] = sum(r["padded"] for r in records[1:]) / max(1, len(records) - 1)
    out["gradient_checkpointing"], out["reference_forward_per_step"] = not tuned, not tuned
    return out


def _summary(times: list[float], records: list[dict], t0: float, tokens_key: str, pairs: int) -> dict:
    timed = len(times) - 1
    elapsed = times[-1] - times[0] if timed > 0 else float("nan")
    tok = sum(r.get(tokens_key, 0) for r in records[1:])
    out = {"pairs_per_s": pairs * timed / elapsed, "tokens_per_s": tok / elapsed if tok else None,
           "seconds_per_step": elapsed / timed, "step1_loss": records[0]["loss"] if records else None,
           "peak_rss_mb": peak_rss_mb(), "setup_s": times[0] - t0 if times else None, "timed_steps": timed}
    if records and "policy" in records[0]:  # dpokit: token positions computed, for the FLOP estimate
        out["policy_positions_per_s"] = sum(r["policy"] for r in records[1:]) / elapsed
        out["reference_positions_per_s"] = sum(r["reference"] for r in records[1:]) / elapsed
        for k in ("policy_head", "reference_head"):
            out[f"{k}_positions_per_s"] = sum(r[k] for r in records[1:]) / elapsed
    return out


def step_flops(r: dict, body: int, head: int) -> dict:
    """Matmul FLOPs of one step from the positions each configuration computed: 2 per parameter and position for a
    forward, 4 for a backward, 2 more where gradient checkpointing recomputes the forward. Body: the ``body``
    non-embedding parameters; LM head: ``head`` parameters. dpokit: the policy's forward and backward over its
    positions, the head over completion positions (plus the reference's forward where one runs). TRL: chosen and
    rejected rows padded to the longest, the head over every position, and the reference forward in the default
    configuration. Attention scores are left out of both (a few percent at 512 tokens)."""
    s = r["seconds_per_step"]
    if "policy_positions_per_s" in r:
        policy, ref, policy_head, ref_head = (r[f"{k}_positions_per_s"] * s for k in (
            "policy", "reference", "policy_head", "reference_head"))
        total = 6 * (body * policy + head * policy_head) + 2 * (body * ref + head * ref_head)
    else:
        n = r["padded_positions_per_step"]
        per = (8 if r["gradient_checkpointing"] else 6) * body + 6 * head  # checkpointing covers the layers only
        total = n * (per + (2 * (body + head) if r["reference_forward_per_step"] else 0))
    return {"flops_per_step": total}


def matmul_peak(precision: str) -> float:
    """Best FLOP/s of a 2048^3 matmul on this machine, in the run's precision."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048**3 / (time.perf_counter() - t))
    return best


def count_params(model_dir: str) -> tuple[int, int]:
    """(non-embedding parameters: the matmuls every token goes through, LM-head parameters)."""
    model, _ = model_and_tokenizer(model_dir)
    head = model.get_output_embeddings().weight.numel()
    embed = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return total - embed - (0 if model.config.tie_word_embeddings else head), head


# ------------------------------------------------------------------------------------- parent
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--mix", choices=[*MIXES, "both"], default="both", help="data mix (default: both)")
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps (the first is not timed)")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--write-pairs", metavar="FILE.jsonl", help="only write the synthetic pairs of --mix to FILE")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the dpokit configurations (repeatable), e.g. train.grad_accum=2")
    ap.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.write_pairs:
        mix = "long-prompts" if args.mix == "both" else args.mix
        rows = make_pairs(args.pairs, 0, args.max_length, mix)
        Path(args.write_pairs).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return
    if args.worker:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        data = Path(args.data)
        if args.worker.startswith("dpokit"):
            res = run_dpokit(args, data, args.worker)
        else:
            res = run_trl(args, data, tuned=args.worker == "trl-tuned")
        print("RESULT " + json.dumps(res))
        return

    model_dir = resolve_model_dir(args.model)
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    mixes = list(MIXES) if args.mix == "both" else [args.mix]
    configs = [c for c in args.configs.split(",") if c]
    body, head = count_params(model_dir)
    report: dict = {"model": args.model, "batch_pairs": args.batch, "max_length": args.max_length,
                    "steps_timed": args.steps - 1, "cpu_threads": os.cpu_count(), "non_embedding_params": body,
                    "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for mix in mixes:
            data = Path(tmp) / f"pairs-{mix}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(args.pairs, 0, args.max_length, mix)))
            for precision in precisions:
                res: dict = {}
                for name in configs:
                    cmd = [sys.executable, __file__, "--worker", name, "--data", str(data), "--model-dir", model_dir,
                           "--precision", precision, "--batch", str(args.batch), "--max-length", str(args.max_length),
                           "--steps", str(args.steps), "--out", str(Path(tmp) / f"{name}-{precision}-{mix}"),
                           *(a for kv in args.set for a in ("--set", kv))]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                    res[name] = json.loads(line[-1][7:]) if line else {"error": proc.stderr[-2000:]}
                    print(f"[{mix} {precision}] {name}: {res[name]}", file=sys.stderr)
                ratios = {}
                for ours in OURS:
                    for theirs in ("trl-default", "trl-tuned"):
                        a, b = res.get(ours, {}), res.get(theirs, {})
                        if "pairs_per_s" in a and "pairs_per_s" in b:
                            ratios[f"{ours}/{theirs}"] = {
                                "pairs_per_s": a["pairs_per_s"] / b["pairs_per_s"],
                                "peak_rss": a["peak_rss_mb"] / b["peak_rss_mb"],
                                "step1_loss_diff": abs(a["step1_loss"] - b["step1_loss"]),
                            }
                peak = matmul_peak(precision)
                flops = {name: step_flops(r, body, head) for name, r in res.items() if "seconds_per_step" in r}
                for name, f in flops.items():
                    f["achieved_flops"] = f["flops_per_step"] / res[name]["seconds_per_step"]
                    f["fraction_of_matmul_peak"] = f["achieved_flops"] / peak
                for ours in OURS:  # the speed-up that equal FLOP/s would give: what the arithmetic saved
                    for theirs in ("trl-default", "trl-tuned"):
                        if ours in flops and theirs in flops and f"{ours}/{theirs}" in ratios:
                            ratios[f"{ours}/{theirs}"]["flop_ratio"] = (flops[theirs]["flops_per_step"]
                                                                         / flops[ours]["flops_per_step"])
                report["results"][f"{mix}/{precision}"] = {"configs": res, "ratios": ratios,
                                                           "matmul_peak_flops": peak, "model_flops": flops}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
