"""Every exception the worker path can raise from config or data is caught by preflight, or documented.

The raise statements are found by reading the source (ast), so a new `raise` in the worker path fails
this test until it is classified here:
- `preflight`: a config that would reach it; `check_experiment` must refuse that config (ConfigError)
  before Ray starts.
- `runtime`: why it can only happen while training (data content, numerics, a lost peer) and what the
  worker does with it.
- `internal`: an invariant of the code (a caller bug), not reachable from a config that passed preflight.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from scalelab.config import ConfigError
from scalelab.train.preflight import check_experiment

SRC = Path(__file__).resolve().parents[2] / "platform" / "scalelab"
WORKER_PATH = ("train/loop", "train/stream", "train/evaluator", "train/reporter", "train/task", "train/plan",
               "train/resume", "train/faults", "train/step", "train/engine", "train/ds_config",
               "train/schedule", "train/optim", "train/checkpoint", "train/compute", "data/pipeline",
               "data/plan", "data/batches", "data/prompts", "data/tokenizer", "eval/datasets",
               "eval/zeroshot",
               "eval/retrieval", "gradcache", "models/image", "models/presets", "models/text",
               "train/image_tower", "train/export", "models/pretrained")


def _eval_set(templates: str | None, classnames: str | None = "keep", empty: bool = False):
    """Overrides builder: the smoke world's `test` set copied with other templates / class names."""
    def build(world: Path, tmp: Path) -> dict[str, Any]:
        import shutil

        out = tmp / "evalset"
        shutil.copytree(world / "eval" / "test", out)
        if templates is None:
            (out / "templates.txt").unlink()
        else:
            (out / "templates.txt").write_text(templates)
        if classnames != "keep":
            (out / "classnames.txt").write_text(classnames or "")
        if empty:
            for img in out.glob("*/*.png"):
                img.unlink()
        return {"eval": {"sets": {"test": str(out)}, "shifted": []}}
    return build


def _no_dirs(world: Path, tmp: Path) -> dict[str, Any]:
    (tmp / "flat").mkdir()
    return {"eval": {"sets": {"test": str(tmp / "flat")}, "shifted": []}}


def _bad_tokenizer(world: Path, tmp: Path) -> dict[str, Any]:
    (tmp / "tok.json").write_text('{"not": "a tokenizer"}')
    return {"data": {"tokenizer": str(tmp / "tok.json")}}


def _init(make):
    """Overrides builder: `model.image.init` pointing at what `make(tmp)` writes there."""
    def build(world: Path, tmp: Path) -> dict[str, Any]:
        return {"model": {"image": {"init": str(make(tmp))}}}
    return build


