"""Every marked snippet of the README runs as written: the "Integrations" section's, the
monitor's of "Seeing what clipping does", and the spike detector's.

A snippet is the ```python block right after a ``<!-- readme-test: NAME -->`` line.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
SNIPPET = re.compile(r"<!-- readme-test: ([\w-]+) -->\n```python\n(.*?)\n```", re.S)
EXPECTED = {
    "lightning",
    "huggingface-trainer",
    "accelerate",
    "torch-amp-fp16",
    "torch-amp-bf16-fused",
    "monitor",
    "spikes",
}


def _snippets() -> dict[str, str]:
    return dict(SNIPPET.findall(README.read_text(encoding="utf-8")))


def test_every_framework_has_a_snippet() -> None:
    assert set(_snippets()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_snippet_runs(name: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the Trainer writes into ./gradclip-out
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # and tempfile.mkdtemp() here
    code = compile(_snippets()[name], f"README.md:{name}", "exec")
    namespace: dict[str, object] = {"__name__": f"readme_{name.replace('-', '_')}"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the frameworks' advice for a tiny CPU run
        exec(code, namespace)
    if "stats" in namespace:
        assert namespace["stats"] is not None  # the loop ended on an optimizer step
    if "clipper" in namespace:
        assert int(namespace["clipper"].steps) > 0
