"""Regenerate the demo media in media/: a short voice prompt and a one-page FAX.

    .venv/bin/python tools/make_sample_media.py

sample-voice.wav: 1.2 s of two tones (8 kHz mono 16-bit PCM, what the PBX plays).
sample-fax-page.png: an A4 page at 100 dpi with a heading bar, ruled lines and a box, enough to
see the FAX conversion keep proportions and black-and-white detail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw

MEDIA = Path(__file__).resolve().parent.parent / "media"


def voice(path: Path) -> None:
    rate = 8000
    t = np.arange(int(0.6 * rate)) / rate
    envelope = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.02)  # no clicks at the edges
    tones = [0.4 * envelope * np.sin(2 * np.pi * f * t) for f in (660.0, 880.0)]
    soundfile.write(path, np.concatenate(tones), rate, subtype="PCM_16", format="WAV")


def fax_page(path: Path) -> None:
    width, height = 827, 1169  # A4 at 100 dpi
    page = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(page)
    draw.rectangle((60, 60, width - 60, 140), fill=0)
    for y in range(220, height - 200, 40):
        draw.line((80, y, width - 80, y), fill=0, width=2)
    draw.rectangle((width - 300, height - 180, width - 80, height - 80), outline=0, width=4)
    page.save(path, format="PNG", dpi=(100, 100), optimize=True)


if __name__ == "__main__":
    MEDIA.mkdir(exist_ok=True)
    voice(MEDIA / "sample-voice.wav")
    fax_page(MEDIA / "sample-fax-page.png")
    print(f"wrote {MEDIA / 'sample-voice.wav'} and {MEDIA / 'sample-fax-page.png'}")
