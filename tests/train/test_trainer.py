"""scalelab.train.trainer: the Ray Train callbacks launch's TorchTrainer runs, and the placement group a
controller that died leaves behind, removed by the launcher (a real local Ray, a real fit)."""

import os
import signal
import time

import pytest
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.util import placement_group_table

from scalelab.train.progress import channel
from scalelab.train.trainer import PlacementGroupRecord, remove_leftovers, trainer_class


def _noop(config: dict) -> None:
    pass


def _kinds(callbacks: list) -> list[str]:
    return sorted(type(c).__name__ for c in callbacks)


def test_the_ray_data_actor_is_left_out_without_datasets_and_the_cleaner_on_a_local_instance(tmp_path):
    """Ray Train starts a Ray Data actor per fit even for a trainer given no datasets, and a detached
    placement-group cleaner per fit: Python processes on the cores a run's start-up needs. scalelab's
    trainer leaves the first out when there is nothing for it, the second on a local instance only."""
    run = RunConfig(name="t", storage_path=str(tmp_path))
    ray_own = _kinds(trainer_class(local=False)(_noop, run_config=run)._create_default_callbacks())
    for local in (False, True):
        trainer = trainer_class(local=local)
        plain = trainer(_noop, run_config=run)._create_default_callbacks()
        with_data = trainer(_noop, run_config=run, datasets={"train": lambda: None})
        with_data = with_data._create_default_callbacks()
        assert not any(isinstance(c, DatasetsCallback) for c in plain)
        assert sum(isinstance(c, DatasetsCallback) for c in with_data) == 1
        cleaners = [isinstance(c, PlacementGroupCleanerCallback) for c in (*plain, *with_data)]
        assert sum(cleaners) == (0 if local else 2)
        expected = [k for k in ray_own if not (local and k == "PlacementGroupCleanerCallback")]
        assert _kinds(plain) == expected  # nothing else left out
    assert "PlacementGroupCleanerCallback" in ray_own


def _kill_my_controller(config: dict) -> None:
    """The worker SIGKILLs its run's controller (the one process of this Ray instance titled so: Ray's
    state API needs the dashboard): a controller that dies without cleaning up."""
    import threading

    import psutil

    raylet = psutil.Process().parent()  # this Ray instance's workers are its raylet's children
    (controller,) = [p for p in raylet.children()
                     if (p.cmdline() or [""])[0].startswith("ray::TrainController")]
    os.kill(controller.pid, signal.SIGKILL)
    threading.Event().wait(60)  # the controller's death ends this worker (owned by it) long before


@pytest.mark.slow
def test_a_controller_that_died_leaves_its_placement_group_and_the_launcher_removes_it(ray_cluster, tmp_path):
    """Without Ray's cleaner (a local instance), the worker group's placement group outlives a controller
    killed mid-run and holds its CPU: the controller sent it to the launcher, which removes it."""
    groups = []

    def consume(items):
        groups.extend(item["placement_group"] for item in items if "placement_group" in item)
        return [], None

    cpus = ray.cluster_resources()["CPU"]
    with channel(consume) as sender:
        trainer = trainer_class(local=True)(
            _kill_my_controller,
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="killed", storage_path=str(tmp_path),
                                 callbacks=[PlacementGroupRecord("run-1", sender)]))
        with pytest.raises(ray.exceptions.RayActorError):
            trainer.fit()
    assert len(groups) == 1
    assert placement_group_table(groups[0])["state"] == "CREATED"  # what Ray's cleaner was for
    assert ray.available_resources().get("CPU", 0) <= cpus - 1
    assert remove_leftovers(groups) == 1
    assert placement_group_table(groups[0])["state"] == "REMOVED"
    assert remove_leftovers(groups) == 0  # a removed group is left alone
    for _ in range(100):  # the raylet gives the bundle's CPU back soon after
        if ray.available_resources().get("CPU", 0) == cpus:
            break
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == cpus
