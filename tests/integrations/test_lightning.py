"""GradClipCallback in real Lightning runs: tiny models, CPU, a few steps each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader, TensorDataset

import gradclip
from gradclip.integrations.lightning import GradClipCallback
from host_reads import HostReadDetector

from .helpers import RTOL, float64_norm, optimizer_params, recording

MAX_NORM = 0.5

# Lightning 2.6 on torch 2.13: a deprecation inside Lightning, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)")


def _loader(batches: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8 * batches, 4, generator=gen)
    y = 5 * torch.randn(8 * batches, 1, generator=gen)  # large targets: norms well above MAX_NORM
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


class Net(pl.LightningModule):
    def __init__(self, optimizer: type = torch.optim.SGD, **opt_kwargs: Any):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
        )
        self.optimizer_cls = recording(optimizer)
        self.opt_kwargs = {"lr": 0.05, **opt_kwargs}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x).float(), y)

    def configure_optimizers(self):
        self.opt = self.optimizer_cls(self.parameters(), **self.opt_kwargs)
        return self.opt


class Probe(pl.Callback):
    """Placed before GradClipCallback: the pre-clip norm of each optimizer step, in float64."""

    def __init__(self):
        self.pre: list[float] = []
        self.scales: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.pre.append(float64_norm(optimizer_params(optimizer)))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales.append(float(scaler.get_scale()) if scaler is not None else 1.0)


class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def series(self, key: str) -> list[float]:
        return [m[key] for _, m in self.rows if key in m]


def _trainer(callbacks: list, **kwargs: Any) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 4,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        **kwargs,
    }
    return pl.Trainer(callbacks=callbacks, **options)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        # Lightning's advice for this tiny CPU setup (workers, small log interval).
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        yield


def test_clips_before_the_step_and_logs_what_it_did() -> None:
    probe, logger = Probe(), MemoryLogger()
    callback = GradClipCallback(gradclip.NormClip(MAX_NORM))
    model = Net()
    _trainer([probe, callback], logger=logger, log_every_n_steps=1, max_steps=6).fit(
        model, _loader(6)
    )
    seen = model.opt.seen
    assert len(seen) == len(probe.pre) == 6
    assert all(s <= MAX_NORM * (1 + RTOL) for s in seen)
    assert max(probe.pre) > MAX_NORM  # the clip did something
    for pre, post in zip(probe.pre, seen, strict=True):
        assert post == pytest.approx(min(pre, MAX_NORM), rel=RTOL)
    assert logger.series("gradclip/grad_norm") == pytest.approx(probe.pre, rel=RTOL)
    assert logger.series("gradclip/grad_norm_clipped") == pytest.approx(seen, rel=RTOL)
    assert logger.series("gradclip/threshold") == pytest.approx([MAX_NORM] * 6)
    clipped = [pre > MAX_NORM for pre in probe.pre]
    rates = [sum(clipped[: i + 1]) / (i + 1) for i in range(6)]
    assert logger.series("gradclip/clip_rate") == pytest.approx(rates)
    assert logger.series("gradclip/nonfinite_steps") == [0.0] * 6


def test_the_step_reads_nothing_on_the_host(accelerator_path) -> None:
    """Clipping and logging in the hook leave every value on the device (accelerator path)."""
    reads: list[list[str]] = []

    class Detecting(GradClipCallback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            with HostReadDetector() as detector:
                super().on_before_optimizer_step(trainer, pl_module, optimizer)
            reads.append(detector.reads)

    records: list[dict] = []
    monitor = gradclip.GradMonitor(sinks=records.append)  # flushes every 100 steps
    callback = Detecting(gradclip.ZClip(warmup_steps=2), monitor=monitor)
    _trainer([callback], logger=MemoryLogger(), log_every_n_steps=2).fit(Net(), _loader())
    assert reads == [[]] * 4
    assert len(records) == 4  # recorded in the hook, written when training ended


class LayerProbe(Probe):
    """Also the float64 pre-clip norm of each of Net's two linear layers."""

    def __init__(self):
        super().__init__()
        self.layers: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        net = pl_module.net
        self.layers.append({f"net.{i}": float64_norm(net[i].parameters()) for i in (0, 2)})


