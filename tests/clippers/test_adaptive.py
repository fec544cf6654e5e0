"""AdaptiveClip against an independent reference of its formulas, and its guards one by one."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest
import torch

from gradclip.clippers.adaptive import (
    LOSS_BLOCK,
    LOSS_CUT,
    LOSS_GROWTH,
    LOSS_PATIENCE,
    LOSS_WINDOW,
    LOSS_Z,
    AdaptiveClip,
)
from gradclip.demo.runner import run

DEFAULTS = {
    "relative": 2.0,
    "window": 128,
    "growth": 5e-4,
    "warmup_start": 1e-2,
    "warmup_growth": 1e-2,
    "warmup_relative": 0.5,
    "spike": 6.0,
    "backoff": 0.5,
    "min_relative": 1 / 48,
    "recovery": 1e-3,
    "max_norm": None,
    "second_moment": None,
}


def reference(norms: list[float], losses: list[float] | None = None, plateau: bool = True,
              **overrides: float | None) -> list[float]:
    """The documented formulas in plain Python: the threshold applied at each step, given
    the step's loss from ``losses`` when there are any (the loss gate; its plateau cut
    when ``plateau``)."""
    cfg = {**DEFAULTS, **overrides}
    history: list[float] = []  # recorded norms, oldest first
    c: float | None = None  # threshold after the last recorded step
    k = cfg["relative"]  # the ceiling, as a multiple of the median
    warm = True
    seen: list[float] = []  # recorded losses, oldest first
    best, mode, stall = math.inf, 0, 0
    beta, moment = cfg["second_moment"], 0.0  # Adam's exp_avg_sq, of the clipped norms
    out = []
    for i, g in enumerate(norms):
        recorded = math.isfinite(g) and g > 0
        recent = history[-cfg["window"] :]
        m = statistics.median_low(recent) if recent else math.inf
        if beta and history:  # the larger of the median and the optimizer's second moment
            m = max(m, math.sqrt(moment / (1 - beta ** len(history))))
        rates = (cfg["warmup_growth"], cfg["growth"], cfg["recovery"])
        gate = None
        if losses is not None:
            gate = _gate(seen, losses[i], best, mode, stall)  # after this loss
            if gate[2] == 1:
                rates = (max(LOSS_GROWTH, rates[0]), LOSS_GROWTH, max(LOSS_GROWTH, rates[2]))
            elif gate[2] == 2:
                rates = (0.0, 0.0, rates[2])
        previous = None
        if c is not None:  # a rise, or a plateau, cuts; never below the back-off's floor
            cut = LOSS_CUT if plateau and gate is not None and gate[4] else gate[0] if gate else 1.0
            previous = max(cut * c, min(c, cfg["min_relative"] * m))
        if previous is None:
            t = cfg["warmup_start"] * g if recorded else math.inf
            still_warm = True
        else:
            grown = previous * (1 + (rates[0] if warm else rates[1]))
            cap = (min(k, cfg["warmup_relative"]) if warm else k) * m
            t = min(grown, cap)
            still_warm = warm and grown < cap
        new_k = min(k * (1 + rates[2]), cfg["relative"])
        full = len(history) >= cfg["window"]
        # given the loss: a batch whose loss is no higher than the recent median is no spike
        typical = (losses is not None and len(seen) >= LOSS_WINDOW
                    and losses[i] <= statistics.median_low(seen[-LOSS_WINDOW:]))
        if cfg["spike"] is not None and recorded and full and g > cfg["spike"] * m and not typical:
            t = min(t, max(cfg["backoff"] * t, cfg["min_relative"] * m))
            new_k = max(t / m, cfg["min_relative"])
        out.append(t if cfg["max_norm"] is None else min(t, cfg["max_norm"]))
        if recorded:
            if beta:
                moment = beta * moment + (1 - beta) * (g * min(1.0, out[-1] / (g + 1e-6))) ** 2
            history.append(g)
            c, warm, k = t, still_warm, new_k
            if gate is not None:
                if math.isfinite(losses[i]):
                    seen.append(losses[i])
                best, mode, stall = gate[1], gate[2], gate[3]
    return out


def _gate(
    seen: list[float], loss: float, best: float, mode: int, stall: int
) -> tuple[float, float, int, int, bool]:
    """The loss gate's (factor on the previous threshold, lowest block mean, mode, decisions
    without a new low, plateau) after ``loss`` joins the recorded ``seen`` (not modified)."""
    if not math.isfinite(loss):
        return 1.0, best, mode, stall, False
    values = [*seen, loss]
    if len(values) % LOSS_BLOCK or len(values) < 2 * LOSS_BLOCK:
        return 1.0, best, mode, stall, False
    last, before = values[-LOSS_BLOCK:], values[-2 * LOSS_BLOCK : -LOSS_BLOCK]
    mean = statistics.fmean(last)
    error = math.sqrt((statistics.variance(last) + statistics.variance(before)) / LOSS_BLOCK)
    if mean > statistics.fmean(before) + LOSS_Z * error:
        return LOSS_CUT, min(best, mean), 2, 0, False
    falls = False
    if len(values) >= 3 * LOSS_BLOCK:
        ys = values[-LOSS_WINDOW:]
        fit = statistics.linear_regression(range(len(ys)), ys)
        xs = range(len(ys))
        xm = statistics.fmean(xs)
        sxx = sum((x - xm) ** 2 for x in xs)
        residual = sum((y - fit.intercept - fit.slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
        spread = math.sqrt(residual / (len(ys) - 2) / sxx)
        # a perfectly straight run: x/0 as the tensors compute it (inf, or NaN for 0/0)
        t = fit.slope / spread if spread else math.copysign(math.inf, fit.slope) if fit.slope else math.nan
        falls = t < -LOSS_Z and mean < best
    stall = 0 if mean < best else stall + 1
    plateau = stall >= LOSS_PATIENCE
    return 1.0, min(best, mean), 1 if falls else 0, 0 if plateau else stall, plateau


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def norm_sequence(steps: int, seed: int = 0, bad: bool = True) -> list[float]:
    """Log-normal norms around 1 with x20 spikes and, if ``bad``, NaN / inf / 0 steps."""
    rng = random.Random(seed)
    out = []
    for i in range(steps):
        g = math.exp(rng.gauss(0.0, 0.4)) * (20.0 if rng.random() < 0.05 else 1.0)
        if bad and i % 37 == 5:
            g = (math.nan, math.inf, 0.0)[i % 3]
        out.append(f32(g))
    return out


def clip_sequence(clipper: AdaptiveClip, norms: list[float],
                  losses: list[float] | None = None) -> tuple[list[float], list[float]]:
    """Feed one-element gradients with these norms (and losses, as 0-dim tensors); return
    (thresholds, clipped norms)."""
    p = torch.nn.Parameter(torch.zeros(1))
    thresholds, clipped = [], []
    for i, g in enumerate(norms):
        p.grad = torch.tensor([g], dtype=torch.float32)
        loss = None if losses is None else torch.tensor(losses[i])
        stats = clipper({"w": p}, loss=loss)
        thresholds.append(float(stats.threshold))
        clipped.append(float(p.grad[0]))
    return thresholds, clipped


CONFIGS = [
    {},
    {"window": 16},
    {"window": 16, "growth": 0.01, "warmup_growth": 0.05, "max_norm": 0.8},
    {"window": 8, "relative": 1.0, "warmup_relative": 1.0, "spike": None},
    {"window": 8, "warmup_start": math.inf, "backoff": 0.25, "min_relative": 0.1, "spike": 3.0},
    {"window": 8, "spike": 2.0, "recovery": 0.05},
    {"window": 16, "second_moment": 0.99},
    {"window": 8, "second_moment": 0.9, "max_norm": 0.8, "spike": 3.0},
]


@pytest.mark.parametrize("overrides", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_thresholds_match_the_reference(overrides: dict) -> None:
    norms = norm_sequence(500)
    got, _ = clip_sequence(AdaptiveClip(**overrides), norms)
    want = reference(norms, **overrides)
    assert got == pytest.approx(want, rel=1e-4)


def loss_sequence(steps: int, seed: int = 0) -> list[float]:
    """A training loss that falls, plateaus, jumps up twice, recovers and falls again, with
    noise (float32 values), and a NaN and an inf among them."""
    rng = random.Random(seed)
    out = []
    for i in range(steps):
        trend = 2.0 * math.exp(-i / 80) if i < 200 else 0.05 + (0.5 if 260 <= i < 330 else 0.0)
        if 400 <= i < 440:
            trend += 1.5
        if i >= 450:
            trend = 0.05 * math.exp(-(i - 450) / 100)
        value = trend * math.exp(rng.gauss(0.0, 0.1))
        out.append(f32(value) if i not in (100, 301) else (math.nan if i == 100 else math.inf))
    return out


LOSS_CONFIGS = [{}, {"window": 16}, {"window": 8, "spike": 3.0, "recovery": 0.05},
                {"warmup_start": math.inf, "growth": 0.0}]


@pytest.mark.parametrize("overrides", LOSS_CONFIGS, ids=[str(c) for c in LOSS_CONFIGS])
def test_loss_gate_matches_the_reference(overrides: dict) -> None:
    norms, losses = norm_sequence(600, seed=5), loss_sequence(600)
    got, _ = clip_sequence(AdaptiveClip(**overrides), norms, losses)
    want = reference(norms, losses, **overrides)
    assert got == pytest.approx(want, rel=1e-4)
    assert got != pytest.approx(reference(norms, **overrides), rel=1e-4)  # the gate acted


def _falling_then_rising() -> tuple[list[float], list[float]]:
    """A loss that falls for 400 steps, and the same loss jumping x5 at step 200."""
    falling = [f32(3.0 * math.exp(-i / 80) * (1 + 0.02 * math.sin(i))) for i in range(400)]
    return falling, falling[:200] + [f32(falling[199] * (5 + 0.01 * (i % 3))) for i in range(200)]


def test_a_falling_loss_lets_the_threshold_grow_fast_and_a_rise_cuts_it() -> None:
    norms = [1.0] * 400
    falling, rising = _falling_then_rising()
    slow, _ = clip_sequence(AdaptiveClip(window=16), norms)
    fast, _ = clip_sequence(AdaptiveClip(window=16), norms, falling)
    assert slow[-1] < 0.6 and fast[-1] == pytest.approx(2.0)  # the ceiling: 2x the median
    assert fast[150] > 2 * slow[150]
    # the loss jumps x5 at step 200: the block of steps 200-219 is decided at step 219
    cut, _ = clip_sequence(AdaptiveClip(window=16), norms, rising)
    assert cut[218] == pytest.approx(fast[218]) and cut[218] < 1.0
    assert cut[219] == pytest.approx(cut[218] * LOSS_CUT)
    assert cut[219:239] == pytest.approx([cut[219]] * 20)  # no growth until the next block


def test_a_rise_cuts_the_threshold_down_to_the_floor_and_no_lower() -> None:
    # the back-off's floor (min_relative x the median, 1 here) bounds every cut
    norms = [1.0] * 400
    falling, rising = _falling_then_rising()
    fast, _ = clip_sequence(AdaptiveClip(window=16), norms, falling)
    floor = f32(0.8 * fast[218])  # between the threshold and its 0.7 cut
    cut, _ = clip_sequence(AdaptiveClip(window=16, min_relative=floor), norms, rising)
    assert cut[218] == pytest.approx(fast[218])
    assert cut[219] == pytest.approx(floor) and cut[219:239] == pytest.approx([floor] * 20)


def test_a_plateau_of_the_loss_cuts_the_threshold_down_to_the_floor() -> None:
    # the loss falls for 200 steps, then stays flat (no noise: no rise, no new low) for 4800:
    # every LOSS_PATIENCE decisions (of LOSS_BLOCK losses) cut the threshold by LOSS_CUT, never
    # below min_relative x the median (1 here)
    steps = 5000
    norms = [1.0] * steps
    losses = [f32(3.0 * math.exp(-min(i, 200) / 40)) for i in range(steps)]
    got, _ = clip_sequence(AdaptiveClip(window=16), norms, losses)
    # float32 against float64 over 5000 steps of growth
    assert got == pytest.approx(reference(norms, losses, window=16), rel=1e-3)
    falls = [i for i in range(1, steps) if got[i] < 0.9 * got[i - 1]]
    period = LOSS_PATIENCE * LOSS_BLOCK
    assert len(falls) >= 10 and all(b - a == period for a, b in itertools.pairwise(falls))
    assert falls[0] % LOSS_BLOCK == LOSS_BLOCK - 1  # a deciding step
    floor = 1 / 48
    for i in falls:  # a cut of the previous threshold, floored (then the growth of mode 0)
        cut = max(got[i - 1] * LOSS_CUT, min(got[i - 1], floor))
        assert got[i] == pytest.approx(cut * (1 + 5e-4), rel=1e-5)
    assert any(got[i - 1] * LOSS_CUT < floor for i in falls)  # the floor was hit
    assert floor * (1 - 1e-6) <= min(got[200:]) < 1.01 * floor  # reached, not passed
    assert got[-1] < (1 + 5e-4) ** period * floor * 1.01  # and held
    # without the loss, nothing of it: the threshold ramps up and creeps on
    plain, _ = clip_sequence(AdaptiveClip(window=16), norms)
    assert plain[-1] > 0.5 and min(plain[1000:]) == plain[1000]
    # nor with plateau=False, or an optimizer that normalises its update (given the loss, it
    # follows the median rule and the rest of the gate)
    without = reference(norms, losses, plateau=False, window=16)
    assert min(without[1000:]) > 0.5
    p = [torch.nn.Parameter(torch.zeros(1))]
    # (and its faster warm-up ramp: NORMALISING_WARMUP_GROWTH)
    adamw = reference(norms, losses, plateau=False, window=16, warmup_growth=0.05)
    for clipper, want in ((AdaptiveClip(window=16, plateau=False), without),
                          (AdaptiveClip(window=16, optimizer=torch.optim.AdamW(p)), adamw)):  # fmt: skip
        assert clipper.plateau is False
        got_off, _ = clip_sequence(clipper, norms, losses)
        assert got_off == pytest.approx(want, rel=1e-3)
    assert AdaptiveClip(optimizer=torch.optim.SGD(p, lr=0.1)).plateau is True
    assert AdaptiveClip(optimizer=torch.optim.AdamW(p), plateau=True).plateau is True
    with pytest.raises(TypeError, match="plateau"):
        AdaptiveClip(plateau="no")  # type: ignore[arg-type]


def test_loss_is_ignored_with_follow_loss_false() -> None:
    norms, losses = norm_sequence(300, seed=2), loss_sequence(300)
    plain, _ = clip_sequence(AdaptiveClip(window=16), norms)
    assert clip_sequence(AdaptiveClip(window=16, follow_loss=False), norms, losses)[0] == plain
    held, _ = clip_sequence(AdaptiveClip(hold=0.25), norms)
    assert clip_sequence(AdaptiveClip(hold=0.25, follow_loss=False), norms, losses)[0] == held
    with pytest.raises(TypeError, match="follow_loss"):
        AdaptiveClip(follow_loss="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("second_moment", [None, 0.999])
def test_loss_gate_reads_nothing_on_the_host(accelerator_path: None, second_moment: float | None) -> None:
    from host_reads import HostReadDetector

    clipper = AdaptiveClip(window=16, second_moment=second_moment)
    p = torch.nn.Parameter(torch.zeros(3))
    for i, (g, loss) in enumerate(zip(norm_sequence(80, bad=False), loss_sequence(80), strict=True)):
        p.grad = torch.full((3,), g)
        value = torch.tensor(loss)
        with HostReadDetector() as detector:
            clipper({"w": p}, loss=value)
        assert detector.reads == [] and (i == 0 or detector.copies == []), (i, detector.reads)


def test_checkpoints_before_the_loss_gate_load_and_its_state_is_checked() -> None:
    norms, losses = norm_sequence(120, seed=4, bad=False), loss_sequence(120)
    clipper = AdaptiveClip(window=16)
    clip_sequence(clipper, norms, losses)
    saved = clipper.state_dict()
    assert int(saved["state"]["loss_count"]) == 119  # the loss at step 100 is NaN
    old = {**saved, "state": {k: v for k, v in saved["state"].items() if not k.startswith("loss")}}
    resumed = AdaptiveClip(window=16)
    resumed.load_state_dict(old)  # written before the gate: its state starts fresh
    assert torch.equal(resumed.state.history, clipper.state.history)
    assert int(resumed.state.loss_count) == 0 and float(resumed.state.loss_best) == math.inf
    again = AdaptiveClip(window=16)
    again.load_state_dict(saved)
    assert torch.equal(again.state.losses, clipper.state.losses)
    without_stall = {**saved, "state": {k: v for k, v in saved["state"].items() if k != "loss_stall"}}
    before_plateau = AdaptiveClip(window=16)
    before_plateau.load_state_dict(without_stall)  # written before the plateau cut
    assert torch.equal(before_plateau.state.losses, clipper.state.losses)
    assert int(before_plateau.state.loss_stall) == 0
    for key, value, match in [("loss_mode", torch.tensor(7), "loss_mode=7"),
                              ("loss_stall", torch.tensor(LOSS_PATIENCE), f"loss_stall={LOSS_PATIENCE}"),
                              ("losses", torch.full((LOSS_WINDOW,), math.inf), "non-finite"),
                              ("losses", torch.zeros(3), "shape")]:
        bad = {**saved, "state": {**saved["state"], key: value}}
        with pytest.raises(ValueError, match=match):
            AdaptiveClip(window=16).load_state_dict(bad)
    ignoring = AdaptiveClip(window=16, follow_loss=False)
    clip_sequence(ignoring, norms[:5])
    assert ignoring.state_dict()["config"]["follow_loss"] is False
    with pytest.raises(ValueError, match=r"follow_loss=False \(here True\)"):
        AdaptiveClip(window=16).load_state_dict(ignoring.state_dict())
    with pytest.raises(ValueError, match="follow_loss"):
        AdaptiveClip(window=16, follow_loss=False).load_state_dict(saved)


def test_gradients_are_scaled_by_torchs_coefficient() -> None:
    norms = norm_sequence(200, seed=3, bad=False)
    thresholds, clipped = clip_sequence(AdaptiveClip(window=16), norms)
    for g, t, after in zip(norms, thresholds, clipped, strict=True):
        assert after == pytest.approx(g * min(1.0, t / (g + 1e-6)), rel=1e-5)


def test_growth_is_bounded_after_the_warm_up() -> None:
    # Settled norms, then a steady explosion (x1.05 a step): the threshold must not follow.
    settled = [1.0] * 500  # the ramp from 0.01 reaches 0.5 * median after 394 steps
    exploding = [1.05**i for i in range(1, 200)]
    clipper = AdaptiveClip(window=32, spike=None)
    clip_sequence(clipper, settled[:450])
    assert not bool(clipper.state_dict()["state"]["warm"])
    more, clipped = clip_sequence(clipper, settled[450:] + exploding)
    after = more[50:]
    for before, now in itertools.pairwise(after):
        assert now <= before * (1 + 5e-4) * (1 + 1e-6)
    # The explosion grows the norm x1.6e4; the clipped norm by at most (1 + growth) a step.
    assert max(clipped[50:]) <= more[49] * (1 + 5e-4) ** 200 * (1 + 1e-5)
    assert clipped[-1] < 1.2


def test_threshold_falls_at_once() -> None:
    norms = [10.0] * 200 + [1.0] * 40
    clipper = AdaptiveClip(window=32, spike=None, warmup_start=math.inf)  # no ramp
    thresholds, _ = clip_sequence(clipper, norms)
    assert thresholds[1] == pytest.approx(5.0)  # warmup_relative * 10: the warm-up is over
    assert thresholds[215] > 5.0  # creeping up toward relative * 10
    # Step 216 is judged against steps 184-215, 16 of which have norm 1: the lower median
    # is 1, and the cap relative * m = 2 applies at once.
    assert thresholds[216] == pytest.approx(2.0)


def test_absolute_ceiling_caps_the_threshold_but_not_the_statistics() -> None:
    norms = norm_sequence(300, seed=1)
    capped = AdaptiveClip(window=16, max_norm=0.3)
    free = AdaptiveClip(window=16)
    got, clipped = clip_sequence(capped, norms)
    free_thresholds, _ = clip_sequence(free, norms)
    assert max(got) <= 0.3
    assert got == pytest.approx([min(t, 0.3) for t in free_thresholds], rel=1e-6)
    assert all(abs(x) <= 0.3 * (1 + 1e-6) for x in clipped if math.isfinite(x))
    # The ceiling is outside the statistics: the state is the uncapped one.
    assert torch.equal(
        capped.state_dict()["state"]["threshold"], free.state_dict()["state"]["threshold"]
    )


def test_warm_up_ramp() -> None:
    clipper = AdaptiveClip(window=64)
    thresholds, _ = clip_sequence(clipper, [10.0] * 600)
    assert thresholds[0] == pytest.approx(0.1)  # warmup_start * first norm
    # Ramp: x1.01 per step up to warmup_relative * median = 5.
    end = math.ceil(math.log(50) / math.log(1.01))
    for i in range(1, end):
        assert thresholds[i] == pytest.approx(0.1 * 1.01**i, rel=1e-4)
    assert thresholds[end] == pytest.approx(5.0)
    # Then the slow growth toward relative * median = 20.
    assert thresholds[end + 100] == pytest.approx(5.0 * (1 + 5e-4) ** 100, rel=1e-4)
    assert bool(clipper.state_dict()["state"]["warm"]) is False


def test_warm_up_can_be_skipped() -> None:
    thresholds, clipped = clip_sequence(
        AdaptiveClip(window=8, warmup_start=math.inf), [4.0, 2.0, 2.0]
    )
    assert thresholds[0] == math.inf and clipped[0] == 4.0
    assert thresholds[1] == pytest.approx(2.0)  # warmup_relative * median(4) at once


def test_spike_halves_the_threshold_down_to_the_floor() -> None:
    window = 16
    clipper = AdaptiveClip(window=window, warmup_start=math.inf, growth=0.0, min_relative=1 / 32)
    base = [1.0] * (window + 1)
    thresholds, clipped = clip_sequence(clipper, [*base, 100.0])
    assert thresholds[-2] == pytest.approx(0.5)
    assert thresholds[-1] == pytest.approx(0.25)  # halved by the spike
    assert clipped[-1] == pytest.approx(0.25, rel=1e-5)
    # Spikes that keep coming: halving stops at min_relative * median (1/32).
    more, _ = clip_sequence(clipper, [1.0, 100.0] * 6)
    assert more[-1] == pytest.approx(1 / 32)
    assert min(more) >= 1 / 32 * (1 - 1e-6)


def test_back_off_is_remembered_and_recovers_at_its_own_rate() -> None:
    window = 16
    clipper = AdaptiveClip(window=window, warmup_start=math.inf, growth=0.1, recovery=0.01)
    thresholds, _ = clip_sequence(clipper, [1.0] * (window + 1) + [100.0] + [1.0] * 20)
    spike = window + 1
    assert thresholds[spike - 1] == pytest.approx(2.0)  # relative * median: growth is fast
    assert thresholds[spike] == pytest.approx(1.0)  # halved
    # The ceiling is now 1x the median (the spike is one rank of 16) and regrows by 1% per
    # step from the next one on, though growth would allow 10%.
    for i in range(1, 20):
        assert thresholds[spike + i] == pytest.approx(1.01 ** (i - 1), rel=1e-5)


def test_spikes_wait_for_a_full_window() -> None:
    clipper = AdaptiveClip(window=16, warmup_start=math.inf, growth=0.0)
    thresholds, _ = clip_sequence(clipper, [1.0] * 8 + [100.0])
    assert thresholds[-1] == pytest.approx(0.5)  # no back-off: 8 < 16 norms recorded


def test_a_large_norm_on_a_batch_of_typical_loss_is_no_spike() -> None:
    # norms of 1 and a steady loss; x20 norms at steps 50 (before 100 losses are recorded),
    # 200 (its loss the median of the last 100), 250 (its loss 10x) and 300 (a NaN loss).
    # Without the ramp and with fast growth the threshold sits at the ceiling, 2x the median,
    # regrown within 15 steps of a back-off
    norms, losses = [1.0] * 320, [f32(1.0 + 0.01 * math.sin(i)) for i in range(320)]
    for step in (50, 200, 250, 300):
        norms[step] = 20.0
    losses[200] = statistics.median_low(losses[100:200])
    losses[250], losses[300] = 10.0, math.nan
    options = {"window": 16, "warmup_start": math.inf, "growth": 0.05, "recovery": 0.05,
               "plateau": False}
    got, _ = clip_sequence(AdaptiveClip(**options), norms, losses)
    assert got == pytest.approx(reference(norms, losses, **options), rel=1e-5)
    before = [got[step - 1] for step in (50, 200, 250, 300)]
    assert before == pytest.approx([2.0] * 4)
    assert got[50] == pytest.approx(1.0)  # fewer than 100 losses: a spike
    assert got[200] == pytest.approx(2.0)  # the network learning: no back-off
    assert got[250] == pytest.approx(1.0) and got[300] == pytest.approx(1.0)  # spikes
    # without the loss, all four are spikes
    plain, _ = clip_sequence(AdaptiveClip(**options), norms)
    assert [plain[step] for step in (50, 200, 250, 300)] == pytest.approx([1.0] * 4)


def test_a_spike_never_raises_the_threshold() -> None:
    # In the warm-up the threshold can sit below the floor; a spike must leave it there.
    clipper = AdaptiveClip(window=8)
    thresholds, _ = clip_sequence(clipper, [1.0] * 9 + [100.0])
    assert thresholds[-1] == pytest.approx(thresholds[-2] * 1.01)
    assert thresholds[-1] < 1 / 32


@pytest.mark.parametrize("policy", ["propagate", "skip"])
def test_nan_inf_and_zero_never_enter_the_statistics(policy: str) -> None:
    clean = norm_sequence(300, seed=2, bad=False)
    dirty = list(clean)
    bad_at = {0: math.nan, 40: math.inf, 41: 0.0, 150: math.nan, 151: math.inf, 299: 0.0}
    for i, value in sorted(bad_at.items()):
        dirty.insert(i, value)
    a, b = AdaptiveClip(window=32), AdaptiveClip(window=32, nonfinite=policy)
    ta, _ = clip_sequence(a, clean)
    tb, _ = clip_sequence(b, dirty)
    kept = [t for i, t in enumerate(tb) if i not in bad_at]
    assert kept == ta
    for key in ("history", "count", "threshold", "warm"):
        assert torch.equal(a.state_dict()["state"][key], b.state_dict()["state"][key]), key
    assert not any(math.isnan(t) for t in tb)
    assert int(b.nonfinite_steps) == 4


def test_threshold_of_an_unrecorded_step_is_the_states() -> None:
    clipper = AdaptiveClip(window=8)
    thresholds, _ = clip_sequence(clipper, [math.nan, 0.0, 2.0, math.inf, 2.0])
    assert thresholds[:2] == [math.inf, math.inf]  # nothing recorded yet
    assert thresholds[2] == pytest.approx(0.02)
    assert thresholds[3] == pytest.approx(0.02 * 1.01)  # what a finite step would get
    assert thresholds[4] == pytest.approx(0.02 * 1.01)  # the inf step changed nothing


def test_scale_invariance() -> None:
    norms = norm_sequence(300, seed=4, bad=False)
    small, _ = clip_sequence(AdaptiveClip(window=32), norms)
    large, _ = clip_sequence(AdaptiveClip(window=32), [f32(g * 1024.0) for g in norms])
    assert [t * 1024.0 for t in small] == pytest.approx(large, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"relative": 0.0}, "relative"),
        ({"relative": math.inf}, "relative"),
        ({"window": 0}, "window"),
        ({"window": 2.5}, "window"),
        ({"growth": -1e-3}, "growth"),
        ({"warmup_start": 0.0}, "warmup_start"),
        ({"warmup_growth": math.nan}, "warmup_growth"),
        ({"warmup_relative": 3.0}, "warmup_relative"),
        ({"spike": 1.0}, "spike"),
        ({"backoff": 0.0}, "backoff"),
        ({"backoff": 1.5}, "backoff"),
        ({"min_relative": 4.0}, "min_relative"),
        ({"recovery": -1.0}, "recovery"),
    ],
)
def test_bad_arguments_say_which_and_how_to_fix(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name) as info:
        AdaptiveClip(**kwargs)
    assert "got " in str(info.value) and "e.g. `" in str(info.value)


@pytest.mark.parametrize("task", ["rnn-addition/violent", "sgd-heavy-tail"])
def test_beats_no_clipping_on_quick_tasks(task: str) -> None:
    unclipped = run(task, None, seed=0, quick=True)
    ours = run(task, AdaptiveClip(), seed=0, quick=True)
    assert math.isfinite(ours.metric) and not ours.diverged
    assert ours.metric < unclipped.metric
    assert ours.nonfinite_steps == 0


# -- hold mode: the threshold for optimizers that normalise their update -----------------


def test_hold_clips_every_step_to_a_fraction_of_the_first_norm() -> None:
    norms = [8.0, math.nan, 1.0, 0.0, 100.0, 0.1, math.inf, 3.0]
    clipper = AdaptiveClip(hold=0.25, window=4)
    p = torch.nn.Parameter(torch.zeros(1))
    for g in norms:
        p.grad = torch.tensor([g])
        stats = clipper({"w": p})
        if math.isfinite(g) and g > 0:  # 0.25 x 8, held; a NaN/inf/0 step changes nothing
            assert float(stats.threshold) == 2.0
            assert float(p.grad) == pytest.approx(min(g, 2.0 * g / (g + 1e-6)), rel=1e-6)
    assert int(clipper.state.count) == 5  # the norms are still recorded


def test_hold_is_the_rule_for_steps_without_a_loss() -> None:
    """Given the loss, a ``hold`` clipper (Adam's, from ``optimizer=``) follows the median rule
    and its loss gate, as one without ``hold``; without it, it holds."""
    norms, losses = norm_sequence(300, seed=4), loss_sequence(300)
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    followed, _ = clip_sequence(AdaptiveClip(window=16), norms, losses)
    # (with Adam's faster warm-up ramp, NORMALISING_WARMUP_GROWTH)
    fast, _ = clip_sequence(AdaptiveClip(window=16, warmup_growth=0.05), norms, losses)
    assert clip_sequence(AdaptiveClip(window=16, optimizer=adam), norms, losses)[0] == fast != followed
    assert clip_sequence(AdaptiveClip(window=16, hold=0.25), norms, losses)[0] == followed
    held, _ = clip_sequence(AdaptiveClip(window=16, hold=0.25), norms)
    assert held == pytest.approx([0.25 * norms[0]] * len(norms))
    assert AdaptiveClip(optimizer=adam).reads_loss and not AdaptiveClip(
        optimizer=adam, follow_loss=False).reads_loss  # fmt: skip


def test_hold_waits_for_a_recorded_first_norm() -> None:
    clipper = AdaptiveClip(hold=0.5)
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.tensor([math.nan])
    assert float(clipper({"w": p}).threshold) == math.inf
    p.grad = torch.tensor([4.0])
    assert float(clipper({"w": p}).threshold) == 2.0
    clipper2 = AdaptiveClip(hold=0.5, max_norm=1.0)  # the ceiling still applies
    p.grad = torch.tensor([4.0])
    assert float(clipper2({"w": p}).threshold) == 1.0
    assert float(clipper2.state.threshold) == 2.0


@pytest.mark.parametrize(
    ("make", "normalising"),
    [
        (lambda p: torch.optim.Adam(p), True),
        (lambda p: torch.optim.AdamW(p), True),
        (lambda p: torch.optim.RMSprop(p), True),
        (lambda p: torch.optim.Adagrad(p), True),
        (lambda p: torch.optim.SGD(p, lr=0.1), False),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), False),
        (lambda p: torch.optim.ASGD(p), False),
    ],
)
def test_optimizer_selects_hold_for_normalising_optimizers(make, normalising: bool) -> None:
    from gradclip.clippers.adaptive import HOLD, normalises

    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = make(params)
    assert normalises(optimizer) is normalising and normalises(type(optimizer)) is normalising
    clipper = AdaptiveClip(optimizer=optimizer)
    assert clipper.hold == (HOLD if normalising else None)
    assert AdaptiveClip(optimizer=optimizer, hold=0.5).hold == 0.5  # an explicit hold wins


def test_an_unknown_optimizer_with_betas_normalises() -> None:
    from gradclip.clippers.adaptive import normalises

    class Lion(torch.optim.Optimizer):
        def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99)) -> None:
            super().__init__(params, {"lr": lr, "betas": betas})

    class Plain(torch.optim.Optimizer):
        def __init__(self, params, lr: float = 1e-4) -> None:
            super().__init__(params, {"lr": lr})

    params = [torch.nn.Parameter(torch.zeros(2))]
    assert normalises(Lion(params)) and not normalises(Plain(params))
    assert normalises(Lion) and not normalises(Plain)  # of a class: the arguments it takes


def test_hold_and_optimizer_arguments_are_checked() -> None:
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="hold"):
            AdaptiveClip(hold=bad)
    with pytest.raises(TypeError, match="hold"):
        AdaptiveClip(hold="0.1")
    for bad in (3, [], int, [torch.optim.Adam, "adam", None]):
        with pytest.raises(TypeError, match=r"`optimizer` must be a torch.optim.Optimizer, its class or its name"):
            AdaptiveClip(optimizer=bad)
    with pytest.raises(ValueError, match=r"`optimizer`='Lion' names no torch.optim optimizer"):
        AdaptiveClip(optimizer="Lion")


@pytest.mark.parametrize("kind", [torch.optim.AdamW, "AdamW", "adamw", [torch.optim.RMSprop, "AdamW"]])
def test_the_optimizer_may_be_named_before_it_exists(kind) -> None:
    # a framework (the Hugging Face Trainer, Lightning) builds the optimizer after the clipper:
    # its class or name gives the same rule as the optimizer itself
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    built = AdaptiveClip(optimizer=torch.optim.AdamW(p))
    assert AdaptiveClip(optimizer=kind).config() == built.config() != AdaptiveClip().config()
    assert AdaptiveClip(optimizer="SGD").config() == AdaptiveClip().config()


needs_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon: torch>=2.9")


def step_twice(clipper, optimizer):
    p = optimizer.param_groups[0]["params"][0]
    for _ in range(2):
        p.grad = torch.ones_like(p)
        clipper.step([p], optimizer)


@pytest.mark.parametrize(
    ("built", "stepped", "says"),
    [
        ({}, torch.optim.AdamW, "built without `optimizer`, and it steps AdamW, which normalises"),
        ({"optimizer": "adam"}, torch.optim.SGD, "built for Adam, and it steps SGD, which does not normalise"),
        ({"optimizer": "SGD"}, torch.optim.RMSprop, "built for SGD, and it steps RMSprop, which normalises"),
    ],
)
def test_stepping_another_kind_of_optimizer_warns_once(built, stepped, says) -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = stepped([p], lr=0.1)
    with pytest.warns(UserWarning, match=says) as seen:
        step_twice(AdaptiveClip(**built), optimizer)
    assert len(seen) == 1 and "AdaptiveClip(optimizer=optimizer)" in str(seen[0].message)
    assert f"or AdaptiveClip(optimizer={stepped.__name__!r}) where a framework" in str(seen[0].message)


@needs_muon
@pytest.mark.filterwarnings("ignore:AdaptiveClip leaves the parameter group")  # Muon's: expected
def test_stepping_muon_and_adamw_unsaid_names_both() -> None:
    w, b = torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(3))
    optimizers = [torch.optim.Muon([w]), torch.optim.AdamW([b])]
    w.grad, b.grad = torch.ones(3, 3), torch.ones(3)
    with pytest.warns(UserWarning, match=r"steps Muon\+AdamW, which normalises.*optimizer=\['Muon', 'AdamW'\]\)"):
        AdaptiveClip().step([w, b], optimizers)


@pytest.mark.parametrize(
    ("built", "stepped"),
    [({}, torch.optim.SGD), ({"optimizer": "AdamW"}, torch.optim.Adam), ({"plateau": True}, torch.optim.Adam),
     ({"hold": 0.1}, torch.optim.SGD), ({"optimizer": [torch.optim.RMSprop, "AdamW"]}, torch.optim.AdamW)],
)
def test_the_kind_it_was_built_for_or_a_rule_picked_by_hand_is_silent(built, stepped, recwarn) -> None:
    step_twice(AdaptiveClip(**built), stepped([torch.nn.Parameter(torch.zeros(2))], lr=0.1))
    assert not [w for w in recwarn if "AdaptiveClip was built" in str(w.message)]


def test_checkpoints_without_hold_still_load_and_hold_is_checked() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.tensor([1.0])
    old = AdaptiveClip()
    old({"w": p})
    saved = old.state_dict()
    assert "hold" not in saved["config"]  # the format of checkpoints written before `hold`
    fresh = AdaptiveClip()
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.state.history, old.state.history)
    with pytest.raises(ValueError, match="hold"):
        AdaptiveClip(hold=0.25).load_state_dict(saved)
    held = AdaptiveClip(hold=0.25)
    p.grad = torch.tensor([1.0])
    held({"w": p})
    again = AdaptiveClip(hold=0.25)
    again.load_state_dict(held.state_dict())
    assert float(again.state.threshold) == 0.25
    with pytest.raises(ValueError, match=r"hold=0.25 \(here None\)"):  # nor the other way
        AdaptiveClip().load_state_dict(held.state_dict())
    # `plateau`, likewise: in the config only when off, and a mismatch is refused
    assert "plateau" not in saved["config"]
    calm = AdaptiveClip(plateau=False)
    calm({"w": p})
    assert calm.state_dict()["config"]["plateau"] is False
    AdaptiveClip(**calm.state_dict()["config"]).load_state_dict(calm.state_dict())
    with pytest.raises(ValueError, match=r"plateau=False \(here True\)"):
        AdaptiveClip().load_state_dict(calm.state_dict())


# -- optimizer= with main's per-group clipping and several optimizers ---------------------

@needs_muon
def test_optimizer_takes_a_list_as_step_does() -> None:
    """``[muon, adamw]``: hold when every optimizer normalises; a list with SGD keeps the
    median rule; anything but torch optimizers is refused."""
    from gradclip.clippers.adaptive import HOLD

    w, b = torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(3))
    muon, adamw = torch.optim.Muon([w]), torch.optim.AdamW([b])
    assert AdaptiveClip(optimizer=[muon, adamw]).hold == HOLD
    assert AdaptiveClip(optimizer=(adamw,)).hold == HOLD
    assert AdaptiveClip(optimizer=[muon, torch.optim.SGD([b], lr=0.1)]).hold is None
    # kinds may be mixed: optimizers, classes, names
    assert AdaptiveClip(optimizer=[muon, "adamw"]).hold == AdaptiveClip(optimizer=[torch.optim.Adam]).hold == HOLD
    assert AdaptiveClip(optimizer=[adamw, "sgd"]).hold is None
    for bad in ([], [adamw, 3]):
        with pytest.raises(TypeError, match="optimizer"):
            AdaptiveClip(optimizer=bad)


def test_optimizer_with_groups_holds_each_group_and_checkpoints() -> None:
    """``optimizer=`` and ``groups=`` together: each group's own threshold is hold x its own
    first norm; the state dict (config with ``hold``, the groups' states) round-trips."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "name": "a"}, {"params": [b], "name": "b"}])
    model = torch.nn.ParameterDict({"a": a, "b": b})

    def make() -> AdaptiveClip:
        return AdaptiveClip(optimizer=opt, groups=opt.param_groups)

    clipper = make()
    for scale in (1.0, 5.0, 0.5):
        a.grad = torch.tensor([3.0, 4.0]) * scale  # norm 5 at first
        b.grad = torch.tensor([0.6, 0.8]) * scale  # norm 1 at first
        stats = clipper(model)
        assert stats.groups.names == ("a", "b")
        assert stats.groups.threshold.tolist() == pytest.approx([5 / 32, 1 / 32])
        assert float(torch.linalg.vector_norm(a.grad)) == pytest.approx(min(5 * scale, 5 / 32))
    saved = clipper.state_dict()
    assert saved["config"]["hold"] == 1 / 32
    again = make()
    again.load_state_dict(saved)
    a.grad, b.grad = torch.tensor([30.0, 40.0]), torch.tensor([6.0, 8.0])
    stats = again(model)
    assert stats.groups.threshold.tolist() == pytest.approx([5 / 32, 1 / 32])
    with pytest.raises(ValueError, match="hold"):  # the median rule's clipper refuses it
        AdaptiveClip(groups=opt.param_groups).load_state_dict(saved)


@needs_muon
def test_optimizer_with_muon_leaves_muon_out_and_holds_the_adamw_groups() -> None:
    """``clipper.step(model, [muon, adamw])`` under main's default policy: the Muon group is
    left out (warning once), the AdamW group is clipped to hold x its first norm."""
    w, b = torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(3))
    muon, adamw = torch.optim.Muon([w], lr=0.0), torch.optim.AdamW([b], lr=0.0)
    model = torch.nn.ParameterDict({"w": w, "b": b})
    clipper = AdaptiveClip(optimizer=[muon, adamw])
    w.grad, b.grad = torch.full((3, 3), 100.0), torch.tensor([2.0, 0.0, 0.0])
    with pytest.warns(UserWarning, match="leaves the parameter group"):
        stats = clipper.step(model, [muon, adamw])
    assert float(stats.threshold) == pytest.approx(2 / 32)
    assert torch.equal(w.grad, torch.full((3, 3), 100.0))  # Muon's gradients untouched
    assert float(b.grad.norm()) == pytest.approx(2 / 32)


def test_the_warm_up_ramp_is_faster_under_a_normalising_optimizer() -> None:
    from gradclip.clippers.adaptive import NORMALISING_WARMUP_GROWTH, WARMUP_GROWTH

    assert AdaptiveClip().warmup_growth == AdaptiveClip(optimizer="SGD").warmup_growth == WARMUP_GROWTH == 0.01
    assert AdaptiveClip(optimizer="AdamW").warmup_growth == NORMALISING_WARMUP_GROWTH == 0.05
    assert AdaptiveClip(optimizer="AdamW", warmup_growth=0.01).warmup_growth == 0.01  # given: kept
    # a checkpoint of the earlier default under Adam names the difference instead of loading
    old = AdaptiveClip(optimizer="AdamW", warmup_growth=0.01).state_dict()
    with pytest.raises(ValueError, match="warmup_growth"):
        AdaptiveClip(optimizer="AdamW").load_state_dict(old)


def _falling_heavy_tailed(steps: int = 700, seed: int = 3) -> list[float]:
    """Norms that fall 1000x over the run, as a classifier's fitting its training set, with
    tails that grow as they fall (1 step in 10 up to 2x its neighbours at first, 63x at the
    end: the few examples still misfit, each a fixed size)."""
    rng = random.Random(seed)
    return [f32(1000 ** (-i / steps) * math.exp(rng.gauss(0, 0.3))
                * (rng.uniform(1, 2 * 1000 ** (i / steps / 2)) if rng.random() < 0.1 else 1.0))
            for i in range(steps)]  # fmt: skip


def test_under_adam_the_tails_of_falling_norms_are_no_spikes() -> None:
    # Adam's second moment still holds the earlier, larger norms: a step 10-60x the recent
    # median is within it. The median alone backs off to its floor and clips most steps (the
    # misfit examples' loss is as far above the median loss as their norm: they are spikes
    # to the median, not a batch of typical loss)
    norms = _falling_heavy_tailed()
    losses = [f32(n ** 2) for n in norms]
    p = [torch.nn.Parameter(torch.zeros(1))]
    adam, _ = clip_sequence(AdaptiveClip(optimizer=torch.optim.Adam(p)), norms, losses)
    assert adam == pytest.approx(reference(norms, losses, plateau=False, warmup_growth=0.05,
                                           second_moment=0.999), rel=1e-4)  # fmt: skip
    median_only, _ = clip_sequence(AdaptiveClip(optimizer=torch.optim.Adam(p), second_moment=0),
                                   norms, losses)  # fmt: skip
    late = range(400, len(norms))
    clipped = [sum(norms[i] > t[i] for i in late) / len(late) for t in (adam, median_only)]
    assert clipped[1] > 0.5 and clipped[0] < 0.05, clipped


@pytest.mark.parametrize("with_loss", [True, False], ids=["median rule", "hold"])
def test_the_second_moment_is_adams(with_loss: bool) -> None:
    # over a model's parameters, Adam's exp_avg_sq sums to the running mean of the squared
    # clipped norm: the state's `moment`, for Adam's own beta2
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    adam = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    clipper = AdaptiveClip(optimizer=adam, window=8, second_moment=0.99)
    clipped = 0
    for step in range(60):
        x = torch.randn(16, 4) * (30.0 if step in (20, 41) else 1.0)  # two spikes
        model.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        stats = clipper.step(model, adam, loss=loss.detach() if with_loss else None)
        clipped += bool(stats.clipped)
        held = sum(float(adam.state[q]["exp_avg_sq"].sum()) for q in model.parameters())
        assert float(clipper.state.moment) == pytest.approx(held, rel=1e-4)
    assert int(clipper.state.count) == 60 and clipped > 10  # Adam was given clipped gradients


def test_second_moment_defaults_to_a_long_memory_under_adam() -> None:
    from gradclip.clippers.adaptive import SECOND_MOMENT

    p = [torch.nn.Parameter(torch.zeros(1))]
    assert AdaptiveClip().second_moment is None and AdaptiveClip(optimizer="SGD").second_moment is None
    assert AdaptiveClip(optimizer="AdamW").second_moment == SECOND_MOMENT == 0.999
    # the same long memory whatever the optimizer's own beta2 (or none: RMSprop)
    assert AdaptiveClip(optimizer=torch.optim.AdamW(p, betas=(0.9, 0.95))).second_moment == 0.999
    assert AdaptiveClip(optimizer=torch.optim.RMSprop(p)).second_moment == SECOND_MOMENT
    assert AdaptiveClip(optimizer=[torch.optim.SGD(p, lr=0.1), "Adam"]).second_moment is None
    assert AdaptiveClip(optimizer="AdamW", second_moment=0).second_moment is None  # 0: none
    assert AdaptiveClip(second_moment=0.9).second_moment == 0.9  # given, for any optimizer
    for bad in (1.0, -0.1, math.nan):
        with pytest.raises(ValueError, match="second_moment"):
            AdaptiveClip(second_moment=bad)
    with pytest.raises(TypeError, match="second_moment"):
        AdaptiveClip(second_moment="0.999")  # type: ignore[arg-type]
    # a checkpoint of the earlier default under Adam names the difference instead of loading
    old = AdaptiveClip(optimizer="AdamW", second_moment=0)
    clip_sequence(old, [1.0, 2.0])
    with pytest.raises(ValueError, match="second_moment"):
        AdaptiveClip(optimizer="AdamW").load_state_dict(old.state_dict())
    # and loads where it is built as it was; a state without `moment` starts it at 0
    saved = old.state_dict()
    AdaptiveClip(optimizer="AdamW", second_moment=0).load_state_dict(saved)
    new = AdaptiveClip(optimizer="AdamW")
    clip_sequence(new, [1.0, 2.0])
    state = {k: v for k, v in new.state_dict()["state"].items() if k != "moment"}
    resumed = AdaptiveClip(optimizer="AdamW")
    resumed.load_state_dict({**new.state_dict(), "state": state})
    assert float(resumed.state.moment) == 0.0 and int(resumed.state.count) == 2
    for bad in (-1.0, math.inf, math.nan):
        corrupt = {**new.state_dict(), "state": {**new.state_dict()["state"], "moment": torch.tensor(bad)}}
        with pytest.raises(ValueError, match="moment"):
            AdaptiveClip(optimizer="AdamW").load_state_dict(corrupt)


def test_a_norm_whose_square_overflows_leaves_the_second_moment_as_it_was() -> None:
    # 1e30 clipped to 1% on its first step is 1e28, whose square is inf in float32: the
    # reference would be inf, and nothing clipped for good. It is left out instead
    clipper = AdaptiveClip(second_moment=0.999, window=4)
    thresholds, _ = clip_sequence(clipper, [1e30, 1.0, 1.0, 1.0, 1.0, 1.0])
    # the five unit norms (some clipped) only: the first left out
    assert 0 < float(clipper.state.moment) <= 1 - 0.999**5
    assert int(clipper.state.count) == 6 and all(math.isfinite(t) for t in thresholds)
