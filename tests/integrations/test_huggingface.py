"""GradClipCallback in real transformers Trainer runs, and clip_gradients in Accelerate loops."""

from __future__ import annotations

import shutil
import types
import warnings
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
)

import gradclip
from gradclip.integrations.huggingface import CHECKPOINT_FILE, GradClipCallback, clip_gradients
from host_reads import HostReadDetector

from .helpers import RTOL, float64_norm, recording

MAX_NORM = 0.5


class Regressor(torch.nn.Module):
    """A plain module the Trainer accepts: keyword inputs, a dict with "loss"."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
        )

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out.float(), labels), "logits": out}


def _dataset(n: int = 24) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=gen)
    y = 5 * torch.randn(n, 1, generator=gen)  # large targets: norms well above MAX_NORM
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


class Probe(TrainerCallback):
    """Placed before GradClipCallback: the pre-clip norm of each optimizer step, in float64."""

    def __init__(self):
        self.pre: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.pre.append(float64_norm(model.parameters()))


def _args(tmp_path, **kwargs: Any) -> TrainingArguments:
    options = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "max_grad_norm": 0.0,
        "seed": 0,
        **kwargs,
    }
    return TrainingArguments(**options)


def _train(
    tmp_path, clipper, *, probe=None, resume=None, model=None, dataset=None, monitor=None,
    eval_dataset=None, **kwargs,
):
    model = Regressor() if model is None else model
    optimizer = recording(torch.optim.AdamW)(model.parameters(), lr=1e-2)
    callback = GradClipCallback(clipper, monitor=monitor)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, **kwargs),
        train_dataset=_dataset() if dataset is None else dataset,
        eval_dataset=eval_dataset,
        callbacks=[cb for cb in (probe, callback) if cb is not None],
        optimizers=(optimizer, None),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback, optimizer


def _history(trainer: Trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_clips_before_the_step_and_logs_what_it_did(tmp_path) -> None:
    probe = Probe()
    trainer, _, optimizer = _train(tmp_path, gradclip.NormClip(MAX_NORM), probe=probe, max_steps=6)
    seen = optimizer.seen
    assert len(seen) == len(probe.pre) == 6
    assert max(probe.pre) > MAX_NORM
    for pre, post in zip(probe.pre, seen, strict=True):
        assert post == pytest.approx(min(pre, MAX_NORM), rel=RTOL)
    assert _history(trainer, "gradclip/grad_norm") == pytest.approx(probe.pre, rel=RTOL)
    assert _history(trainer, "gradclip/grad_norm_clipped") == pytest.approx(seen, rel=RTOL)
    assert _history(trainer, "gradclip/threshold") == pytest.approx([MAX_NORM] * 6)
    clipped = [pre > MAX_NORM for pre in probe.pre]
    rates = [sum(clipped[: i + 1]) / (i + 1) for i in range(6)]
    assert _history(trainer, "gradclip/clip_rate") == pytest.approx(rates)
    assert _history(trainer, "gradclip/nonfinite_steps") == [0.0] * 6
    # The Trainer's own pre-clip grad_norm, computed with its clip off, agrees.
    assert _history(trainer, "grad_norm") == pytest.approx(probe.pre, rel=RTOL)


def test_the_trainers_own_clip_is_turned_off_with_a_warning(tmp_path) -> None:
    probe = Probe()
    with pytest.warns(
        UserWarning, match=r"max_grad_norm=1.0\) makes the Trainer clip .* Pass max_grad_norm=0"
    ):
        trainer, _, optimizer = _train(
            tmp_path, gradclip.NormClip(MAX_NORM), probe=probe, max_grad_norm=1.0
        )
    assert trainer.args.max_grad_norm == 0.0
    assert max(probe.pre) > 1.0  # gradclip saw gradients the Trainer had not clipped to 1.0
    assert all(s <= MAX_NORM * (1 + RTOL) for s in optimizer.seen)


def test_gradient_accumulation_clips_once_per_optimizer_step(tmp_path) -> None:
    probe = Probe()
    clipper = gradclip.AutoClip(percentile=50.0)
    _, _, optimizer = _train(
        tmp_path,
        clipper,
        probe=probe,
        max_steps=2,
        gradient_accumulation_steps=3,
        per_device_train_batch_size=2,
    )
    assert len(optimizer.seen) == len(probe.pre) == 2
    assert int(clipper.steps) == 2


class LossRecorder(Regressor):
    """A Regressor that keeps the loss of every forward pass, and whether it trained."""

    def __init__(self):
        super().__init__()
        self.passes: list[tuple[bool, float]] = []

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        self.passes.append((self.training and torch.is_grad_enabled(), float(out["loss"].detach())))
        return out


class LossSeen(gradclip.NormClip):
    """NormClip that keeps the loss each call is handed."""

    def __init__(self, max_norm: float):
        super().__init__(max_norm)
        self.losses: list[float | None] = []

    def __call__(self, parameters, *, loss=None):
        self.losses.append(None if loss is None else float(loss))
        return super().__call__(parameters, loss=loss)


def test_the_clipper_gets_the_mean_training_loss_of_each_optimizer_step(tmp_path) -> None:
    model, clipper = LossRecorder(), LossSeen(1e3)
    _train(tmp_path, clipper, model=model, dataset=_dataset(12), max_steps=2,
           gradient_accumulation_steps=3, per_device_train_batch_size=2,
           eval_dataset=_dataset(8), eval_strategy="steps", eval_steps=1)  # fmt: skip
    trained = [loss for training, loss in model.passes if training]
    assert len(trained) == 6 and len(model.passes) > 6  # evaluation passes ran too
    expected = [sum(trained[:3]) / 3, sum(trained[3:]) / 3]
    assert clipper.losses == pytest.approx(expected, rel=1e-6)
    assert not model._forward_hooks  # the callback's hook is gone after training


class OwnLoss(Regressor):
    """The model of a ``compute_loss`` override: its output holds no loss."""

    def forward(self, x, labels=None):
        return {"logits": self.net(x)}


class OwnLossTrainer(Trainer):
    """Computes the loss outside the model (a Huber loss), and hands it over when asked."""

    callback: GradClipCallback | None = None
    losses: list[float]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(x=inputs["x"])
        loss = torch.nn.functional.huber_loss(outputs["logits"].float(), inputs["labels"])
        self.losses.append(float(loss.detach()))
        if self.callback is not None:
            self.callback.add_loss(loss)
        return (loss, outputs) if return_outputs else loss


def _train_own_loss(tmp_path, clipper, *, hand_over: bool) -> tuple[OwnLossTrainer, list[warnings.WarningMessage]]:
    model = OwnLoss()
    callback = GradClipCallback(clipper)
    trainer = OwnLossTrainer(
        model=model,
        args=_args(tmp_path, max_steps=2, gradient_accumulation_steps=3, per_device_train_batch_size=2),
        train_dataset=_dataset(12),
        callbacks=[callback],
        optimizers=(torch.optim.AdamW(model.parameters(), lr=1e-2), None),
    )
    trainer.losses = []
    trainer.callback = callback if hand_over else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return trainer, [w for w in caught if "no training loss" in str(w.message)]


def test_a_loss_computed_outside_the_model_is_handed_over_with_add_loss(tmp_path) -> None:
    clipper = LossSeen(1e3)
    trainer, warned = _train_own_loss(tmp_path, clipper, hand_over=True)
    expected = [sum(trainer.losses[:3]) / 3, sum(trainer.losses[3:]) / 3]
    assert len(trainer.losses) == 6 and clipper.losses == pytest.approx(expected, rel=1e-6)
    assert not warned


def test_a_step_without_a_loss_warns_once_when_the_clipper_reads_it(tmp_path) -> None:
    _, warned = _train_own_loss(tmp_path, gradclip.AdaptiveClip(), hand_over=False)
    assert len(warned) == 1  # two optimizer steps, one warning
    assert "callback.add_loss(loss)" in str(warned[0].message)
    assert "step 1" in str(warned[0].message)
    _, warned = _train_own_loss(tmp_path, gradclip.NormClip(1.0), hand_over=False)
    assert not warned  # NormClip reads no loss


def test_add_loss_replaces_what_the_hook_read_and_refuses_a_vector() -> None:
    callback = GradClipCallback(LossSeen(1.0))
    model = LossRecorder().train()
    callback.on_train_begin(_args_stub(), TrainerState(), None, model=model)
    with torch.enable_grad():
        model(torch.zeros(2, 4), labels=torch.ones(2, 1))  # the hook reads this loss
    callback.add_loss(torch.tensor(7.0))  # from now on only what is handed over counts
    model(torch.zeros(2, 4), labels=torch.ones(2, 1))
    callback.add_loss(3.0)
    assert float(callback._step_loss()) == 5.0
    with pytest.raises(ValueError, match="`loss` must be one real number"):
        callback.add_loss(torch.ones(3))
    callback.on_train_end(_args_stub(), TrainerState(), None)


def _args_stub() -> types.SimpleNamespace:
    return types.SimpleNamespace(max_grad_norm=0.0, deepspeed=None, fsdp=None)


class LayerProbe(Probe):
    """Also the float64 pre-clip norm of each of the Regressor's two linear layers."""

    def __init__(self):
        super().__init__()
        self.layers: list[list[float]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        super().on_pre_optimizer_step(args, state, control, model=model, **kwargs)
        self.layers.append([float64_norm(model.net[i].parameters()) for i in (0, 2)])


def test_monitor_records_each_optimizer_step(tmp_path) -> None:
    probe = LayerProbe()
    monitor = gradclip.GradMonitor(log=tmp_path / "grads.jsonl")
    trainer, _, _ = _train(
        tmp_path,
        gradclip.NormClip(MAX_NORM),
        probe=probe,
        monitor=monitor,
        max_steps=3,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
    )
    log = gradclip.read_log(tmp_path / "grads.jsonl")  # flushed at the end; still open
    assert log.steps.tolist() == [0, 1, 2]  # one record per optimizer step: state.global_step
    assert log.norm.tolist() == _history(trainer, "gradclip/grad_norm")
    assert log.post_norm.tolist() == _history(trainer, "gradclip/grad_norm_clipped")
    assert log.norm.tolist() == pytest.approx(probe.pre, rel=RTOL)
    assert log.layer_names == ("net.0", "net.2")
    for row, expected in zip(log.layers.tolist(), probe.layers, strict=True):
        assert row == pytest.approx(expected, rel=RTOL)
    assert (log.optimizer, log.normalising) == ("RecordingAdamW", True)  # the one stepped
    monitor.close()


def test_the_step_reads_nothing_on_the_host_and_a_log_reads_once(tmp_path, accelerator_path) -> None:
    reads: dict[str, list[list[str]]] = {"step": [], "log": []}

    class Detecting(GradClipCallback):
        def on_pre_optimizer_step(self, *args, **kwargs):
            with HostReadDetector() as detector:
                super().on_pre_optimizer_step(*args, **kwargs)
            reads["step"].append(detector.reads)

        def on_log(self, *args, **kwargs):
            with HostReadDetector() as detector:
                super().on_log(*args, **kwargs)
            reads["log"].append(detector.reads)

    model = Regressor()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, logging_steps=2),
        train_dataset=_dataset(),
        callbacks=[Detecting(gradclip.ZClip(warmup_steps=2), monitor=gradclip.GradMonitor())],
    )
    trainer.train()
    assert reads["step"] == [[]] * 4  # a monitor included: it reads only when it flushes
    # steps 2 and 4: one read each; the summary at the end of training: none
    assert reads["log"] == [["Tensor.tolist"]] * 2 + [[]]


