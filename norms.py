"""The layer-wise norm diagnostic of paper section 3 (Figure 2): (a) the mean and standard deviation of
log(L2 norm) of text and vision hidden states from the input embeddings through every decoder layer (pre-norm
residual stream), (b) the final normalized state that an output-as-input latent loop feeds back, against the
query-image vision embeddings, and, for a GAP checkpoint, the norm of its head's reconstruction of that state.

    python norms.py --model out/gap --data test.jsonl --n 64 --out norms.png      # GAP checkpoint: + reconstruction
    python norms.py --model Qwen/Qwen2.5-VL-7B-Instruct --data test.jsonl           # a plain model: (a), (b) without it

Writes the PNG and beside it the JSON (same stem) with the profile, the model, the data and n. One no-grad
forward per batch of left-padded prompts (data.encode_row), with the embeddings and M-RoPE positions of
latent_loop; forward hooks read each decoder layer's output and the final norm's output, so no version's
convention for output_hidden_states matters. Statistics are over real (non-padding) tokens, split into text
tokens and vision tokens (<|image_pad|>).
"""
import dataclasses
import json
import math
import os
from dataclasses import field

import torch
from PIL import Image, ImageDraw

import latent_loop
from common import DataError, atomic_write_text, fsync_dir, parse_config, run_main
from data import DataSpec, collate, encode_row, read_jsonl, resolve
from checkpoint import load_checkpoint
from model import load_backbone


@dataclasses.dataclass
class NormsConfig:
    """Profile the L2 norms of hidden states layer by layer (paper Figure 2)."""
    model: str = field(default="out/gap", metadata={"help": "GAP checkpoint (has gap.json: its head's reconstruction "
                                                            "is measured too) or a plain model directory / hub id"})
    data: str = field(default="", metadata={"help": "JSONL with id, image, question (no response needed)"})
    n: int = field(default=64, metadata={"help": "profile the first n rows of --data", "range": (1, None)})
    batch_size: int = field(default=8, metadata={"help": "prompts per forward", "range": (1, None)})
    out: str = field(default="norms.png", metadata={"help": "PNG to write; the JSON goes beside it (.json)"})


@torch.no_grad()
def collect(model, batch, head=None):
    """Per-token L2 norms (fp32, CPU) of one left-padded batch: layers[l] = dict(text, vision) for l = 0 (input
    embeddings) .. L (decoder layer L's output, pre-norm); final_text, final_last (the final norm's output at
    text positions / at each row's last position); with `head` also reconstruction = ||head(final_last state)||."""
    dev = model.device
    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    pixels, grid = batch["pixel_values"].to(dev), batch["image_grid_thw"].to(dev)
    if not bool(mask[:, -1].all()):
        raise ValueError("prompts must be left-padded (the last column real in every row)")
    real = mask.bool()
    vision = real & (ids == model.config.image_token_id)  # (B, T)
    text = real & ~vision
    embeds = latent_loop.embed_inputs(model, ids, pixels, grid)  # (B, T, D)
    pos = latent_loop.rope_positions(model, ids, mask, grid)  # (3, B, T)
    per_layer, last = [], []  # (B, T) norms per layer; the final normalized state (B, T, D)

    def keep(module, args, out):
        h = out[0] if isinstance(out, tuple) else out  # older versions return a tuple from a decoder layer
        per_layer.append(h.float().norm(dim=-1))

    lm = model.model.language_model
    hooks = [layer.register_forward_hook(keep) for layer in lm.layers]
    hooks.append(lm.norm.register_forward_hook(lambda module, args, out: last.append(out)))
    try:
        model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    if len(per_layer) != len(lm.layers) or len(last) != 1:
        raise RuntimeError(f"hooks saw {len(per_layer)} of {len(lm.layers)} decoder layers and {len(last)} final norms")
    per_layer.insert(0, embeds.float().norm(dim=-1))
    h_final = last[0]  # (B, T, D)
    final = h_final.float().norm(dim=-1)
    out = dict(layers=[dict(text=x[text].cpu(), vision=x[vision].cpu()) for x in per_layer],
               final_text=final[text].cpu(), final_last=final[:, -1].cpu())
    if head is not None:
        out["reconstruction"] = head(h_final[:, -1]).float().norm(dim=-1).cpu()
    return out


