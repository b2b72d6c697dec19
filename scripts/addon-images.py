"""Draws the Home Assistant add-on's icon.png (128x128) and logo.png (250x100).

    python3 -m venv /tmp/img && /tmp/img/bin/pip install pillow
    /tmp/img/bin/python scripts/addon-images.py

A microphone with sound waves on a teal tile; the logo adds the name in
DejaVu Sans Bold (Debian's fonts-dejavu-core). Drawn at 4x, then scaled down.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).resolve().parents[1] / "ha-addon" / "voice_relay"
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
S = 4  # supersampling
TOP, BOTTOM = (20, 184, 166), (15, 94, 110)  # teal gradient
WHITE = (255, 255, 255, 255)
INK = (30, 41, 59, 255)


def tile(size: int) -> Image.Image:
    """A rounded square with a vertical gradient."""
    n = size * S
    grad = Image.new("RGBA", (n, n))
    px = grad.load()
    for y in range(n):
        t = y / (n - 1)
        c = tuple(round(a + (b - a) * t) for a, b in zip(TOP, BOTTOM))
        for x in range(n):
            px[x, y] = (*c, 255)
    mask = Image.new("L", (n, n), 0)
    ImageDraw.Draw(mask).rounded_rectangle((0, 0, n - 1, n - 1), radius=n // 5, fill=255)
    out = Image.new("RGBA", (n, n), (0, 0, 0, 0))
    out.paste(grad, (0, 0), mask)
    return out


def microphone(img: Image.Image) -> None:
    """White microphone, slightly left of centre, with two sound arcs on the right."""
    d = ImageDraw.Draw(img)
    n = img.width
    u = n / 128  # drawing unit: one pixel of the 128 px icon
    cx = 54 * u
    w = round(7 * u)
    d.rounded_rectangle((cx - 14 * u, 24 * u, cx + 14 * u, 72 * u), radius=14 * u, fill=WHITE)
    d.arc((cx - 24 * u, 38 * u, cx + 24 * u, 86 * u), start=0, end=180, fill=WHITE, width=w)
    d.line((cx, 86 * u, cx, 100 * u), fill=WHITE, width=w)
    d.rounded_rectangle((cx - 16 * u, 98 * u, cx + 16 * u, 105 * u), radius=3 * u, fill=WHITE)
    for r, alpha in ((24, 255), (38, 170)):
        box = (cx + 14 * u - r * u, 50 * u - r * u, cx + 14 * u + r * u, 50 * u + r * u)
        d.arc((box[0] + 20 * u, box[1], box[2] + 20 * u, box[3]), start=-40, end=40,
              fill=(255, 255, 255, alpha), width=round(6 * u))


def icon(size: int) -> Image.Image:
    img = tile(size)
    microphone(img)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def logo() -> Image.Image:
    w, h = 250, 100
    big = Image.new("RGBA", (w * S, h * S), (0, 0, 0, 0))
    mark = tile(84)
    microphone(mark)
    big.paste(mark, (8 * S, 8 * S), mark)
    d = ImageDraw.Draw(big)
    font = ImageFont.truetype(FONT, 30 * S)
    d.text((102 * S, 20 * S), "Voice", font=font, fill=INK)
    d.text((102 * S, 52 * S), "Relay", font=font, fill=(15, 118, 110, 255))
    return big.resize((w, h), Image.Resampling.LANCZOS)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    icon(128).save(OUT / "icon.png", optimize=True)
    logo().save(OUT / "logo.png", optimize=True)
    print(f"wrote {OUT / 'icon.png'} and {OUT / 'logo.png'}")


if __name__ == "__main__":
    main()