def _wrong_shapes(tmp: Path) -> Path:
    import torch

    from scalelab.models import create_model

    state = {f"image_tower.{k}": v for k, v in create_model("micro").image_tower.state_dict().items()}
    state["image_tower.proj.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp / "wrong.pt")
    return tmp / "wrong.pt"


def _not_weights(tmp: Path) -> Path:
    (tmp / "garbage.pt").write_bytes(b"not a torch file")
    return tmp / "garbage.pt"


def _without(deepspeed: bool):
    """A checkpoint folder with its scalelab.json but no DeepSpeed weights (an interrupted copy);
    `deepspeed`: with DeepSpeed's state folder (empty) or without."""
    def make(tmp: Path) -> Path:
        import json
        from dataclasses import asdict

        from scalelab.config import ExperimentConfig
        from scalelab.train.checkpoint import RunState

        folder = tmp / "step_00000004"
        (folder / "deepspeed" / "state").mkdir(parents=True) if deepspeed else folder.mkdir()
        run = RunState(step=4, config=ExperimentConfig(model={"preset": "micro"}).to_dict())
        (folder / "scalelab.json").write_text(json.dumps(asdict(run)))
        return folder
    return make


PRE = "preflight"
RT = "runtime"
INT = "internal"
# (module, function, exception) -> (kind, overrides or a builder of them | the reason)
CLASSIFIED: dict[tuple[str, str, str], tuple[str, Any]] = {
    # --- the worker loop
    ("train/evaluator", "maybe_run", "RunStopped"): (RT, "an eval error on rank 0 (e.g. an image file "
                                                     "damaged after preflight): every rank stops once"),
    ("train/loop", "_train", "RunStopped"): (RT, "train.max_skipped_steps non-finite steps in a row "
                                             "(see step.observe): every rank stops once, no retry"),
    ("train/stream", "next", "RunStopped"): (RT, "too many bad samples in an epoch for a full batch on some "
                                           "rank: depends on the data's content; stops once, no retry"),
    ("train/stream", "next", "AssertionError"): (INT, "unreachable end of a two-pass loop"),
    ("train/faults", "maybe_inject_fault", "RuntimeError"): (INT, "the test hook's injected failure"),
    ("train/resume", "decide_resume", "ConfigError"): (PRE, "an incompatible re-run: check_resume "
                                                       "(tests/train/test_preflight.py)"),
    # --- the step and the engine
    ("train/step", "train_step", "ValueError"): (INT, "per-rank batch size is fixed by batch_geometry"),
    ("train/step", "__call__", "RuntimeError"): (INT, "backward-call count is fixed by batch_geometry"),
    ("train/step", "check_complete", "RuntimeError"): (INT, "backward-call count: batch_geometry"),
    ("train/step", "__init__", "ValueError"): (INT, "max_skipped_steps >= 0 is enforced by the config"),
    ("train/step", "observe", "NonFiniteRunError"): (RT, "too many NaN/inf steps in a row: numerics and "
                                                     "data; every rank stops once, no retry"),
    ("train/engine", "build_engine", "ValueError"): (INT, "world size comes from Ray's process group"),
    ("train/engine", "build_engine", "RuntimeError"): (INT, "world size comes from Ray's process group"),
    ("train/engine", "optimizer_step", "RuntimeError"): (INT, "engine bookkeeping invariant"),
    ("train/ds_config", "batch_geometry", "ConfigError"): (PRE, {"train": {"global_batch": 63}}),
    ("train/ds_config", "deepspeed_config", "ConfigError"): (INT, "micro-batch count from batch_geometry"),
    ("train/schedule", "_check", "ValueError"): (PRE, {"train": {"steps": 20},
                                                       "optim": {"warmup_steps": 20}}),
    ("train/optim", "param_groups", "ValueError"): (INT, "weight_decay >= 0 is enforced by the config"),
    ("train/optim", "build_optimizer", "ValueError"): (PRE, {"optim": {"betas": [0.9, 1.5]}}),
    ("train/optim", "_adafactor_bv", "ValueError"): (PRE, {"optim": {"name": "adafactor_bv",
                                                                     "betas": [1.5, 0.9]},
                                                           "train": {"zero_stage": 0}}),
    ("train/ds_config", "refuse_flattening_optimizer", "ConfigError"): (
        PRE, {"optim": {"name": "adafactor_bv"}, "train": {"zero_stage": 2}}),
    ("models/presets", "model_for", "ConfigError"): (INT, "data.labels.num_classes is resolved by preflight "
                                                     "(tests/train/test_preflight_classify.py)"),
    ("data/pipeline", "label_settings", "ValueError"): (INT, "num_classes is resolved by preflight"),
    ("train/checkpoint", "load_checkpoint", "ValueError"): (PRE, "world-size change: check_resume "
                                                            "(tests/train/test_preflight.py)"),
    ("train/checkpoint", "load_checkpoint", "RuntimeError"): (RT, "a checkpoint folder damaged after the "
                                                              "driver chose it: retried, then fails"),
    ("train/checkpoint", "read_run_state", "FileNotFoundError"): (INT, "only complete checkpoints are "
                                                                  "chosen"),
    ("train/checkpoint", "read_run_state", "ValueError"): (RT, "a checkpoint of another scalelab version"),
    ("train/compute", "_check_count", "ValueError"): (INT, "counts come from the loop"),
    ("train/compute", "utilization", "ValueError"): (INT, "benchmark helper, not called by the worker"),
    # --- data
    ("data/plan", "source_counts", "ConfigError"): (PRE, {"data": {"n_pairs": 10**7}}),
    ("data/plan", "plan_epoch", "ValueError"): (INT, "rank < world size by construction"),
    ("data/tokenizer", "tokenizer_path", "FileNotFoundError"): (PRE, {"data": {"tokenizer": "/nonexistent"}}),
    ("data/pipeline", "build_dataset", "RuntimeError"): (PRE, {"train": {"global_batch": 4096}}),
    ("data/pipeline", "decode_subset", "ValueError"): (INT, "cache + augment is refused by the config"),
    ("data/batches", "__init__", "ValueError"): (INT, "batch size and start: geometry / checkpoint"),
    ("data/batches", "_batches", "RuntimeError"): (INT, "decoded columns' shapes are fixed by the config"),
    ("data/tokenizer", "load_tokenizer", "FileNotFoundError"): (PRE, {"data": {"tokenizer": "/nonexistent"}}),
    ("data/tokenizer", "__init__", "ValueError"): (PRE, _bad_tokenizer),
    ("data/tokenizer", "encode_batch", "ValueError"): (INT, "context_length >= 2 is enforced by the presets"),
    ("data/tokenizer", "_new_tokenizer", "ValueError"): (INT, "`scalelab data tokenizer` only"),
    ("data/tokenizer", "train_tokenizer", "ValueError"): (INT, "`scalelab data tokenizer` only"),
    ("data/tokenizer", "train_tokenizer", "RuntimeError"): (INT, "`scalelab data tokenizer` only"),
    # --- class names and templates of the eval sets
    ("data/prompts", "normalise_template", "ValueError"): (PRE, _eval_set("a photo of a dog.\n")),
    ("data/prompts", "read_templates", "ValueError"): (PRE, _eval_set("# nothing but a comment\n")),
    ("data/prompts", "read_templates", "FileNotFoundError"): (PRE, {"eval": {"templates": "/nonexistent"}}),
    ("data/prompts", "templates_file", "FileNotFoundError"): (PRE, _eval_set(None)),
    ("data/prompts", "read_classnames", "ValueError"): (PRE, _eval_set("a {}.\n", classnames="")),
    ("data/prompts", "resolve_classnames", "ValueError"): (PRE, _eval_set("a {}.\n", classnames="one\n")),
    # --- evaluation
    ("eval/datasets", "load_image_folder", "FileNotFoundError"): (PRE, {"eval": {
        "sets": {"t": "/nonexistent"}, "shifted": []}}),
    ("eval/datasets", "load_image_folder", "ValueError"): (PRE, _no_dirs),
    ("eval/datasets", "load_pairs", "ValueError"): (RT, "a retrieval shard unreadable or without a good "
                                                    "pair: preflight checks the manifest and files, not "
                                                    "every byte; stops once at the first evaluation"),
    ("eval/zeroshot", "encode_images", "ValueError"): (INT, "image batches are built by load_image_folder"),
    ("eval/zeroshot", "encode_texts", "ValueError"): (INT, "prompts are non-empty after preflight"),
    ("eval/zeroshot", "fill_templates", "ValueError"): (INT, "templates are non-empty after preflight"),
    ("eval/zeroshot", "class_embeddings", "ValueError"): (INT, "class names are non-empty after preflight"),
    ("eval/zeroshot", "zeroshot_classify", "ValueError"): (INT, "labels come from load_image_folder"),
    ("eval/zeroshot", "evaluate_sets", "ValueError"): (INT, "set names / shifted: validated by the config"),
    ("eval/retrieval", "positive_ranks", "ValueError"): (INT, "shapes fixed by evaluate_retrieval"),
    ("eval/retrieval", "retrieval_metrics", "ValueError"): (INT, "shapes fixed by evaluate_retrieval"),
    ("eval/retrieval", "evaluate_retrieval", "ValueError"): (RT, "see load_pairs"),
    # --- the gradient cache and the models
    ("gradcache", "micro_batch_slices", "ValueError"): (INT, "micro-batch > 0 is enforced by the config"),
    ("gradcache", "cached_step", "ValueError"): (INT, "loss kind is a config literal"),
    ("gradcache", "_check_inputs", "ValueError"): (INT, "batch shapes are fixed by the pipeline"),
    ("gradcache", "_loss_and_grads", "NonFiniteError"): (RT, "a non-finite loss depends on data and "
                                                         "numerics: the step is skipped and counted"),
    ("gradcache", "_world", "RuntimeError"): (INT, "distributed=True only inside a process group"),
    ("models/image", "_group_norm_for", "ValueError"): (INT, "group count derived from the channel count"),
    ("models/image", "_timm_kwargs", "ConfigError"): (PRE, {"model": {"overrides": {"image": {
        "timm_kwargs": {"pretrained": True}}}}}),
    ("models/image", "create_backbone", "ConfigError"): (PRE, {"model": {"overrides": {"image": {
        "timm_name": "no_such_timm_model"}}}}),
    ("models/presets", "get_spec", "ConfigError"): (PRE, {"model": {"preset": "nope"}}),
    ("models/presets", "register_preset", "ValueError"): (INT, "registration at import time"),
    ("models/presets", "decorator", "ValueError"): (INT, "registration at import time"),
    ("models/text", "forward", "ValueError"): (INT, "token shapes fixed by the tokenizer and context_length"),
    # --- the image tower's start (model.image.init): every rank reads what preflight read
    ("train/image_tower", "read_image_init", "ConfigError"): (PRE, {"model": {"image": {"init": "/absent"}}}),
    ("train/image_tower", "read_image_init", "FileNotFoundError"): (PRE, _init(lambda tmp: tmp)),
    ("train/image_tower", "prepare_model", "ConfigError"): (PRE, _init(_wrong_shapes)),
    ("train/image_tower", "check_image_init", "ConfigError"): (PRE, _init(_wrong_shapes)),
    ("models/pretrained", "match_image_weights", "ValueError"): (PRE, _init(_wrong_shapes)),
    ("models/pretrained", "read_weights_file", "ValueError"): (PRE, _init(_not_weights)),
    ("models/pretrained", "read_weights_file", "FileNotFoundError"): (INT, "read_image_init passes existing "
                                                                      "files only"),
    ("train/export", "read_checkpoint_weights", "FileNotFoundError"): (PRE, _init(_without(deepspeed=False))),
    ("train/export", "_fp32_weights", "FileNotFoundError"): (PRE, _init(_without(deepspeed=True))),
    ("train/export", "_in_model_shapes", "ValueError"): (PRE, "an init checkpoint whose weights do not fit "
                                                         "its own config: check_image_init reads the same"),
    ("train/export", "_masters_by_name", "ValueError"): (PRE, "as _in_model_shapes (a bf16 ZeRO-0 init "
                                                         "checkpoint): check_image_init reads the same"),
}


def raise_sites() -> set[tuple[str, str, str]]:
    """(module, enclosing function, exception class name) of every `raise X(...)` in the worker path."""
    found = set()
    for module in WORKER_PATH:
        tree = ast.parse((SRC / f"{module}.py").read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Raise) and node.exc is not None:
                    exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                    found.add((module, fn.name, ast.unparse(exc).rsplit(".", 1)[-1]))
    return found


def test_every_raise_in_the_worker_path_is_classified():
    sites = raise_sites()
    assert len(sites) > 40  # the scan itself works
    unclassified = sorted(sites - CLASSIFIED.keys())
    assert not unclassified, f"classify these raise sites in {__file__}: {unclassified}"
    stale = sorted(CLASSIFIED.keys() - sites)
    assert not stale, f"these classified raise sites no longer exist: {stale}"


PREFLIGHT = sorted((k, v) for k, (kind, v) in CLASSIFIED.items() if kind == PRE and not isinstance(v, str))


@pytest.mark.parametrize(("site", "overrides"), PREFLIGHT, ids=[f"{m}.{f}.{e}" for (m, f, e), _ in PREFLIGHT])
def test_preflight_refuses_what_the_worker_would_raise(smoke_config, smoke_world, tmp_path, site, overrides):
    if callable(overrides):
        overrides = overrides(smoke_world, tmp_path)
    with pytest.raises(ConfigError):  # by the config's own validation, or by preflight
        check_experiment(smoke_config(tmp_path / "runs", overrides))
