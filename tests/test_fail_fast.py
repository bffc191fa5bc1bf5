"""Errors a retry cannot fix end the run at once, with the user's traceback; the coordinator
reports storage trouble instead of dying of it."""

from __future__ import annotations

import pytest
from ray_jobs import buggy_loss, dataset, loopback_cluster, tiny_config

from elastic_ckpt import ElasticTrainer, TrainingFailedError
from elastic_ckpt.coordinator import Coordinator
from elastic_ckpt.train import TrainJob, TrainSpec, build_gpt


def test_coordinator_reports_an_unreadable_checkpoint_root_instead_of_dying(tmp_path):
    (tmp_path / "file").write_text("x")
    config = tiny_config(tmp_path, checkpoint__uri=str(tmp_path / "file" / "ckpt"))
    job = TrainJob(config=config, spec=TrainSpec(), dataset=dataset())
    coordinator = Coordinator(config, job, cluster=object())  # no Ray: only the report path
    text = coordinator._latest_uri()
    assert text.startswith(f"unknown ({tmp_path / 'file' / 'ckpt'} cannot be read: "), text
    assert coordinator._latest() is None


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_loss_fn_bug_is_fatal_after_one_retry_with_the_users_traceback(tmp_path):
    config = tiny_config(tmp_path, max_steps=10, scaling__max_workers=1,
                         failure__max_failures=5)
    notices = []
    with loopback_cluster(num_nodes=1):
        trainer = ElasticTrainer(model_fn=lambda: build_gpt(config.model), dataset=dataset(),
                                 loss_fn=buggy_loss, config=config,
                                 on_progress=lambda p: notices.extend(p.failures))
        with pytest.raises(TrainingFailedError) as err:
            trainer.fit()
    text = str(err.value)
    assert "it is deterministic" in text and "not retried" in text, text
    assert "rank 0 raised in step 1 (resumed from step 0): KeyError: 'labels'" in text, text
    assert 'batch["labels"]' in text and "ray_jobs.py" in text, text  # the user's traceback
    # Shown as it happened, once retried, then given up on.
    assert [(n.kind, n.at_step, n.retrying) for n in notices] == [
        ("training_error", 0, True), ("training_error", 0, False)], notices
    assert "KeyError: 'labels'" in notices[0].message


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_killed_coordinator_says_what_happened(tmp_path):
    import threading

    import ray
    from ray_jobs import Faults, trainer_kwargs, wait_for

    config = tiny_config(tmp_path, max_steps=400, scaling__max_workers=1)
    faults = Faults(tmp_path / "faults")
    faults.set("slow")
    with loopback_cluster(num_nodes=1):
        trainer = ElasticTrainer(**trainer_kwargs(config, faults))
        steps, errors = [], []
        trainer.on_progress = lambda p: steps.extend(p.steps)

        def fit():
            try:
                trainer.fit()
            except TrainingFailedError as exc:
                errors.append(exc)

        thread = threading.Thread(target=fit)
        thread.start()
        wait_for(lambda: len(steps) >= 2, 180, "two steps")
        ray.kill(ray.get_actor(trainer.coordinator_name))
        thread.join(120)
    assert errors, "fit() must raise when its coordinator is gone"
    text = str(errors[0])
    assert "the run's coordinator actor stopped before training ended" in text, text
    assert "ray_address='local'" in text and "Last committed checkpoint:" in text, text
