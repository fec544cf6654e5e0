"""The Muon + AdamW problem of ``gradclip demo``: imbalanced gradients under two optimizers.

See :class:`MuonConfig`; :func:`gradclip.demo.problems.build_problem` builds it, and
:mod:`gradclip.demo.tasks` makes it the ``muon-adamw`` task.

Example:
    >>> import torch
    >>> problem = MuonProblem(MuonConfig(), seed=0, steps=10, device=torch.device("cpu"))
    >>> problem.loss(0).backward()
    >>> [type(o).__name__ for o in problem.optimizer.optimizers]
    ['Muon', 'AdamW']
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["MuonAdamW", "MuonConfig", "MuonProblem"]


@dataclass(frozen=True)
class MuonConfig:
    """A two-task model under ``torch.optim.Muon`` + AdamW, with imbalanced gradients.

    Two towers, trained on one summed loss:

    * a token classifier: context of ``context`` tokens -> embedding (``embed`` wide) ->
      hidden ``Linear`` (``hidden`` units, ReLU) -> head over the ``vocab`` tokens; the labels
      are drawn from a fixed random teacher's softmax (cross-entropy loss);
    * a regressor of ``outputs`` quantities in raw units: ``features`` N(0, 1) inputs ->
      two bias-free ``Linear`` layers (``hidden`` units, ReLU) -> times ``unit``; the targets
      are ``unit`` times a tanh teacher plus ``noise`` (MSE loss in raw units).

    The common recipe splits the optimizers: Muon (``muon_lr``) for the 2-D weights of the
    hidden layers (the classifier's hidden layer and both regressor layers), AdamW
    (``adamw_lr``) for the embedding, the classifier's head and every bias. The regressor's
    loss is in raw units, so its gradients are about ``unit ** 2`` times larger: the total
    gradient norm is ~1e7 with the defaults, and the noise keeps it there. A global clip
    coefficient (1 / 1e7 at ``max_norm=1``) shrinks the classifier's gradients under AdamW's
    and Muon's numerical floors (``eps``), so the classifier stalls; clipping the AdamW
    groups on their own norm (gradclip's default with Muon) does not.

    The metric is the classifier's KL divergence from the teacher on ``val_size`` fixed
    contexts (nats; lower is better): the regressor learns alike under every policy.

    Attributes:
        muon_lr, adamw_lr: learning rates of the two optimizers (no weight decay).
        unit: the raw unit of the regression targets.
        noise: target noise, in units of ``unit``.
        vocab, context, embed, hidden, features, outputs: sizes.
        batch: training batch size.
        val_size: number of validation contexts.
        data_seed: seed of the teachers and the validation set.
    """

    muon_lr: float = 0.02
    adamw_lr: float = 3e-3
    unit: float = 1e4
    noise: float = 0.3
    vocab: int = 64
    context: int = 4
    embed: int = 32
    hidden: int = 128
    features: int = 16
    outputs: int = 8
    batch: int = 64
    val_size: int = 2000
    data_seed: int = 4_000_003


class _TwoTower(nn.Module):
    def __init__(self, cfg: MuonConfig, gen: torch.Generator):
        super().__init__()
        self.unit = cfg.unit
        self.embed = nn.utils.skip_init(nn.Embedding, cfg.vocab, cfg.embed)
        self.hidden = nn.utils.skip_init(nn.Linear, cfg.context * cfg.embed, cfg.hidden)
        self.head = nn.utils.skip_init(nn.Linear, cfg.hidden, cfg.vocab)
        self.reg_in = nn.utils.skip_init(nn.Linear, cfg.features, cfg.hidden, bias=False)
        self.reg_out = nn.utils.skip_init(nn.Linear, cfg.hidden, cfg.outputs, bias=False)
        with torch.no_grad():
            nn.init.normal_(self.embed.weight, 0.0, 1.0, generator=gen)
            for linear in (self.hidden, self.head, self.reg_in, self.reg_out):
                bound = 1.0 / math.sqrt(linear.in_features)
                nn.init.uniform_(linear.weight, -bound, bound, generator=gen)
                if linear.bias is not None:
                    linear.bias.zero_()

    def forward(self, tokens: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
        """``tokens`` (batch, context), ``features`` (batch, features) -> (logits, values)."""
        logits = self.head(torch.relu(self.hidden(self.embed(tokens).flatten(1))))
        values = self.reg_out(torch.relu(self.reg_in(features))) * self.unit
        return logits, values


class MuonAdamW:
    """``torch.optim.Muon`` and ``torch.optim.AdamW`` stepped as one optimizer.

    ``param_groups`` is the Muon groups followed by the AdamW groups (the inner optimizers'
    own dicts), so that :meth:`gradclip.Clipper.step` sees both; the Muon groups carry
    Muon's Newton–Schulz entries, by which :func:`gradclip.muon_like` recognises them.

    Example:
        >>> import torch
        >>> w, b = torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(3))
        >>> opt = MuonAdamW(torch.optim.Muon([w]), torch.optim.AdamW([b]))
        >>> len(opt.param_groups)
        2
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.optimizers = (muon, adamw)
        self.defaults: dict[str, object] = {}

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)


