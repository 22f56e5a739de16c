"""Compute accounting of `scalelab sweep --status`: spent vs planned MACs per trial, from sweep.json."""

from scalelab.scaling import TrialResult
from scalelab.sweep.results import SweepState, compute_accounts


def _result(name: str, batch: int, seen: int, macs: int) -> TrialResult:
    return TrialResult(trial_id=name, data=100, model="nano", batch=batch, extra={}, params=10,
                       macs_per_sample=macs, samples_seen=seen, compute=4.0 * macs * seen, wall_s=1.0,
                       metrics={}, state="RUNNING", curve=[])


def _state(trials: list[dict]) -> SweepState:
    return SweepState("s", "sqlite://", "1", "p", "m", None, None, trials)


def test_spent_and_planned_compute_per_trial():
    planned = [{"name": "a", "batch": 8, "steps": 10, "macs_per_sample": 3},
               {"name": "b", "batch": 16, "steps": 10, "macs_per_sample": 5}]
    results = [_result("a", 8, 40, 3), _result("b", 16, 0, 0)]  # b not started: no MLflow run yet
    assert compute_accounts(_state(planned), results) == [(4.0 * 3 * 40, 4.0 * 3 * 8 * 10),
                                                          (0.0, 4.0 * 5 * 16 * 10)]


def test_a_sweep_json_without_steps_has_no_planned_figure():
    planned = [{"name": "a", "batch": 8}]
    assert compute_accounts(_state(planned), [_result("a", 8, 40, 3)]) == [(4.0 * 3 * 40, None)]


def test_sweep_state_on_s3_is_written_read_and_shown_by_status(tmp_path, capsys):
    """sweep.json in a bucket (moto's S3 server on 127.0.0.1): `write_state` / `read_state` round-trip,
    and `scalelab sweep NAME --status --storage s3://…` finds it; the trials' storage sits under it."""
    from conftest import REPO
    from s3_server import s3_server
    from scalelab import storage
    from scalelab.cli import main
    from scalelab.sweep.config import load_sweep
    from scalelab.sweep.results import read_state, state_path, write_state
    from scalelab.sweep.runner import sweep_dir
    from scalelab.tracking import get_or_create_experiment

    with s3_server() as s3:
        root = s3.uri("sweeps") + "?scheme=http"  # a query stays at the end of every path built
        sweep = load_sweep(REPO / "sweeps" / "smoke.yaml", [f"storage={root}", "name=grid"])[0]
        folder = sweep_dir(sweep)
        assert folder == s3.uri("sweeps/grid") + "?scheme=http"
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        experiment = get_or_create_experiment("scalelab", uri)
        planned = [{"name": "t0", "data": 256, "model": "nano", "batch": 32, "steps": 4,
                    "macs_per_sample": 8}]
        state = SweepState("grid", uri, experiment, "parent", "m", None, None, planned)
        write_state(folder, state)
        assert "sweeps/grid/sweep.json" in s3.keys("sweeps/")
        assert storage.is_file(state_path(folder)) and read_state(folder) == state
        assert main(["sweep", "grid", "--status", "--storage", root]) == 0
        shown = capsys.readouterr().out
        assert "sweep grid" in shown and "t0" in shown and "PENDING" in shown


def test_a_finished_trials_curve_is_read_once_while_it_stays_finished(tmp_path):
    """The refit after each trial keeps the finished trials' loss curves (`curves`): their histories are
    not read again, until the run finishes again (a resumed trial: a new end time)."""
    import mlflow

    from scalelab.sweep.results import collect_results
    from scalelab.tracking import get_or_create_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = get_or_create_experiment("scalelab", uri)
    client = mlflow.MlflowClient(uri)
    planned, ids = [], {}
    for name in ("done", "running"):
        run = client.create_run(experiment, tags={"sweep": "s", "trial": name})
        ids[name] = run.info.run_id
        client.log_param(run.info.run_id, "model.macs_per_sample", 3)
        for step in (1, 2):
            client.log_metric(run.info.run_id, "train/loss", 5.0 - step, step=step)
        planned.append({"name": name, "data": 100, "model": "nano", "batch": 8})
    client.set_terminated(ids["done"], "FINISHED", end_time=1_000)
    state = SweepState("s", uri, experiment, "p", "m", None, None, planned)

    curves: dict = {}
    first = collect_results(state, curves)
    assert first == collect_results(state)
    assert [r.curve for r in first] == [[(8, 4.0), (16, 3.0)]] * 2
    assert list(curves) == [(ids["done"], 1_000)]  # the running trial's curve is read every time

    for name in ("done", "running"):  # one more step each, the finished run's end time unchanged
        client.log_metric(ids[name], "train/loss", 2.0, step=3)
    cached = collect_results(state, curves)
    assert cached[0].curve == [(8, 4.0), (16, 3.0)]  # kept, not read again
    assert cached[1].curve == [(8, 4.0), (16, 3.0), (24, 2.0)]

    client.set_terminated(ids["done"], "FINISHED", end_time=2_000)  # resumed and finished again
    assert collect_results(state, curves)[0].curve == [(8, 4.0), (16, 3.0), (24, 2.0)]
