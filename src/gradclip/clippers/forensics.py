"""What went wrong on a spike: :class:`SpikeReport`, :class:`GradientSpikeError`, and the
watch that stops a run after too many spikes in a row without waiting for the device.

A report names the parameters whose gradient norm grew most relative to their own running
median (the streaming median :class:`~gradclip.clippers.spikes.SpikeDetector` keeps per
parameter), their largest absolute gradient values, the parameters whose norm is NaN/inf in
backward order (autograd produces the output side's gradients first and a NaN born in one
layer reaches every layer before it, so the first named is where it most likely arose), and
the rank that wrote it. Building one reads the step's values on the host: it happens where
that is free (the CPU) or asked for (``on_spike``).

Example:
    >>> from gradclip.clippers.forensics import SpikeLayer, SpikeReport
    >>> report = SpikeReport(step=41, norm=812.0, bound=3.2, loss=None, loss_bound=None,
    ...     score=0.01, run=1, policy="skip",
    ...     layers=(SpikeLayer("head.weight", 800.0, 1.5, 533.3, 42.0),), nonfinite=(), rank=None)
    >>> print(report.to_text())
    spike at step 41 (skip): norm 812 > bound 3.2; SpikeScore 0.01
      head.weight: norm 800 = 533x its median 1.5, max |g| 42
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from gradclip.clippers.spikes import Verdict
    from gradclip.clippers.targets import Target
    from gradclip.norms import GradNorms

__all__ = [
    "GradientSpikeError",
    "SpikeLayer",
    "SpikeReport",
    "SpikeWatch",
    "build_report",
    "check_cap",
]


@dataclass(frozen=True)
class SpikeLayer:
    """One parameter named by a :class:`SpikeReport`.

    Attributes:
        name: the parameter's name.
        norm: its gradient norm this step.
        median: its running median norm (``inf`` before its first accepted step).
        ratio: ``norm / median``.
        max_abs: its largest absolute gradient value on this rank (NaN where this rank holds
            no part of it).
    """

    name: str
    norm: float
    median: float
    ratio: float
    max_abs: float


@dataclass(frozen=True)
class SpikeReport:
    """The forensics of one spike (host values).

    Attributes:
        step: the detector's step number (steps it judged before this one; it goes on across
            a checkpoint).
        norm: the total gradient norm; bound: the largest one that is not a spike (``inf``
            in warm-up).
        loss, loss_bound: the rank-averaged loss and its bound (None: no loss was passed).
        score: the SpikeScore after this step; run: spikes in a row, this one included.
        policy: what the detector did (``"skip"``, ``"clip"``, ``"off"``).
        layers: up to ``top_k`` parameters by the ratio of their norm to their running
            median, largest first (:class:`SpikeLayer`).
        nonfinite: parameters whose norm is NaN/inf, in backward order (the first is where
            the NaN/inf most likely arose).
        rank: the process's rank under ``torch.distributed`` (None without it).
    """

    step: int
    norm: float
    bound: float
    loss: float | None
    loss_bound: float | None
    score: float
    run: int
    policy: str
    layers: tuple[SpikeLayer, ...]
    nonfinite: tuple[str, ...]
    rank: int | None

    def __str__(self) -> str:
        return self.to_text()

    def to_text(self) -> str:
        """A few lines for a terminal or a log (``str(report)``)."""
        head = f"spike at step {self.step} ({self.policy}): norm {self.norm:.4g} > bound {self.bound:.4g}"
        if self.loss is not None:
            head += f"; loss {self.loss:.4g} (bound {self.loss_bound:.4g})"
        head += f"; SpikeScore {self.score:.3g}"
        if self.rank is not None:
            head += f"; rank {self.rank}"
        lines = [head]
        for layer in self.layers:
            line = f"  {layer.name}: norm {layer.norm:.4g} = {layer.ratio:.3g}x its median {layer.median:.4g}"
            if not math.isnan(layer.max_abs):
                line += f", max |g| {layer.max_abs:.4g}"
            lines.append(line)
        if self.nonfinite:
            shown = ", ".join(self.nonfinite[:5]) + (" ..." if len(self.nonfinite) > 5 else "")
            lines.append(f"  non-finite (first: where it most likely arose): {shown}")
        return "\n".join(lines)

    def to_record(self) -> dict[str, Any]:
        """The report as the ``"spike"`` object of a step record (:mod:`gradclip.records`)."""
        out: dict[str, Any] = {
            "layers": {layer.name: layer.ratio for layer in self.layers},
            "max_abs": {layer.name: layer.max_abs for layer in self.layers if not math.isnan(layer.max_abs)},
            "nonfinite": list(self.nonfinite),
        }
        if self.rank is not None:
            out["rank"] = self.rank
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class GradientSpikeError(RuntimeError):
    """Raised after ``max_skips`` spikes in a row: the run has most likely diverged.

    Attributes:
        report: the :class:`SpikeReport` of the step that reached the cap.
    """

    def __init__(self, message: str, report: SpikeReport):
        super().__init__(message)
        self.report = report


def _rank() -> int | None:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


def _vector(verdict: Verdict, norms: GradNorms, medians: Tensor) -> Tensor:
    """Everything a report needs, in one float64 vector (one host read)."""
    top = verdict.top
    per = norms.per_tensor
    parts = [
        torch.stack([verdict.spike.double(), norms.total.double(), verdict.bound.double(),
                     verdict.loss.double(), verdict.loss_bound.double(), verdict.score.double(),
                     verdict.run.double(), verdict.step.double()]),
        top.double(), verdict.ratios.double(), per.index_select(0, top).double(),
        torch.exp(medians.index_select(0, top).double()),
    ]  # fmt: skip
    return torch.cat([p.to(per.device) for p in parts])


def _report(values: list[float], k: int, names: tuple[str, ...], policy: str,
            max_abs: dict[str, float], nonfinite: tuple[str, ...]) -> SpikeReport:
    _, norm, bound, loss, loss_bound, score, run, step = values[:8]
    top = [int(i) for i in values[8 : 8 + k]]
    ratios, per, medians = (values[8 + j * k : 8 + (j + 1) * k] for j in (1, 2, 3))
    layers = tuple(
        SpikeLayer(names[i], per[j], medians[j], ratios[j], max_abs.get(names[i], math.nan))
        for j, i in enumerate(top)
    )
    has_loss = not math.isnan(loss)
    return SpikeReport(
        step=int(step), norm=norm, bound=bound, loss=loss if has_loss else None,
        loss_bound=loss_bound if has_loss else None, score=score, run=int(run),
        policy=policy, layers=layers, nonfinite=nonfinite, rank=_rank(),
    )  # fmt: skip


def build_report(verdict: Verdict, norms: GradNorms, target: Target, policy: str) -> SpikeReport | None:
    """The :class:`SpikeReport` of this step if it is a spike, else None. Host reads: the
    decision, then (on a spike) the top layers' values and max-abs (a pass over those few
    tensors only)."""
    values = _vector(verdict, norms, verdict.medians.log_median).tolist()
    if not values[0]:
        return None
    k = verdict.top.numel()
    names = target.names
    local = dict(zip(target.local_names, target.grads, strict=True))
    max_abs = {}
    for i in values[8 : 8 + k]:
        grad = local.get(names[int(i)])
        if grad is not None and grad.numel():
            max_abs[names[int(i)]] = float(grad.detach().abs().max())
    bad = [] if math.isfinite(values[1]) else (~torch.isfinite(norms.per_tensor)).nonzero().flatten().tolist()
    nonfinite = tuple(names[i] for i in reversed(bad))
    return _report(values, k, names, policy, max_abs, nonfinite)


def check_cap(report: SpikeReport, cap: int) -> None:
    """Raise :class:`GradientSpikeError` if ``report`` is the ``cap``-th spike in a row."""
    if report.run < cap:
        return
    tops = ", ".join(f"{layer.name} ({layer.ratio:.3g}x its median)" for layer in report.layers)
    loss = "" if report.loss is None else f", loss {report.loss:.4g} (bound {report.loss_bound:.4g})"
    nonfinite = f"; non-finite from {report.nonfinite[0]}" if report.nonfinite else ""
    raise GradientSpikeError(
        f"{report.run} gradient spikes in a row (max_skips={cap}) at step {report.step}: norm "
        f"{report.norm:.4g} against a bound of {report.bound:.4g}{loss}{nonfinite}; top layers: "
        f"{tops or 'none'}. The run has most likely diverged, and skipping would go on forever; "
        "this step changed nothing. Restore a checkpoint or lower the learning rate; pass "
        "max_skips=None to the SpikeDetector to skip without limit.",
        report,
    )


class SpikeWatch:
    """Watches the run of spikes on an accelerator without waiting for it.

    Each step adds, on the device, whether the run reached the cap to a counter and keeps the
    values of the latest such step; then, when the copy of the previous step has arrived
    (an event says so: no wait), it reads that copy on the host and raises if the counter
    grew, and starts the next copy into pinned memory. The error comes a step or two after
    the step that reached the cap; those steps are spikes too (the run diverged), so under
    ``"skip"`` nothing changed meanwhile.
    """

    def __init__(self) -> None:
        self._device: torch.device | None = None
        self._count: Tensor | None = None
        self._info: Tensor | None = None
        self._host: Tensor | None = None
        self._event: Any = None
        self._names: tuple[str, ...] = ()
        self._policy = ""
        self._cap = 0
        self._seen = 0.0
        self._disabled = False

    def _start(self, device: torch.device) -> bool:
        try:
            event = self._event = torch.Event(device=device)
            event.record()
        except (RuntimeError, TypeError, ValueError, AttributeError):  # a backend without events
            # (also the CPU when tests run the accelerator path on it: nothing to wait for)
            self._disabled = True
            return False
        self._device = device
        return True

    def post(self, verdict: Verdict, cap: int, names: tuple[str, ...], norms: GradNorms,
             policy: str = "skip") -> None:
        """Count this step on the device and check an earlier one's copy on the host."""
        device = verdict.spike.device
        if self._disabled or (self._device != device and not self._start(device)):
            return
        trip = verdict.run >= cap
        info = _vector(verdict, norms, verdict.medians.log_median)
        if self._count is None or self._info is None or self._info.shape != info.shape:
            self._count = torch.zeros((), dtype=torch.float64, device=device)
            self._info = torch.zeros_like(info)
        self._count.add_(trip.double())
        self._info.copy_(torch.where(trip, info, self._info))
        if self._host is not None:
            if not self._event.query():
                return  # the last copy is still on its way: count on, look next step
            self.check()
        snapshot = torch.cat([self._count.reshape(1), self._info])
        if self._host is None or self._host.shape != snapshot.shape:
            self._host = torch.empty(snapshot.shape, dtype=snapshot.dtype, pin_memory=device.type == "cuda")
        self._host.copy_(snapshot, non_blocking=True)
        self._event.record()
        self._names, self._policy, self._cap = names, policy, cap

    def check(self) -> None:
        """Raise if the last copy that arrived shows a new step at the cap."""
        if self._host is None:
            return
        values = self._host.tolist()  # pinned host memory that has arrived: no device wait
        if values[0] <= self._seen:
            return
        self._seen = values[0]
        info = values[1:]
        k = (len(info) - 8) // 4
        check_cap(_report(info, k, self._names, self._policy, {}, ()), self._cap)
