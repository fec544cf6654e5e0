"""The private-torch wrappers: the fast parameter walk equals ``named_parameters()``; the
declared torch range and its warning."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
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


# ---------------------------------------------------------------------------------------
# the declared torch range: pyproject.toml, SUPPORTED_TORCH and the warning agree

ROOT = Path(__file__).resolve().parents[1]


def _range_text() -> str:
    (low, high) = _foreach.SUPPORTED_TORCH
    return f">={low[0]}.{low[1]},<{high[0]}.{high[1]}"


def test_pyproject_declares_the_supported_range() -> None:
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python >= 3.11)
    (dependencies,) = re.findall(r"^dependencies = (\[.*\])$", text, flags=re.M)
    assert ast.literal_eval(dependencies) == [f"torch{_range_text()}"]


@pytest.mark.parametrize(
    ("version", "warns"),
    [("2.5.1", True), ("2.7.1+cu126", True), ("2.16.0.dev20261201", True), ("3.0.0", True),
     ("nightly", True), ("2.8.0", False), ("2.8.0a0+5228986c39.nv25.06", False),
     ("2.15.0+cu130", False), (torch.__version__, False)],
)
def test_a_torch_outside_the_range_warns_once_naming_it(monkeypatch, version, warns) -> None:
    monkeypatch.setattr(_foreach, "_version_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _foreach.check_torch_version(version)
        _foreach.check_torch_version(version)
    assert len(caught) == warns
    if warns:
        assert caught[0].category is _foreach.UntestedTorchWarning
        assert f"torch{_range_text()}" in str(caught[0].message)
        assert f"torch {version} is installed" in str(caught[0].message)


def _import_gradclip_under(version: str) -> list[str]:
    """Import gradclip in a new interpreter whose torch reports ``version``; its warnings."""
    code = (
        "import warnings, torch\n"
        f"torch.__version__ = {version!r}\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import gradclip, gradclip.functional\n"
        "    gradclip._foreach.check_torch_version()\n"
        "print([f'{w.category.__name__}: {w.message}' for w in caught])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    return [w for w in ast.literal_eval(done.stdout.strip().splitlines()[-1])
            if w.startswith("UntestedTorchWarning")]


def test_importing_gradclip_warns_once_under_an_untested_torch() -> None:
    (warning,) = _import_gradclip_under("2.5.1")
    assert f"gradclip supports torch{_range_text()}" in warning and "2.5.1" in warning
    assert _import_gradclip_under("2.13.0") == []


# ---------------------------------------------------------------------------------------
# no_grad: torch.no_grad() without its Python objects


@_foreach.no_grad
def _double(t: torch.Tensor, fail: bool = False) -> torch.Tensor:
    if fail:
        raise ValueError("fail")
    return t * 2


@pytest.mark.parametrize("enabled", [True, False])
def test_no_grad_restores_the_grad_mode_it_found(enabled: bool) -> None:
    x = torch.ones(2, requires_grad=True)
    with torch.set_grad_enabled(enabled):
        y = _double(x)
        assert not y.requires_grad and y.grad_fn is None
        assert torch.is_grad_enabled() is enabled
        with pytest.raises(ValueError, match="fail"):
            _double(x, fail=True)
        assert torch.is_grad_enabled() is enabled  # restored on the way out of an error too
    assert _double.__name__ == "_double" and _double.__wrapped__ is not None


def test_default_group_exists_follows_torch_distributed() -> None:
    """The private record read by default_group_exists agrees with torch's public query,
    before, during and after a (one-process, gloo) process group."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("no torch.distributed")
    assert _foreach.default_group_exists() is dist.is_initialized() is False
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert _foreach.default_group_exists() is dist.is_initialized() is True
    finally:
        dist.destroy_process_group()
    assert _foreach.default_group_exists() is dist.is_initialized() is False
