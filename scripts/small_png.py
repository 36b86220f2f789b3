"""Shrinks PNG figures for docs/ in place: at most --max_width pixels wide and
quantised to a 64-colour palette (the figures are mostly grey; text and
colour maps survive 64 colours). Each file is rewritten through a temporary
name, so an interrupted run leaves every file whole.

    python scripts/small_png.py [--max_width=1200] FILE.png...
"""

import argparse
import os
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zfkeras import fileio  # noqa: E402


def shrink(path, max_width):
    with Image.open(path) as image:
        image = image.convert("RGB")
    if image.width > max_width:
        height = round(image.height * max_width / image.width)
        image = image.resize((max_width, height), Image.LANCZOS)
    image = image.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    with fileio.atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, optimize=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_width", type=int, default=1200)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    for path in args.files:
        before = os.path.getsize(path)
        shrink(path, args.max_width)
        print(f"{path}: {before // 1024} KB -> {os.path.getsize(path) // 1024} KB")


if __name__ == "__main__":
    main()