def test_resumed_run_continues_with_the_same_clipper_state(tmp_path) -> None:
    straight, callback, _ = _train(
        tmp_path, gradclip.ZClip(warmup_steps=2), max_steps=6, save_strategy="steps", save_steps=3
    )
    expected = callback.clipper.state_dict()
    expected_params = [p.detach().clone() for p in straight.model.parameters()]
    checkpoint = tmp_path / "out" / "checkpoint-3"
    assert (checkpoint / CHECKPOINT_FILE).is_file()

    resumed, callback, _ = _train(
        tmp_path,
        gradclip.ZClip(warmup_steps=2),
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        resume=str(checkpoint),
    )
    state = callback.clipper.state_dict()
    assert int(state["state"]["steps"]) == 6
    for key, value in expected["state"].items():
        torch.testing.assert_close(state["state"][key], value, rtol=0, atol=0)
    for p, q in zip(expected_params, resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert (
        _history(resumed, "gradclip/clip_rate")[-1] == _history(straight, "gradclip/clip_rate")[-1]
    )


def test_checkpoint_elsewhere_warns_and_loads_when_asked(tmp_path) -> None:
    _train(
        tmp_path, gradclip.ZClip(warmup_steps=2), max_steps=3, save_strategy="steps", save_steps=3
    )
    elsewhere = tmp_path / "moved"
    shutil.copytree(tmp_path / "out" / "checkpoint-3", elsewhere)
    shutil.rmtree(tmp_path / "out")
    with pytest.warns(
        UserWarning, match=r"resuming at step 3, but no gradclip.pt .*callback.load_checkpoint"
    ):
        _, callback, _ = _train(
            tmp_path, gradclip.ZClip(warmup_steps=2), max_steps=4, resume=str(elsewhere)
        )
    assert int(callback.clipper.steps) == 1  # started afresh
    callback = GradClipCallback(gradclip.ZClip(warmup_steps=2))
    callback.load_checkpoint(elsewhere)
    assert int(callback.clipper.steps) == 3


def test_checkpoint_of_a_different_clipper_is_refused(tmp_path) -> None:
    _train(
        tmp_path, gradclip.ZClip(warmup_steps=2), max_steps=3, save_strategy="steps", save_steps=3
    )
    checkpoint = str(tmp_path / "out" / "checkpoint-3")
    with pytest.raises(
        ValueError, match=r"cannot resume gradclip from .*gradclip.pt: .* a ZClip, not a AutoClip"
    ):
        _train(tmp_path, gradclip.AutoClip(), max_steps=4, resume=checkpoint)


def test_unsupported_setups_are_refused() -> None:
    callback = GradClipCallback(gradclip.NormClip(1.0))
    state = types.SimpleNamespace(global_step=0)
    for field, value, name in (
        ("fsdp", "full_shard", "FSDP"),
        ("deepspeed", "ds.json", "DEEPSPEED"),
    ):
        args = types.SimpleNamespace(max_grad_norm=0.0, deepspeed=None, fsdp=None)
        setattr(args, field, value)
        with pytest.raises(ValueError, match=rf"cannot clip under {name}: .* instead|use DDP"):
            callback.on_train_begin(args, state, None)
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        accelerator = types.SimpleNamespace(distributed_type=kind, sync_gradients=True)
        with pytest.raises(ValueError, match=rf"cannot clip under {kind.name}"):
            clip_gradients(accelerator, Regressor(), gradclip.NormClip(1.0))
    with pytest.raises(TypeError, match=r"`clipper` must be a gradclip Clipper, got float"):
        GradClipCallback(1.0)  # type: ignore[arg-type]
    bad = r"`monitor` must be a gradclip.GradMonitor or None, got str"
    with pytest.raises(TypeError, match=bad):
        GradClipCallback(gradclip.NormClip(1.0), monitor="grads.jsonl")  # type: ignore[arg-type]
    accelerator = types.SimpleNamespace(distributed_type=DistributedType.NO, sync_gradients=True)
    with pytest.raises(TypeError, match=bad):
        clip_gradients(accelerator, Regressor(), gradclip.NormClip(1.0), monitor="grads.jsonl")


def test_tiny_gpt2_in_bf16(tmp_path) -> None:
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 64, (16, 16), generator=gen)
    dataset = [{"input_ids": t, "labels": t} for t in tokens]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes about the tiny config
        trainer, callback, optimizer = _train(
            tmp_path, gradclip.ZClip(warmup_steps=2), model=model, dataset=dataset, bf16=True
        )
    thresholds = _history(trainer, "gradclip/threshold")
    assert len(thresholds) == len(optimizer.seen) == 4
    assert all(s <= t * (1 + 1e-3) for s, t in zip(optimizer.seen, thresholds, strict=True))
    assert int(callback.clipper.steps) == 4


