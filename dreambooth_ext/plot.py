"""A loss curve drawn with PIL, so neither the demo nor the tab needs a plotting library."""

from typing import Sequence


def loss_plot(losses: Sequence[Sequence[float]], width: int = 560, height: int = 220):
    """Raw loss (light) and its moving average (dark) against the step."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    left, right, top, bottom = 52, width - 12, 12, height - 24
    draw.rectangle([left, top, right, bottom], outline=(170, 170, 170))
    if not losses:
        draw.text((left + 10, top + 10), "the loss appears here once training steps run", fill=(90, 90, 90), font=font)
        return img
    steps, values = [p[0] for p in losses], [p[1] for p in losses]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(values), max(values)
    pad = (y1 - y0) * 0.05 or 0.5
    y0, y1 = y0 - pad, y1 + pad

    def xy(step, value):
        return (left + (step - x0) / (x1 - x0) * (right - left), bottom - (value - y0) / (y1 - y0) * (bottom - top))

    for i in range(5):  # horizontal grid with value labels
        v = y0 + (y1 - y0) * i / 4
        y = xy(x0, v)[1]
        draw.line([left, y, right, y], fill=(232, 232, 232))
        draw.text((4, y - 6), f"{v:.3g}", fill=(90, 90, 90), font=font)
    draw.text((left, bottom + 6), f"step {int(x0)}", fill=(90, 90, 90), font=font)
    end_label = f"step {int(steps[-1])}"
    draw.text((right - 7 * len(end_label), bottom + 6), end_label, fill=(90, 90, 90), font=font)
    raw = [xy(s, v) for s, v in zip(steps, values)]
    smooth, avg = [], values[0]
    for s, v in zip(steps, values):
        avg = 0.9 * avg + 0.1 * v
        smooth.append(xy(s, avg))
    if len(raw) == 1:
        x, y = raw[0]
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(40, 90, 200))
    else:
        draw.line(raw, fill=(160, 190, 240), width=1)
        draw.line(smooth, fill=(30, 80, 190), width=2)
    return img
