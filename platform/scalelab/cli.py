"""The `scalelab` command: thin subcommands over library functions.

    scalelab models [--json]            presets of the model axis: parameters, MACs per sample
    scalelab config [FILE] [--set k=v]  validate an experiment config and print it resolved
    scalelab check [--preset P ...]     verify the cached step against a full-batch backward
    scalelab train FILE [--set k=v]     train one model on Ray Train workers (resumes an existing run)
    scalelab export CHECKPOINT OUT      a training checkpoint -> plain fp32 model.pt + config + tokenizer
    scalelab eval --checkpoint PATH     zero-shot + retrieval metrics of an exported model or a checkpoint
    scalelab sweep FILE [--set k=v]     run or resume a data x model x batch sweep (--status: its grid)
    scalelab plot SWEEP_DIR             a sweep's results table, fits and plots, recomputed offline
    scalelab data synth|validate|index|from-labels|export-digits|export-fashion-mnist|tokenizer
    scalelab demo                       the main job: the demo scaling sweep (see README)
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from scalelab.config import ConfigError
from scalelab.data.cli import add_data_commands
from scalelab.sweep.commands import add_sweep_commands

__all__ = ["main"]


def _cmd_models(args: argparse.Namespace) -> int:
    from scalelab.models import preset_table

    rows = preset_table()
    if args.json:
        print(json.dumps([vars(r) for r in rows], indent=2))
        return 0
    print(f"{'preset':<10} {'image':>8} {'text':>8} {'params':>9} {'GMACs/sample':>13} {'px':>4} {'ctx':>4}")
    for r in rows:
        print(
            f"{r.name:<10} {_count(r.image_params):>8} {_count(r.text_params):>8} {_count(r.params):>9} "
            f"{r.macs_per_sample / 1e9:>13.4g} {r.image_size:>4} {r.context_length:>4}"
        )
    print("training compute per sample = 3 x forward MACs (forward + backward)")
    return 0


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _cmd_config(args: argparse.Namespace) -> int:
    from scalelab.config import load_experiment
    from scalelab.models import get_spec

    cfg = load_experiment(args.file, args.set)
    spec = get_spec(cfg.model.preset, **cfg.model.overrides)
    out = cfg.to_dict()
    out["resolved_model"] = spec.to_dict()
    print(yaml.safe_dump(out, sort_keys=False), end="")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from scalelab.verify import verify_cached_step

    report = verify_cached_step(
        preset=args.preset,
        batch=args.batch,
        micro_batch_size=args.micro_batch,
        loss=args.loss,
        block_size=args.block_size,
        seed=args.seed,
    )
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_train(args: argparse.Namespace) -> int:
    from scalelab.config import load_experiment

    cfg = load_experiment(args.file, args.set)
    from scalelab.console import LiveView, RunTable, session
    from scalelab.train.launch import RunFailed, launch, preflight, release_ray  # deferred: imports ray
    cfg = preflight(cfg, args.ray)  # a refused config leaves nothing behind, not even the run's log file
    log = _console_log(cfg)
    with session(log, verbose=args.verbose) as console:
        if not args.verbose:
            console.say(f"[{cfg.name}] Ray, DeepSpeed and the workers' own output: {log}")
        table = RunTable(_headline_metric(cfg))
        table.row(cfg.name, steps=cfg.train.steps, batch=cfg.train.global_batch).state = "RUNNING"
        with LiveView(console, table) as view:

            def progress(metrics: dict[str, Any]) -> None:
                table.update(cfg.name, metrics)
                view.changed()

            try:
                result = launch(cfg, ray_address=args.ray, progress=None if args.verbose else progress)
            except RunFailed as err:  # a deterministic error: one line, and where the details are
                table.row(cfg.name).state = "FAILED"
                console.say(f"scalelab: {err}" + ("" if args.verbose else f" (details: {log})"))
                return 1
            except BaseException:
                table.row(cfg.name).state = "FAILED"
                raise
            finally:
                release_ray()
            table.row(cfg.name).state = "FINISHED"
        _print_metrics(result.final_metrics, console.say)
        console.say(f"MLflow run {result.mlflow_run_id}: mlflow ui --backend-store-uri {result.tracking_uri}")
    return 0


LOCAL_LOGS = "scalelab-logs"  # under the current directory: console logs of runs on a storage URI


def _console_log(cfg: Any) -> Path:
    """`<storage>/<name>/console.log`; for a storage URI a local file, `./scalelab-logs/<name>/
    console.log`, since the log is appended line by line and an object store only takes whole files."""
    from scalelab import storage
    from scalelab.train.resume import run_dir

    if storage.is_uri(cfg.run.storage):
        return Path.cwd() / LOCAL_LOGS / cfg.name / "console.log"
    return run_dir(cfg) / "console.log"


def _headline_metric(cfg: Any) -> str:
    """The live view's metric column: zero-shot top-1 on the first eval set, if any."""
    sets = list(cfg.eval.sets)
    return f"eval/zeroshot/{sets[0]}/top1" if sets else "eval/zeroshot/top1"


