"""launch's TorchTrainer: the Ray Train callbacks it runs (no fit: the trainer's own choice of callbacks)."""

from ray.train import RunConfig
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

from scalelab.train.launch import _trainer_class


def _noop(config: dict) -> None:
    pass


def test_without_datasets_no_ray_data_actor_is_started_and_with_datasets_it_is(tmp_path):
    """Ray Train starts a Ray Data actor per fit (its DatasetsCallback) even for a trainer given no
    datasets: one more Python process on the cores a run's start-up needs. scalelab's workers read their
    shards themselves, so its trainer leaves that callback out — only when there is nothing for it."""
    trainer = _trainer_class()
    run = RunConfig(name="t", storage_path=str(tmp_path))
    plain = trainer(_noop, run_config=run)._create_default_callbacks()
    assert plain and not any(isinstance(c, DatasetsCallback) for c in plain)
    with_data = trainer(_noop, run_config=run, datasets={"train": lambda: None})._create_default_callbacks()
    assert sum(isinstance(c, DatasetsCallback) for c in with_data) == 1
    assert len(with_data) == len(plain) + 1  # nothing else left out