def test_accelerate_loop_clips_once_per_optimizer_step() -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = Regressor()
    optimizer = recording(torch.optim.SGD)(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(_dataset(24), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    clipper = gradclip.NormClip(MAX_NORM)
    results = []
    records: list[dict] = []
    with gradclip.GradMonitor(sinks=records.append) as monitor:
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch)["loss"])
                stats = clip_gradients(accelerator, model, clipper, monitor=monitor)
                results.append(stats)
                optimizer.step()
                optimizer.zero_grad()
    assert [s is not None for s in results] == [False, True] * 3
    steps = [s for s in results if s is not None]
    assert [r["norm"] for r in records] == [float(s.norm) for s in steps]  # one per step
    assert {(r["optimizer"], r["normalising"]) for r in records} == {("RecordingSGD", False)}
    seen = optimizer.optimizer.seen
    assert len(seen) == 3
    for stats, post in zip([s for s in results if s is not None], seen, strict=True):
        assert float(stats.post_norm) == pytest.approx(post, rel=RTOL)
        assert post <= MAX_NORM * (1 + RTOL)


def test_fp16_gradients_are_unscaled_once_before_clipping() -> None:
    # accelerate keeps no scaler on the CPU, so the fp16 path runs with stand-ins holding a
    # real GradScaler: an accelerator (clip_gradients) and an AcceleratedOptimizer (callback).
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    accelerator = types.SimpleNamespace(
        distributed_type=DistributedType.NO,
        sync_gradients=True,
        is_main_process=True,
        scaler=scaler,
        _optimizers=[optimizer],
        unwrap_model=lambda m: m,
    )
    loss = model(torch.randn(8, 4)).pow(2).mean()
    reference = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    true_norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in reference])
    )
    callback = GradClipCallback(gradclip.NormClip(1e9))
    accelerated = types.SimpleNamespace(optimizer=optimizer, scaler=scaler)
    for unscaled_before in (False, True):  # e.g. by the Trainer's own norm, or by the user
        for via_callback in (False, True):
            optimizer.zero_grad()
            scaler.scale(loss).backward(retain_graph=True)
            if unscaled_before:
                scaler.unscale_(optimizer)
            if via_callback:
                callback.on_pre_optimizer_step(
                    None, TrainerState(), None, model=model, optimizer=accelerated
                )
                stats = callback._log.last
            else:
                stats = clip_gradients(accelerator, model, gradclip.NormClip(1e9))
            torch.testing.assert_close(stats.norm, true_norm, rtol=1e-5, atol=0)
            scaler.step(optimizer)
            scaler.update()


