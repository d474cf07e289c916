"""One labelled image of many: column labels on top, row labels on the left (the validation grids, the app's grids).

Small models draw small images: cells are enlarged (nearest neighbour, pixels stay sharp) to at least `MIN_CELL`
px so the labels fit and the images can be compared by eye.
"""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 128
LABEL_WIDTH = 160
HEADER_LINES = 4
FONT_SIZE = 12
BACKGROUND, INK = (255, 255, 255), (20, 20, 20)


def _font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, width_px: int, max_lines: int) -> None:
    chars = max(4, width_px // (FONT_SIZE * 6 // 10))
    lines = [wrapped for line in text.splitlines() for wrapped in textwrap.wrap(line, chars)][:max_lines]
    draw.multiline_text(xy, "\n".join(lines), fill=INK, font=_font(), spacing=2)


def labelled_grid(images: list[list[Image.Image]], row_labels: list[str], column_labels: list[str]) -> Image.Image:
    """One image: `column_labels` on top, `row_labels` on the left, `images[row][column]` in the cells."""
    rows, columns = len(images), len(images[0])
    side = max(images[0][0].size)
    cell = side * max(1, -(-MIN_CELL // side))  # a whole multiple of the image side: no blurry resampling
    header = HEADER_LINES * (FONT_SIZE + 2) + 8
    grid = Image.new("RGB", (LABEL_WIDTH + columns * (cell + 4), header + rows * (cell + 4)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(column_labels):
        _text(draw, (LABEL_WIDTH + column * (cell + 4) + 2, 4), label, cell, HEADER_LINES)
    for row, label in enumerate(row_labels):
        top = header + row * (cell + 4)
        _text(draw, (4, top + 4), label, LABEL_WIDTH - 8, cell // (FONT_SIZE + 2))
        for column, image in enumerate(images[row]):
            grid.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (LABEL_WIDTH + column * (cell + 4), top))
    return grid
