"""What each rank runs: every parallel layout, checked against the single-process reference.

Each case builds the same tiny model (same seed) twice: once as the reference, trained on
the full batch in this process without any parallelism, and once under the layout, each rank
on its part of the batch. Then, for every p, from the same gradients:

* gradclip's clip: its norm against the reference norm (torch's own function on the full
  model), and the clipped gradients (gathered whole) against the reference's clipped ones;
* torch's own ``clip_grad_norm_``: what it returns on this rank (``.to_local()`` of a
  DTensor: what ``.item()`` shows), or its error, and whether its clipped gradients match.

Records are plain dicts; the parent test asserts on them (tests/distributed/test_layouts.py).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.utils as tnu
from torch import nn

import gradclip
from gradclip import distributed as gd
from gradclip.monitor import layer_name

P_VALUES = (1.0, 2.0, 3.0, math.inf)
BATCH = 8


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def mlp(out: int = 3, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, out))


def data(out: int = 3, seed: int = 1, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    x = torch.randn(BATCH, 8, generator=gen)
    y = torch.randn(BATCH, out, generator=gen)
    if step % 10 == 7:  # a spike: clipping fires
        x = x * 30
    return x, y


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def clean(name: str) -> str:
    name = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
    return name.removeprefix("module.")


def reference_grads(out: int = 3) -> dict[str, torch.Tensor]:
    model = mlp(out)
    x, y = data(out)
    loss_of(model, x, y).backward()
    return {n: q.grad.detach().clone() for n, q in model.named_parameters()}


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, _dtensor()) else t


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole gradients by reference name (DTensors gathered: a collective on every rank)."""
    out = {}
    for n, q in model.named_parameters():
        if q.grad is not None:
            g = q.grad
            out[clean(n)] = (g.full_tensor() if isinstance(g, _dtensor()) else g).detach().clone()
    return out


def grad_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Largest |got - want| relative to the largest |want|; inf if a name is missing."""
    if set(got) != set(want):
        return math.inf
    scale = max(float(w.abs().max()) for w in want.values())
    return max(float((got[n] - want[n]).abs().max()) for n in want) / scale


class Saved:
    """The local gradients of ``params``, restorable in place (DTensor: its local shard)."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.values = [None if q.grad is None else local(q.grad).clone() for q in params]

    def restore(self) -> None:
        for q, v in zip(self.params, self.values, strict=True):
            if v is not None:
                local(q.grad).copy_(v)


def by_name(model: nn.Module, per_tensor: torch.Tensor) -> dict[str, float]:
    """``grad_norms(model.parameters())``'s per-tensor norms by reference name: one per
    parameter, on every rank, when each has a gradient on some rank (the layouts here)."""
    names = [clean(n) for n, _ in model.named_parameters()]
    values = per_tensor.tolist()
    if len(values) != len(names):
        return {"<rows>": float(len(values)), "<params>": float(len(names))}
    return dict(zip(names, values, strict=True))


def describe(value: Any) -> tuple[float | None, str]:
    """What torch returned on this rank: ``(value, type)``; a DTensor's local value."""
    if isinstance(value, _dtensor()):
        kinds = ",".join(type(p).__name__ for p in value.placements)
        return float(value.to_local()), f"DTensor({kinds})"
    return float(value), type(value).__name__


def first_call_reads(model: nn.Module, params: list, kwargs: dict) -> list[str]:
    """Host reads of the first calls on this layout (new meshes, nothing cached), on the
    accelerator code path: the plan reads no value either (tests/host_reads.py)."""
    from host_reads import HostReadDetector

    original = gradclip._foreach.is_host_device
    gradclip._foreach.is_host_device = lambda device: False
    try:
        with HostReadDetector() as detector:
            gradclip.grad_norms(params, 2.0, **kwargs)
            gradclip.NormClip(1e30, **kwargs)(model)
            gradclip.clip_grad_norm_(params, 1e30, math.inf, **kwargs)
        return detector.reads
    finally:
        gradclip._foreach.is_host_device = original


def check_layout_case(
    rec: list[dict], case: str, model: nn.Module, ref: dict[str, torch.Tensor], *,
    gather: Callable[[], dict[str, torch.Tensor]] | None = None,
    kwargs: dict | None = None, run_torch: bool | str = True, p_values=P_VALUES,
) -> None:
    """The norm and clipped gradients of gradclip and of torch, for every p, on one layout."""
    kwargs = kwargs or {}
    gather = gather or (lambda: full_grads(model))
    params = list(model.parameters())
    saved = Saved(params)
    rec.append({"case": "first_call_reads", "layout": case,
                "reads": first_call_reads(model, params, kwargs)})
    saved.restore()
    for p in p_values:
        ref_total = float(tnu.get_total_norm(list(ref.values()), p))
        max_norm = 0.5 * ref_total
        coef = min(max_norm / (ref_total + 1e-6), 1.0)
        ref_clipped = {n: g * coef for n, g in ref.items()}
        # the reference restricted to what this rank's model holds (pipeline stages)
        saved.restore()
        norms = gradclip.grad_norms(params, p, **kwargs)
        # a clipper's per-tensor norms (max_norm=inf: nothing changes), by parameter name
        stats = gradclip.NormClip(math.inf, p, **kwargs)(model)
        ours = gradclip.clip_grad_norm_(params, max_norm, p, **kwargs)
        got = gather()
        entry: dict[str, Any] = {
            "case": case, "p": p, "ref": ref_total, "ours": float(ours),
            "measured": float(norms.total), "clipper_total": float(stats.norm),
            "ours_type": type(ours).__name__,
            "grad_err": grad_error(got, {n: ref_clipped[n] for n in got}) if got else 0.0,
            "names": sorted(got),
            "per_tensor": by_name(model, norms.per_tensor),
            "clipper_per_tensor": dict(zip(map(clean, stats.names),
                                           stats.norms.per_tensor.tolist(), strict=True)),
            "ref_per_tensor": {n: float(torch.linalg.vector_norm(g, p)) for n, g in ref.items()},
        }
        saved.restore()
        if run_torch is True:
            try:
                theirs = tnu.clip_grad_norm_(params, max_norm, p)
                entry["torch"], entry["torch_type"] = describe(theirs)
                got = gather()
                entry["torch_grad_err"] = grad_error(got, {n: ref_clipped[n] for n in got})
            except Exception as err:  # raised on every rank alike (checked by the parent)
                entry["torch_error"] = f"{type(err).__name__}: {str(err)[:160]}"
        else:
            entry["torch_error"] = f"not run: {run_torch}"
        saved.restore()
        rec.append(entry)