# -- spike detection ---------------------------------------------------------------------


class Snapshots(TrainerCallback):
    """After each optimizer step: parameters, Adam's step counters, the learning rate."""

    def __init__(self):
        self.rows: list[tuple] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)
        steps = [float(inner.state[p]["step"]) for p in model.parameters() if p in inner.state]
        self.rows.append(([p.detach().clone() for p in model.parameters()], steps,
                          lr_scheduler.get_last_lr()[0], state.global_step))  # fmt: skip


class Glitch(Regressor):
    """The 9th training batch (step 8) has its labels multiplied by 1000 (the Trainer
    shuffles the data, so the model picks the batch)."""

    calls = 0

    def forward(self, x, labels=None):
        self.calls += 1
        return super().forward(x, labels * 1000 if self.calls == 9 else labels)


def test_a_spike_is_skipped_and_the_schedule_goes_on(tmp_path) -> None:
    data = _dataset(40)
    snapshots = Snapshots()
    clipper = gradclip.NormClip(1e3, spikes=gradclip.SpikeDetector(window=8, warmup=4))
    model = Glitch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=10), train_dataset=data,
                      callbacks=[GradClipCallback(clipper), snapshots],
                      optimizers=(optimizer, None))  # fmt: skip
    trainer.train()
    (p7, steps7, lr7, g7), (p8, steps8, lr8, g8), (p9, steps9, _, _) = snapshots.rows[7:10]
    assert all(torch.equal(a, b) for a, b in zip(p7, p8, strict=True))  # not updated
    assert steps8 == steps7 and steps9 == [s + 1 for s in steps8]  # Adam's counters held
    assert not torch.equal(p8[0], p9[0])
    assert g8 == g7 + 1 and lr8 < lr7  # the Trainer counts the step, its scheduler steps
    assert _history(trainer, "gradclip/spikes")[-1] == 1.0
    assert _history(trainer, "gradclip/spike_score")[-1] == pytest.approx(1 / 10)


