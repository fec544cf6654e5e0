"""The private-torch wrappers: the fast parameter walk equals ``named_parameters()``."""

from __future__ import annotations

import torch
from torch import nn

from gradclip import _foreach


def same_walk(module: nn.Module) -> None:
    ours = _foreach.named_parameters(module)
    theirs = list(module.named_parameters())
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    assert all(a is b for (_, a), (_, b) in zip(ours, theirs, strict=True))


def test_walk_matches_torch_on_real_models():
    same_walk(nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=1,
                             dim_feedforward=32, batch_first=True))
    same_walk(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.LSTM(4, 5)))
    same_walk(nn.Linear(2, 2))
    same_walk(nn.Module())


def test_walk_counts_shared_modules_and_tied_weights_once():
    shared = nn.Linear(3, 3)
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # tied
    model = nn.Sequential(emb, shared, nn.Sequential(shared, nn.ReLU()), head)
    model.register_parameter("none", None)
    same_walk(model)
    assert len(_foreach.named_parameters(model)) == 3


class Renaming(nn.Module):
    """A wrapper that cleans its parameter names, as FSDP1 does."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self._wrapped = inner

    def named_parameters(self, *args, **kwargs):
        for name, p in super().named_parameters(*args, **kwargs):
            yield name.replace("_wrapped.", ""), p


class OwnModules(nn.Module):
    """A child whose ``named_modules`` hides a submodule."""

    def __init__(self):
        super().__init__()
        self.seen = nn.Linear(1, 1)
        self.hidden = nn.Linear(1, 1)

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        yield prefix, self
        yield from self.seen.named_modules(memo, prefix + ".seen", remove_duplicate)


def test_walk_defers_to_a_customised_walk():
    same_walk(Renaming(nn.Sequential(nn.Linear(2, 2))))
    assert [n for n, _ in _foreach.named_parameters(Renaming(nn.Linear(1, 1)))] == ["weight", "bias"]
    model = nn.Sequential(nn.Linear(1, 1), OwnModules())
    same_walk(model)
    assert len(_foreach.named_parameters(model)) == 4  # the hidden Linear is not listed


def test_walk_sees_parameters_replaced_in_place():
    model = nn.Sequential(nn.Linear(2, 2))
    _foreach.named_parameters(model)
    model[0]._parameters["weight"] = nn.Parameter(torch.zeros(2, 2))  # as FSDP2 does
    del model[0].bias
    same_walk(model)
