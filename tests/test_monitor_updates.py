"""The monitor's per-group records, its stall detector and its update ratios; the
recommendation's learning-rate-cut warning and the report's group and update panels.

References: the ClipStats the clipper returned, float64 copies of the parameters taken by
hand around ``optimizer.step()``, and hand-made step sequences; never a number from a
previous run.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

import gradclip
from gradclip.recorder import layer_name
from gradclip.stalls import Stall, StallDetector


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(),
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)),
    )


def _backward(model: torch.nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    model.zero_grad()
    model(torch.randn(16, 4, generator=gen)).pow(2).mean().backward()


def test_group_norms_and_coefficients_are_logged(tmp_path: Path) -> None:
    model = _model()
    clipper = gradclip.NormClip(0.05, groups={"first": model[0], "rest": model[2]})
    seen = []
    with gradclip.GradMonitor(clipper, model, log=tmp_path / "log.jsonl", every=3) as mon:
        for step in range(7):
            _backward(model, step)
            stats = mon()
            seen.append(stats.groups.to_dict())
    h = gradclip.read_log(tmp_path / "log.jsonl")
    norms, coefs = h.group_columns("norm"), h.group_columns("coef")
    assert sorted(norms) == sorted(coefs) == ["first", "rest"]
    for group in ("first", "rest"):
        assert norms[group].tolist() == pytest.approx([s[group]["norm"] for s in seen], rel=1e-6)
        assert coefs[group].tolist() == pytest.approx([s[group]["coef"] for s in seen], rel=1e-6)


@pytest.mark.parametrize("depth", [None, 1])
def test_update_ratios_match_float64_copies(tmp_path: Path, depth: int | None) -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    expected = []
    with gradclip.GradMonitor(gradclip.NormClip(1.0), model, log=tmp_path / "log.jsonl",
                              updates=True, depth=depth) as mon:
        for step in range(4):
            _backward(model, step)
            before = {n: q.detach().double().clone() for n, q in model.named_parameters()}
            mon.step(opt)
            sums: dict[str, list[float]] = {}
            for n, q in model.named_parameters():
                layer = layer_name(n, depth)
                d = float((q.detach().double() - before[n]).square().sum())
                w = float(before[n].square().sum())
                acc = sums.setdefault(layer, [0.0, 0.0])
                acc[0] += d
                acc[1] += w
            ratios = {k: math.sqrt(d) / math.sqrt(w) for k, (d, w) in sums.items()}
            total = math.sqrt(sum(d for d, _ in sums.values())) / math.sqrt(
                sum(w for _, w in sums.values()))
            expected.append({**ratios, "total": total})
    got = gradclip.read_log(tmp_path / "log.jsonl").update_ratios()
    assert set(got) == set(expected[0])
    for layer, column in got.items():
        assert column.tolist() == pytest.approx([e[layer] for e in expected], rel=1e-6)


def test_updates_every_n_steps_records_only_those(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradclip.GradMonitor(gradclip.NormClip(1.0), model, log=tmp_path / "log.jsonl",
                              updates=3) as mon:
        for step in range(7):
            _backward(model, step)
            mon.step(opt)
    total = gradclip.read_log(tmp_path / "log.jsonl").update_ratios()["total"]
    assert [not math.isnan(v) for v in total.tolist()] == [s % 3 == 0 for s in range(7)]


# ---------------------------------------------------------------------------------------
# stalls


def test_stall_detector_needs_a_long_run_below_the_floor_with_a_growing_norm() -> None:
    d = StallDetector(floor=1e-3, steps=8)
    growing = [d.feed(s, "g", 10.0 * 1.1**s, 1e-5) for s in range(12)]
    assert [s is not None for s in growing].count(True) == 1
    stall = next(s for s in growing if s is not None)
    assert (stall.first_step, stall.last_step, stall.group) == (0, 7, "g")
    assert stall.norm_start == 10.0 and stall.norm_end == pytest.approx(10.0 * 1.1**7)
    # a falling norm: the clip is doing its job
    d = StallDetector(floor=1e-3, steps=8)
    assert all(d.feed(s, "g", 10.0 * 0.9**s, 1e-5) is None for s in range(30))
    # one coefficient above the floor (or NaN) starts the run again
    d = StallDetector(floor=1e-3, steps=8)
    coefs = [1e-5] * 6 + [0.5] + [1e-5] * 6 + [math.nan] + [1e-5] * 6
    assert all(d.feed(s, "g", 10.0 * 1.1**s, c) is None for s, c in enumerate(coefs))


def test_monitor_warns_once_per_group_and_lists_every_stall() -> None:
    records = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = gradclip.GradMonitor(sinks=records.append, every=10, stall_steps=20)
        for step in range(80):
            # the loop of Megatron-LM#5394: a norm that grows under a coefficient of ~1e-6,
            # broken once at step 40
            norm = 1e6 * 1.05**step if step != 40 else 0.5
            mon.record(torch.tensor(norm), max_norm=1.0)
        mon.close()
    messages = [str(w.message) for w in caught if "GradMonitor" in str(w.message)]
    assert len(messages) == 1 and "every gradient" in messages[0]
    assert "policy='exclude'" in messages[0]
    assert [(s.first_step, s.last_step) for s in mon.stalls] == [(0, 19), (41, 60)]
    history = gradclip.History.from_records(records)
    assert history.stalls(steps=20) == mon.stalls


def test_stall_detector_can_be_turned_off_and_checks_its_arguments() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon = gradclip.GradMonitor(every=5, stall_steps=None)
        for step in range(30):
            mon.record(torch.tensor(1e6 * 1.1**step), max_norm=1.0)
        mon.close()
    assert mon.stalls == []
    with pytest.raises(ValueError, match="stall_floor"):
        gradclip.GradMonitor(stall_floor=0.0)
    with pytest.raises(ValueError, match="stall_steps"):
        gradclip.GradMonitor(stall_steps=0)
    with pytest.raises(ValueError, match="updates"):
        gradclip.GradMonitor(updates=-1)
    with pytest.raises(TypeError, match="`update` must be the UpdateNorms"):
        gradclip.GradMonitor().record(torch.tensor(1.0), update={"total": 1.0})


def test_a_stall_says_what_to_do() -> None:
    text = Stall("adamw", 3, 60, 1.0, 4.0, 2e-8).describe()
    assert "group 'adamw'" in text and "58 consecutive steps (3-60)" in text
    assert "from 1 to 4" in text and "policy='own'" in text


# ---------------------------------------------------------------------------------------
# recommendation and report


def _grouped_history(cut: float) -> gradclip.History:
    """100 steps of two groups: 'adamw' clipped to ``cut`` of its norm on 70 steps."""
    records = []
    for step in range(100):
        coef = cut if step % 10 < 7 else 1.0
        records.append({
            "schema": 1, "step": step, "time": 0.0, "norm_type": 2.0, "norm": 2.0,
            "post_norm": 2.0, "threshold": math.nan, "coef": 1.0, "clipped": False,
            "finite": True, "skipped": False, "layers": {},
            "extra": {"group/adamw/norm": 3.0, "group/adamw/coef": coef,
                      "group/muon/norm": 1.0, "group/muon/coef": 1.0},
        })  # fmt: skip
    return gradclip.History.from_records(records)


def test_recommend_warns_when_a_group_threshold_cuts_the_learning_rate() -> None:
    rec = gradclip.recommend_max_norm(_grouped_history(0.1))
    cuts = [w for w in rec.warnings if "acts as a learning-rate cut" in w]
    assert len(cuts) == 1
    assert "group 'adamw'" in cuts[0] and "70% of steps" in cuts[0]
    assert "median factor 0.1" in cuts[0]


def test_recommend_says_a_threshold_below_the_typical_norm_cuts_the_learning_rate() -> None:
    norms = [1.0, 1.2, 0.8, 1.1, 0.5, 0.4] * 20  # clipped at 0.9 on 4 steps in 6
    rec = gradclip.recommend_max_norm(gradclip.History.from_norms(norms, threshold=0.9))
    assert any("learning-rate cut on most steps" in w for w in rec.warnings)


def test_report_shows_groups_updates_and_stalls(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from gradclip.report import build_report, render_report

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = gradclip.NormClip(1e-9, groups={"first": model[0], "rest": model[2]})
    log = tmp_path / "log.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stall is expected
        with gradclip.GradMonitor(clipper, model, log=log, updates=2, stall_steps=5) as mon:
            for step in range(12):
                _backward(model, step)
                for q in model.parameters():
                    q.grad.mul_(1.2**step)  # a norm that grows under a tiny coefficient
                mon.step(opt)
    report = build_report(log, stall_steps=5)
    assert next(iter(report.update_ratios)) == "total"
    assert set(report.update_ratios) - {"total"} == {"0", "2.0", "2.1"}
    assert set(report.group_coefs) == {"first", "rest"}
    assert report.stalls
    files = render_report(report, tmp_path / "report")
    assert {"updates", "groups"} <= set(files.images)
    page = files.html.read_text(encoding="utf-8")
    assert "Parameter groups" in page and "Updates" in page and "stalling" in page


def test_a_recommendation_reads_the_norm_the_clip_met_when_muon_is_left_out(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    matrices = [q for q in model.parameters() if q.dim() == 2]
    rest = [q for q in model.parameters() if q.dim() != 2]
    muon, adamw = torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=1e-2)
    kept = []  # torch's norm of the gradients the clip compares with its threshold
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Muon's groups are left out, with a warning
        with gradclip.GradMonitor(gradclip.NormClip(0.5), model, log=tmp_path / "log.jsonl") as mon:
            for step in range(60):
                _backward(model, step)
                for q in matrices:
                    q.grad.mul_(1e4)  # Muon's matrices dominate the total, as in raw-unit losses
                kept.append(float(torch.nn.utils.get_total_norm([q.grad for q in rest])))
                mon.step([muon, adamw])
    h = gradclip.read_log(tmp_path / "log.jsonl")
    thresholds = h.group_columns("threshold")
    assert len(thresholds) == 2 and sum(bool(t.isnan().all()) for t in thresholds.values()) == 1
    judged, left_out = h.clipped_norm()
    assert judged.tolist() == pytest.approx(kept, rel=1e-5) and len(left_out) == 1
    assert float(h.norm.median()) > 100 * max(kept)  # the total is on Muon's scale
    rec = gradclip.recommend_max_norm(h)
    assert rec.max_norm == gradclip.recommend_max_norm(kept).max_norm
    assert f"({left_out[0]} left out)" in rec.rule
    # without groups left out, the total is what the threshold met
    assert gradclip.History.from_norms([1.0, 2.0]).clipped_norm()[1] == ()