def test_the_accelerate_helper_hands_the_loss_to_the_detector() -> None:
    accelerator = Accelerator(cpu=True)
    model = Regressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(_dataset(48), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    clipper = gradclip.NormClip(1e3, spikes=gradclip.SpikeDetector("off", window=8, warmup=4))
    flags = []
    for i, batch in enumerate(loader):
        loss = model(**batch)["loss"]
        accelerator.backward(loss)
        reported = loss.detach() + (1e4 if i == 10 else 0.0)  # only the loss tells
        flags.append(bool(clip_gradients(accelerator, model, clipper, loss=reported).spike))
        optimizer.step()
        optimizer.zero_grad()
    assert flags == [i == 10 for i in range(12)]


def test_an_adaptive_clip_built_for_another_optimizer_warns_once(tmp_path) -> None:
    # the Trainer steps an AdamW: AdaptiveClip() follows SGD's rule, and says so once
    with pytest.warns(UserWarning, match="built without `optimizer`, and it steps RecordingAdamW") as seen:
        _train(tmp_path / "a", gradclip.AdaptiveClip(), max_steps=3)
    assert len([w for w in seen if "AdaptiveClip was built" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="AdaptiveClip was built")
        _train(tmp_path / "b", gradclip.AdaptiveClip(optimizer="AdamW"), max_steps=3)
