"""Units of the train layer that need no process group: the LR schedule, the model, the loss."""

from __future__ import annotations

import math

import pytest
import torch

from elastic_ckpt.config import ModelConfig, OptimConfig
from elastic_ckpt.train import build_gpt, lm_loss, lr_at
from elastic_ckpt.train import shard_units

PEAK, MAX_STEPS = 1e-3, 100


def _schedule(max_steps: int = MAX_STEPS, upto: int | None = None, **optim) -> list[float]:
    cfg = OptimConfig(lr=PEAK, **optim)
    return [lr_at(s, cfg, max_steps) for s in range((max_steps if upto is None else upto) + 1)]


# -- lr_at --------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_warmup_is_linear_from_one_step_to_peak(schedule):
    lrs = _schedule(warmup_steps=10, schedule=schedule)
    assert lrs[0] == pytest.approx(PEAK / 10)  # step 0 already trains (not at lr 0)
    assert lrs[:10] == pytest.approx([PEAK * (s + 1) / 10 for s in range(10)])
    assert lrs[9] == pytest.approx(PEAK) and lrs[10] == pytest.approx(PEAK)


def test_constant_is_peak_everywhere_after_warmup():
    assert _schedule(schedule="constant", upto=MAX_STEPS + 5) == [PEAK] * (MAX_STEPS + 6)
    assert _schedule(schedule="constant", warmup_steps=5)[5:] == [PEAK] * (MAX_STEPS - 4)


@pytest.mark.parametrize("warmup", [0, 20])
def test_cosine_endpoints_midpoint_and_shape(warmup):
    lrs = _schedule(warmup_steps=warmup, schedule="cosine", min_lr_ratio=0.1)
    floor = 0.1 * PEAK
    assert lrs[warmup] == pytest.approx(PEAK)
    assert lrs[MAX_STEPS] == pytest.approx(floor)
    mid = warmup + (MAX_STEPS - warmup) // 2
    assert lrs[mid] == pytest.approx((PEAK + floor) / 2)
    # Cosine, not linear: a quarter of the way it has fallen less than a quarter of the span.
    quarter = warmup + (MAX_STEPS - warmup) // 4
    assert lrs[quarter] == pytest.approx(floor + (PEAK - floor) * (1 + math.cos(math.pi / 4)) / 2)


@pytest.mark.parametrize("warmup", [0, 20])
def test_linear_endpoints_and_constant_decrement(warmup):
    lrs = _schedule(warmup_steps=warmup, schedule="linear", min_lr_ratio=0.2)
    assert lrs[warmup] == pytest.approx(PEAK) and lrs[MAX_STEPS] == pytest.approx(0.2 * PEAK)
    steps = [b - a for a, b in zip(lrs[warmup:], lrs[warmup + 1:])]
    assert steps == pytest.approx([-(0.8 * PEAK) / (MAX_STEPS - warmup)] * len(steps))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 1, 7])
def test_rises_through_warmup_then_never_rises_and_stays_in_bounds(schedule, warmup):
    lrs = _schedule(warmup_steps=warmup, schedule=schedule, min_lr_ratio=0.1,
                    upto=MAX_STEPS + 10)
    assert all(a < b for a, b in zip(lrs[:warmup - 1], lrs[1:warmup]))
    assert all(b <= a for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert all(0.1 * PEAK - 1e-15 <= lr <= PEAK + 1e-15 for lr in lrs)
    # Past max_steps the schedule holds its floor instead of turning back up (cosine) or
    # going negative (linear).
    assert lrs[MAX_STEPS:] == pytest.approx([0.1 * PEAK] * 11)


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_min_lr_ratio_bounds(ratio):
    lrs = _schedule(schedule="cosine", min_lr_ratio=ratio)
    assert lrs[-1] == pytest.approx(ratio * PEAK, abs=1e-18)
    if ratio == 1.0:
        assert lrs == pytest.approx([PEAK] * len(lrs))


def test_decay_is_stretched_over_max_steps():
    # Why every run of one job (each segment between resizes) must use the same max_steps.
    cfg = OptimConfig(lr=PEAK, warmup_steps=3)
    assert lr_at(30, cfg, 60) > lr_at(30, cfg, 50)
    assert lr_at(2, cfg, 50) == lr_at(2, cfg, 60)  # warm-up does not depend on it


# -- model and loss -----------------------------------------------------------------------------
TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, max_seq_len=16)