# ---------------------------------------------------------------------------------------
# two ranks


def ddp_case(rank: int, world: int, rec: list[dict]) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(mlp())
    x, y = data()
    loss_of(model, x[rank::world], y[rank::world]).backward()
    check_layout_case(rec, "ddp", model, reference_grads())


def fsdp1_cases(rank: int, world: int, rec: list[dict]) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    x, y = data()
    ref = reference_grads()
    # use_orig_params=True: plain-tensor grads per parameter, each a piece of the flat shard
    # (None where a parameter has no elements on this rank).
    model = FSDP(mlp(), device_id=torch.device("cpu"), use_orig_params=True)
    loss_of(model, x[rank::world], y[rank::world]).backward()
    rec.append({"case": "fsdp1_orig_missing", "grads": [
        n for n, q in model.named_parameters() if q.grad is None or q.grad.numel() == 0]})

    def gather() -> dict[str, torch.Tensor]:
        with FSDP.summon_full_params(model, with_grads=True):
            return {clean(n): q.grad.clone() for n, q in model.named_parameters()}

    check_layout_case(rec, "fsdp1_orig", model, ref, gather=gather,
                      kwargs={"shard_group": dist.group.WORLD})
    # use_orig_params=False: one flat-parameter shard per rank; the post-clip norm of all
    # shards (gathered) must be the clipped reference's.
    flat = FSDP(mlp(), device_id=torch.device("cpu"))
    loss_of(flat, x[rank::world], y[rank::world]).backward()

    def gather_flat() -> dict[str, torch.Tensor]:
        g = next(flat.parameters()).grad
        parts = [torch.empty_like(g) for _ in range(world)]
        dist.all_gather(parts, g)
        return {"flat": torch.cat(parts)}

    params = list(flat.parameters())
    saved = Saved(params)
    for p in P_VALUES:
        ref_total = float(tnu.get_total_norm(list(ref.values()), p))
        saved.restore()
        whole = float(torch.linalg.vector_norm(gather_flat()["flat"], p))  # padding adds 0
        per_tensor = gradclip.grad_norms(params, p, shard_group=dist.group.WORLD).per_tensor
        ours = gradclip.clip_grad_norm_(params, 0.5 * ref_total, p, shard_group=dist.group.WORLD)
        post = float(torch.linalg.vector_norm(gather_flat()["flat"], p))
        saved.restore()
        theirs = tnu.clip_grad_norm_(params, 0.5 * ref_total, p)
        torch_post = float(torch.linalg.vector_norm(gather_flat()["flat"], p))
        saved.restore()
        own = float(flat.clip_grad_norm_(0.5 * ref_total, p))  # FSDP1's own method
        saved.restore()
        rec.append({"case": "fsdp1_flat", "p": p, "ref": ref_total, "ours": float(ours),
                    "post": post, "want_post": 0.5 * ref_total, "torch": float(theirs),
                    "torch_post": torch_post, "fsdp_method": own,
                    "per_tensor": per_tensor.tolist(), "whole": whole})