def test_monitor_records_each_optimizer_step(tmp_path) -> None:
    probe, logger = LayerProbe(), MemoryLogger()
    monitor = gradclip.GradMonitor(log=tmp_path / "grads.jsonl")
    callback = GradClipCallback(gradclip.NormClip(MAX_NORM), monitor=monitor)
    trainer = _trainer(
        [probe, callback],
        logger=logger,
        log_every_n_steps=1,
        accumulate_grad_batches=2,
        max_steps=3,
    )
    trainer.fit(Net(), _loader(6))
    log = gradclip.read_log(tmp_path / "grads.jsonl")  # flushed at the end; still open
    assert log.steps.tolist() == [0, 1, 2]  # one record per optimizer step: trainer.global_step
    assert log.norm.tolist() == logger.series("gradclip/grad_norm")
    assert log.post_norm.tolist() == logger.series("gradclip/grad_norm_clipped")
    assert log.norm.tolist() == pytest.approx(probe.pre, rel=RTOL)
    assert log.layer_names == ("net.0", "net.2")
    for row, expected in zip(log.layers.tolist(), probe.layers, strict=True):
        assert row == pytest.approx(list(expected.values()), rel=RTOL)
    assert (log.optimizer, log.normalising) == ("RecordingSGD", False)  # the one stepped
    assert monitor.summary().steps == 3
    monitor.close()


def test_monitor_with_two_optimizers_is_refused() -> None:
    callback = GradClipCallback(gradclip.NormClip(1.0), monitor=gradclip.GradMonitor())
    with pytest.raises(ValueError, match=r"records one optimizer's steps, and this run has 2"):
        _trainer([callback], max_steps=2).fit(TwoOptimizers(), _loader())


def test_gradient_accumulation_clips_once_per_optimizer_step() -> None:
    probe = Probe()
    clipper = gradclip.AutoClip(percentile=50.0)
    model = Net()
    _trainer([probe, GradClipCallback(clipper)], accumulate_grad_batches=3, max_steps=2).fit(
        model, _loader(6)
    )
    assert len(model.opt.seen) == len(probe.pre) == 2
    assert int(clipper.steps) == 2


def test_bf16_mixed_precision() -> None:
    probe = Probe()
    model = Net()
    _trainer([probe, GradClipCallback(gradclip.NormClip(MAX_NORM))], precision="bf16-mixed").fit(
        model, _loader()
    )
    assert max(probe.pre) > MAX_NORM
    assert all(s <= MAX_NORM * (1 + RTOL) for s in model.opt.seen)


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_with_a_scaler_clips_unscaled_gradients(fused: bool) -> None:
    # Lightning unscales before the hook, except for fused optimizers: then the callback does.
    # (Lightning turns precision="16-mixed" on the CPU into bf16, so the plugin is given.)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    plugin = MixedPrecision(precision="16-mixed", device="cpu", scaler=scaler)
    probe, logger = Probe(), MemoryLogger()
    model = Net(torch.optim.AdamW, fused=fused, lr=1e-3)
    _trainer(
        [probe, GradClipCallback(gradclip.NormClip(MAX_NORM))],
        plugins=[plugin],
        logger=logger,
        log_every_n_steps=1,
    ).fit(model, _loader())
    # The probe runs before the callback: it sees scaled gradients only when fused.
    unscale = probe.scales if fused else [1.0] * len(probe.pre)
    true_pre = [pre / scale for pre, scale in zip(probe.pre, unscale, strict=True)]
    logged = logger.series("gradclip/grad_norm")
    assert len(logged) == 4
    assert logged == pytest.approx(true_pre, rel=1e-3)
    assert all(s <= MAX_NORM * (1 + RTOL) for s in model.opt.seen)


class SpikesOnce(Net):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx == 1 else loss