def test_gpt_shapes_and_blocks_are_the_shard_units():
    model = build_gpt(TINY)
    assert shard_units(model) == list(model.blocks) and len(model.blocks) == 3
    logits = model(torch.zeros(2, 16, dtype=torch.long))
    assert logits.shape == (2, 16, 64)


def test_same_seed_same_initial_weights():
    torch.manual_seed(5)
    a = build_gpt(TINY).state_dict()
    torch.manual_seed(5)
    b = build_gpt(TINY).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lm_loss_is_next_token_cross_entropy_near_log_vocab_at_init():
    torch.manual_seed(0)
    model = build_gpt(TINY)
    ids = torch.randint(0, 64, (3, 16))
    loss = lm_loss(model, {"input_ids": ids})
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(math.log(64), rel=0.05)
    logits = model(ids[:, :-1])
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, manual)


def test_lm_loss_is_a_mean_so_sample_weighting_recovers_the_batch_mean():
    # The loop weights each micro-batch's mean loss by its sample count; with equal-length
    # sequences that reproduces the mean over the whole batch, however it is split.
    torch.manual_seed(0)
    model = build_gpt(TINY)
    ids = torch.randint(0, 64, (7, 16))
    whole = lm_loss(model, {"input_ids": ids})
    parts = [ids[:3], ids[3:6], ids[6:]]
    weighted = sum(lm_loss(model, {"input_ids": p}) * len(p) for p in parts) / len(ids)
    torch.testing.assert_close(weighted, whole)


# -- the built-in schedule as an LR scheduler -----------------------------------------------------
def test_builtin_scheduler_scales_each_group_and_resumes_at_a_step():
    from elastic_ckpt.train import builtin_lr_scheduler

    cfg = OptimConfig(lr=PEAK, warmup_steps=5, schedule="cosine")
    w = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [w]}, {"params": [b], "lr": PEAK / 10}], lr=PEAK)
    sched = builtin_lr_scheduler(opt, cfg, MAX_STEPS)
    seen = []
    for _ in range(20):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    want = [lr_at(s, cfg, MAX_STEPS) for s in range(20)]
    assert [a for a, _ in seen] == pytest.approx(want)
    assert [b for _, b in seen] == pytest.approx([x / 10 for x in want])  # stays at 0.1x
    # A resume at step 20: the groups carry initial_lr, and the lr is the step's at once.
    again = builtin_lr_scheduler(opt, cfg, MAX_STEPS, step=20)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [lr_at(20, cfg, MAX_STEPS), lr_at(20, cfg, MAX_STEPS) / 10])
    assert again.last_epoch == 20


def test_warm_up_builds_on_meta_in_its_own_group_and_tolerates_builders_that_cannot():
    import logging

    import torch.distributed as dist

    from elastic_ckpt.config import TrainConfig
    from elastic_ckpt.data import SyntheticLMDataset
    from elastic_ckpt.train import TrainJob, TrainSpec
    from elastic_ckpt.train.loop import warm_up

    config = TrainConfig()
    dataset = SyntheticLMDataset(8, config.model.max_seq_len, config.model.vocab_size)
    built = []

    def model_fn():
        model = build_gpt(config.model)
        built.append(next(model.parameters()).device.type)
        return model

    def broken():
        raise RuntimeError("needs real weights")

    assert warm_up(TrainJob(config, TrainSpec(model_fn, lm_loss), dataset)) > 0
    assert built == ["meta"] and not dist.is_initialized()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("elastic_ckpt.train.loop").addHandler(handler)
    logging.getLogger("elastic_ckpt.train.loop").setLevel(logging.INFO)
    try:
        warm_up(TrainJob(config, TrainSpec(broken, lm_loss), dataset))
    finally:
        logging.getLogger("elastic_ckpt.train.loop").removeHandler(handler)
    assert not dist.is_initialized()
    assert any("needs real weights" in r.getMessage() for r in records)
