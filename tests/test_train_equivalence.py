"""Training does not notice a resize: the acceptance of elastic training semantics.

A run interrupted and resumed at other world sizes consumes exactly the samples, at exactly
the steps, of a never-interrupted run, with the same per-step loss (sample-weighted, so the
gradient is the mean over the global batch for every W) and the same final parameters. At
the same world size a resume is bit-identical. Gloo ranks on CPU, fp32, a tiny GPT.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter

import pytest
import torch

from elastic_ckpt import CheckpointManager
from elastic_ckpt.data import ElasticSampler
from elastic_ckpt.storage import fs as storage_fs
from elastic_ckpt.train.local import run_ranks
from train_jobs import Segment, run_segments, smallest_config, tiny_config, with_fields

pytestmark = pytest.mark.dist

RTOL = 1e-5


# -- helpers ----------------------------------------------------------------------------------
def _segment(outs: list[list[dict]], i: int) -> list[dict]:
    """Segment ``i`` of a ``run_segments`` spawn: one output per rank."""
    return [rank_outs[i] for rank_outs in outs]


def _by_step(segments: list[list[dict]]) -> dict[int, list[tuple]]:
    """step -> that step's ledger rows of every rank (in rank order), over several segments.
    Fails if a step was run twice or a rank reported a step twice."""
    rows: dict[int, list[tuple]] = {}
    for seg in segments:
        seen = {}
        for out in seg:
            for row in out["steps"]:
                assert (row[0], out["rank"]) not in seen, f"rank {out['rank']} ran {row[0]} twice"
                seen[(row[0], out["rank"])] = row
        steps = sorted({step for step, _ in seen})
        for step in steps:
            assert step not in rows, f"step {step} was trained by two segments"
            rows[step] = [seen[(step, r)] for r in range(len(seg))]
    return rows


def _losses(rows: dict[int, list[tuple]]) -> list[float]:
    out = []
    for step in sorted(rows):
        per_rank = {row[1] for row in rows[step]}
        assert len(per_rank) == 1, f"step {step}: ranks disagree on the loss {per_rank}"
        out.append(per_rank.pop())
    return out


def _ids(rows: dict[int, list[tuple]], step: int) -> list[int]:
    """The samples all ranks consumed in ``step``, concatenated in rank order."""
    return [i for row in rows[step] for i in row[2]]


def _assert_ledger_matches(rows: dict[int, list[tuple]], ref: dict[int, list[tuple]],
                           config) -> None:
    assert sorted(rows) == sorted(ref) == list(range(1, config.max_steps + 1))
    sampler = ElasticSampler(config.data.dataset.num_samples, config.data.global_batch_size,
                             config.data.seed)
    for step in ref:
        got, want = _ids(rows, step), _ids(ref, step)
        # The same samples at the same step, none lost or doubled (a batch that straddles an
        # epoch boundary may legitimately hold a sample twice, so compare multisets) ...
        assert Counter(got) == Counter(want), f"step {step}: samples differ from the reference"
        # ... and both are the sampler's global batch, split over ranks in rank order.
        assert got == want == sampler.global_batch(step - 1).tolist(), f"step {step}"
        assert all(row[4] == config.data.global_batch_size for row in rows[step])
    # Over the whole run: the stream is whole epochs of permutations, every sample once each.
    stream = [i for step in sorted(rows) for i in _ids(rows, step)]
    n = config.data.dataset.num_samples
    for start in range(0, len(stream) - n + 1, n):
        assert sorted(stream[start:start + n]) == list(range(n)), f"epoch at {start}"


KEY_BIAS_ATOL = 1e-4


def _assert_params_close(got: dict, want: dict, atol: float) -> None:
    """Every parameter within ``atol``, but the attention key bias within ``KEY_BIAS_ATOL``.

    The key bias adds the same q.b_k to every score of a softmax row, so its gradient is zero
    up to rounding; AdamW divides that rounding noise by its own tiny RMS and turns it into
    updates of ~1e-5 that differ across world sizes. They change no output (the losses prove
    it), so they get the looser bound; every other entry has a real gradient.
    """
    assert got.keys() == want.keys() and got
    for name in want:
        g, w = got[name], want[name]
        if name.endswith("qkv.bias"):
            d = w.numel() // 3
            torch.testing.assert_close(g[d:2 * d], w[d:2 * d], rtol=0, atol=KEY_BIAS_ATOL,
                                       msg=lambda m: f"{name} (key part): {m}")
            g, w = torch.cat([g[:d], g[2 * d:]]), torch.cat([w[:d], w[2 * d:]])
        torch.testing.assert_close(g, w, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


# -- 1. resize W=2 -> 3 -> 1 equals a fixed W=2 run; W=2 -> 2 is bit-identical --------------------
@pytest.mark.timeout(240)
def test_resize_2_3_1_matches_uninterrupted_and_same_size_resume_is_exact(tmp_path):
    steps = 12  # three segments of four; the LR schedule (max_steps) is the same everywhere
    ref_cfg = tiny_config(str(tmp_path / "ref"), max_steps=steps)
    el_uri, same_uri = str(tmp_path / "elastic"), str(tmp_path / "same")
    el_cfg = tiny_config(el_uri, max_steps=steps)
    assert ref_cfg.data.global_batch_size % 2 and ref_cfg.data.global_batch_size % 3
    assert steps * ref_cfg.data.global_batch_size > ref_cfg.data.dataset.num_samples  # epochs

    first = run_ranks(2, run_segments, [Segment(ref_cfg, gather_params=True),
                                        Segment(el_cfg, stop_at=steps // 3)])
    ref, seg_a = _segment(first, 0), _segment(first, 1)
    shutil.copytree(el_uri, same_uri)  # the step-4 checkpoint, for the W=2 -> 2 resume
    seg_b = _segment(run_ranks(3, run_segments, [Segment(el_cfg, stop_at=2 * steps // 3)]), 0)
    seg_c = _segment(run_ranks(1, run_segments, [Segment(el_cfg, gather_params=True)]), 0)
    same_cfg = tiny_config(same_uri, max_steps=steps)
    seg_d = _segment(run_ranks(2, run_segments, [Segment(same_cfg, gather_params=True)]), 0)

    # Each segment stopped or resumed where it was asked to, at the world size it ran at.
    assert [(o["restored_step"], o["final_step"], o["stopped"]) for o in seg_a] == [
        (None, 4, True)] * 2
    assert [(o["restored_step"], o["restored_from_world_size"], o["final_step"])
            for o in seg_b] == [(4, 2, 8)] * 3
    assert [(o["restored_step"], o["restored_from_world_size"], o["final_step"], o["stopped"])
            for o in seg_c] == [(8, 3, 12, False)]
    assert {row[3] for seg in (seg_a, seg_b, seg_c) for out in seg for row in out["steps"]} == {
        1, 2, 3}

    ref_rows = _by_step([ref])
    el_rows = _by_step([seg_a, seg_b, seg_c])
    _assert_ledger_matches(ref_rows, ref_rows, ref_cfg)
    _assert_ledger_matches(el_rows, ref_rows, ref_cfg)

    ref_losses, el_losses = _losses(ref_rows), _losses(el_rows)
    assert ref_losses[-1] < ref_losses[0]  # it trains, so matching losses mean something
    torch.testing.assert_close(el_losses, ref_losses, rtol=RTOL, atol=0)
    # The LR schedule continues on the global step, whatever the world size.
    assert [r[0][5] for _, r in sorted(el_rows.items())] == [
        r[0][5] for _, r in sorted(ref_rows.items())]
    _assert_params_close(seg_c[0]["params"], ref[0]["params"], atol=1e-6)

    # W=2 -> W=2: bit-identical to the uninterrupted run (same ledger, losses, parameters).
    assert seg_d[0]["restored_step"] == 4 and seg_d[0]["restored_from_world_size"] == 2
    same_rows = _by_step([seg_a, seg_d])
    assert same_rows == ref_rows
    assert _losses(same_rows) == ref_losses
    params, ref_params = seg_d[0]["params"], ref[0]["params"]
    assert params.keys() == ref_params.keys()
    assert all(torch.equal(params[k], ref_params[k]) for k in ref_params)


# -- 1a. async saves on: a resize while an interval save is still persisting -------------------
def slow_persist_segments(rank: int, world_size: int, segments: list[Segment],
                          delay_s: float) -> list[dict]:
    """``run_segments`` with every background persist ``delay_s`` slower (per file closed)."""
    original = storage_fs._LocalWriter.close

    def close(self, durable: bool) -> None:
        if threading.current_thread().name.startswith("elastic-ckpt-persist"):
            time.sleep(delay_s)
        original(self, durable)

    storage_fs._LocalWriter.close = close
    try:
        return run_segments(rank, world_size, segments)
    finally:
        storage_fs._LocalWriter.close = original


@pytest.mark.timeout(240)
def test_resize_during_an_in_flight_async_save_loses_nothing(tmp_path):
    steps = 8
    ref_cfg = tiny_config(str(tmp_path / "ref"), max_steps=steps)
    el_cfg = with_fields(tiny_config(str(tmp_path / "elastic"), max_steps=steps),
                         checkpoint={"interval_steps": 1, "async_save": True})
    first = run_ranks(2, slow_persist_segments, [Segment(ref_cfg), Segment(el_cfg, stop_at=4)],
                      0.6)
    ref, seg_a = _segment(first, 0), _segment(first, 1)
    seg_b = _segment(run_ranks(3, run_segments, [Segment(el_cfg)]), 0)

    for out in seg_a:  # step 3 was still persisting when the stop came at step 4
        staged = [f["step"] for name, f in out["events"] if name == "CheckpointStaged"]
        final = [f for name, f in out["events"]
                 if name == "CheckpointCommitted" and f["step"] == 4]
        assert staged == [1, 2, 3] and final and final[0]["is_async"] is False, out["events"]
        assert final[0]["waited_s"] > 0.2, final  # the save in flight, committed first
        assert (out["final_step"], out["stopped"], out["checkpoint_step"]) == (4, True, 4)
    assert [(o["restored_step"], o["restored_from_world_size"]) for o in seg_b] == [(4, 2)] * 3
    ref_rows, el_rows = _by_step([ref]), _by_step([seg_a, seg_b])
    _assert_ledger_matches(el_rows, ref_rows, ref_cfg)
    torch.testing.assert_close(_losses(el_rows), _losses(ref_rows), rtol=RTOL, atol=0)
    committed = [i.step for i in CheckpointManager(el_cfg.checkpoint.uri).list()]
    assert committed == list(range(1, steps + 1)), committed


# -- 1b. a corrupt latest checkpoint: resume from the one before, bit-identically -------------
@pytest.mark.timeout(180)
def test_resume_falls_back_past_a_corrupt_latest_checkpoint(tmp_path):
    from elastic_ckpt import CheckpointManager

    uri = tmp_path / "run"
    cfg = smallest_config(str(uri), max_steps=6, interval_steps=2)  # saves 2, 4, 6
    first = _segment(run_ranks(2, run_segments, [Segment(cfg)]), 0)
    step6 = uri / "step-00000006"
    data = step6 / "rank-00001.bin"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    data.write_bytes(bytes(raw))

    again = _segment(run_ranks(2, run_segments, [Segment(cfg)]), 0)
    assert [(o["restored_step"], o["skipped"], o["final_step"]) for o in again] == [
        (4, [6], 6)] * 2
    # Steps 5 and 6 re-run exactly as before (same W, same samples), and step 6 is saved anew.
    assert _by_step([again]) == {s: r for s, r in _by_step([first]).items() if s > 4}
    assert not (step6 / "CORRUPT").exists()
    assert CheckpointManager(str(uri)).latest().step == 6


# -- 2. a checkpoint written at any W' in 1..4 resumes at any W in 1..4 -------------------------
SAVE_AT, RESUME_STEPS = 2, 2
WORLD_SIZES = (1, 2, 3, 4)


@pytest.mark.slow  # 53 s; the default suite resumes across sizes in the tests around it
@pytest.mark.timeout(300)
def test_resume_at_any_world_size_from_any_world_size(tmp_path):
    def cfg(name: str):
        return smallest_config(str(tmp_path / name), max_steps=6)

    def resume(w: int, w_saved: int) -> Segment:
        return Segment(cfg(f"resume-{w}-from-{w_saved}"), stop_at=SAVE_AT + RESUME_STEPS,
                       copy_from=str(tmp_path / f"saved-{w_saved}"))

    # Round 1, W = 1..4: write the W checkpoint, then resume from every W' <= W written so far
    # (W = 1 also runs the uninterrupted reference). Round 2, W = 1..3: resume from W' > W.
    # Seven spawns instead of eight; W=4 spawns once.
    results: dict[tuple[int, int], list[dict]] = {}
    saved: dict[int, list[dict]] = {}
    reference = None
    for w in WORLD_SIZES:
        segs = [Segment(cfg(f"saved-{w}"), stop_at=SAVE_AT)]
        if w == 1:
            segs.append(Segment(cfg("reference"), stop_at=SAVE_AT + RESUME_STEPS))
        pairs = [(w, ws) for ws in WORLD_SIZES if ws <= w]
        outs = run_ranks(w, run_segments, segs + [resume(*p) for p in pairs])
        saved[w] = _segment(outs, 0)
        if w == 1:
            reference = _segment(outs, 1)
        for i, pair in enumerate(pairs):
            results[pair] = _segment(outs, len(segs) + i)
    for w in WORLD_SIZES[:-1]:
        pairs = [(w, ws) for ws in WORLD_SIZES if ws > w]
        outs = run_ranks(w, run_segments, [resume(*p) for p in pairs])
        for i, pair in enumerate(pairs):
            results[pair] = _segment(outs, i)
    assert sorted(results) == [(w, ws) for w in WORLD_SIZES for ws in WORLD_SIZES]

    ref_rows = _by_step([reference])
    ref_losses = _losses(ref_rows)
    for w_saved, seg in saved.items():
        assert [(o["final_step"], o["stopped"]) for o in seg] == [(SAVE_AT, True)] * w_saved
        torch.testing.assert_close(_losses(_by_step([seg])), ref_losses[:SAVE_AT], rtol=RTOL,
                                   atol=0)
    for (w, w_saved), seg in sorted(results.items()):
        where = f"resume at W={w} from W'={w_saved}"
        assert [(o["world_size"], o["restored_step"], o["restored_from_world_size"])
                for o in seg] == [(w, SAVE_AT, w_saved)] * w, where
        rows = _by_step([seg])
        assert sorted(rows) == list(range(SAVE_AT + 1, SAVE_AT + RESUME_STEPS + 1)), where
        for step in rows:
            assert _ids(rows, step) == _ids(ref_rows, step), where
        # The first resumed step checks the parameters, the second the optimizer state too.
        torch.testing.assert_close(_losses(rows), ref_losses[SAVE_AT:], rtol=RTOL, atol=0,
                                   msg=lambda m: f"{where}: {m}")


# -- 3. more ranks than samples: the idle rank still joins every collective ------------------------
@pytest.mark.timeout(180)
def test_world_size_above_global_batch_matches_single_rank(tmp_path):
    def cfg(name: str):
        return tiny_config(str(tmp_path / name), max_steps=6, global_batch_size=2,
                           micro_batch_size=1, num_samples=9)

    # W=1: the reference, and a run stopped at step 3 whose checkpoint W=3 resumes.
    single = run_ranks(1, run_segments, [Segment(cfg("w1"), gather_params=True),
                                         Segment(cfg("half"), stop_at=3)])
    ref, half = _segment(single, 0), _segment(single, 1)
    # W=3 from scratch, and resuming at W=3 from the W=1 checkpoint.
    wide = run_ranks(3, run_segments, [Segment(cfg("w3"), gather_params=True),
                                       Segment(cfg("w3-resumed"), copy_from=str(tmp_path / "half"),
                                               gather_params=True)],
                     timeout_s=150)
    fresh, resumed = _segment(wide, 0), _segment(wide, 1)

    ref_rows = _by_step([ref])
    ref_losses = _losses(ref_rows)
    assert ref_losses[-1] < ref_losses[0]
    assert resumed[0]["restored_step"] == 3 and resumed[0]["restored_from_world_size"] == 1
    for name, segs in (("fresh", [fresh]), ("resumed", [half, resumed])):
        rows = _by_step(segs)
        _assert_ledger_matches(rows, ref_rows, cfg("x"))
        torch.testing.assert_close(_losses(rows), ref_losses, rtol=RTOL, atol=0,
                                   msg=lambda m: f"{name}: {m}")
        _assert_params_close(segs[-1][0]["params"], ref[0]["params"], atol=1e-5)
    # Rank 2 had no samples at any step, yet ran (and reported) every step.
    for seg in (fresh, resumed):
        assert seg[2]["steps"] and all(row[2] == () for row in seg[2]["steps"])
        assert all(len(row[2]) == 1 for out in seg[:2] for row in out["steps"])
