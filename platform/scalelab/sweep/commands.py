"""`scalelab sweep` and `scalelab plot`: thin commands over `runner`, `results` and `analysis`."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from scalelab.config import ConfigError

__all__ = ["add_sweep_commands"]


def add_sweep_commands(sub: Any) -> None:
    s = sub.add_parser("sweep", help="run (or resume) a data x model x batch scaling sweep on Ray Tune")
    s.add_argument("target", help="sweep YAML (sweeps/<name>.yaml); with --status also a sweep name")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dot override")
    s.add_argument("--ray", default=None, metavar="ADDRESS", help="as for `scalelab train`")
    s.add_argument("--status", action="store_true", help="print the grid with each trial's state and metric")
    s.add_argument("--storage", default="./runs", help="storage root for --status NAME (default ./runs)")
    s.add_argument("--verbose", action="store_true",
                   help="show Ray's, DeepSpeed's and the workers' raw output here instead of the live view "
                        "(otherwise it goes to <storage>/<sweep>/console.log)")
    s.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("plot", help="recompute a sweep's results table, fits and plots offline")
    p.add_argument("sweep_dir", nargs="?", help="the sweep folder <storage>/<name> (holds sweep.json)")
    p.add_argument("--mlflow-run", help="the sweep's parent MLflow run id instead of a folder")
    p.add_argument("--tracking-uri", help="MLflow URI for --mlflow-run (default: env, else ./runs/mlflow.db)")
    p.add_argument("--out", help="write results.csv, fits.json, plots/ here (default: <sweep_dir>/analysis)")
    p.add_argument("--predict-compute", type=float, help="predict the error at this training compute (MACs)")
    p.add_argument("--holdout", type=float, default=None, metavar="N",
                   help="hold out the N largest-compute trials (a fraction < 1: that share; 0: no check) and "
                        "report how well the fits on the rest predict them (default: the sweep's `holdout`, "
                        "else the trials at the largest compute)")
    p.set_defaults(func=_cmd_plot)


def _cmd_sweep(args: argparse.Namespace) -> int:
    if args.status:
        return _status(args)
    from scalelab.sweep.config import load_sweep
    from scalelab.sweep.runner import run_sweep

    sweep, base = load_sweep(args.target, args.set)
    run_sweep(sweep, base, ray_address=args.ray, verbose=args.verbose)
    return 0


def _status(args: argparse.Namespace) -> int:
    from scalelab.sweep.results import collect_results, compute_accounts, read_state
    from scalelab.sweep.runner import resolve_root, sweep_dir
    from scalelab.train.compute import COMPUTE_CONVENTION

    target = Path(args.target)
    if target.suffix in (".yaml", ".yml"):
        from scalelab.sweep.config import load_sweep

        folder = sweep_dir(resolve_root(load_sweep(target, args.set)[0]))
    else:
        from scalelab import storage

        folder = (storage.join(args.storage, args.target) if storage.is_uri(args.storage)
                  else Path(args.storage).resolve() / args.target)
    try:
        state = read_state(folder)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    results = collect_results(state)
    accounts = compute_accounts(state, results)
    print(f"sweep {state.name}: parent MLflow run {state.parent_run_id} ({state.tracking_uri})")
    print(f"{'trial':<28} {'data':>7} {'model':<10} {'batch':>6} {'state':<10} {'samples':>9} "
          f"{'GMACs done':>11} {'of':>9} {state.metric}")
    for r, (spent, total) in zip(results, accounts):
        value = r.metrics.get(state.metric)
        print(f"{r.trial_id:<28} {r.data:>7} {r.model:<10} {r.batch:>6} {r.state:<10} {r.samples_seen:>9} "
              f"{spent / 1e9:>11.4g} {_gmacs(total):>9} {'' if value is None else f'{value:.4f}'}")
    done = sum(r.finished for r in results)
    spent = sum(a for a, _ in accounts)
    print(f"{done}/{len(results)} finished")
    if all(t is not None for _, t in accounts):
        total = sum(t for _, t in accounts if t is not None)
        left = sum(max(0.0, t - a) for a, t in accounts if t is not None)
        print(f"compute: {spent / 1e9:.4g} GMACs spent of {total / 1e9:.4g} planned "
              f"({100 * spent / total:.1f}%), {left / 1e9:.4g} GMACs left")
    else:  # a sweep.json from before scalelab recorded each trial's steps
        print(f"compute: {spent / 1e9:.4g} GMACs spent (planned total unknown: sweep.json predates it; "
              "the next `scalelab sweep` run records it)")
    print(f"  ({COMPUTE_CONVENTION})")
    return 0


def _gmacs(value: float | None) -> str:
    return "?" if value is None else f"{value / 1e9:.4g}"


def _cmd_plot(args: argparse.Namespace) -> int:
    from scalelab.sweep.analysis import analyse, summary_lines, write_analysis
    from scalelab.sweep.results import collect_results

    state = _state_for_plot(args)
    if args.predict_compute is not None:
        state.predict_compute = args.predict_compute
    if args.holdout is not None:
        state.holdout = int(args.holdout) if args.holdout >= 1 else args.holdout
    results = collect_results(state)
    analysis = analyse(state, results)
    out = Path(args.out) if args.out else (Path(args.sweep_dir) / "analysis" if args.sweep_dir else None)
    if out is None:
        out = Path(tempfile.mkdtemp(prefix=f"scalelab-plot-{state.name}-"))
    write_analysis(out, results, analysis)
    for line in summary_lines(state, results, analysis):
        print(line)
    print(f"wrote {out}/results.csv, fits.json, plots/")
    return 0


def _state_for_plot(args: argparse.Namespace) -> Any:
    from scalelab.sweep.results import SweepState, read_state

    if (args.sweep_dir is None) == (args.mlflow_run is None):
        raise ConfigError("give a sweep folder or --mlflow-run ID (one of them)")
    if args.sweep_dir:
        try:
            return read_state(args.sweep_dir)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
    import json

    import mlflow

    from scalelab.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri, "./runs")
    client = mlflow.MlflowClient(uri)
    try:
        run = client.get_run(args.mlflow_run)
    except mlflow.exceptions.MlflowException as err:
        raise ConfigError(f"--mlflow-run {args.mlflow_run}: not found in {uri} ({err.message})") from None
    with tempfile.TemporaryDirectory() as tmp:
        planned = json.loads(Path(client.download_artifacts(run.info.run_id, "sweep.json", tmp)).read_text())
    sweep = planned["sweep"]
    return SweepState(sweep["name"], uri, run.info.experiment_id, run.info.run_id, sweep["metric"],
                      sweep.get("robustness_metric"), sweep.get("predict_compute"), planned["trials"],
                      sweep.get("holdout"))