def _print_metrics(metrics: dict[str, float], say: Any = print) -> None:
    if metrics:
        width = max(len(k) for k in metrics)
        for key in sorted(metrics):
            say(f"  {key:<{width}}  {metrics[key]:.4f}")


def _cmd_export(args: argparse.Namespace) -> int:
    from scalelab.train.export import export_checkpoint  # deferred: reads DeepSpeed checkpoint files

    try:
        out = export_checkpoint(_checkpoint_folder(args.checkpoint), args.out)
    except FileNotFoundError as err:
        return _not_found(err)
    print(f"exported {args.checkpoint} -> {out} (model.pt, config.json, tokenizer.json)")
    return 0


def _not_found(err: object) -> int:
    """A missing checkpoint, export or tokenizer: one line on stderr, exit status 2 (like ConfigError)."""
    print(f"scalelab: {err}", file=sys.stderr)
    return 2


def _checkpoint_folder(path: str) -> Any:
    """A checkpoint folder as given, or the latest checkpoint of a run folder (`<storage>/<name>`);
    either may be on a storage URI (`s3://…`)."""
    from scalelab import storage
    from scalelab.train.checkpoint import META_NAME, latest_checkpoint

    folder = path if storage.is_uri(path) else Path(path)
    if not storage.is_file(storage.join(folder, META_NAME)):
        latest = latest_checkpoint(folder)
        if latest is not None:
            return latest
    return folder


