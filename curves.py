"""Training curves: the metrics.jsonl of one or several train.py runs (metrics.py) drawn side by side to one PNG, a
panel per number (training losses, validation losses, the latent channel's cosine and PCA-space RelMSE, the
fed-back latent / vision-embedding norm ratio of paper Fig. 2b, the generation rates, gradient norm, learning rate,
throughput), a colour per run. PIL only (no plotting library to install); panels of numbers no run has are left out.

    python curves.py out/gap out/dense --out curves.png                 # runs by directory (or metrics.jsonl path)
    python curves.py out/gap --keys loss_lm,val_loss_lm,val_latent_cos --out lm.png

A run still training can be drawn (its OUT_DIR.logs/metrics.jsonl, read up to its last whole line).
"""
import dataclasses
import io
import math
import os
from dataclasses import field

from PIL import Image, ImageDraw

from common import DataError, atomic_write_bytes, parse_config, run_main, user_file
from metrics import METRICS, logs_dir, read_metrics

# the panels drawn by default, in order (those no run has are left out)
PANELS = ("loss_lm", "val_loss_lm", "loss_latent", "val_loss_latent", "loss_align", "val_loss_align",
          "val_latent_cos", "val_latent_pca_cos", "val_latent_relmse", "val_norm_ratio", "val_span_open",
          "val_well_formed", "val_accuracy", "grad_norm", "lr", "tokens_per_s")
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
PANEL_W, PANEL_H, MARGIN = 420, 260, (64, 30, 16, 34)  # margin: left, top, right, bottom


@dataclasses.dataclass
class CurvesConfig:
    """Draw the training curves of one or several runs (their metrics.jsonl) to a PNG."""
    runs: tuple = field(default=(), metadata={"help": "run directories (out_dir of train.py) or metrics.jsonl files",
                                              "positional": True, "nargs": "+"})
    out: str = field(default="curves.png", metadata={"help": "PNG to write"})
    keys: str = field(default="", metadata={"help": "comma-separated numbers to draw (default: every known one the "
                                                    "runs have, e.g. loss_lm, val_latent_cos)"})
    columns: int = field(default=3, metadata={"help": "panels per row", "range": (1, 12)})


def load_run(path):
    """(name, records) of a run directory or metrics file; a DataError naming it when it has none. A run directory
    still training has no metrics.jsonl yet: its live one in OUT_DIR.logs is read."""
    file = path
    if os.path.isdir(path) or not os.path.exists(path):
        file = os.path.join(path, METRICS)
        if not os.path.exists(file) and os.path.exists(os.path.join(logs_dir(path), METRICS)):
            file = os.path.join(logs_dir(path), METRICS)
    records = read_metrics(user_file(file, "metrics file", " (train.py writes OUT_DIR/metrics.jsonl)"))
    name = os.path.basename(os.path.dirname(os.path.abspath(file)) if file.endswith(METRICS) else file)
    name = name[:-len(".logs")] if name.endswith(".logs") else name
    return name, records


def series(records, key):
    """[(step, value)] of `key` in a run's records, in step order."""
    return sorted((r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))
                  and math.isfinite(r[key]))


def nice_ticks(lo, hi, n=4):
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def draw_panel(d, x0, y0, key, runs):
    """One panel at (x0, y0): `key` of every run that has it, a line with dots (sparse validation points show)."""
    left, top, right, bottom = MARGIN
    X0, X1, Y0, Y1 = x0 + left, x0 + PANEL_W - right, y0 + top, y0 + PANEL_H - bottom
    d.text((X0, y0 + 8), key, fill="black")
    pts = {i: series(records, key) for i, (_, records) in enumerate(runs)}
    every = [p for s in pts.values() for p in s]
    steps, values = [p[0] for p in every], [p[1] for p in every]
    # a log axis when the values are positive and span more than two decades (losses, RelMSE early on)
    log = min(values) > 0 and max(values) / min(values) > 100
    f = (lambda v: math.log10(v)) if log else (lambda v: v)  # noqa: E731
    lo, hi = f(min(values)), f(max(values))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    s_lo, s_hi = min(steps), max(max(steps), min(steps) + 1)
    X = lambda s: X0 + (X1 - X0) * (s - s_lo) / (s_hi - s_lo)  # noqa: E731
    Y = lambda v: Y1 - (Y1 - Y0) * (f(v) - lo) / (hi - lo)  # noqa: E731
    d.rectangle([X0, Y0, X1, Y1], outline=(160, 160, 160))
    for t in nice_ticks(lo, hi):
        v = 10 ** t if log else t
        d.line([X0 - 4, Y(v), X0, Y(v)], fill="black")
        d.text((x0 + 4, Y(v) - 6), f"{v:.3g}", fill="black")
    for s in nice_ticks(s_lo, s_hi):
        d.line([X(s), Y1, X(s), Y1 + 4], fill="black")
        d.text((X(s) - 8, Y1 + 8), str(int(s)), fill="black")
    if log:
        d.text((X1 - 40, y0 + 8), "log y", fill=(120, 120, 120))
    for i, s in pts.items():
        c = COLORS[i % len(COLORS)]
        xy = [(X(a), Y(b)) for a, b in s]
        if len(xy) > 1:
            d.line(xy, fill=c, width=2)
        if len(xy) <= 60:  # dots where points are few (validation); a dense training curve is a line
            for x, y in xy:
                d.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=c)


def draw(runs, keys, columns=3):
    """The PNG (a PIL image) of `runs` [(name, records)]: a legend, then a panel per key that some run has."""
    keys = [k for k in keys if any(series(records, k) for _, records in runs)]
    if not keys:
        raise DataError("none of the runs has any of the numbers asked for (--keys)")
    rows = math.ceil(len(keys) / columns)
    legend = 24 + 16 * len(runs)
    img = Image.new("RGB", (PANEL_W * min(columns, len(keys)), legend + PANEL_H * rows), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), "x: optimizer step", fill="black")
    for i, (name, records) in enumerate(runs):
        y, c = 24 + 16 * i, COLORS[i % len(COLORS)]
        d.line([8, y + 6, 30, y + 6], fill=c, width=3)
        d.text((36, y), f"{name} ({max(r['step'] for r in records)} steps)", fill="black")
    for j, key in enumerate(keys):
        draw_panel(d, PANEL_W * (j % columns), legend + PANEL_H * (j // columns), key, runs)
    return img


def main(cfg: CurvesConfig):
    if not cfg.runs:
        raise DataError("give one or more run directories (train.py --out_dir) or metrics.jsonl files")
    runs = [load_run(p) for p in cfg.runs]
    for (name, records), path in zip(runs, cfg.runs):
        if not records:
            raise DataError(f"{path}: no metrics yet (the run has not logged a step)")
    keys = [k for k in cfg.keys.split(",") if k] or list(PANELS)
    keys = [k for k in keys if any(series(records, k) for _, records in runs)]
    img = draw(runs, keys, cfg.columns)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    atomic_write_bytes(cfg.out, buf.getvalue())
    print(f"{len(runs)} run(s), {len(keys)} panels -> {cfg.out}")
    return img


if __name__ == "__main__":
    run_main(main, parse_config(CurvesConfig))
