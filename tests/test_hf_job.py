"""The main job on an HF model, as a user runs it: ``python jobs/train.py --config
configs/hf_llama_tiny.yaml`` (embedded local Ray) trains a Llama with every decoder layer its
own FSDP unit, evaluates, checkpoints; ``elastic-ckpt export --format hf`` turns the checkpoint
into a directory ``from_pretrained`` loads with the trained weights. Only the Ray this job
started is stopped (found by its private temp dir)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from elastic_ckpt.checkpoint import open_weights
from elastic_ckpt.cli.main import main as cli
from ray_head import processes_of, stop_ray

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def test_main_job_trains_an_hf_llama_and_exports_it(tmp_path, capsys):
    temp_dir = tempfile.mkdtemp(prefix="rayhf-", dir="/tmp")  # short: unix socket paths
    env = {**os.environ, "RAY_TMPDIR": temp_dir, "TMPDIR": temp_dir,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    ckpt = tmp_path / "ckpt"
    sets = {"max_steps": 8, "optim.warmup_steps": 2, "log_interval_steps": 4,
            "eval.interval_steps": 4, "checkpoint.interval_steps": 4,
            "checkpoint.uri": str(ckpt), "run_dir": str(tmp_path / "run")}
    try:
        job = subprocess.run(
            [sys.executable, "jobs/train.py", "--config", "configs/hf_llama_tiny.yaml",
             *[arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    finally:
        leftover = processes_of(temp_dir)
        stop_ray(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    out = job.stdout + job.stderr
    assert job.returncode == 0, out[-4000:]
    assert not leftover, f"the job left Ray processes behind: {[p.pid for p in leftover]}"
    assert "elastic_ckpt: HF llama 4 layers x 64, 8 steps" in out
    # root, embedding, 4 decoder layers, head: each its own FSDP unit.
    assert "start: 0 -> " in out and "7 FSDP units" in out, out[-4000:]
    assert "eval       4  loss" in out and "eval       8  loss" in out, out[-4000:]
    assert "done: step 8" in out and "eval loss:" in out, out[-4000:]

    export = tmp_path / "hf"
    assert cli(["export", str(ckpt / "step-00000008"), str(export), "--format", "hf"]) == 0
    assert "config.json" in capsys.readouterr().out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    # The same weights, read straight from the checkpoint into a model built from the config.
    fresh = transformers.AutoModelForCausalLM.from_config(loaded.config).eval()
    with open_weights(str(ckpt)) as source:
        fresh.load_state_dict({k: source.read(k) for k in fresh.state_dict()})
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, fresh(ids).logits, rtol=0, atol=1e-6)
        assert not torch.allclose(loaded(ids).logits, transformers.AutoModelForCausalLM
                                  .from_config(loaded.config)(ids).logits)
