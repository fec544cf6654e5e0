"""Counts of a pytest JUnit XML report: passed / failed / errors / skipped, with the failures
and the skip reasons, as ``tests.json`` and a short text (for ``run.sh``).

Run: ``python benchmarks/gpu/tests_summary.py JUNIT_XML OUT_DIR [--label TEXT] [--left-out TEXT]``.

Example:
    >>> import tempfile, pathlib
    >>> from gpu import tests_summary
    >>> xml = ('<testsuites><testsuite><testcase classname="t" name="a"/>'
    ...        '<testcase classname="t" name="b"><skipped message="needs a CUDA device"/></testcase>'
    ...        '</testsuite></testsuites>')
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "junit.xml"; _ = path.write_text(xml)
    >>> s = tests_summary.summarize(path)
    >>> s["passed"], s["skipped"], s["skip_reasons"]
    (1, 1, {'needs a CUDA device': 1})
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

__all__ = ["main", "render", "summarize"]


def summarize(junit: Path) -> dict:
    """The counts and details of one JUnit XML file."""
    root = ET.parse(junit).getroot()
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    failures: list[dict[str, str]] = []
    for case in root.iter("testcase"):
        if not case.get("name"):  # the test an interrupt (the time budget) cut short
            continue
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                text = (child.get("message") or child.text or "").strip().splitlines()
                failures.append({"test": name, "kind": child.tag, "message": (text or [""])[0][:300]})
            elif child.tag == "skipped":
                outcome = "skipped"
                reasons[(child.get("message") or "").strip()[:200]] += 1
        counts[outcome] += 1
    return {"passed": counts["passed"], "failed": counts["failed"], "errors": counts["errors"],
            "skipped": counts["skipped"], "total": sum(counts.values()),
            "skip_reasons": dict(reasons.most_common()), "failures": failures}


def render(summary: dict) -> str:
    lines = [f"{summary['passed']} passed, {summary['failed']} failed, {summary['errors']} errors, "
             f"{summary['skipped']} skipped (of {summary['total']})"]
    for text in summary.get("notes", []):
        lines.append(f"  note: {text}")
    for reason, n in summary["skip_reasons"].items():
        lines.append(f"  skipped x{n}: {reason}")
    for f in summary["failures"][:40]:
        lines.append(f"  {f['kind'].upper()} {f['test']}: {f['message']}")
    if len(summary["failures"]) > 40:
        lines.append(f"  ... and {len(summary['failures']) - 40} more (tests.json)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--label", default="")
    parser.add_argument("--note", action="append", default=[], help="a line to keep with the counts")
    args = parser.parse_args(argv)
    if args.junit.exists():
        summary = summarize(args.junit)
    else:
        summary = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "total": 0,
                   "skip_reasons": {}, "failures": [{"test": "(the test run)", "kind": "error",
                                                     "message": "no JUnit report: pytest did not finish"}]}
        summary["errors"] = 1
    summary["label"], summary["notes"] = args.label, args.note
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tests.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = (f"{args.label}\n" if args.label else "") + render(summary)
    (args.out / "tests.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
