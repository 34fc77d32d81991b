"""Draw icon.png, the pack's icon for ComfyUI Manager / the Comfy Registry ([tool.comfy] Icon).

    python scripts/make_icon.py

A square 256x256 PNG: a head in profile speaking (sound arcs), over a sparse grid of reference
tokens of which a few are lit (the top-k blocks one query attends to). Drawn with PIL, no assets.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 256
SCALE = 4  # drawn at 4x and downsampled: smooth edges without an anti-aliasing library
OUT = Path(__file__).resolve().parent.parent / "icon.png"


def main() -> None:
    big = SIZE * SCALE
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    s = SCALE
    draw.rounded_rectangle((0, 0, big - 1, big - 1), radius=48 * s, fill=(22, 27, 38, 255))
    # The sparse reference: an 8x8 grid of token dots, a few of them selected.
    lit = {(1, 5), (2, 6), (5, 1), (6, 2), (6, 6), (3, 1)}
    for row in range(8):
        for column in range(8):
            x, y = (28 + column * 29) * s, (28 + row * 29) * s
            radius = (5 if (row, column) in lit else 3) * s
            colour = (120, 220, 180, 255) if (row, column) in lit else (70, 82, 104, 255)
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    # The head, facing right: skull, face, chin, neck.
    head = [(70, 200), (70, 168), (58, 150), (56, 118), (64, 84), (86, 60), (118, 50), (146, 54), (166, 70),
            (176, 92), (178, 110), (190, 130), (180, 136), (182, 150), (176, 156), (178, 170), (168, 176),
            (150, 178), (146, 200)]
    draw.polygon([(x * s, y * s) for x, y in head], fill=(236, 238, 244, 255))
    # The open mouth and the eye.
    draw.ellipse((166 * s, 146 * s, 180 * s, 156 * s), fill=(22, 27, 38, 255))
    draw.ellipse((150 * s, 96 * s, 160 * s, 106 * s), fill=(22, 27, 38, 255))
    # Speech: three arcs in front of the mouth.
    for index, radius in enumerate((20, 34, 48)):
        box = ((190 - radius) * s, (150 - radius) * s, (190 + radius) * s, (150 + radius) * s)
        draw.arc(box, start=-40, end=40, fill=(120, 220, 180, 255 - 50 * index), width=7 * s)
    image.resize((SIZE, SIZE), Image.LANCZOS).save(OUT, optimize=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
