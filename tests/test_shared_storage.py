"""The shared-storage check, with a real second filesystem: one Ray node runs in its own mount
namespace where a tmpfs hides the checkpoint directory, so a local path names two different
directories across the group's nodes."""

from __future__ import annotations

import subprocess
import time

import pytest
import ray
from ray_head import ray_head
from ray_jobs import dataset, tiny_config

from elastic_ckpt import ElasticTrainer, TrainingFailedError
from elastic_ckpt.train import build_gpt, lm_loss

pytestmark = [pytest.mark.ray, pytest.mark.fault, pytest.mark.timeout(400)]


def _can_unshare(path) -> bool:
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs tmpfs {path}"], capture_output=True)
    return probe.returncode == 0


def test_local_checkpoint_dir_that_differs_across_nodes_is_fatal(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    if not _can_unshare(ckpt):
        pytest.skip("needs mount namespaces (unshare --mount, tmpfs): run as root")
    config = tiny_config(tmp_path, max_steps=6, scaling__min_workers=2,
                         scaling__max_workers=2, scaling__placement_strategy="STRICT_SPREAD",
                         scaling__capacity_timeout_s=60)
    hide = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs tmpfs {ckpt} && exec "$@"', "sh"]
    with ray_head(num_cpus=1) as head:
        node = head.add_node(num_cpus=1, prefix=hide)
        try:
            trainer = ElasticTrainer(
                model_fn=lambda: build_gpt(config.model), dataset=dataset(), loss_fn=lm_loss,
                config=config, ray_address=head.address)
            t0 = time.time()
            with pytest.raises(TrainingFailedError) as err:
                trainer.fit()
            seconds = time.time() - t0
        finally:
            ray.shutdown()
            node.terminate()
            node.wait(30)
    text = str(err.value)
    assert f"checkpoint.uri {ckpt} is a local path but not one filesystem" in text, text
    assert "is not visible on node(s)" in text and "s3://" in text, text
    assert "(a fatal error: retrying cannot fix it)" in text, text  # a config problem
    assert not list(ckpt.iterdir()), "the probe file must be removed"
    print(f"shared-storage check failed the run in {seconds:.1f}s:\n{text}")
