"""The run report: values drawn equal metrics.jsonl, verdicts with their numbers, escaping, run.json,
the render budget, comparison, and `dpokit report` / `dpokit eval --out RUN/eval` through the CLI."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dpokit.cli import main
from dpokit.report import ReportWriter, load_run, read_run_info, write_report, write_run_info
from dpokit.report.panels import (
    NOT_CURVES,
    ChanceRule,
    compare_panels,
    config_differences,
    length_histograms,
    run_panels,
    verdicts,
)
from dpokit.report.run import Run

XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = "<img src=x onerror=alert(2)>"


def judge_len(prompt: str, completion: str) -> float:
    """A deterministic toy reward for `dpokit eval --judge`: the completion's length."""
    return float(len(completion))


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def values_of(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r and not isinstance(r[key], bool)]
    return [float(s) for s, _ in pts], [float(v) for _, v in pts]


class Markup(HTMLParser):
    """Every tag and attribute of a page, and its text as a browser shows it (entities decoded)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [a for a, _ in attrs]
        self.links += [v or "" for a, v in attrs if a in ("src", "href", "xlink:href", "action", "data")]

    def handle_data(self, data):
        self.text.append(data)


def parse(html_text: str) -> Markup:
    m = Markup()
    m.feed(html_text)
    return m


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A short DPO run through the CLI, with held-out data, a data file whose name is markup, and
    `dpokit eval --out RUN/eval` afterwards."""
    from conftest import PAIRS

    root = tmp_path_factory.mktemp("report")
    data = root / f"{XSS_IMG}.jsonl"
    long = {"prompt": " ".join(f"w{i}" for i in range(60)), "chosen": " yes " * 3, "rejected": " no"}
    data.write_text("".join(json.dumps(r) + "\n" for r in [*PAIRS, long]))
    run = root / "run"
    assert main(["dpo", "--model", str(tiny_model_dir), "--data", str(data), "--eval-data", str(data),
                 "--output-dir", str(run), "--max-steps", "6", "train.batch_size=4", "precision=fp32",
                 "train.lr=1e-3", "data.max_length=48", "data.max_prompt_length=32"]) == 0
    prompts = root / "prompts.txt"
    prompts.write_text(f"The movie was\n{XSS_SCRIPT}\n")
    assert main(["eval", "--model", str(run / "final"), "--ref-model", str(tiny_model_dir), "--data", str(data),
                 "--prompts", str(prompts), "--judge", "test_report:judge_len", "--num-samples", "2",
                 "--max-new-tokens", "4", "--out", str(run / "eval")]) == 0
    assert "Samples, side by side" in (run / "report.html").read_text()  # `--out RUN/eval` rebuilt the report
    return run


