"""Bring your own model, optimizer and data: an HF Llama trains through a resize history
exactly like a fixed-size run with the user's param groups, scheduler and optimizer; meta
models start from the same weights at any W; eval and custom metrics are sample-exact; a
tuple dataset works with no collate_fn; training starts from pretrained HF weights, each
rank reading only its rows. Gloo ranks on CPU, fp32, tiny models built from configs."""

from __future__ import annotations

import functools

import pytest
import torch

from byo_jobs import (
    LLAMA,
    MLP,
    PairDataset,
    adamw_two_groups,
    frozen_sgd,
    hf_config,
    llama,
    lm_loss_with_metrics,
    mse_loss,
    one_cycle,
    per_sample_metrics,
    sgd_momentum,
    step_lr,
)
from elastic_ckpt.data import ElasticSampler, SyntheticLMDataset, collate
from elastic_ckpt.train import TrainSpec, build_gpt, default_parallelize, device_mesh
from elastic_ckpt.train.hf import build_hf_causal_lm
from elastic_ckpt.train.init import materialize
from elastic_ckpt.train.local import run_ranks
from test_train_equivalence import _assert_ledger_matches, _by_step, _losses, _segment
from train_jobs import (
    Segment,
    dataset_for,
    full_params,
    run_segments,
    tiny_config,
    with_fields,
)

pytestmark = pytest.mark.dist
RTOL = 1e-5


