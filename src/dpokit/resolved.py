"""What a run actually ran with, for ``RUN/config.yaml`` and the model card.

``resolve_run_config`` writes down every value a default or ``auto`` left open that decides the numbers: the
effective learning rate (the stage's default when ``train.lr`` is unset) and the precision ``auto`` chose.
Rerunning or resuming from the saved ``config.yaml`` therefore computes the same thing. Facts about the
machine (device, library versions) go in a comment at the top of ``config.yaml`` and in the model card, where
they inform without pinning a resumed run to this machine. The model card's ``base_model`` is a hub id or absent
(``card_base_model``), never a local path.
"""

from __future__ import annotations

import copy
import platform
import re
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from dpokit.config import Config

LIBRARIES = ("dpokit", "torch", "transformers", "peft", "trl")
_FRONT_BASE = re.compile(r"^base_model:\s*(\S+)\s*$", re.MULTILINE)


def stage_default_lr(stage: str) -> float | None:
    """The learning rate a stage uses when ``train.lr`` is unset."""
    if stage == "sft":
        from dpokit.train.sft import DEFAULT_LR
    elif stage == "dpo":
        from dpokit.train.dpo import DEFAULT_LR
    elif stage == "rl":
        from dpokit.train.rl import DEFAULT_LR
    else:
        return None
    return DEFAULT_LR


def resolve_run_config(cfg: Config, stage: str, precision: str) -> Config:
    """A copy of ``cfg`` with the effective ``train.lr`` and the ``precision`` that runs (``auto`` resolved)."""
    out = copy.deepcopy(cfg)
    if out.train.lr is None:
        out.train.lr = stage_default_lr(stage)
    out.precision = precision
    return out


def versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Python and the installed versions of ``names`` (default: the libraries that decide the numbers; absent ones
    left out)."""
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def config_header(cfg: Config, given: Config, device: Any) -> str:
    """Comment lines for the top of config.yaml: what was resolved from what, the device and the versions."""
    lines = [f"# ran on {device} with " + ", ".join(f"{k} {v}" for k, v in versions().items())]
    if given.train.lr is None:
        lines.append(f"# train.lr: unset, so the stage's default {cfg.train.lr}")
    if given.precision != cfg.precision:
        lines.append(f"# precision: {given.precision} resolved to {cfg.precision} on this machine")
    if cfg.train.layout == "auto":
        lines.append("# train.layout: auto picks, per micro-batch, the layout computing the fewest tokens")
    return "\n".join(lines) + "\n"


def card_base_model(name_or_path: str) -> str | None:
    """The hub id a model card may name as ``base_model``: the embedded model's, a hub id as given, or the
    ``base_model`` a local model's own card names (a run's final/); None for anything else (a local path)."""
    from dpokit.hub import looks_like_hub_id
    from dpokit.models import EMBEDDED_ALIASES, EMBEDDED_FILE, EMBEDDED_HUB_ID

    if name_or_path.lower() in EMBEDDED_ALIASES or Path(name_or_path).name == EMBEDDED_FILE:
        return EMBEDDED_HUB_ID
    p = Path(name_or_path)
    if p.exists():
        card = p / "README.md"
        found = _FRONT_BASE.search(card.read_text(errors="replace")) if card.is_file() else None
        return found.group(1) if found and looks_like_hub_id(found.group(1)) and "/" in found.group(1) else None
    return name_or_path if looks_like_hub_id(name_or_path) else None


def card_facts(device: Any, layouts: Mapping[str, int]) -> str:
    """Model-card lines: device, the layouts the micro-batches used, library versions."""
    used = ", ".join(f"{k} {v}" for k, v in sorted(layouts.items())) or "none recorded"
    return (f"- **Device:** {device}; micro-batch layouts used (count): {used}\n"
            f"- **Versions:** {', '.join(f'{k} {v}' for k, v in versions().items())}\n")
