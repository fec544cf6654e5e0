"""Regenerate the README's pictures: the demo page, its diagnostics report, the loss plot.

    python docs/screenshots.py            # about 2 minutes: a quick demo and a full one

``docs/demo-page.png`` and ``docs/report-page.png`` are headless-Chromium screenshots of the
pages ``gradclip demo --quick`` writes (seed 0), trimmed, scaled to 1040 px and reduced to 256
colours so that each stays well under 400 KB; ``docs/demo-loss.png`` is the loss plot of the
full ``gradclip demo`` (the run whose table the README prints). Needs the demo's extras
(``pip install 'gradclip[demo]'``, which bring Pillow with matplotlib) and Chromium.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageChops

DOCS = Path(__file__).resolve().parent
WIDTH = 1040


def demo(out: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "gradclip", "demo", "--out", str(out), *args],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def screenshot(page: Path, png: Path, profile: Path) -> None:
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                    "google-chrome"))))  # fmt: skip
    raw = png.with_suffix(".raw.png")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={profile}", f"--screenshot={raw}",
                    "--window-size=1280,4000", page.as_uri()],
                   check=True, capture_output=True)  # fmt: skip
    image = Image.open(raw).convert("RGB")
    content = ImageChops.difference(image, Image.new("RGB", image.size, "white")).getbbox()
    image = image.crop((0, 0, image.width, min(image.height, content[3] + 30)))
    image = image.resize((WIDTH, round(image.height * WIDTH / image.width)), Image.LANCZOS)
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
        png, optimize=True)
    raw.unlink()


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="gradclip-docs-"))
    demo(work / "quick", "--quick")
    screenshot(work / "quick" / "index.html", DOCS / "demo-page.png", work / "profile")
    screenshot(work / "quick" / "adaptive-report" / "report.html", DOCS / "report-page.png",
               work / "profile")  # fmt: skip
    demo(work / "full")
    shutil.copyfile(work / "full" / "loss.png", DOCS / "demo-loss.png")
    shutil.rmtree(work)
    for name in ("demo-page.png", "report-page.png", "demo-loss.png"):
        print(f"{DOCS / name}: {(DOCS / name).stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