def _resize_2_3_1(tmp_path, make_cfg, spec: TrainSpec, steps: int = 9, dataset=None):
    """Runs a fixed W=2 reference and the same job stopped/resumed at W=2 -> 3 -> 1; returns
    (reference rows, elastic rows, reference segment, segments a, b, c)."""
    ref_cfg, el_cfg = make_cfg(str(tmp_path / "ref")), make_cfg(str(tmp_path / "elastic"))
    seg = functools.partial(Segment, spec=spec, dataset=dataset)
    first = run_ranks(2, run_segments, [seg(ref_cfg), seg(el_cfg, stop_at=steps // 3)])
    ref, seg_a = _segment(first, 0), _segment(first, 1)
    seg_b = _segment(run_ranks(3, run_segments, [seg(el_cfg, stop_at=2 * steps // 3)]), 0)
    seg_c = _segment(run_ranks(1, run_segments, [seg(el_cfg)]), 0)
    assert [o["restored_step"] for o in seg_b + seg_c] == [steps // 3] * 3 + [2 * steps // 3]
    return _by_step([ref]), _by_step([seg_a, seg_b, seg_c]), ref, seg_a, seg_b, seg_c


# -- HF Llama through 2 -> 3 -> 1 with the user's optimizer and scheduler ----------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize("optimizer", [
    pytest.param("adamw_two_groups_onecycle", marks=pytest.mark.slow),  # 25 s each
    "sgd_momentum_steplr"])
def test_hf_llama_resize_matches_fixed_world_size(tmp_path, optimizer):
    steps = 9
    if optimizer == "adamw_two_groups_onecycle":
        spec = TrainSpec(optimizer_fn=adamw_two_groups,
                         lr_scheduler_fn=functools.partial(one_cycle, total_steps=steps))
    else:
        spec = TrainSpec(optimizer_fn=sgd_momentum, lr_scheduler_fn=step_lr)

    def make_cfg(uri):
        return hf_config(uri, max_steps=steps)

    ref_rows, el_rows, ref, *segs = _resize_2_3_1(tmp_path, make_cfg, spec, steps)
    cfg = make_cfg("x")
    _assert_ledger_matches(el_rows, ref_rows, cfg)
    ref_losses = _losses(ref_rows)
    assert ref_losses[-1] < ref_losses[0]
    torch.testing.assert_close(_losses(el_rows), ref_losses, rtol=RTOL, atol=0)
    # The user's scheduler continues across resizes: every group's LR, at every step.
    ref_lrs = [rows[0][6] for _, rows in sorted(ref_rows.items())]
    assert [rows[0][6] for _, rows in sorted(el_rows.items())] == ref_lrs
    assert len(set(ref_lrs)) > 2  # it really schedules
    if optimizer == "adamw_two_groups_onecycle":
        assert all(len(lrs) == 2 and lrs[1] == pytest.approx(lrs[0] / 2) for lrs in ref_lrs)
    # Every decoder layer is its own FSDP unit, on every rank of every group.
    for out in ref + [o for seg in segs for o in seg]:
        assert {"model.layers.0", "model.layers.1"} <= set(out["fsdp_units"]), out["fsdp_units"]


# -- meta-device models: the same initial weights at W = 1, 2, 3, 4 ------------------------------
def _meta_init(rank: int, world_size: int) -> dict | None:
    from elastic_ckpt.config import HFModelConfig, ModelConfig

    gpt_cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, max_seq_len=16)
    models = {}
    with torch.device("meta"):
        models["gpt"] = build_gpt(gpt_cfg)
    models["hf"] = build_hf_causal_lm(HFModelConfig(kind="hf", config=LLAMA))  # meta params
    models["hf_all_meta"] = llama(meta=True)  # rotary buffers on meta too
    out = {}
    for name, model in models.items():
        default_parallelize(model, device_mesh(torch.device("cpu")))
        materialize(model, torch.device("cpu"), seed=0)
        out[name] = full_params(model)
        out[name + "_buffers"] = {k: v.clone() for k, v in model.named_buffers()}
    return out if rank == 0 else None


@pytest.mark.slow  # ~50 s; the resize equivalence tests start meta models at W=1, 2, 3
@pytest.mark.timeout(240)
def test_meta_models_start_bit_identical_at_every_world_size():
    by_w = {w: run_ranks(w, _meta_init)[0] for w in (1, 2, 3, 4)}
    for name in ("gpt", "hf", "hf_all_meta"):
        ref = by_w[1][name]
        for w in (2, 3, 4):
            got = by_w[w][name]
            assert got.keys() == ref.keys()
            bad = [k for k in ref if not torch.equal(got[k], ref[k])]
            assert not bad, f"{name}: W={w} differs from W=1 in {bad[:3]}"
        # Not a degenerate init: the embedding rows of different shards differ.
        emb = ref["tok_emb.weight"] if name == "gpt" else ref["model.embed_tokens.weight"]
        assert not torch.equal(emb[:32], emb[32:]) and emb.std() > 0
        assert not any(torch.isnan(v).any() for v in ref.values())
    # Fully-meta HF: the rotary buffers were recomputed by the model's own init code.
    ref_buffers = by_w[1]["hf_buffers"]
    for w in (1, 2, 3, 4):
        for k, v in by_w[w]["hf_all_meta_buffers"].items():
            torch.testing.assert_close(v, ref_buffers[k], rtol=0, atol=0)


class _NoInit(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.empty(4))


class _IntBuffer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("positions", torch.arange(4))


class _NoArgInit(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def _init_weights(self) -> None:
        torch.nn.init.ones_(self.proj.weight)


class _HalfMeta(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.real = torch.nn.Linear(4, 4)
        torch.nn.init.ones_(self.real.weight)
        with torch.device("meta"):
            self.lazy = torch.nn.Linear(4, 4)


def _materialize(rank: int, world_size: int, build) -> str:
    if build is _HalfMeta:
        model = build()
    else:
        with torch.device("meta"):
            model = build()
    default_parallelize(model, device_mesh(torch.device("cpu")), warn=False)
    try:
        materialize(model, torch.device("cpu"), seed=0)
    except Exception as exc:  # noqa: BLE001 - the message is the result
        return f"{type(exc).__name__}: {exc}"
    params = full_params(model)
    return "ones kept" if torch.equal(params["real.weight"], torch.ones(4, 4)) else "changed"


@pytest.mark.parametrize("build, expected", [
    (_NoInit, "ConfigError: _NoInit.scale (in FSDP unit '<root>') was built on the meta "
              "device and no init code wrote it"),
    (_IntBuffer, "ConfigError: _IntBuffer.positions"),
    (_NoArgInit, "ConfigError: _NoArgInit._init_weights() takes no argument"),
    (_HalfMeta, "ones kept"),
], ids=["param", "int-buffer", "no-arg-init", "half-meta"])
def test_meta_tensors_no_init_code_writes_are_errors(build, expected):
    (message,) = run_ranks(2, _materialize, build)[:1]
    assert message.startswith(expected), message


# -- eval and custom metrics ---------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_eval_is_identical_at_every_world_size_and_metrics_are_sample_weighted(tmp_path):
    cfg = with_fields(tiny_config(str(tmp_path / "a"), max_steps=2, warmup_steps=0),
                      eval={"interval_steps": 1, "max_samples": 13, "micro_batch_size": 4})
    eval_set = SyntheticLMDataset(20, 16, 64, seed=99)
    spec = TrainSpec(optimizer_fn=frozen_sgd, loss_fn=lm_loss_with_metrics,
                     model_fn=functools.partial(build_gpt, cfg.model))
    runs = {}
    for w in (1, 2, 3):
        wcfg = with_fields(cfg, checkpoint={"uri": str(tmp_path / f"w{w}")})
        runs[w] = _segment(run_ranks(w, run_segments, [Segment(
            wcfg, spec=spec, eval_dataset=eval_set)]), 0)
    # Offline: the same (frozen) initial weights, every sample on its own.
    torch.manual_seed(cfg.seed)
    model = build_gpt(cfg.model).eval()
    ev = per_sample_metrics(model, torch.stack([eval_set[i]["input_ids"] for i in range(13)]))
    train_ids = ElasticSampler(len(dataset_for(cfg)), cfg.data.global_batch_size,
                               cfg.data.seed).global_batch(0)
    tr = per_sample_metrics(model, collate([dataset_for(cfg)[int(i)] for i in train_ids])[
        "input_ids"])
    for w, seg in runs.items():
        for out in seg:  # every rank gets the same eval records
            assert [(e[0], e[3]) for e in out["evals"]] == [(1, 13), (2, 13)]
            for step, loss, metrics, _ in out["evals"]:
                assert loss == pytest.approx(ev["loss"].mean().item(), rel=1e-6), (w, step)
                assert metrics["accuracy"] == pytest.approx(ev["accuracy"].mean().item(),
                                                            rel=1e-6)
                assert metrics["first_logit"] == pytest.approx(
                    ev["first_logit"].mean().item(), rel=1e-5, abs=1e-7)
        step1 = seg[0]["steps"][0]
        assert step1[1] == pytest.approx(tr["loss"].mean().item(), rel=RTOL)
        assert step1[7]["accuracy"] == pytest.approx(tr["accuracy"].mean().item(), rel=RTOL)
        assert step1[7]["first_logit"] == pytest.approx(tr["first_logit"].mean().item(),
                                                        rel=1e-4, abs=1e-6)
    eval_losses = {w: [e[1] for e in seg[0]["evals"]] for w, seg in runs.items()}
    for w in (2, 3):
        torch.testing.assert_close(eval_losses[w], eval_losses[1], rtol=1e-6, atol=0)


# -- a (x, y) tuple dataset, no collate_fn, across a resize ----------------------------------
@pytest.mark.timeout(240)
def test_tuple_dataset_trains_and_resumes_across_a_resize(tmp_path):
    steps = 9
    spec = TrainSpec(model_fn=MLP, loss_fn=mse_loss)
    dataset = PairDataset()

    def make_cfg(uri):
        return tiny_config(uri, max_steps=steps, num_samples=len(dataset), lr=1e-1)

    ref_rows, el_rows, *_ = _resize_2_3_1(tmp_path, make_cfg, spec, steps, dataset=dataset)
    ref_losses = _losses(ref_rows)
    assert sum(ref_losses[-3:]) < 0.7 * sum(ref_losses[:3])  # it learns (batches are noisy)
    torch.testing.assert_close(_losses(el_rows), ref_losses, rtol=RTOL, atol=0)
    _assert_ledger_matches(el_rows, ref_rows, make_cfg("x"))


# -- pretrained start ----------------------------------------------------------------------------
def _pretrained_dirs(tmp_path):
    model = llama(seed=123)
    single, sharded, torch_file = (tmp_path / "hf", tmp_path / "hf-sharded",
                                   tmp_path / "weights.pt")
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="20KB")
    torch.save(model.state_dict(), torch_file)
    assert (sharded / "model.safetensors.index.json").exists()
    return model, {"single": single, "sharded": sharded, "torch": torch_file}


@pytest.mark.timeout(300)
def test_init_from_hf_weights_step_one_loss_matches_offline(tmp_path):
    model, sources = _pretrained_dirs(tmp_path)
    segs = [Segment(with_fields(hf_config(str(tmp_path / f"run-{name}"), max_steps=3),
                                checkpoint={"init_from": str(path)}))
            for name, path in sources.items()]
    segs.append(Segment(hf_config(str(tmp_path / "run-random"), max_steps=3),
                        gather_params=True))
    # An elastic_ckpt checkpoint root (its model part) as the pretrained weights.
    segs.append(Segment(with_fields(hf_config(str(tmp_path / "run-from-ckpt"), max_steps=3),
                                    checkpoint={"init_from": str(tmp_path / "run-random")})))
    outs = run_ranks(2, run_segments, segs)
    cfg = segs[0].config
    ids = ElasticSampler(len(dataset_for(cfg)), cfg.data.global_batch_size,
                         cfg.data.seed).global_batch(0)
    batch = collate([dataset_for(cfg)[int(i)] for i in ids])["input_ids"]
    offline = per_sample_metrics(model, batch)["loss"].mean().item()
    for i, name in enumerate(sources):
        seg = _segment(outs, i)
        for out in seg:
            assert out["restored_step"] is None
            assert out["steps"][0][1] == pytest.approx(offline, rel=RTOL), name
            # Each rank read about half the model (its shards), never all of it.
            assert out["init_bytes_read"] < 0.75 * out["model_bytes"], (name, out)
        assert sum(o["init_bytes_read"] for o in seg) >= seg[0]["model_bytes"]
    random_start = _segment(outs, len(sources))[0]
    assert random_start["init_bytes_read"] is None
    assert abs(random_start["steps"][0][1] - offline) > 1e-3  # the weights made the difference
    trained = llama()
    trained.load_state_dict(random_start["params"])
    want = per_sample_metrics(trained, batch)["loss"].mean().item()
    for out in _segment(outs, len(sources) + 1):
        assert out["steps"][0][1] == pytest.approx(want, rel=RTOL)
        assert out["init_bytes_read"] < 0.75 * out["model_bytes"]


def _bad_init(rank: int, world_size: int, segment: Segment) -> str:
    from train_jobs import run_segment

    try:
        out = run_segment(rank, world_size, segment)
    except Exception as exc:  # noqa: BLE001 - the message is the result
        return f"{type(exc).__name__}: {exc}"
    return f"trained {len(out['steps'])} steps"


@pytest.mark.timeout(240)
def test_init_from_with_wrong_keys_or_shapes_fails_before_step_one(tmp_path):
    wider = llama({**LLAMA, "intermediate_size": 48}, seed=1)
    wider.save_pretrained(tmp_path / "wider")
    deeper = llama({**LLAMA, "num_hidden_layers": 3}, seed=1)
    deeper.save_pretrained(tmp_path / "deeper")
    shallow = llama({**LLAMA, "num_hidden_layers": 1}, seed=1)
    shallow.save_pretrained(tmp_path / "shallow")
    results = {}
    for name in ("wider", "deeper", "shallow"):
        cfg = with_fields(hf_config(str(tmp_path / f"run-{name}"), max_steps=3),
                          checkpoint={"init_from": str(tmp_path / name)})
        results[name] = run_ranks(2, _bad_init, Segment(cfg))
    for name, messages in results.items():
        assert all(m.startswith("ConfigError: checkpoint.init_from") for m in messages), messages
        assert str(tmp_path / name) in messages[0]
    wider_msg, deeper_msg, shallow_msg = (results[n][0] for n in ("wider", "deeper", "shallow"))
    assert "shape mismatches" in wider_msg and "model.layers.0.mlp.gate_proj.weight" in wider_msg
    assert "(48, 32) vs model (64, 32)" in wider_msg
    assert "the model does not have: model.layers.2." in deeper_msg
    assert "missing from the file: model.layers.1." in shallow_msg


# -- default_parallelize's options change speed and memory, never the numbers ------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize("options", [
    {"activation_checkpointing": True, "reshard_after_forward": False},
    pytest.param({"compile": True}, marks=pytest.mark.slow),
], ids=["ac+zero2", "compile"])
def test_parallel_options_keep_the_losses(tmp_path, options):
    segs = [Segment(with_fields(hf_config(str(tmp_path / name), max_steps=3), parallel=p))
            for name, p in (("plain", {}), ("options", options))]
    outs = run_ranks(2, run_segments, segs, timeout_s=280)
    plain, changed = _segment(outs, 0), _segment(outs, 1)
    torch.testing.assert_close(_losses(_by_step([changed])), _losses(_by_step([plain])),
                               rtol=1e-6, atol=0)