def fsdp2_cases(rank: int, world: int, rec: list[dict]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    x, y = data()

    def build(out: int) -> nn.Module:
        model = mlp(out)
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    # out=3: uneven shards (2 rows and 1 row)
    model = build(3)
    loss_of(model, x[rank::world], y[rank::world]).backward()
    check_layout_case(rec, "fsdp2", model, reference_grads(3))
    # out=1: the last layer's weight (1, 16) and bias (1,) are empty on rank 1. torch's inf
    # norm raises on that rank only and the other hangs in the collective: not run; the
    # local evidence is recorded instead.
    xe, ye = data(1)
    model = build(1)
    loss_of(model, xe[rank::world], ye[rank::world]).backward()
    empty = [clean(n) for n, q in model.named_parameters() if local(q.grad).numel() == 0]
    try:
        torch._foreach_norm([local(model[2].bias.grad)], math.inf)
        evidence = "no error"
    except RuntimeError as err:
        evidence = str(err)[:120]
    rec.append({"case": "fsdp2_empty_shards", "empty": empty, "torch_local_inf": evidence})
    check_layout_case(rec, "fsdp2_empty", model, reference_grads(1),
                      run_torch="torch's inf norm raises on the empty rank only and hangs the other")
    check_layout_case(rec, "fsdp2_empty_torch_p", model, reference_grads(1),
                      p_values=(1.0, 2.0, 3.0))

    # a DTensor gradient missing on one rank only: every rank still issues the same
    # collectives (the parameter says which), and the norm is that of the present gradients.
    model = build(3)
    loss_of(model, x[rank::world], y[rank::world]).backward()
    ref = reference_grads(3)
    ref["2.bias"][2:] = 0.0  # rank 1's shard of the 3-element bias (torch.chunk: 2 + 1)
    if rank == 1:
        model[2].bias.grad = None
    gd.check_layout(model.parameters())  # agrees: the parameters decide the collectives
    per_tensor = by_name(model, gradclip.grad_norms(model.parameters()).per_tensor)
    total = gradclip.clip_grad_norm_(model.parameters(), math.inf)
    rec.append({"case": "dtensor_grad_missing_on_rank1", "ours": float(total),
                "ref": float(tnu.get_total_norm(list(ref.values()))),
                "per_tensor": per_tensor,
                "ref_per_tensor": {n: float(torch.linalg.vector_norm(g)) for n, g in ref.items()}})


def tp_case(rank: int, world: int, rec: list[dict]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (world,))
    model = parallelize_module(mlp(), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    x, y = data()
    loss_of(model, x, y).backward()  # every TP rank sees the whole batch
    rec.append({"case": "tp_placements", "placements": {
        n: str(q.grad.placements) for n, q in model.named_parameters()}})
    check_layout_case(rec, "tp", model, reference_grads())


def mixed_case(rank: int, world: int, rec: list[dict]) -> None:
    """FSDP2 on the first layer only: DTensor and plain gradients in one list."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = mlp()
    fully_shard(model[0], mesh=mesh)
    x, y = data()
    loss_of(model, x, y).backward()  # same batch on every rank: the plain grads agree
    check_layout_case(rec, "mixed", model, reference_grads())


def _stage(full: nn.Sequential, which: int) -> nn.Sequential:
    """Stage 0 holds layers 0-1, stage 1 layer 2, under their reference names."""
    names = ("0", "1") if which == 0 else ("2",)
    return nn.Sequential(OrderedDict((n, full[int(n)]) for n in names))


def _pipeline_step(stage: nn.Module, which: int, peer: int, x, y) -> None:
    """One GPipe-like step with one micro-batch: activations forward, gradients back."""
    if which == 0:
        h = stage(x)
        dist.send(h.detach().contiguous(), peer)
        g = torch.empty_like(h)
        dist.recv(g, peer)
        h.backward(g)
    else:
        h = torch.empty(x.shape[0], 16)
        dist.recv(h, peer)
        h.requires_grad_()
        nn.functional.mse_loss(stage(h), y).backward()
        dist.send(h.grad.contiguous(), peer)


def pp_case(rank: int, world: int, rec: list[dict]) -> None:
    stage = _stage(mlp(), rank)
    x, y = data()
    _pipeline_step(stage, rank, 1 - rank, x, y)
    check_layout_case(rec, "pp", stage, reference_grads(),
                      kwargs={"extra_groups": [dist.group.WORLD]})


def nan_case(rank: int, world: int, rec: list[dict]) -> None:
    """A NaN in rank 1's shard only."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = mlp()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    x, y = data()
    loss_of(model, x[rank::world], y[rank::world]).backward()
    if rank == 1:
        local(model[0].weight.grad)[0, 0] = math.nan
    params = list(model.parameters())
    saved = Saved(params)
    for p in (2.0, math.inf):
        saved.restore()
        ours = float(gradclip.clip_grad_norm_(params, 1.0, p))
        saved.restore()
        theirs, kind = describe(tnu.clip_grad_norm_(params, 1.0, p))
        saved.restore()
        try:
            tnu.clip_grad_norm_(params, 1.0, p, error_if_nonfinite=True)
            torch_raised = False
        except RuntimeError:
            torch_raised = True
        saved.restore()
        per_tensor = by_name(model, gradclip.grad_norms(params, p).per_tensor)
        rec.append({"case": "nan_rank1", "p": p, "ours": ours, "torch": theirs,
                    "torch_type": kind, "torch_error_if_nonfinite": torch_raised,
                    "per_tensor": per_tensor})
    saved.restore()
    stats = gradclip.NormClip(1.0, nonfinite="skip")(model)
    untouched = all(
        torch.equal(local(q.grad).view(torch.int32), v.view(torch.int32))  # NaN == NaN here
        for q, v in zip(params, saved.values, strict=True)
    )
    try:
        gradclip.NormClip(1.0, nonfinite="error")(model)
        error = None
    except gradclip.NonFiniteGradientError as err:
        error = str(err)[:100]
    rec.append({"case": "nan_policies", "skipped": bool(stats.skipped), "untouched": untouched,
                "error": error})


# ---------------------------------------------------------------------------------------
# adaptive clippers: 50 steps, identical state on every rank


ADAPTIVE = (
    ("NormClip", {"max_norm": 0.5}),
    ("AutoClip", {"percentile": 50.0, "window": 16}),
    ("ZClip", {"warmup_steps": 5}),
    ("AdaptiveClip", {"window": 8}),
)


def _state_values(clipper: gradclip.Clipper) -> list[float]:
    sd = clipper.state_dict()
    values: list[float] = []
    for key in sorted(sd["state"]):
        values.extend(torch.as_tensor(sd["state"][key]).double().flatten().tolist())
    for name in sorted(sd["param_state"]):
        for key in sorted(sd["param_state"][name]):
            values.extend(torch.as_tensor(sd["param_state"][name][key]).double().flatten().tolist())
    return values


def _train(layout: str, name: str, kwargs: dict, rank: int, world: int, steps: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    model = mlp()
    if layout == "ddp":
        model = DistributedDataParallel(model)
    else:
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
    clipper = getattr(gradclip, name)(**kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    norms, clipped = [], 0
    for step in range(steps):
        x, y = data(step=step)
        opt.zero_grad()
        loss_of(model, x[rank::world], y[rank::world]).backward()
        stats = clipper.step(model, opt)
        norms.append(float(stats.norm))
        clipped += bool(stats.clipped)
    return {"state": _state_values(clipper), "norms": norms, "clipped": clipped}


def adaptive_cases(rank: int, world: int, rec: list[dict], steps: int = 50) -> None:
    for layout in ("ddp", "fsdp2"):
        for name, kwargs in ADAPTIVE:
            out = _train(layout, name, kwargs, rank, world, steps)
            rec.append({"case": "adaptive", "layout": layout, "clipper": name, **out})
    # the single-process reference of the first norms (same data, same init)
    model = mlp()
    ref = []
    for step in range(3):
        x, y = data(step=step)
        model.zero_grad()
        loss_of(model, x, y).backward()
        ref.append(float(tnu.get_total_norm([q.grad for q in model.parameters()])))
        break
    rec.append({"case": "adaptive_reference", "first_norm": ref[0]})
    # per-tensor clippers: whole tensors under DDP; under FSDP2 shards AdaGC reads the
    # whole tensors' norms, AGC (per row) refuses with a clear error
    for name in ("AdaGC", "AGC"):
        kwargs = {"warmup_steps": 2} if name == "AdaGC" else {"clipping": 0.05}
        out = _train("ddp", name, kwargs, rank, world, 5)
        rec.append({"case": "per_tensor_ddp", "clipper": name, **out})
        try:
            out = _train("fsdp2", name, kwargs, rank, world, 5)
            rec.append({"case": "per_tensor_fsdp2", "clipper": name, "error": None, **out})
        except NotImplementedError as err:
            rec.append({"case": "per_tensor_fsdp2", "clipper": name, "error": str(err)})
    model = mlp()  # plain shards (FSDP1, ZeRO): AGC refuses them too
    loss_of(model, *data()).backward()
    try:
        gradclip.AGC(shard_group=dist.group.WORLD)(model)
        rec.append({"case": "agc_shard_group", "error": None})
    except NotImplementedError as err:
        rec.append({"case": "agc_shard_group", "error": str(err)})


# ---------------------------------------------------------------------------------------
# AdaGC (per tensor) and AGC (per row) under sharded layouts, against the single-process run


ADAGC = {"warmup_steps": 3}
CLIP_STEPS = 12  # the x30 spike of step 7 comes after the warm-up


def _layer_norms(grads: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-module 2-norms (the monitor's layers) of whole gradients by name."""
    squares: dict[str, float] = {}
    for n, g in grads.items():
        layer = layer_name(n)
        squares[layer] = squares.get(layer, 0.0) + float(torch.linalg.vector_norm(g)) ** 2
    return {k: math.sqrt(v) for k, v in squares.items()}


def _adagc_state(clipper: gradclip.AdaGC) -> dict[str, tuple[float, int]]:
    """``(gamma, steps)`` by reference parameter name."""
    entries = clipper.state_dict()["param_state"]
    return {clean(n): (float(e["gamma"]), int(e["steps"])) for n, e in entries.items()}


def _adagc(**kwargs: Any) -> gradclip.Clipper:
    return gradclip.AdaGC(**ADAGC, **kwargs)


def clip_reference(model: nn.Module, steps: int = CLIP_STEPS, make: Callable = _adagc) -> dict:
    """The single-process run on the full batch: clipped gradients, pre-clip layer norms
    and final state, step by step (the clipper ``make()``, AdaGC by default, then SGD)."""
    clipper = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    clipped, layers, count = [], [], 0
    out = model[-1].out_features
    for step in range(steps):
        x, y = data(step=step, out=out)
        opt.zero_grad()
        loss_of(model, x, y).backward()
        layers.append(_layer_norms({n: q.grad for n, q in model.named_parameters()}))
        count += bool(clipper(model).clipped)
        clipped.append({n: q.grad.detach().clone() for n, q in model.named_parameters()})
        opt.step()
    return {"clipped": clipped, "layers": layers, "state": _adagc_state(clipper), "count": count,
            "out": out}


def clip_layout(
    rec: list[dict], case: str, model: nn.Module, ref: dict, batch: Callable, *,
    gather: Callable[[], dict[str, torch.Tensor]] | None = None, kwargs: dict | None = None,
    monitor: bool = False, steps: int = CLIP_STEPS, make: Callable = _adagc, tag: str = "adagc",
) -> None:
    """A clipper (``make(**kwargs)``, AdaGC by default) on one layout, each rank on
    ``batch(x, y)``: the clipped gradients (gathered whole) and the state against the
    reference, and (``monitor``) a GradMonitor's layers. Recorded as case ``tag``."""
    gather = gather or (lambda: full_grads(model))
    clipper = make(**(kwargs or {}))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    records: list[dict] = []
    mon = gradclip.GradMonitor(clipper, model, sinks=records.append, every=5) if monitor else None
    errors, count = [], 0
    for step in range(steps):
        x, y = data(step=step, out=ref["out"])
        opt.zero_grad()
        loss_of(model, *batch(x, y)).backward()
        stats = mon() if mon is not None else clipper(model)
        count += bool(stats.clipped)
        errors.append(grad_error(gather(), ref["clipped"][step]))
        opt.step()
    entry = {"case": tag, "layout": case, "grad_err": max(errors), "count": count,
             "ref_count": ref["count"], "state": _adagc_state(clipper),
             "ref_state": ref["state"], "bits": _state_values(clipper)}
    if mon is not None:
        mon.close()
        entry["layers"] = [r["layers"] for r in records]
        entry["ref_layers"] = ref["layers"]
    rec.append(entry)


def adagc_cases(rank: int, world: int, rec: list[dict]) -> None:
    """AdaGC under FSDP2 (with a GradMonitor), tensor parallel and FSDP1 (2 ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (world,))
    ref = clip_reference(mlp())
    split = lambda x, y: (x[rank::world], y[rank::world])  # noqa: E731

    model = mlp()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    clip_layout(rec, "fsdp2", model, ref, split, monitor=True)

    model = parallelize_module(mlp(), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    clip_layout(rec, "tp", model, ref, lambda x, y: (x, y))

    model = FSDP(mlp(), device_id=torch.device("cpu"), use_orig_params=True)

    def gather() -> dict[str, torch.Tensor]:
        with FSDP.summon_full_params(model, with_grads=True):
            return {clean(n): q.grad.clone() for n, q in model.named_parameters()}

    clip_layout(rec, "fsdp1_orig", model, ref, split, gather=gather,
                 kwargs={"shard_group": dist.group.WORLD})

    # FSDP2 with the last layer empty on rank 1: its gamma is still kept (and equal) there
    model = mlp(1)
    for module in (model[0], model[2], model):
        fully_shard(module, mesh=mesh)
    clip_layout(rec, "fsdp2_empty", model, clip_reference(mlp(1)), split)


def _agc(**kwargs: Any) -> gradclip.Clipper:
    return gradclip.AGC(**{"clipping": 0.05, **kwargs})


def agc_cases(rank: int, world: int, rec: list[dict]) -> None:
    """AGC (per row) under FSDP2, with an empty shard, and tensor parallel (2 ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (world,))
    split = lambda x, y: (x[rank::world], y[rank::world])  # noqa: E731
    # rows dealt out (Shard(0) weights), biases cut in pieces; the head excluded (LAST_LINEAR)
    model = mlp()
    for module in (model[0], model[2], model):
        fully_shard(module, mesh=mesh)
    clip_layout(rec, "fsdp2", model, clip_reference(mlp(), make=_agc), split, make=_agc,
                 tag="agc")
    # one pass over the gradients: the rows' norms come from the measuring pass
    from gradclip.norms.units import UnitPlan

    passes = []
    original = UnitPlan.unit_norms
    UnitPlan.unit_norms = lambda plan, tensors, *a, **k: (  # type: ignore[method-assign]
        passes.append({t.data_ptr() for t in tensors}) or original(plan, tensors, *a, **k))
    try:
        model.zero_grad()
        loss_of(model, *split(*data())).backward()
        grads = {q.grad.to_local().data_ptr() for q in model.parameters()}
        _agc()(model)
    finally:
        UnitPlan.unit_norms = original  # type: ignore[method-assign]
    rec.append({"case": "agc_passes", "grad_passes": sum(bool(ptrs & grads) for ptrs in passes),
                "passes": len(passes)})
    # every parameter clipped; the last layer's single row lives on rank 0 only
    everything = {"exclude": None}
    model = mlp(1)
    for module in (model[0], model[2], model):
        fully_shard(module, mesh=mesh)
    ref = clip_reference(mlp(1), make=lambda: _agc(**everything))
    clip_layout(rec, "fsdp2_empty", model, ref, split, make=_agc, kwargs=everything, tag="agc")
    # replicated DTensor parameters (nothing split): whole rows on every rank
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    errors = {}
    for name in ("AGC", "AdaGC"):
        make = ((lambda: _agc(exclude=None)) if name == "AGC"
                else (lambda: gradclip.AdaGC(warmup_steps=1, warmup_max_norm=0.01)))
        ref, model = mlp(), mlp()
        distribute_module(model, mesh)
        x, y = data()
        loss_of(ref, x, y).backward()
        out = model(DTensor.from_local(x, mesh, [Replicate()])).to_local()
        ((out - y) ** 2).mean().backward()
        stats = make()(model)
        make()(ref)
        want = {n: q.grad for n, q in ref.named_parameters()}
        errors[name] = (grad_error(full_grads(model), want), bool(stats.clipped))
    rec.append({"case": "replicated", "errors": errors})
    # column-parallel rows (Shard(0)) and row-parallel rows cut in pieces (Shard(1))
    model = parallelize_module(mlp(), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    ref = clip_reference(mlp(), make=lambda: _agc(**everything))
    clip_layout(rec, "tp", model, ref, lambda x, y: (x, y), make=_agc, kwargs=everything,
                 tag="agc")


def more_clipper_cases(rank: int, world: int, rec: list[dict]) -> None:
    """ValueClip, clip_grad_value_, the skip policy and Clipper.step (fused and not) under
    FSDP2 and TP, against the single-process run (2 ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (world,))

    def sharded(layout: str) -> tuple[nn.Module, Callable]:
        if layout == "fsdp2":
            model = mlp()
            for module in (model[0], model[2], model):
                fully_shard(module, mesh=mesh)
            return model, lambda x, y: (x[rank::world], y[rank::world])
        tp = {"0": ColwiseParallel(), "2": RowwiseParallel()}
        return parallelize_module(mlp(), mesh, tp), lambda x, y: (x, y)

    clips: dict[str, Callable[[nn.Module], object]] = {
        "ValueClip": lambda m: gradclip.ValueClip(0.01)(m),
        "clip_grad_value_": lambda m: gradclip.clip_grad_value_(m.parameters(), 0.01),
        "NormClip skip": lambda m: gradclip.NormClip(0.1, nonfinite="skip")(m),
        "AGC skip": lambda m: gradclip.AGC(0.05, exclude=None, nonfinite="skip")(m),
    }
    for layout in ("fsdp2", "tp"):
        for name, clip in clips.items():
            ref, (model, batch) = mlp(), sharded(layout)
            x, y = data()
            loss_of(ref, x, y).backward()
            loss_of(model, *batch(x, y)).backward()
            clip(model)
            clip(ref)
            want = {n: q.grad for n, q in ref.named_parameters()}
            rec.append({"case": "more_clippers", "what": f"{layout} {name}",
                        "err": grad_error(full_grads(model), want)})
    steps = {
        "NormClip": lambda: gradclip.NormClip(0.1),  # folds into the fused kernel
        "AGC": lambda: gradclip.AGC(0.05, exclude=None),
        "ZClip skip": lambda: gradclip.ZClip(warmup_steps=2, nonfinite="skip"),
    }
    for name, make in steps.items():
        for fused in (True, False):
            ref, (model, batch) = mlp(), sharded("fsdp2")
            opts = [torch.optim.AdamW(m.parameters(), lr=0.01, fused=fused) for m in (ref, model)]
            clippers = [make(), make()]
            for step in range(4):
                x, y = data(step=step)
                for m, opt, clipper, xy in zip((ref, model), opts, clippers,
                                              ((x, y), batch(x, y)), strict=True):
                    opt.zero_grad()
                    loss_of(m, *xy).backward()
                    clipper.step(m, opt)
            got = {clean(n): q.full_tensor().detach() for n, q in model.named_parameters()}
            err = max(float((got[n] - q).abs().max()) for n, q in ref.named_parameters())
            rec.append({"case": "more_clippers", "what": f"step {name} fused={fused}", "err": err})


# ---------------------------------------------------------------------------------------
# bad input


def bad_input_cases(rank: int, world: int, rec: list[dict]) -> None:
    model = mlp()
    loss_of(model, *data()).backward()
    params = list(model.parameters())
    # a group this rank is not a member of
    solo = dist.new_group([0])
    try:
        gradclip.clip_grad_norm_(params, 1.0, shard_group=solo)
        rec.append({"case": "non_member", "error": None})
    except ValueError as err:
        rec.append({"case": "non_member", "error": str(err)})
    # groups that disagree across ranks: check_layout names them on every rank
    try:
        gd.check_layout(params, shard_group=dist.group.WORLD if rank == 0 else None)
        rec.append({"case": "disagree", "error": None})
    except ValueError as err:
        rec.append({"case": "disagree", "error": str(err)})
    try:
        gd.check_layout(params, shard_group=dist.group.WORLD)
        rec.append({"case": "agree", "error": None})
    except ValueError as err:
        rec.append({"case": "agree", "error": str(err)})
    # plain shards with a gradient missing on rank 1 only (FSDP1 use_orig_params=True
    # does this): the norm of the gradients that exist, on every rank
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(2))
    a.grad = torch.full((3,), float(rank + 1))
    b.grad = torch.full((2,), 2.0) if rank == 0 else None
    per_tensor = {p: gradclip.grad_norms([a, b], p, shard_group=dist.group.WORLD).per_tensor.tolist()
                  for p in (2.0, math.inf)}
    total = gradclip.clip_grad_norm_([a, b], math.inf, shard_group=dist.group.WORLD)
    want = math.sqrt(3 * 1 + 3 * 4 + 2 * 4)
    rec.append({"case": "plain_grad_missing", "ours": float(total), "ref": want,
                "per_tensor": per_tensor[2.0], "ref_per_tensor": [math.sqrt(3 + 12), math.sqrt(8)],
                "per_tensor_inf": per_tensor[math.inf], "ref_per_tensor_inf": [2.0, 2.0]})
    # different parameter sets in one shard group: the per-tensor vectors would not align
    try:
        gd.check_layout([a, b] if rank == 0 else [a], shard_group=dist.group.WORLD)
        rec.append({"case": "different_params", "error": None})
    except ValueError as err:
        rec.append({"case": "different_params", "error": str(err)})
    # ZeRO-style partitions (each rank its own tensors): the drop-ins reduce the total only,
    # so, as torch's, they take whatever each rank holds
    mine = [nn.Parameter(torch.zeros(n)) for n in ((3, 2) if rank == 0 else (4,))]
    for q in mine:
        q.grad = torch.full_like(q, float(rank + 2))
    total = gradclip.clip_grad_norm_(mine, 1e9, shard_group=dist.group.WORLD)
    rec.append({"case": "zero_partitions", "ours": float(total), "ref": math.sqrt(5 * 4 + 4 * 9)})
    # norm_type 0 cannot be reduced across shards
    try:
        gradclip.clip_grad_norm_(params, 1.0, 0, shard_group=dist.group.WORLD)
        rec.append({"case": "norm_type_0", "error": None})
    except ValueError as err:
        rec.append({"case": "norm_type_0", "error": str(err)})
    # a wrong type for the groups
    try:
        gradclip.clip_grad_norm_(params, 1.0, extra_groups=["world"])
        rec.append({"case": "bad_type", "error": None})
    except TypeError as err:
        rec.append({"case": "bad_type", "error": str(err)})


def _split(names: list[str]) -> dict[str, list[str]]:
    """The groups of the group cases, by reference name: weights and biases."""
    return {"weights": [n for n in names if n.endswith("weight")],
            "biases": [n for n in names if not n.endswith("weight")]}


def check_group_case(
    rec: list[dict], case: str, model: nn.Module, ref: dict[str, torch.Tensor], *,
    kwargs: dict | None = None,
) -> None:
    """Per-group clipping on one layout (groups mixing sharded and replicated tensors):
    the drop-in with a threshold per group and a clipper with a shared and an excluded
    group, against the single-process reference clipped group by group."""
    kwargs = kwargs or {}
    params = list(model.parameters())
    saved = Saved(params)
    names = {clean(n): q for n, q in model.named_parameters()}
    split = _split(list(names))
    groups = {g: [names[n] for n in members] for g, members in split.items()}
    ref_split = _split(list(ref))  # the whole model's (pipeline stages hold part of it)
    for p in P_VALUES:
        ref_norms = [float(tnu.get_total_norm([ref[n] for n in ref_split[g]], p))
                     for g in ("weights", "biases")]
        limits = [0.5 * r for r in ref_norms]
        want = {}
        for g, limit, total in zip(("weights", "biases"), limits, ref_norms, strict=True):
            coef = min(limit / (total + 1e-6), 1.0)
            want.update({n: ref[n] * coef for n in ref_split[g]})
        saved.restore()
        norms = gradclip.clip_grad_norm_(params, limits, p, groups=groups, **kwargs)
        got = full_grads(model)
        drop_in_err = grad_error(got, {n: want[n] for n in got})
        saved.restore()
        clipper = gradclip.NormClip(limits[0], p, groups=groups, policy=["shared", "exclude"],
                                    **kwargs)
        stats = clipper(model)
        got = full_grads(model)
        coef = min(limits[0] / (ref_norms[0] + 1e-6), 1.0)
        want_clipper = {n: ref[n] * coef if n in ref_split["weights"] else ref[n] for n in got}
        rec.append({
            "case": case, "p": p, "ref": ref_norms, "ours": norms.tolist(),
            "grad_err": drop_in_err, "clipper_err": grad_error(got, want_clipper),
            "clipper_norms": stats.groups.norm.tolist(),
            "clipper_coef": stats.groups.coef.tolist(),
            "clipper_threshold": float(stats.threshold),
            "excluded": list(stats.groups.excluded),
        })
        saved.restore()


def group_cases(rank: int, world: int, rec: list[dict]) -> None:
    """Per-group clipping under DDP, FSDP2 on one layer (DTensor and plain tensors in a
    group), tensor parallel (a replicated bias among sharded weights) and pipeline stages
    (each stage's groups reduced with the other stage's)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
    from torch.nn.parallel import DistributedDataParallel

    x, y = data()
    model = DistributedDataParallel(mlp())
    loss_of(model, x[rank::world], y[rank::world]).backward()
    check_group_case(rec, "groups_ddp", model, reference_grads())

    mesh = init_device_mesh("cpu", (world,))
    model = mlp()
    fully_shard(model[0], mesh=mesh)
    loss_of(model, x, y).backward()  # same batch on every rank: the plain grads agree
    check_group_case(rec, "groups_mixed", model, reference_grads())

    model = parallelize_module(mlp(), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    loss_of(model, x, y).backward()
    check_group_case(rec, "groups_tp", model, reference_grads())

    stage = _stage(mlp(), rank)
    _pipeline_step(stage, rank, 1 - rank, x, y)
    check_group_case(rec, "groups_pp", stage, reference_grads(),
                     kwargs={"extra_groups": [dist.group.WORLD]})


SPIKE_STEPS = 16
SPIKE_LOSS_STEP = 12  # rank 0's loss alone is x1000 here: the mean over ranks spikes


def spike_cases(rank: int, world: int, rec: list[dict]) -> None:
    """A spike detector under DDP and FSDP2: each rank passes its own loss (rank 0's alone
    spikes at one step); every rank must decide the same, from the global norm and the loss
    averaged over ranks. The data's x30 steps (7, ...) are gradient spikes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    for layout in ("ddp", "fsdp2"):
        model = mlp()
        if layout == "ddp":
            model = DistributedDataParallel(model)
        else:
            mesh = init_device_mesh("cpu", (world,))
            for module in (model[0], model[2], model):
                fully_shard(module, mesh=mesh)
        clipper = gradclip.NormClip(1.0, spikes=gradclip.SpikeDetector(window=8, warmup=4))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        out: dict[str, list] = {"spike": [], "skipped": [], "bound": [], "norm": [], "loss": []}
        for step in range(SPIKE_STEPS):
            x, y = data(step=step)
            opt.zero_grad()
            loss = loss_of(model, x[rank::world], y[rank::world])
            loss.backward()
            reported = loss.detach() * (1000.0 if step == SPIKE_LOSS_STEP and rank == 0 else 1.0)
            stats = clipper.step(model, opt, loss=reported)
            for key, value in (("spike", stats.spike), ("skipped", stats.skipped),
                               ("bound", stats.spike_bound), ("norm", stats.norm)):  # fmt: skip
                out[key].append(value.item())
            out["loss"].append(float(reported))
        rec.append({"case": "spikes", "layout": layout, **out,
                    "state": _state_values(clipper),
                    "detector": [v for k, v in sorted(clipper.spikes.state_dict()["state"].items())
                                 for v in torch.as_tensor(v).double().flatten().tolist()]})  # fmt: skip


GATE_STEPS = 80  # the loss gate decides at 40, 60 and 80 recorded losses


def adaptive_loss_cases(rank: int, world: int, rec: list[dict]) -> None:
    """AdaptiveClip's loss gate under DDP: each rank passes its own loss (rank 0's falls, the
    others' stay flat); every rank must decide from their mean, the same on every rank."""
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(mlp())
    clipper = gradclip.AdaptiveClip(window=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out: dict[str, list] = {"threshold": [], "norm": [], "loss": []}
    for step in range(GATE_STEPS):
        x, y = data(step=step)
        opt.zero_grad()
        loss_of(model, x[rank::world], y[rank::world]).backward()
        reported = 10.0 * math.exp(-step / 15) if rank == 0 else 1.0 + 0.01 * (step % 3)
        stats = clipper.step(model, opt, loss=torch.tensor(reported))
        out["threshold"].append(stats.threshold.item())
        out["norm"].append(stats.norm.item())
        out["loss"].append(reported)
    rec.append({"case": "adaptive_loss", **out, "state": _state_values(clipper)})


def suite_two(rank: int, world: int, rec: list[dict]) -> None:
    """Everything that runs on 2 ranks, in one launch."""
    for case in (ddp_case, fsdp1_cases, fsdp2_cases, tp_case, mixed_case, pp_case, nan_case,
                 bad_input_cases, host_read_cases, adaptive_cases, adagc_cases, agc_cases,
                 more_clipper_cases, group_cases, spike_cases, adaptive_loss_cases):
        case(rank, world, rec)


# ---------------------------------------------------------------------------------------
# four ranks


def _fsdp_tp_model(mesh, world: int) -> tuple[nn.Module, nn.Module]:
    """A 5-layer MLP (seed 0) tensor-parallel over ``mesh["tp"]``, FSDP2-sharded over
    ``mesh["dp"]``, its last layer sharded on another (1-D world) mesh; and an unsharded
    copy taken before sharding, for the reference."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                          nn.Linear(8, 3))
    unsharded = copy.deepcopy(model)
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model[0], mesh=mesh["dp"])
    fully_shard(model[2], mesh=mesh["dp"])
    fully_shard(model[4], mesh=init_device_mesh("cpu", (world,)))  # another mesh
    return model, unsharded


def _fsdp_tp_grads(world: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The FSDP2 x TP model on a (dp=2, tp=2) mesh after a backward pass on its data-parallel
    slice of the batch, and the unsharded reference's gradients on the whole batch, by name."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model, ref_model = _fsdp_tp_model(mesh, world)
    x, y = data()
    dp = mesh.get_local_rank("dp")
    loss_of(model, x[dp::2], y[dp::2]).backward()
    loss_of(ref_model, x, y).backward()
    return model, {n: q.grad.detach().clone() for n, q in ref_model.named_parameters()}


def fsdp_tp_case(rank: int, world: int, rec: list[dict]) -> None:
    """FSDP2 x TP on a (dp=2, tp=2) mesh, plus a layer FSDP-sharded on a 1-D world mesh."""
    model, ref = _fsdp_tp_grads(world)
    rec.append({"case": "fsdp_tp_placements", "placements": {
        n: str(q.grad.placements) for n, q in model.named_parameters()}})
    check_layout_case(rec, "fsdp_tp", model, ref)


def hsdp_case(rank: int, world: int, rec: list[dict]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = mlp()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    x, y = data()
    loss_of(model, x[rank::world], y[rank::world]).backward()
    check_layout_case(rec, "hsdp", model, reference_grads())


def pp_fsdp_case(rank: int, world: int, rec: list[dict]) -> None:
    """Two pipeline stages, each FSDP2-sharded over its 2 data-parallel ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    which, dp = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
    stage = _stage(mlp(), which)
    fully_shard(stage, mesh=mesh["dp"])
    peer = int(mesh.mesh[1 - which, dp])
    x, y = data()
    _pipeline_step(stage, which, peer, x[dp::2], y[dp::2])
    check_layout_case(rec, "pp_fsdp", stage, reference_grads(),
                      kwargs={"extra_groups": [mesh["pp"]]})


def adagc_four_cases(rank: int, world: int, rec: list[dict]) -> None:
    """AdaGC under FSDP2 x TP on a (dp=2, tp=2) mesh and under HSDP (4 ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model, unsharded = _fsdp_tp_model(mesh, world)
    dp = mesh.get_local_rank("dp")
    clip_layout(rec, "fsdp_tp", model, clip_reference(unsharded),
                lambda x, y: (x[dp::2], y[dp::2]))
    # AGC on the same layout, every parameter: rows dealt out over dp (and tp), cut over tp
    model, unsharded = _fsdp_tp_model(mesh, world)
    everything = {"exclude": None}
    ref = clip_reference(unsharded, make=lambda: _agc(**everything))
    clip_layout(rec, "fsdp_tp", model, ref, lambda x, y: (x[dp::2], y[dp::2]), make=_agc,
                kwargs=everything, tag="agc")

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = mlp()
    for module in (model[0], model[2], model):
        fully_shard(module, mesh=mesh)
    clip_layout(rec, "hsdp", model, clip_reference(mlp()),
                 lambda x, y: (x[rank::world], y[rank::world]))


def group_four_case(rank: int, world: int, rec: list[dict]) -> None:
    """Per-group clipping under FSDP2 x TP on a (dp=2, tp=2) mesh with a layer on a second
    mesh: groups hold tensors sharded over dp, over tp, over both, and replicated."""
    model, ref = _fsdp_tp_grads(world)
    check_group_case(rec, "groups_fsdp_tp", model, ref)


def suite_four(rank: int, world: int, rec: list[dict]) -> None:
    for case in (fsdp_tp_case, hsdp_case, pp_fsdp_case, adagc_four_cases, group_four_case):
        case(rank, world, rec)


def run_named(rank: int, world: int, rec: list[dict], names: list[str]) -> None:
    """Run the named cases in order (for running a few while debugging)."""
    import sys

    module = sys.modules[__name__]
    for name in names:
        getattr(module, name)(rank, world, rec)


def host_read_cases(rank: int, world: int, rec: list[dict]) -> None:
    """The accelerator code path (CPU tensors treated as device tensors) reads no device
    value on the host, collectives included (tests/host_reads.py)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from host_reads import HostReadDetector

    mesh = init_device_mesh("cpu", (world,))
    model = mlp()
    fully_shard(model[0], mesh=mesh)  # mixed: DTensor and plain gradients
    x, y = data()
    loss_of(model, x, y).backward()
    plain = [nn.Parameter(torch.zeros(3)) for _ in range(2)]
    for q in plain:
        q.grad = torch.full((3,), float(rank + 1))
    original = gradclip._foreach.is_host_device
    gradclip._foreach.is_host_device = lambda device: False
    try:
        clipper = gradclip.ZClip(warmup_steps=2, extra_groups=[dist.group.WORLD])
        adagc = gradclip.AdaGC(warmup_steps=1)  # per-tensor norms and coefficients
        agc = gradclip.AGC(0.05, exclude=None)  # rows cut in pieces (biases) and dealt out
        calls = {
            "dtensor": lambda p: gradclip.clip_grad_norm_(model.parameters(), 0.1, p),
            "shard_group": lambda p: gradclip.clip_grad_norm_(
                plain, 0.1, p, shard_group=dist.group.WORLD),
            "extra_groups": lambda p: gradclip.get_total_norm(
                [q.grad for q in plain], p, extra_groups=[dist.group.WORLD]),
            "clipper": lambda p: clipper(model),
            "adagc": lambda p: adagc(model),
            "agc": lambda p: agc(model),
        }
        for name, call in calls.items():
            for p in (2.0, math.inf):
                call(p)  # warm-up: caches (the mesh layout is read once per mesh)
                with HostReadDetector() as detector:
                    call(p)
                rec.append({"case": "host_reads", "call": name, "p": p, "reads": detector.reads})
    finally:
        gradclip._foreach.is_host_device = original