def test_every_curve_is_metrics_jsonl(dpo_run):
    records = read_metrics(dpo_run)
    panels = run_panels(load_run(dpo_run))
    drawn = set()
    for p in panels:
        for s in p.series:
            steps, values = values_of(records, s.key)
            assert list(s.steps) == steps and list(s.values) == values, s.key
            assert s.eval == s.key.startswith("eval/")
            drawn.add(s.key)
    logged = {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert logged - NOT_CURVES == drawn  # every logged number has a curve, and nothing else is drawn
    titles = [p.title for p in panels]
    assert titles[:2] == ["loss", "reward accuracy (chance: 0.5)"]
    loss = panels[0]
    assert [s.key for s in loss.series] == ["loss", "eval/loss"]  # train and eval on the same axes
    assert len(records) == 7 and records[-1]["step"] == 6 and "eval/loss" in records[-1]


def test_histograms_are_the_data_report(dpo_run):
    report = json.loads((dpo_run / "data_report.json").read_text())
    hists = length_histograms(load_run(dpo_run))
    assert {(h.split, h.part) for h in hists} == {(s, p) for s in ("train", "eval")
                                                  for p in ("prompt", "chosen", "rejected")}
    for h in hists:
        assert h.counts == {int(k): v for k, v in report[h.split]["token_lengths"][h.part].items()}
        assert sum(h.counts.values()) == report[h.split]["examples"] == 9
    prompt = next(h for h in hists if h.split == "train" and h.part == "prompt")
    assert prompt.limit == 32 and max(prompt.counts) > 32  # the long prompt was cut: its length is shown before


def test_report_page_of_a_run(dpo_run):
    path = write_report(dpo_run)
    assert path == dpo_run / "report.html"
    assert not list(dpo_run.glob(".report.html*"))  # the temporary file was renamed away
    page = path.read_text()
    m = parse(page)
    assert "script" not in m.tags and "img" not in m.tags and "link" not in m.tags
    assert not any(a.startswith("on") for a in m.attrs)
    assert all(link.startswith("#") for link in m.links)  # only references inside the page
    assert "url(" not in page.replace("url(#", "") and "@import" not in page
    text = "".join(m.text)
    for heading in ("Summary", "Training curves", "Data", "Evaluation", "Configuration and environment"):
        assert heading in text
    assert text.count(XSS_IMG) >= 2  # the data file's name, as text: summary and config
    assert XSS_SCRIPT in text  # a sampled prompt, as text
    assert "Truncation: 1 of 9 train examples had their prompt cut to data.max_prompt_length = 32" in text
    assert "win rate of policy over reference" in text and "Samples, side by side (4 of 4)" in text
    assert m.tags.count("svg") == 13 + 6  # 13 panels (10, and entropy, token accuracy, mean logits), 6 histograms
    assert "finished" in text and "Library versions" in text  # run.json, written by the training loop
    cost = read_run_info(dpo_run)["report_cost"]  # what the live report cost, measured by the loop
    assert cost["renders"] >= 1 and 0 < cost["render_s"] and 0 < cost["share"] < 1


def test_escaping_of_every_data_string(tmp_path):
    run = tmp_path / XSS_IMG.replace("/", "")
    run.mkdir()
    (run / "config.yaml").write_text(f"model:\n  name_or_path: '{XSS_SCRIPT}'\nloss:\n  name: '{XSS_IMG}'\n"
                                     f"  beta: 0.1\ntrain:\n  batch_size: 2\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69, XSS_SCRIPT: 1.0}) + "\n"
                                       + json.dumps({"step": 2, "loss": 0.6, XSS_SCRIPT: 2.0}) + "\n")
    (run / "data_report.json").write_text(json.dumps({
        "train": {"examples": 3, "kept": 2, "skipped_identical": 1, "skipped_identical_sources": [XSS_IMG],
                  "token_lengths": {"prompt": {"3": 2}}},
        "train_skipped_records": {"skipped": 1, "by_kind": {XSS_SCRIPT: 1}, "first": [XSS_IMG]}}))
    (run / "eval").mkdir()
    (run / "eval" / "samples.jsonl").write_text(json.dumps(
        {"prompt": XSS_SCRIPT, "policy": XSS_IMG, "reference": "<b>bold</b>", "reward_policy": 1.0,
         "reward_reference": 0.0}) + "\n")
    (run / "eval" / "eval_report.json").write_text(json.dumps({"model": XSS_IMG, "reference": XSS_SCRIPT}))
    write_run_info(run, stage="dpo", status="failed", error=XSS_SCRIPT, device=XSS_IMG)
    page = write_report(run).read_text()
    m = parse(page)
    assert "script" not in m.tags and "img" not in m.tags and "b" not in m.tags
    assert not any(a.startswith("on") for a in m.attrs)
    text = "".join(m.text)
    assert XSS_SCRIPT in text and XSS_IMG in text and "<b>bold</b>" in text
    assert "<script>" not in page and "<img" not in page  # not even inside the SVGs


def test_verdicts_name_the_numbers(tmp_path):
    recs = [{"step": 1, "loss": 0.69, "rewards/margins": 0.0, "logratio/chosen": 0.0, "logps/chosen": -40.0},
            {"step": 2, "loss": 0.5, "rewards/margins": 0.8, "logratio/chosen": -1.5, "logps/chosen": -41.5,
             "likelihood_displacement": True},
            {"step": 3, "loss": 0.4, "rewards/margins": 1.2, "logratio/chosen": -2.25, "logps/chosen": -42.25,
             "likelihood_displacement": True, "nonfinite_skipped": 2}]
    run = Run(tmp_path, records=recs, config={"train": {"max_nonfinite": 3}},
              data_report={"train": {"examples": 10, "prompt_truncated": 3, "completion_truncated": 0,
                                     "skipped_identical": 0}})
    texts = [v.text for v in verdicts(run)]
    disp = next(t for t in texts if t.startswith("Likelihood displacement"))
    assert "on 2 of 3 logged steps, from step 2" in disp
    assert "fell 1.50 nats below the reference's at step 2 and 2.25 nats at the lowest (step 3)" in disp
    assert "margin grew to 1.200" in disp and "went from -40.00 to -42.25" in disp
    assert any(t.startswith("2 optimizer updates were skipped") and "first reported at step 3" in t
               and "train.max_nonfinite = 3" in t for t in texts)
    assert any(t.startswith("Truncation: 3 of 10 train examples") for t in texts)
    assert not any("Nothing needs attention" in t for t in texts)


def test_accuracy_stuck_at_chance_uses_a_binomial_band(tmp_path):
    def run_with(accs: list[float]) -> list[str]:
        recs = [{"step": i + 1, "loss": 0.69, "rewards/accuracies": a} for i, a in enumerate(accs)]
        r = Run(tmp_path, records=recs, config={"train": {"batch_size": 8, "log_steps": 1, "lr": 1e-6}})
        return [v.text for v in verdicts(r, ChanceRule(min_steps=20, min_records=4, z=2.0))]

    # 40 steps: the window is the last 10 records = 80 pairs; band = 2 * 0.5 / sqrt(80) = 0.1118
    stuck = run_with([0.0] + [0.55] * 39)
    assert any("stuck near chance: 0.55" in t and "steps 31-40, about 80 pairs" in t and "+/- 0.11" in t
               for t in stuck)
    assert not any("stuck near" in t for t in run_with([0.0] + [0.62] * 39))  # 0.12 > 0.1118 from chance
    assert not any("stuck near" in t for t in run_with([0.5] * 19))  # too early to say
    assert any("Nothing needs attention" in t for t in run_with([0.9] * 40))


def test_status_verdicts(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    write_run_info(tmp_path, stage="dpo", status="interrupted", steps_done=3, steps_total=10, error="SIGTERM")
    run = load_run(tmp_path)
    texts = [v.text for v in verdicts(run)]
    assert any(t.startswith("The run was interrupted after step 3 of 10 (SIGTERM). Resume with: dpokit dpo")
               for t in texts)
    assert any("metrics.jsonl line 2: not valid JSON (still being written?); skipped" in t for t in texts)
    write_run_info(tmp_path, status="running")
    page = write_report(tmp_path).read_text()
    assert 'http-equiv="refresh"' in page and "Running: step 3 of 10" in page


def test_run_info_merges_atomically(tmp_path):
    first = write_run_info(tmp_path, stage="dpo", status="running", steps_total=57, device="cpu")
    assert first["versions"]["python"] and "torch" in first["versions"] and first["started"] == first["updated"]
    second = write_run_info(tmp_path, steps_done=5)
    assert second["stage"] == "dpo" and second["steps_done"] == 5 and second["started"] == first["started"]
    assert read_run_info(tmp_path) == second
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
    with pytest.raises(ValueError, match="unknown field"):
        write_run_info(tmp_path, stpes_done=6)
    with pytest.raises(ValueError, match="status must be one of"):
        write_run_info(tmp_path, status="done")
    assert read_run_info(tmp_path) == second  # a refused write changes nothing


def test_writer_keeps_the_render_cost_under_budget(tmp_path, monkeypatch):
    import dpokit.report as report

    now = [0.0]
    render_cost = [0.5]

    def fake_write(run_dir):
        now[0] += render_cost[0]
        return Path(run_dir) / "report.html"

    monkeypatch.setattr(report, "write_report", fake_write)
    writer = ReportWriter(tmp_path, budget=0.02, first_estimate=1.0, clock=lambda: now[0])
    written = []
    for step in range(3000):
        now[0] += 1.0  # one training step
        if step == 1500:
            render_cost[0] = 2.0  # the report grows: renders get slower than expected once
        written.append(writer.maybe_write() is not None)
        # once rendering, a final render of the last cost always fits; the one misestimate (0.5 s expected,
        # 2 s taken) overshoots by 1.5 s in the render and 1.5 s in the reserve, until later renders wait it out
        if writer.writes:
            assert writer.spent + writer.expected <= 0.02 * writer.elapsed + (3.0 if step >= 1500 else 0)
    first = written.index(True)
    assert first == 98  # the first render waits until its expected 1 s, twice, fits in 2% of the time: 99 s
    assert sum(written) > 15 and writer.spent / writer.elapsed > 0.015  # it uses the budget, and no more
    assert writer.maybe_write(force=True) is not None  # the end of the run: always
    assert writer.spent / writer.elapsed <= 0.02
    monkeypatch.setattr(report, "write_report", lambda run_dir: 1 / 0)
    assert writer.maybe_write(force=True) is None and writer.failed  # logged, never raised


def fake_run(root: Path, name: str, loss: str, beta: float, steps: int, seed: int) -> Path:
    """A run directory as training leaves it: the resolved config and a metrics.jsonl (made-up numbers)."""
    import random

    from dpokit.config import load_config, save_config

    run = root / name
    run.mkdir()
    save_config(load_config(None, [("loss.name", loss), ("loss.beta", beta), ("output_dir", str(run)),
                                   ("train.max_steps", steps)]), run / "config.yaml")
    rng = random.Random(seed)
    lines = [{"step": s, "loss": 0.69 - 0.01 * s + rng.random() / 100, "rewards/margins": beta * s * rng.random(),
              "rewards/accuracies": rng.choice([0.5, 0.75, 1.0]), "logps/chosen": -40 - rng.random(),
              "grad_norm": rng.random(), "lr": 1e-6, "pairs_per_s": 3.0 + rng.random()} for s in range(1, steps + 1)]
    lines.append({"step": steps, "eval/loss": 0.6 - beta, "eval/rewards/accuracies": 0.8})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def test_cli_report_rebuilds_and_compares(dpo_run, tmp_path, capsys):
    out = tmp_path / "one.html"
    assert main(["report", str(dpo_run), "--out", str(out)]) == 0
    assert out.is_file() and capsys.readouterr().out.strip() == str(out)
    runs = [fake_run(tmp_path, "dpo-b01", "sigmoid", 0.1, 12, 0), fake_run(tmp_path, "ipo-b05", "ipo", 0.5, 8, 1)]
    cmp = tmp_path / "cmp.html"
    assert main(["report", *map(str, runs), "--out", str(cmp)]) == 0
    loaded = [load_run(r) for r in runs]
    panels = compare_panels(loaded)
    assert [p.title for p in panels][:3] == ["loss", "reward accuracy (chance: 0.5)", "reward margin"]
    for p in panels:
        for s in p.series:
            run = runs[["dpo-b01", "ipo-b05"].index(s.label.split(" ")[0])]
            assert (list(s.steps), list(s.values)) == values_of(read_metrics(run), s.key)
    assert [s.label for s in panels[0].series] == ["dpo-b01", "dpo-b01 (eval)", "ipo-b05", "ipo-b05 (eval)"]
    diffs = config_differences(loaded)
    assert diffs == {"loss.beta": [0.1, 0.5], "loss.name": ["sigmoid", "ipo"], "train.max_steps": [12, 8]}
    text = "".join(parse(cmp.read_text()).text)
    assert "Final metrics" in text and "Settings that differ" in text
    for r in runs:
        recs = read_metrics(r)
        assert f"{recs[-2]['loss']:.4g}" in text and f"{recs[-1]['eval/loss']:.4g}" in text
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().endswith("no such run directory")


def test_sft_run_gets_its_own_curves(tmp_path, tiny_model_dir):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": f" answer {i}."}) + "\n" for i in range(6)))
    run = tmp_path / "sft"
    assert main(["sft", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(run),
                 "--max-steps", "2", "train.batch_size=3", "precision=fp32"]) == 0
    loaded = load_run(run)
    assert loaded.stage == "sft"
    panels = run_panels(loaded)
    assert [p.title for p in panels][:2] == ["loss (NLL per completion token)", "completion log-prob (per sequence)"]
    records = read_metrics(run)
    for p in panels:
        for s in p.series:
            assert (list(s.steps), list(s.values)) == values_of(records, s.key)
    assert {h.part for h in length_histograms(loaded)} == {"prompt", "completion"}
    assert "(SFT)" in write_report(run).read_text()


def test_not_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_run(tmp_path)
    (tmp_path / "config.yaml").write_text("train:\n  max_steps: 5\n")
    run = load_run(tmp_path)  # nothing logged yet: still a page, saying so
    assert run.records == [] and any("metrics.jsonl" in m for m in run.missing)
    assert "No step has been logged yet." in write_report(tmp_path).read_text()


def test_report_in_a_real_browser(dpo_run, tmp_path):
    """Headless Chromium (Debian's package) opens the page: every section renders, no console error, no
    script ran, no request but the file itself, and the screenshot is not blank."""
    import os

    from browser import find_chromium, open_page
    from PIL import Image

    chromium = find_chromium()
    if chromium is None:
        if os.environ.get("DPOKIT_REQUIRE_BROWSER") == "1":
            pytest.fail("DPOKIT_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    page = write_report(dpo_run)
    url = page.resolve().as_uri()
    res = open_page(url, chromium)
    assert res.section_ids == ["summary", "curves", "data", "evaluation", "environment"]
    assert res.errors == [] and res.dialogs == [] and res.console == []
    assert res.requests == [url]
    assert len(res.svg_sizes) == 19 and all(w > 300 and h > 150 for w, h in res.svg_sizes)
    assert XSS_SCRIPT in res.text and XSS_IMG in res.text  # shown as text; no dialog opened
    shot = tmp_path / "report.png"
    shot.write_bytes(res.screenshot)
    img = Image.open(shot).convert("RGB")
    assert img.width == 1280 and img.height > 2000
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 100
    background = max(colors)[0]
    assert 1 - background / (img.width * img.height) > 0.2  # a fifth of the page is not background


def test_length_quantiles_by_hand():
    from dpokit.report.panels import quantile

    counts = {1: 2, 5: 1, 9: 1}  # the values 1, 1, 5, 9
    assert [quantile(counts, q) for q in (0.25, 0.5, 0.75, 0.9, 1.0)] == [1, 1, 5, 9, 9]
