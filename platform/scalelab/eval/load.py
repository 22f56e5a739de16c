"""Read a model written by `scalelab export` (`scalelab.train.export`): weights, tokenizer, config.

Plain torch only (no DeepSpeed, Ray or MLflow), so an exported directory can be evaluated, or used
anywhere else, on a machine that never trained. The model is rebuilt from the resolved ModelSpec saved
in config.json rather than from the preset name, so a later change to a preset's definition cannot
silently change what an exported model is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from scalelab.config import ModelSpec, validate
from scalelab.data.tokenizer import CaptionTokenizer, load_tokenizer
from scalelab.models import DualEncoder, build_model

__all__ = ["load_exported"]

# The names `scalelab.train.export` writes (kept literal here: eval must not import train).
_FILES = ("model.pt", "config.json", "tokenizer.json")


def load_exported(directory: str | Path) -> tuple[DualEncoder, CaptionTokenizer, dict[str, Any]]:
    """`(model, tokenizer, config)` of an exported directory; the model fp32, on CPU, in eval mode.

    `config` is config.json: "experiment" (the run's config), "model" (the ModelSpec), "step",
    "samples_seen", "source". Raises FileNotFoundError naming the directory when a file is missing.
    """
    d = Path(directory)
    missing = [name for name in _FILES if not (d / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{d} is not an exported scalelab model (missing {', '.join(missing)}); "
            "write one with `scalelab export CHECKPOINT OUT`"
        )
    config = json.loads((d / "config.json").read_text())
    model = build_model(validate(ModelSpec, config["model"], prefix="model."))
    state = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model = model.float().eval()
    return model, load_tokenizer(d / "tokenizer.json"), config
