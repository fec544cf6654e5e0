"""Find ``max_norm`` on your own model: short runs under candidate thresholds, one snapshot.

The package, read in order: :mod:`~gradclip.tune.snapshot` (the exact copy of a training
state), :mod:`~gradclip.tune.results` (what a search returns), :mod:`~gradclip.tune.scoring`
(how trials are judged) and :mod:`~gradclip.tune.search` (:func:`find_max_norm`).

:func:`find_max_norm` answers "1 or 10?" the way a learning-rate range test answers "which
learning rate?": it snapshots the training state, trains a short horizon from it under each
candidate threshold on the same batches, puts the state back after each, and keeps the
threshold whose loss went lowest, with the evidence (:class:`MaxNormSearch`).

Candidates: the recommended default (:class:`~gradclip.AdaptiveClip`, run first: its
pre-clip norms are the "norms seen"), thresholds log-spaced around those norms (round
values, two per decade, from 1/100 to 10 times their median), and no clipping.

Short-horizon bias, and the guards against it. A few dozen steps are not a training run:
a threshold that looks best early can be worse later (a lower threshold acts as a smaller
learning rate: it may win while the loss is noisy and lose once progress matters, or the
reverse). The finder therefore

1. scores each candidate by its (geometric) mean loss over the last half of the horizon (a
   smoothed trend, not the last, noisy, loss), compared step by step on the same batches
   as loss ratios, with a standard error from block means: differences within two
   standard errors (or under 0.5%) are ties;
2. runs a second, shorter confirmation round on the next batches, starting from where the
   best candidate of the first round ended (later in training), among the best candidates
   of the first round; the pick must hold there too;
3. keeps :class:`~gradclip.AdaptiveClip` (whose warm-up makes it slow in any short run,
   by design) when no fixed threshold is clearly better than its neighbours in both rounds
   on steady training (the best candidate's loss moved by less than ``SETTLED`` = 1.5x
   across round 1). At the start of training a short run favours what gains fastest first:
   on the violent RNN a threshold of 0.1 beat every other in both rounds on two seeds of
   twelve and was 1.6-2.8x worse than the default over the run (a third such win on a held-out
   seed of the moderate RNN: 2.2x), so a clear win there keeps the default too. Unless the
   default lost beyond noise in round 1 on steady training: then the gentlest of round 1's
   best candidates (:func:`~gradclip.tune.scoring.decide`). A default whose loss became
   non-finite is never kept;
4. when every candidate of round 1 ties on steady training (the default and no clipping
   included: within the horizon the threshold made no difference, as with AdamW on a
   well-behaved model), keeps the lowest threshold that clipped none of its steps and lies
   at least ``HEADROOM`` = 3x above the largest norm seen (a run's first norms are often not
   its largest: they rise with a learning-rate warm-up): it changes nothing that was
   measured and still cuts a spike beyond the horizon.

The finder changes the default only when the evidence says so, and says how sure it is; a
warning says when round 1 saw the start of training, or ran within a learning-rate warm-up
(a learning rate grew ``WARMING`` = 1.5x or more over it), where it is no guide to the run.

Everything the finder touches is restored exactly (the model's parameters, buffers and
gradients, the optimizers (several, as ``[muon, adamw]``), schedulers and GradScaler, the
RNGs and the data generators you name): training continues as if the finder had never run,
except for the batches an iterator gave it. See :mod:`gradclip.tune.snapshot`.

Example:
    >>> import torch, gradclip
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Linear(8, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> data = [(torch.randn(16, 8), torch.randn(16, 1)) for _ in range(30)]
    >>> def train_step(batch, clip):
    ...     x, y = batch
    ...     opt.zero_grad()
    ...     loss = torch.nn.functional.mse_loss(model(x), y)
    ...     loss.backward()
    ...     clip(model)               # between backward() and step(), as a clipper
    ...     opt.step()
    ...     return loss
    >>> before = model.weight.detach().clone()
    >>> search = gradclip.find_max_norm(model, opt, train_step, data, horizon=20)
    >>> search.choice.name in {c.candidate.name for c in search.rounds[0].trials}
    True
    >>> torch.equal(model.weight, before)   # the model is as it was
    True
"""

from gradclip.tune.results import Candidate, Cost, MaxNormSearch, Round, Trial
from gradclip.tune.scoring import (
    ABOVE,
    BELOW,
    BLOCKS,
    CONFIRM,
    CONFIRM_CANDIDATES,
    PER_DECADE,
    SETTLED,
    TAIL,
    TOLERANCE,
    Z,
    log_grid,
)
from gradclip.tune.search import StepError, TrialClip, find_max_norm, render_text
from gradclip.tune.snapshot import SnapshotError

__all__ = [
    "ABOVE",
    "BELOW",
    "BLOCKS",
    "CONFIRM",
    "CONFIRM_CANDIDATES",
    "PER_DECADE",
    "SETTLED",
    "TAIL",
    "TOLERANCE",
    "Candidate",
    "Cost",
    "MaxNormSearch",
    "Round",
    "SnapshotError",
    "StepError",
    "Trial",
    "TrialClip",
    "Z",
    "find_max_norm",
    "log_grid",
    "render_text",
]