class MuonProblem:
    """The problem of a :class:`MuonConfig` (see :func:`gradclip.demo.problems.build_problem`)."""

    def __init__(self, cfg: MuonConfig, seed: int, steps: int, device: torch.device):
        self.cfg, self.device = cfg, device
        data_gen = torch.Generator().manual_seed(cfg.data_seed)
        self.teacher_embed = torch.randn(cfg.vocab, 16, generator=data_gen).to(device)
        self.teacher_mix = (torch.randn(cfg.context * 16, 64, generator=data_gen) / 4).to(device)
        self.teacher_out = (torch.randn(64, cfg.vocab, generator=data_gen) * 1.5).to(device)
        self.teacher_reg = (torch.randn(cfg.features, cfg.outputs, generator=data_gen) / 4).to(device)
        val = torch.randint(0, cfg.vocab, (cfg.val_size, cfg.context), generator=data_gen)
        self.val_tokens = val.to(device)
        self.val_probs = torch.softmax(self._teacher_logits(self.val_tokens), -1)
        self.gen = torch.Generator().manual_seed(seed)
        model = _TwoTower(cfg, self.gen).to(device)
        self.model = model
        matrices = [model.hidden.weight, model.reg_in.weight, model.reg_out.weight]
        rest = [p for p in model.parameters() if all(p is not m for m in matrices)]
        self.optimizer = MuonAdamW(
            torch.optim.Muon(matrices, lr=cfg.muon_lr, weight_decay=0.0),
            torch.optim.AdamW(rest, lr=cfg.adamw_lr, weight_decay=0.0),
        )

    def _teacher_logits(self, tokens: Tensor) -> Tensor:
        mixed = torch.tanh(self.teacher_embed[tokens].flatten(1) @ self.teacher_mix)
        return mixed @ self.teacher_out

    def loss(self, step: int) -> Tensor:
        cfg = self.cfg
        tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.context), generator=self.gen)
        tokens = tokens.to(self.device)
        probs = torch.softmax(self._teacher_logits(tokens), -1).cpu()
        labels = torch.multinomial(probs, 1, generator=self.gen).squeeze(1).to(self.device)
        features = torch.randn(cfg.batch, cfg.features, generator=self.gen)
        noise = torch.randn(cfg.batch, cfg.outputs, generator=self.gen)
        features, noise = features.to(self.device), noise.to(self.device)
        targets = cfg.unit * (torch.tanh(features @ self.teacher_reg) + cfg.noise * noise)
        logits, values = self.model(tokens, features)
        return nn.functional.cross_entropy(logits, labels) + nn.functional.mse_loss(values, targets)

    def after_step(self, step: int) -> None:
        pass

    def metric(self) -> float:
        with torch.no_grad():
            features = torch.zeros(self.cfg.val_size, self.cfg.features, device=self.device)
            log_q = torch.log_softmax(self.model(self.val_tokens, features)[0], -1)
            p = self.val_probs
            return (p * (p.clamp_min(1e-30).log() - log_q)).sum(-1).mean().item()