def test_nonfinite_skip_leaves_the_parameters_unchanged() -> None:
    class Snapshots(pl.Callback):
        def __init__(self):
            self.params: list[list[torch.Tensor]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.params.append([p.detach().clone() for p in pl_module.parameters()])

    snapshots, clipper = Snapshots(), gradclip.ZClip(warmup_steps=2, nonfinite="skip")
    model = SpikesOnce(torch.optim.AdamW)
    _trainer([GradClipCallback(clipper), snapshots]).fit(model, _loader())
    before, after = snapshots.params[0], snapshots.params[1]
    for p, q in zip(before, after, strict=True):
        assert torch.equal(p, q)  # the NaN step did not update
    assert not torch.equal(snapshots.params[1][0], snapshots.params[2][0])  # the next one did
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (int(clipper.steps), int(clipper.nonfinite_steps)) == (3, 1)


class TwoOptimizers(pl.LightningModule):
    """Manual optimization, two optimizers (a GAN's pattern): both backward passes first."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 1)
        self.b = torch.nn.Linear(4, 1)
        self.untouched: list[bool] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        opt_a.zero_grad()
        opt_b.zero_grad()
        loss = torch.nn.functional.mse_loss(self.a(x), y) + torch.nn.functional.mse_loss(
            self.b(x), y
        )
        self.manual_backward(loss)
        b_grads = [p.grad.clone() for p in self.b.parameters()]
        opt_a.step()  # clips a's gradients only
        self.untouched.append(
            all(torch.equal(g, p.grad) for g, p in zip(b_grads, self.b.parameters(), strict=True))
        )
        opt_b.step()

    def configure_optimizers(self):
        self.opts = [
            recording(torch.optim.SGD)(self.a.parameters(), lr=0.01),
            recording(torch.optim.SGD)(self.b.parameters(), lr=0.01),
        ]
        return self.opts


def test_manual_optimization_with_two_optimizers() -> None:
    logger = MemoryLogger()
    callback = GradClipCallback(gradclip.ZClip(warmup_steps=2))
    model = TwoOptimizers()
    _trainer([callback], logger=logger, log_every_n_steps=1, max_steps=6).fit(model, _loader(3))
    assert len(callback.clippers) == 2
    assert callback.clippers[0] is not callback.clippers[1]
    assert [int(c.steps) for c in callback.clippers] == [3, 3]  # 6 optimizer steps in all
    assert model.untouched == [True] * 3
    for i, opt in enumerate(model.opts):
        thresholds = logger.series(f"gradclip/opt{i}/threshold")
        assert len(thresholds) == 3
        assert all(s <= t * (1 + RTOL) for s, t in zip(opt.seen, thresholds, strict=True))


def _fit_epochs(
    clipper: gradclip.Clipper, epochs: int, ckpt: str | None = None, save: str | None = None
):
    callback = GradClipCallback(clipper)
    model = Net(torch.optim.AdamW, lr=1e-2)
    trainer = _trainer([callback], max_steps=-1, max_epochs=epochs)
    trainer.fit(model, _loader(3), ckpt_path=ckpt)
    if save is not None:
        trainer.save_checkpoint(save)
    return callback, model


def test_resumed_run_continues_with_the_same_clipper_state(tmp_path) -> None:
    straight, straight_model = _fit_epochs(gradclip.ZClip(warmup_steps=2), epochs=2)
    ckpt = str(tmp_path / "epoch1.ckpt")
    _fit_epochs(gradclip.ZClip(warmup_steps=2), epochs=1, save=ckpt)
    resumed, resumed_model = _fit_epochs(gradclip.ZClip(warmup_steps=2), epochs=2, ckpt=ckpt)

    a, b = straight.state_dict(), resumed.state_dict()
    assert a["counters"] == b["counters"] == [{"steps": 6, "clipped": b["counters"][0]["clipped"]}]
    for key, value in a["clippers"][0]["state"].items():
        torch.testing.assert_close(b["clippers"][0]["state"][key], value, rtol=0, atol=0)
    for p, q in zip(straight_model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_checkpoint_of_a_different_clipper_is_refused(tmp_path) -> None:
    ckpt = str(tmp_path / "zclip.ckpt")
    _fit_epochs(gradclip.ZClip(warmup_steps=2), epochs=1, save=ckpt)
    with pytest.raises(ValueError, match=r"cannot resume gradclip .* from a ZClip, not a AutoClip"):
        _fit_epochs(gradclip.AutoClip(), epochs=2, ckpt=ckpt)
    with pytest.raises(ValueError, match=r"z_threshold=2.5 \(here 3.0\)"):
        _fit_epochs(gradclip.ZClip(warmup_steps=2, z_threshold=3.0), epochs=2, ckpt=ckpt)


def test_stacked_clipping_is_refused() -> None:
    callback = GradClipCallback(gradclip.NormClip(1.0))
    with pytest.raises(ValueError, match=r"remove gradient_clip_val from the Trainer"):
        _trainer([callback], gradient_clip_val=1.0).fit(Net(), _loader())
    two = [GradClipCallback(gradclip.NormClip(1.0)), GradClipCallback(gradclip.NormClip(2.0))]
    with pytest.raises(
        RuntimeError, match=r"more than one stateful callback of type `GradClipCallback`"
    ):
        _trainer(two)  # Lightning refuses two callbacks with one state key
    trainer = _trainer([])
    trainer.callbacks.extend(two)  # past that check: ours names the problem
    with pytest.raises(
        ValueError, match=r"2 GradClipCallbacks, which would clip each step several"
    ):
        two[0].setup(trainer, Net(), "fit")


def test_configure_gradient_clipping_override_warns() -> None:
    class Custom(Net):
        def configure_gradient_clipping(
            self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
        ):
            pass

    with pytest.warns(UserWarning, match=r"overrides configure_gradient_clipping"):
        _trainer([GradClipCallback(gradclip.NormClip(1.0))], max_steps=1).fit(Custom(), _loader())


def test_unsupported_strategy_is_refused() -> None:
    # FSDP cannot be set up on this CPU-only machine; the check reads only the strategy's type.
    trainer = types.SimpleNamespace(
        gradient_clip_val=None, callbacks=[], strategy=object.__new__(FSDPStrategy)
    )
    callback = GradClipCallback(gradclip.NormClip(1.0))
    with pytest.raises(ValueError, match=r"does not support FSDPStrategy: .* use strategy='ddp'"):
        callback.setup(trainer, Net(), "fit")


FSDP2_SCRIPT = Path(__file__).with_name("lightning_fsdp2.py")


def _fsdp2_run(tmp_path: Path, mode: str) -> list[dict]:
    """Run lightning_fsdp2.py (2 processes, gloo); each rank's record."""
    out = tmp_path / mode
    out.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    done = subprocess.run([sys.executable, str(FSDP2_SCRIPT), str(out), mode], env=env,
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _grad_error(got: dict[str, list], want: dict[str, list]) -> float:
    return max(float((torch.tensor(got[n]) - torch.tensor(want[n])).abs().max())
               / float(torch.tensor(want[n]).abs().max()) for n in want)


def test_model_parallel_fsdp2_clips_like_one_process(tmp_path) -> None:
    ranks = _fsdp2_run(tmp_path, "run")
    ref = ranks[0]["reference"]
    assert [r["steps"] for r in ranks] == [8, 8]
    assert ranks[0]["state"] == ranks[1]["state"]  # the same statistics on every rank
    assert set(ranks[0]["state"]) == set(ref["state"])
    for key, values in ranks[0]["state"].items():
        assert values == pytest.approx(ref["state"][key], rel=1e-6), key
    assert ranks[0]["clip_steps"] == ref["clip_steps"] > 0
    assert len(ranks[0]["clipped"]) == len(ref["clipped"]) == 8
    for got, want in zip(ranks[0]["clipped"], ref["clipped"], strict=True):
        assert _grad_error(got, want) <= 1e-5


def test_model_parallel_fsdp2_resumes_the_clipper(tmp_path) -> None:
    ranks = _fsdp2_run(tmp_path, "resume")
    ref = ranks[0]["reference"]
    for r in ranks:  # every rank loads exactly what was saved
        assert r["loaded"] == r["saved"] and r["saved"]["steps"] == [4]
    # the first resumed step clips as the uninterrupted run's fifth step
    assert _grad_error(ranks[0]["clipped"][0], ref["clipped"][4]) <= 1e-5


def test_more_optimizers_than_clippers_is_refused() -> None:
    callback = GradClipCallback([gradclip.NormClip(1.0)])
    with pytest.raises(ValueError, match=r"optimizer 1 has no clipper: .* pass one per optimizer"):
        _trainer([callback], max_steps=2).fit(TwoOptimizers(), _loader())


def test_not_a_clipper_is_refused() -> None:
    with pytest.raises(
        TypeError,
        match=r"`clipper` must be a gradclip Clipper .*got float 1.0; pass e.g. gradclip.NormClip",
    ):
        GradClipCallback(1.0)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"`monitor` must be a gradclip.GradMonitor or None, got str"
    ):
        GradClipCallback(gradclip.NormClip(1.0), monitor="grads.jsonl")  # type: ignore[arg-type]


# -- spike detection ---------------------------------------------------------------------


class Glitch(Net):
    """Batch 8 has its targets multiplied by 1000 (a corrupted batch); a step LR scheduler."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        y = y * 1000 if batch_idx == 8 else y
        return torch.nn.functional.mse_loss(self.net(x).float(), y)

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        return {"optimizer": opt, "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9),
            "interval": "step"}}  # fmt: skip


class Snapshots(pl.Callback):
    """After each batch: the parameters, Adam's step counters, the learning rate, the step."""

    def __init__(self):
        self.rows: list[tuple] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        steps = [float(opt.state[p]["step"]) for p in pl_module.parameters() if p in opt.state]
        self.rows.append(([p.detach().clone() for p in pl_module.parameters()], steps,
                          opt.param_groups[0]["lr"], trainer.global_step))  # fmt: skip


def test_a_spike_is_skipped_and_the_schedule_goes_on() -> None:
    snapshots, logger = Snapshots(), MemoryLogger()
    clipper = gradclip.NormClip(1e3, spikes=gradclip.SpikeDetector(window=8, warmup=4))
    model = Glitch(torch.optim.AdamW, lr=1e-3)
    _trainer([GradClipCallback(clipper), snapshots], max_steps=10, logger=logger,
             log_every_n_steps=1).fit(model, _loader(10))  # fmt: skip
    (p7, steps7, lr7, g7), (p8, steps8, lr8, g8), (p9, steps9, _, _) = snapshots.rows[7:10]
    assert all(torch.equal(a, b) for a, b in zip(p7, p8, strict=True))  # not updated
    assert steps8 == steps7 and steps9 == [s + 1 for s in steps8]  # Adam's counters held
    assert not torch.equal(p8[0], p9[0])  # the next batch trains again
    assert g8 == g7 + 1 and lr8 == pytest.approx(lr7 * 0.9)  # Lightning counts the step
    assert logger.series("gradclip/spikes")[-1] == 1.0
    assert logger.series("gradclip/spike_score")[-1] == pytest.approx(1 / 10)
    assert int(clipper.spikes.state.judged) == 10


class LossOnly(Net):
    """Batch 8's loss has a constant added: no gradient changes, only the loss tells."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss + 1e4 if batch_idx == 8 else loss


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_loss_reaches_the_detector_unscaled(accumulate: int) -> None:
    """Lightning hands on_before_backward the loss divided by the accumulation, and scaled
    under fp16: the detector gets the optimizer step's mean loss, unscaled."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    plugin = MixedPrecision(precision="16-mixed", device="cpu", scaler=scaler)
    clipper = gradclip.NormClip(1e3, spikes=gradclip.SpikeDetector("off", window=8, warmup=3))
    losses = []

    class Record(LossOnly):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            losses.append(float(loss.detach()))
            return loss

    logger = MemoryLogger()
    _trainer([GradClipCallback(clipper)], max_steps=12 // accumulate, plugins=[plugin],
             accumulate_grad_batches=accumulate, logger=logger,
             log_every_n_steps=1).fit(Record(), _loader(12))  # fmt: skip
    means = [sum(losses[i : i + accumulate]) / accumulate for i in range(0, 12, accumulate)]
    ring = [0.0] * clipper.spikes.window  # the detector's window of losses (a loss-only
    for j, mean in enumerate(means):  # spike is learnt too: the gradients were ordinary)
        ring[j % len(ring)] = mean
    assert clipper.spikes.state.losses.tolist() == pytest.approx(ring, rel=1e-3)
    assert logger.series("gradclip/spikes")[-1] == 1.0


def test_an_adaptive_clip_built_for_another_optimizer_warns_once() -> None:
    # Lightning builds the optimizer: AdaptiveClip() under its AdamW follows SGD's rule, and
    # says so once; AdaptiveClip(optimizer="AdamW") is silent
    with pytest.warns(UserWarning, match="built without `optimizer`, and it steps RecordingAdamW") as seen:
        _trainer([GradClipCallback(gradclip.AdaptiveClip())]).fit(Net(torch.optim.AdamW), _loader())
    assert len([w for w in seen if "AdaptiveClip was built" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="AdaptiveClip was built")
        _trainer([GradClipCallback(gradclip.AdaptiveClip(optimizer="AdamW"))]).fit(Net(torch.optim.AdamW), _loader())
