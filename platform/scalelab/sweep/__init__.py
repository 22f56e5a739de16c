"""Sweeps: the data × model × batch grid on Ray Tune, one MLflow parent run with a child per trial.

`config` (the sweep YAML and its expansion into trial experiments, framework-free), `runner` (the
Tune driver), `trial` (the function each Tune trial runs), `results` (per-trial results read back from
MLflow, the sweep's state file), `analysis` (fits and plots logged to the parent run), `live` (the
terminal table and the refit after each trial), `commands` (`scalelab sweep` / `plot`) and `demo`
(`scalelab demo`).
This `__init__` imports nothing, so `scalelab.sweep.config` loads without Ray or MLflow.
"""
