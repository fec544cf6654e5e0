"""GradClipCallback under Lightning's ModelParallelStrategy (FSDP2), two CPU processes.

Run by tests/integrations/test_lightning.py as ``python lightning_fsdp2.py OUT MODE``; Lightning
starts the second process by running this script again. Each rank writes ``OUT/rank<r>.json``.

MODE ``run``: a fit of STEPS optimizer steps (two epochs); rank 0 records the whole clipped
gradients of every step (gathered in the module's ``on_before_optimizer_step``, which
Lightning calls after the callbacks'), and every rank its clipper's final state. MODE
``resume``: a fit of one epoch and a checkpoint, then ``fit(ckpt_path=...)``: the clipper
state saved and the one loaded, and the gradients of the resumed steps. (Later resumed steps
drift from the uninterrupted run without any clipping too: Lightning's resume, not ours.)
:func:`reference` is the single-process run on the union of the ranks' batches.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradclip
from gradclip.integrations.lightning import GradClipCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: torch_bugs
from torch_bugs import average_gloo_reduce_scatter

STEPS, EPOCH, BATCH, WORLD = 8, 4, 8, 2  # cut at an epoch's end: Lightning restarts epochs


def make_clipper() -> gradclip.Clipper:
    return gradclip.AdaGC(warmup_steps=2)  # per-tensor norms: whole tensors needed


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * BATCH * EPOCH, 4, generator=gen)
    y = torch.randn(WORLD * BATCH * EPOCH, 3, generator=gen)
    y[WORLD * BATCH * 2:WORLD * BATCH * 3] *= 30  # a spike after the warm-up: AdaGC clips
    return TensorDataset(x, y)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


class Module(pl.LightningModule):
    def __init__(self, record: bool):
        super().__init__()
        self.net = net()
        self.record = record
        self.clipped: list[dict[str, list]] = []

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in (self.net[0], self.net[2], self.net):
            fully_shard(module, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return loss_of(self.net, *batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:  # rank r: samples r, r + WORLD, ... in order
        x, y = dataset().tensors
        part = TensorDataset(x[self.global_rank::WORLD], y[self.global_rank::WORLD])
        return DataLoader(part, batch_size=BATCH, shuffle=False)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.record:  # every rank gathers (a collective); rank 0 keeps them
            whole = {n: q.grad.full_tensor().tolist() for n, q in self.net.named_parameters()}
            self.clipped.append(whole)


def state_of(clipper: gradclip.Clipper) -> dict[str, list]:
    """The clipper's statistics as lists, by key (per-parameter ones as ``name/key``)."""
    sd = clipper.state_dict()
    out = {k: torch.as_tensor(v).flatten().tolist() for k, v in sd["state"].items()}
    for name, entry in sd["param_state"].items():
        for k, v in entry.items():
            out[f"{name.replace('net.', '', 1)}/{k}"] = torch.as_tensor(v).flatten().tolist()
    return out


def reference() -> dict:
    """Single process, each step on the batches the ranks get (DistributedSampler order)."""
    model, clipper = net(), make_clipper()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = dataset().tensors
    parts = [(x[r::WORLD], y[r::WORLD]) for r in range(WORLD)]
    clipped, count = [], 0
    for step in range(STEPS):
        window = slice(step % EPOCH * BATCH, (step % EPOCH + 1) * BATCH)
        opt.zero_grad()
        sum(loss_of(model, px[window], py[window]) for px, py in parts).div(WORLD).backward()
        count += bool(clipper(model).clipped)
        clipped.append({n: q.grad.tolist() for n, q in model.named_parameters()})
        opt.step()
    return {"clipped": clipped, "state": state_of(clipper), "clip_steps": count}


def trainer(out: Path, steps: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=WORLD, max_steps=steps, logger=False,
        strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
        use_distributed_sampler=False, **kwargs,
    )


class Loaded(pl.Callback):
    """The clipper state a resumed fit starts from (the checkpoint is loaded before this)."""

    def __init__(self, callback: GradClipCallback):
        self.callback = callback
        self.state: dict[str, list] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state = state_of(self.callback.clippers[0])


def main(out: Path, mode: str) -> None:
    average_gloo_reduce_scatter()  # torch < 2.9 sums where FSDP2 averages (see there)
    callback = GradClipCallback(make_clipper(), log=False)
    module = Module(record=True)
    result: dict = {}
    if mode == "run":
        fit = trainer(out, STEPS, callbacks=[callback], enable_checkpointing=False)
        fit.fit(module)
    else:  # the state at the cut, the state loaded, the first resumed step's gradients
        first = trainer(out, EPOCH, callbacks=[callback], enable_checkpointing=False)
        first.fit(Module(record=False))
        first.save_checkpoint(out / "cut.ckpt")
        result["saved"] = state_of(callback.clippers[0])
        callback = GradClipCallback(make_clipper(), log=False)
        loaded = Loaded(callback)
        fit = trainer(out, STEPS, callbacks=[callback, loaded], enable_checkpointing=False)
        fit.fit(module, ckpt_path=out / "cut.ckpt")
        result["loaded"] = loaded.state
    result.update({"rank": fit.global_rank, "steps": fit.global_step,
                   "state": state_of(callback.clippers[0]), "clipped": module.clipped,
                   "clip_steps": callback.state_dict()["counters"][0]["clipped"]})
    if fit.global_rank == 0:
        result["reference"] = reference()
    (out / f"rank{fit.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