def _cmd_eval(args: argparse.Namespace) -> int:
    from scalelab.eval import load_exported
    from scalelab.train.export import is_exported

    path = Path(args.checkpoint)
    if not path.exists():
        return _not_found(f"--checkpoint {path}: no such file or directory")
    with tempfile.TemporaryDirectory(prefix="scalelab-export-") as tmp:
        try:
            if is_exported(path):
                model, tokenizer, config = load_exported(path)
            else:  # a raw training checkpoint (or run folder): export it first, as `scalelab export` would
                from scalelab.train.export import export_checkpoint

                exported = export_checkpoint(_checkpoint_folder(args.checkpoint), tmp)
                model, tokenizer, config = load_exported(exported)
        except FileNotFoundError as err:
            return _not_found(err)
        try:
            metrics = _evaluate_checkpoint(model, tokenizer, config["experiment"]["eval"], args)
        except ConfigError:
            raise
        except (OSError, ValueError) as err:  # an eval folder or image that cannot be read: one line
            print(f"scalelab: evaluation failed: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(metrics, indent=1, sort_keys=True))
    else:
        print(f"{path} (step {config['step']}, {config['samples_seen']} samples seen)")
        _print_metrics(metrics)
    return 0


def _evaluate_checkpoint(model: Any, tokenizer: Any, defaults: dict[str, Any],
                         args: argparse.Namespace) -> dict[str, float]:
    """The training loop's evaluation (`train/evaluator.py`) with the config's eval section as defaults."""
    from scalelab.eval import evaluate_retrieval, evaluate_sets

    sets = dict(defaults.get("sets") or {})
    if args.set:
        sets = dict(_name_dir(item) for item in args.set)
    # The config's shifted sets apply only to those still evaluated when --set replaced the sets.
    shifted = args.shifted
    if shifted is None:
        shifted = [s for s in defaults.get("shifted", []) if s in sets]
    unknown = [s for s in shifted if s not in sets]
    if unknown:
        raise ConfigError(f"--shifted {unknown}: not among the evaluated sets {sorted(sets)}")
    retrieval = args.retrieval if args.retrieval is not None else defaults.get("retrieval")
    for name, directory in [*sets.items(), *([("retrieval", retrieval)] if retrieval else [])]:
        if not Path(directory).is_dir():
            raise ConfigError(f"eval set {name!r}: directory {directory} does not exist")
    if not sets and not retrieval:
        raise ConfigError("nothing to evaluate: the checkpoint's config has no eval sets; "
                          "give --set NAME=DIR or --retrieval DIR")
    batch = args.batch_size or int(defaults.get("batch_size") or 256)
    metrics: dict[str, float] = {}
    if sets:
        templates = args.templates if args.templates is not None else defaults.get("templates")
        metrics.update(evaluate_sets(model, tokenizer, sets, shifted=shifted, batch_size=batch,
                                     templates=templates))
    if retrieval:
        metrics.update(evaluate_retrieval(model, tokenizer, retrieval, batch_size=batch))
    return metrics


def _name_dir(item: str) -> tuple[str, str]:
    name, sep, directory = item.partition("=")
    if not sep or not name or not directory:
        raise ConfigError(f"--set {item!r}: expected NAME=DIR")
    return name, directory


def _cmd_demo(args: argparse.Namespace) -> int:
    from scalelab.sweep.demo import run_demo

    return run_demo(args.sweep, ray_address=args.ray, verbose=args.verbose)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scalelab", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list the model presets with parameters and MACs per sample")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=_cmd_models)

    c = sub.add_parser("config", help="validate an experiment config and print it resolved")
    c.add_argument("file", nargs="?", help="experiment YAML (defaults when omitted)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dot override")
    c.set_defaults(func=_cmd_config)

    k = sub.add_parser("check", help="verify the cached step equals a full-batch backward (float64)")
    k.add_argument("--preset", default="micro")
    k.add_argument("--batch", type=int, default=48, help="global contrastive batch")
    k.add_argument("--micro-batch", type=int, default=7, help="micro-batch size of the cache")
    k.add_argument("--loss", choices=["softmax", "sigmoid"], default="softmax")
    k.add_argument("--block-size", type=int, default=None, help="tile size of the loss (default dense)")
    k.add_argument("--seed", type=int, default=0)
    k.set_defaults(func=_cmd_check)

    t = sub.add_parser("train", help="train one model on Ray Train workers (resumes an existing run)")
    t.add_argument("file", help="experiment YAML, e.g. experiments/smoke.yaml")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dot override")
    t.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="Ray to use: 'local' starts a new local instance; default RAY_ADDRESS, else the "
                        "cluster running on this machine, else a new local instance")
    t.add_argument("--verbose", action="store_true",
                   help="show Ray's, DeepSpeed's and the workers' raw output here instead of the live view "
                        "(otherwise it goes to <storage>/<name>/console.log; ./scalelab-logs/<name>/ "
                        "for a storage URI)")
    t.set_defaults(func=_cmd_train)

    x = sub.add_parser("export", help="write a training checkpoint as a plain fp32 model directory")
    x.add_argument("checkpoint", help="checkpoint folder <storage>/<name>/step_* (or the run "
                   "folder: latest); local or on a storage URI (s3://...)")
    x.add_argument("out", help="output directory (model.pt, config.json, tokenizer.json)")
    x.set_defaults(func=_cmd_export)

    e = sub.add_parser("eval", help="zero-shot and retrieval metrics of an exported model or a checkpoint")
    e.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="an exported directory, or a training checkpoint folder (exported to a temp dir)")
    e.add_argument("--set", action="append", default=[], metavar="NAME=DIR",
                   help="zero-shot ImageFolder set (repeatable; replaces the config's eval.sets)")
    e.add_argument("--shifted", nargs="*", default=None, metavar="NAME",
                   help="sets counted as distribution shifts (default: the config's, among the sets)")
    e.add_argument("--retrieval", default=None, metavar="DIR", help="retrieval pairs (default: the config's)")
    e.add_argument("--templates", default=None, metavar="FILE",
                   help="shared prompt templates ({} or {c}) for sets without a templates.txt")
    e.add_argument("--batch-size", type=int, default=None, help="encode batch (default: eval.batch_size)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=_cmd_eval)

    add_data_commands(sub)
    add_sweep_commands(sub)

    d = sub.add_parser("demo", help="the main job: build the easy synthetic world if missing, run the "
                       "3x3x3 demo sweep on local Ray, print the table, fits and the MLflow link")
    d.add_argument("--sweep", default="sweeps/demo.yaml", help="sweep file (default: sweeps/demo.yaml)")
    d.add_argument("--ray", default=None, metavar="ADDRESS", help="as for `scalelab train`")
    d.add_argument("--verbose", action="store_true", help="as for `scalelab sweep`")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"scalelab: config error: {err}", file=sys.stderr)
        return 2


def entry() -> NoReturn:
    """The `scalelab` command: `main`, then an exit without the interpreter's teardown. After a run,
    Python spent ~2.5 s on 2 cores finalising the thousands of modules torch, Ray, DeepSpeed and MLflow
    leave loaded (every atexit handler had finished in 0.02 s); the exit handlers still run (logging's
    flush, Ray's and MLflow's shutdown), then the standard streams are flushed and the process ends."""
    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