def merge(parts):
    """collect() results of several batches as one (the token norms concatenated)."""
    cat = lambda key: torch.cat([p[key] for p in parts])  # noqa: E731
    out = dict(layers=[{k: torch.cat([p["layers"][l][k] for p in parts]) for k in ("text", "vision")}
                       for l in range(len(parts[0]["layers"]))],
               final_text=cat("final_text"), final_last=cat("final_last"))
    if "reconstruction" in parts[0]:
        out["reconstruction"] = cat("reconstruction")
    return out


def stats(x):
    """Mean and standard deviation (over tokens) of log(norm), and the mean raw norm."""
    log = x.double().log()
    return dict(log_mean=log.mean().item(), log_std=log.std(correction=0).item(), mean=x.double().mean().item())


def summarize(norms):
    """The profile of collect()'s per-token norms (see profile())."""
    layers = [dict(text=stats(x["text"]), vision=stats(x["vision"])) for x in norms["layers"]]
    vision_embed, text_embed = layers[0]["vision"]["mean"], layers[0]["text"]["mean"]
    final = dict(text=norms["final_text"].double().mean().item(), last=norms["final_last"].double().mean().item())
    out = dict(layers=layers, final=final, vision_embed=vision_embed, text_embed=text_embed,
               ratio=final["last"] / vision_embed)
    if "reconstruction" in norms:
        out["reconstruction"] = norms["reconstruction"].double().mean().item()
    return out


def profile(model, batch, head=None):
    """Figure 2's numbers for one collate()d batch of left-padded prompts: layers[l][text|vision] = dict(log_mean,
    log_std, mean) for l = 0..L; final = dict(text, last): mean norm of the final normalized state at text
    positions and at each row's last position; vision_embed / text_embed: mean input-embedding norms; ratio =
    final last / vision_embed; with `head` (a LatentHead) reconstruction: mean ||head(final state, last)||."""
    return summarize(collect(model, batch, head))


def peak(result, kind):
    """(layer, log-norm) of the largest mean log-norm of `kind` tokens."""
    return max(enumerate(x[kind]["log_mean"] for x in result["layers"]), key=lambda t: t[1])


