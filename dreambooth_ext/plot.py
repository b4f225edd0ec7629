"""Loss and monitor curves drawn with PIL, so neither the demo nor the tab needs a plotting library."""

from typing import Optional, Sequence


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


GREY, GRID = (90, 90, 90), (232, 232, 232)
FIDELITY, DRIFT, LIMIT, BEST = (30, 80, 190), (220, 120, 20), (200, 40, 40), (30, 150, 60)
CLIP_COLOURS = ((30, 80, 190), (130, 60, 170), (220, 120, 20))


def monitor_plot(points: Sequence, drift_limit: float, best: Optional[int] = None, width: int = 560):
    """The training monitor's curves against the step (points as in train/monitor.py): fidelity and class
    drift as shares of the base's distance to the instances, the drift limit, the best step; with CLIP
    scores, a second panel with CLIP-I, CLIP-T and the class's CLIP-I to the base."""
    from PIL import Image, ImageDraw, ImageFont

    clip = any(getattr(p, "clip_i", None) is not None for p in points)
    height = 400 if clip else 220
    img = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    left, right = 52, width - 12
    if not points:
        draw.rectangle([left, 12, right, height - 24], outline=(170, 170, 170))
        draw.text((left + 10, 22), "the monitor's fidelity and class drift appear here at each sample step",
                  fill=GREY, font=font)
        return img
    points = sorted(points, key=lambda p: p.step)
    steps = [p.step for p in points]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    panels = [(12, 196 if clip else height - 24)] + ([(214, height - 24)] if clip else [])
    latent = [("fidelity (1 = the base's distance)", FIDELITY, [(p.step, p.fidelity) for p in points]),
              ("class drift", DRIFT, [(p.step, p.drift) for p in points])]
    _panel(draw, font, (left, panels[0][0], right, panels[0][1]), (x0, x1), latent,
           limit=(f"drift limit {drift_limit:g}", drift_limit), best=best)
    if clip:
        names = ("CLIP-I", "CLIP-T", "class CLIP-I (1 = the base's)")
        series = [(n, c, [(p.step, getattr(p, a)) for p in points if getattr(p, a, None) is not None])
                  for n, c, a in zip(names, CLIP_COLOURS, ("clip_i", "clip_t", "class_clip_i"))]
        _panel(draw, font, (left, panels[1][0], right, panels[1][1]), (x0, x1), [s for s in series if s[2]],
               best=best, best_label=False)
    bottom = panels[-1][1]
    draw.text((left, bottom + 6), f"step {int(x0)}", fill=GREY, font=font)
    end_label = f"step {int(steps[-1])}"
    draw.text((right - 7 * len(end_label), bottom + 6), end_label, fill=GREY, font=font)
    return img


def _panel(draw, font, box, x_range, series, limit=None, best=None, best_label=True):
    """One framed chart: value grid, a line (or a dot) per series, a dashed limit line, the best step."""
    left, top, right, bottom = box
    x0, x1 = x_range
    draw.rectangle([left, top, right, bottom], outline=(170, 170, 170))
    values = [v for _n, _c, pts in series for _s, v in pts] + ([limit[1]] if limit else [])
    y0, y1 = min(values), max(values)
    pad = (y1 - y0) * 0.08 or 0.5
    y0, y1 = y0 - pad, y1 + pad

    inner = top + 12 * len(series) + 6  # the legend's rows stay above the curves

    def xy(step, value):
        return (left + (step - x0) / (x1 - x0) * (right - left), bottom - (value - y0) / (y1 - y0) * (bottom - inner))

    for i in range(5):
        v = y0 + (y1 - y0) * i / 4
        y = xy(x0, v)[1]
        draw.line([left, y, right, y], fill=GRID)
        draw.text((4, y - 6), f"{v:.3g}", fill=GREY, font=font)
    if limit is not None:
        y = xy(x0, limit[1])[1]
        for x in range(int(left), int(right), 8):  # dashed
            draw.line([x, y, min(x + 4, right), y], fill=LIMIT, width=1)
        draw.text((right - 6 * len(limit[0]) - 4, y - 12), limit[0], fill=LIMIT, font=font)
    if best is not None and x0 <= best <= x1:
        x = xy(best, y0)[0]
        draw.line([x, top, x, bottom], fill=BEST, width=1)
        label = f"best step {best}" if best_label else ""
        draw.text((min(x + 3, right - 6 * len(label) - 2), bottom - 14), label, fill=BEST, font=font)
    for _name, colour, pts in series:
        line = [xy(s, v) for s, v in pts]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    y = top + 4
    for name, colour, _pts in series:  # legend
        draw.rectangle([left + 6, y + 3, left + 14, y + 9], fill=colour)
        draw.text((left + 18, y), name, fill=(40, 40, 40), font=font)
        y += 12
