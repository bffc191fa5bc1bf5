"""Checks before step 1: paths resolved on the driver (and refused where Ray deletes them),
the checkpoint root and run_dir probed, datasets opened, init_from found; and the job that
fails on them does so in seconds, before Ray starts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from mounts import tmpfs
from ray_jobs import tiny_config

from elastic_ckpt.config import TrainConfig
from elastic_ckpt.errors import ConfigError, StorageError, WeightsError
from elastic_ckpt.trainer import dataset_from_config
from elastic_ckpt.trainer.preflight import PROBE_PREFIX, preflight
from elastic_ckpt.trainer.run_paths import ray_working_dir_copy, resolve_run_paths

REPO = Path(__file__).resolve().parents[1]
JOB_DIR = "/tmp/ray/session_2026/runtime_resources/working_dir_files/_ray_pkg_0123abcd"


def test_relative_paths_become_absolute_against_the_driver_cwd():
    config = TrainConfig(checkpoint={"uri": "ckpt/a", "init_from": "weights/"},
                         run_dir="./runs/x",
                         data={"dataset": {"kind": "parquet", "uri": "data/tokens"}})
    out = resolve_run_paths(config, cwd="/home/me/proj")
    assert out.checkpoint.uri == "/home/me/proj/ckpt/a"
    assert out.run_dir == "/home/me/proj/runs/x"
    assert out.checkpoint.init_from == "/home/me/proj/weights"
    assert out.data.dataset.uri == "/home/me/proj/data/tokens"
    assert out.data.model_fields_set == config.data.model_fields_set  # not re-validated
    for uri in ("s3://b/ckpt", "/abs/ckpt", "gs://b/x"):
        same = TrainConfig(checkpoint={"uri": uri})
        assert resolve_run_paths(same, cwd="/elsewhere").checkpoint.uri == uri


@pytest.mark.parametrize("field, overrides", [
    ("checkpoint.uri", {"run_dir": "/shared/run"}),
    ("run_dir", {"checkpoint": {"uri": "s3://bucket/ckpt"}}),
])
def test_relative_written_paths_are_refused_inside_a_ray_job_copy(field, overrides):
    assert ray_working_dir_copy(JOB_DIR) and not ray_working_dir_copy("/home/me/proj")
    with pytest.raises(ConfigError) as err:
        resolve_run_paths(TrainConfig(**overrides), cwd=JOB_DIR)
    text = str(err.value)
    assert err.value.field == field
    assert f"{field} is the relative path" in text and JOB_DIR in text, text
    assert "deletes when the job ends" in text and "absolute path" in text, text


def test_inside_a_ray_job_read_only_paths_stay_relative_to_each_nodes_copy():
    config = TrainConfig(checkpoint={"uri": "s3://b/c", "init_from": "weights/"},
                         run_dir="/shared/run")
    assert resolve_run_paths(config, cwd=JOB_DIR).checkpoint.init_from == "weights/"


def _config(tmp_path, **fields) -> TrainConfig:
    return tiny_config(tmp_path, **fields)  # checkpoint.uri tmp/ckpt, run_dir tmp/run


def test_preflight_probes_and_leaves_nothing_behind(tmp_path):
    config = _config(tmp_path)
    report = preflight(config, dataset_from_config(config))
    assert report.latest is None and "fresh start" in report.describe()
    for d in (tmp_path / "ckpt", tmp_path / "run"):
        assert d.is_dir() and not [p for p in d.iterdir() if p.name.startswith(PROBE_PREFIX)]


def test_a_uri_under_a_regular_file_is_a_typed_error_naming_it(tmp_path):
    (tmp_path / "file").write_text("x")
    config = _config(tmp_path, checkpoint__uri=str(tmp_path / "file" / "ckpt"))
    with pytest.raises(StorageError) as err:
        preflight(config, dataset_from_config(config))
    assert f"checkpoint.uri {tmp_path / 'file' / 'ckpt'} is not writable" in str(err.value)
    assert "Not a directory" in str(err.value)
    config = _config(tmp_path, run_dir=str(tmp_path / "file" / "run"))
    with pytest.raises(StorageError, match=r"run_dir .*file/run is not writable"):
        preflight(config, dataset_from_config(config))


def test_a_read_only_filesystem_is_found_before_training(tmp_path):
    with tmpfs(tmp_path / "ro", "ro") as ro:
        config = _config(tmp_path, checkpoint__uri=str(ro / "ckpt"))
        with pytest.raises(StorageError, match="Read-only file system"):
            preflight(config, dataset_from_config(config))


class _Broken:
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i):
        raise KeyError("input_ids")


def test_a_dataset_that_cannot_be_read_names_itself(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(ConfigError, match=r"the training dataset \(_Broken\): reading sample "
                                          r"0 failed: KeyError: 'input_ids'"):
        preflight(config, _Broken())
    with pytest.raises(ConfigError, match=r"the eval dataset \(list\) is empty"):
        preflight(config, dataset_from_config(config), [])


def test_missing_init_from_is_found_only_when_the_run_would_use_it(tmp_path):
    config = _config(tmp_path, checkpoint__init_from=str(tmp_path / "nope"))
    with pytest.raises(WeightsError, match=r"checkpoint.init_from: nothing at .*nope"):
        preflight(config, dataset_from_config(config))


def test_unwritable_uri_fails_the_job_in_seconds_before_ray_starts(tmp_path):
    t0 = time.time()
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--set",
                          "checkpoint.uri=/etc/hostname/ckpt", "--set",
                          f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    seconds = time.time() - t0
    assert out.returncode == 1, out.stderr
    assert "error: checkpoint.uri /etc/hostname/ckpt is not writable" in out.stderr
    # Found before Ray starts (so within seconds: no worker, no step, no retry).
    assert "Traceback" not in out.stderr and "Ray" not in out.stdout, out.stdout + out.stderr
    print(f"jobs/train.py failed in {seconds:.1f}s")