def plot(result, path):
    """Panel (a): mean log-norm per layer, text and vision, with +-1 sd bands; panel (b): bars of the vision
    embedding, final state and reconstruction norms. PIL only; written atomically."""
    W, H, top, bottom = 900, 340, 40, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img, "RGBA")
    colors = dict(text=(40, 120, 200), vision=(220, 110, 30))
    # (a) x: layer 0..L, y: log norm
    x0, x1, ph = 60, 520, H - top - bottom
    L = len(result["layers"]) - 1
    bands = [(x[k]["log_mean"] - x[k]["log_std"], x[k]["log_mean"] + x[k]["log_std"]) for x in result["layers"]
             for k in colors]
    lo = math.floor(min(b[0] for b in bands))
    hi = max(math.ceil(max(b[1] for b in bands)), lo + 1)
    X = lambda l: x0 + (x1 - x0) * l / max(L, 1)  # noqa: E731
    Y = lambda v: H - bottom - ph * (v - lo) / (hi - lo)  # noqa: E731
    d.text((x0, 10), "(a) log(L2 norm) per layer, +-1 sd (0 = input embeddings)", fill="black")
    d.line([x0, top, x0, H - bottom, x1, H - bottom], fill="black")
    for t in range(lo, hi + 1, max(1, (hi - lo) // 6)):
        d.line([x0 - 4, Y(t), x0, Y(t)], fill="black")
        d.text((x0 - 30, Y(t) - 6), f"{t}", fill="black")
    for l in range(0, L + 1, max(1, L // 8)):
        d.line([X(l), H - bottom, X(l), H - bottom + 4], fill="black")
        d.text((X(l) - 4, H - bottom + 8), str(l), fill="black")
    d.text(((x0 + x1) / 2 - 15, H - 20), "layer", fill="black")
    d.text((x0 - 40, top - 16), "log norm", fill="black")
    for i, (kind, c) in enumerate(colors.items()):
        m = [(X(l), Y(x[kind]["log_mean"])) for l, x in enumerate(result["layers"])]
        up = [(X(l), Y(x[kind]["log_mean"] + x[kind]["log_std"])) for l, x in enumerate(result["layers"])]
        down = [(X(l), Y(x[kind]["log_mean"] - x[kind]["log_std"])) for l, x in enumerate(result["layers"])]
        d.polygon(up + down[::-1], fill=c + (50,))  # light band
        d.line(m, fill=c, width=2)
        d.line([x1 - 90, top + 8 + 16 * i, x1 - 70, top + 8 + 16 * i], fill=c, width=2)
        d.text((x1 - 64, top + 2 + 16 * i), kind, fill="black")
    # (b) bars
    bars = [("vision embed", result["vision_embed"], colors["vision"]), ("final state", result["final"]["last"],
                                                                        (120, 120, 120))]
    if "reconstruction" in result:
        bars.append(("reconstruction", result["reconstruction"], (60, 160, 90)))
    b0, b1, top_v = 590, W - 20, max(v for _, v, _ in bars)
    d.text((b0, 10), f"(b) mean L2 norm; final / vision = {result['ratio']:.2f}x", fill="black")
    d.line([b0, top, b0, H - bottom, b1, H - bottom], fill="black")
    bw = (b1 - b0) / len(bars)
    for i, (name, v, c) in enumerate(bars):
        left = b0 + 10 + i * bw
        d.rectangle([left, H - bottom - ph * v / top_v, left + bw - 20, H - bottom], fill=c)
        d.text((left, H - bottom - ph * v / top_v - 14), f"{v:.2f}", fill="black")
        d.text((left, H - bottom + 8), name, fill="black")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        img.save(f, "PNG")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path)


def main(cfg: NormsConfig):
    if not cfg.data:
        raise DataError("--data: give a JSONL with id, image, question")
    rows = read_jsonl(cfg.data, need_response=False)[0][:cfg.n]
    if not rows:
        raise DataError(f"{cfg.data}: no examples")
    for r in rows:  # a missing image stops the run here, before the model loads
        resolve(r, "image")
    head, spec = None, DataSpec()
    if os.path.exists(os.path.join(cfg.model, "gap.json")):
        gap, tokenizer, image_processor, config = load_checkpoint(cfg.model, flag="--model")
        model, head = gap.backbone, gap.head
        spec = DataSpec(**{f.name: config[f.name] for f in dataclasses.fields(DataSpec) if f.name in config})
    else:
        model, tokenizer, image_processor = load_backbone(cfg.model)
    model.eval()
    parts = []
    for i in range(0, len(rows), cfg.batch_size):
        items = [encode_row(tokenizer, image_processor, r, spec) for r in rows[i:i + cfg.batch_size]]
        parts.append(collect(model, collate(items, tokenizer.pad_token_id, left=True), head))
    result = summarize(merge(parts))
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    plot(result, cfg.out)
    json_path = os.path.splitext(cfg.out)[0] + ".json"
    atomic_write_text(json_path, json.dumps(dict(result, model=cfg.model, data=cfg.data, n=len(rows)), indent=2) + "\n")
    (lt, pt), (lv, pv) = peak(result, "text"), peak(result, "vision")
    recon = f", reconstruction {result['reconstruction']:.3g}" if "reconstruction" in result else ""
    print(f"final/vision ratio {result['ratio']:.2f} (final {result['final']['last']:.3g}, vision embed "
          f"{result['vision_embed']:.3g}{recon}); peak log-norm text {pt:.2f} at layer {lt}, vision {pv:.2f} at "
          f"layer {lv} of {len(result['layers']) - 1}; n={len(rows)} -> {cfg.out}, {json_path}")
    return result


if __name__ == "__main__":
    run_main(main, parse_config(NormsConfig))
