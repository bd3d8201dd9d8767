"""The toy world: a seeded synthetic visual task in the GAP data format, where the auxiliary image carries the
evidence the answer needs, and one command that runs the whole GAP pipeline on a CPU (paper section 4 and the
latent interventions of section 5.4 / table 6) and reports whether the latents carry signal.

    python toy.py                 # default world (10.5 min measured on 2 CPU cores) -> out/toy/results.json + .png
    python toy.py --quick         # the same pipeline at smoke-test size, under a minute (test_toy.py runs it)

Measured with the default command (600 test examples, accuracy +- stderr): clean latents (model) 0.530 +- 0.020,
latent span banned (zero) 0.412 +- 0.020, Gaussian PCA latents (noise) 0.228 +- 0.017, so the generated latents
carry evidence; the base 0.360, the K=0 dense-caption control 0.735 (it beats GAP in this world), the `hidden`
output-as-input head 0.515 (level with GAP). One seed; README "Quick start" has the per-family numbers and why they
moved from an earlier version. A toy world on a CPU: these are not the paper's benchmarks.

Stages (each with a progress bar): world (JSONL + PNGs, train/val/test) -> tokenizer + tiny Qwen2.5-VL ->
base model (trained text-only, K=0, random vision tower scaled by --vision_scale and kept frozen, standing in for
the pretrained base) -> latent targets from the frozen base vision tower (data.extract_targets) -> PCA basis
(pca.py) -> difficulty (N sampled answers of the base per training example -> `accuracy`) -> from the base: GAP
(pca head, difficulty-aware), the dense-caption control (K=0, same data) and the output-as-input variant (`hidden`
head) -> evaluation on the test split (infer.run_batch) with latent_mode model / zero / noise -> table,
results.json, PNG plot.

Task families. Images are 4 x 4 grids of 14 px cells (one ViT patch each, a flat colour); the auxiliary image
makes the missing evidence explicit and is never shown to the student, only its frozen-tower embeddings:
  count    "How many red cells are there?"                          aux: only the red cells, lined up
  neighbor "What colour is the cell right of the black cell?"       aux: that cell, zoomed in
  pattern  "Each row has one colour. What colour is the missing cell?" aux: the missing cell, filled in and zoomed
"""
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import field

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (225, 195, 20),
          "purple": (150, 50, 190)}
FAMILIES = ("count", "neighbor", "pattern")
INK = COLORS | {"black": (0, 0, 0)}
CELL = 14  # one ViT patch: every cell is a flat colour, which even a random frozen tower tells apart
MODES = ("base", "model", "zero", "noise", "dense_caption", "hidden")


@dataclasses.dataclass
class ToyConfig:
    """Generate the toy world and run the whole GAP pipeline on it (base -> targets -> PCA -> difficulty ->
    GAP / dense caption / hidden -> evaluation with model, zero and noise latents)."""
    out: str = field(default="out/toy", metadata={"help": "output directory (data, checkpoints, results)"})
    quick: bool = field(default=False, metadata={"help": "smoke-test sizes (overrides the size fields below)"})
    seed: int = field(default=0, metadata={"help": "world, weights and training seed"})
    families: str = field(default="count,neighbor,pattern", metadata={"help": "comma-separated task families"})
    n_train: int = field(default=3000, metadata={"help": "training examples (split evenly over families)"})
    n_val: int = field(default=150, metadata={"help": "validation examples"})
    n_test: int = field(default=600, metadata={"help": "test examples (>= 500 for the two-stderr claim)"})
    image_size: int = field(default=56, metadata={"help": "image side in px, a multiple of 28 (56: 4x4 cells, "
                                                                "2x2 merged vision tokens)"})
    hidden: int = field(default=128, metadata={"help": "decoder width d of the tiny Qwen2.5-VL"})
    layers: int = field(default=4, metadata={"help": "decoder layers of the tiny Qwen2.5-VL"})
    # a random tower's embeddings come out ~1.3x the text-embedding norm; Qwen2.5-VL-7B's are ~50x (paper sec. 3),
    # and at 1.3x the per-dimension target variance is ~2e-4, too small for L_latent to teach the head anything
    vision_scale: float = field(default=40.0, metadata={"help": "scale of the base vision tower's output "
                                                                 "(40: vision/text embedding norm ~ 50, as in 7B)"})
    latent_tokens: int = field(default=4, metadata={"help": "K latents per span (a perfect square)"})
    pca_var: float = field(default=0.95, metadata={"help": "explained variance that sets k"})
    base_epochs: int = field(default=6, metadata={"help": "epochs of the text-only base stage"})
    epochs: int = field(default=10, metadata={"help": "epochs of each fine-tuning stage (GAP, dense, hidden)"})
    batch: int = field(default=32, metadata={"help": "global batch (one micro-batch) of every training stage"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate of the base stage"})
    ft_lr: float = field(default=1e-3, metadata={"help": "peak learning rate (backbone and head) of fine-tuning"})
    # measured: training the tower at the base lr collapsed its output to a near-constant vector (std across
    # images 0.008 vs mean |v| 0.58), so the base keeps the random tower; on this world's flat 14 px cells a linear
    # probe reads every cell's colour from its frozen features (100% held out)
    base_train_vision: bool = field(default=False, metadata={"help": "also train the vision tower in the base stage"})
    samples: int = field(default=8, metadata={"help": "N sampled base answers per example (difficulty)"})
    difficulty_temperature: float = field(default=1.0, metadata={"help": "sampling temperature for difficulty"})
    # measured: with tau=0 only ~10% of examples were latent-supervised (a near-chance base hits the answer by luck
    # in 1 of 8 samples at T=1), too few for the model to learn to open a span; 0.5 = fails at least half
    difficulty_tau: float = field(default=0.5, metadata={"help": "latent supervision where accuracy <= tau"})
    max_new_tokens: int = field(default=64, metadata={"help": "generated tokens per answer, latents included"})
    eval_batch: int = field(default=64, metadata={"help": "prompts per generation batch"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default, all cores)"})
    valr: bool = field(default=False, metadata={"help": "also train VaLR (REPA stage 1 -> 2, output-as-input) from the "
                                                        "base and evaluate it (README 'VaLR'; off: the quick start's time)"})


QUICK = dict(hidden=64, layers=2, n_train=96, n_val=12, n_test=48, base_epochs=2, epochs=2, batch=16, samples=2,
             max_new_tokens=48)


# ----------------------------------------------------------------------------------------------------------
# the world: three task families, each a query image, a question, an answer and an auxiliary image.
# No space before <latent>: with "cells. <latent>" the student learns "." " " <|latent_start|>, and a lone " " token
# never precedes text in the text-only examples, so with the start token banned (latent_mode zero) it looped on
# spaces (measured: 7% of zero-mode answers well formed); "cells.<latent>" leaves the text-only path reachable.

def _cells(rng, n, grid):
    return rng.sample([(r, c) for r in range(grid) for c in range(grid)], n)


def _canvas(size):
    return Image.new("RGB", (size, size), "white")


def _grid(size):
    return size // CELL


def _paint(img, cells):
    """cells: {(row, col): colour name}; each a flat CELL x CELL square."""
    d = ImageDraw.Draw(img)
    for (r, c), name in cells.items():
        d.rectangle([c * CELL, r * CELL, (c + 1) * CELL - 1, (r + 1) * CELL - 1], fill=INK[name])
    return img


def make_count(rng, size):
    """Cells of several colours; count those of one colour. Aux: only that colour's cells, lined up in reading
    order (a tally)."""
    g = _grid(size)
    color, *others = rng.sample(sorted(COLORS), 3)
    n = rng.randint(0, 5)
    where = _cells(rng, n + rng.randint(3, 7), g)
    cells = {p: color for p in where[:n]} | {p: rng.choice(others) for p in where[n:]}
    query = _paint(_canvas(size), cells)
    aux = _paint(_canvas(size), {divmod(i, g): color for i in range(n)})
    return dict(question=f"How many {color} cells are there?", answer=str(n),
                response=f"<think>Keep only the {color} cells and line them up.<latent> <parser>the {color} cells, "
                         f"lined up: {n}.</parser></think><answer>{n}</answer>"), query, aux


def make_pattern(rng, size):
    """Every row (or column) has one colour; one cell is missing (white). Name its colour.
    Aux: the missing cell filled in and zoomed in to the whole image (a crop-and-zoom view)."""
    g = _grid(size)
    rule = rng.choice(["row", "column"])
    line = [rng.choice(sorted(COLORS)) for _ in range(g)]
    hole = (rng.randrange(g), rng.randrange(g))
    answer = line[hole[0] if rule == "row" else hole[1]]
    cells = {(r, c): line[r if rule == "row" else c] for r in range(g) for c in range(g) if (r, c) != hole}
    query = _paint(_canvas(size), cells)
    aux = Image.new("RGB", (size, size), INK[answer])
    return dict(question=f"Each {rule} has one colour. What colour is the missing cell?", answer=answer,
                response=f"<think>Fill in the missing cell and zoom in on it.<latent> <parser>the missing cell is "
                         f"{answer}.</parser></think><answer>{answer}</answer>"), query, aux


def make_neighbor(rng, size):
    """Coloured cells and one black cell; name the colour of the cell right of / below it.
    Aux: that neighbour, zoomed in to the whole image."""
    g = _grid(size)
    side = rng.choice(["right of", "below"])
    r, c = rng.randrange(g - (side == "below")), rng.randrange(g - (side == "right of"))
    nb = (r, c + 1) if side == "right of" else (r + 1, c)
    cells = {p: rng.choice(sorted(COLORS)) for p in _cells(rng, rng.randint(6, 10), g)}
    cells[nb] = answer = rng.choice(sorted(COLORS))
    cells[(r, c)] = "black"
    query = _paint(_canvas(size), cells)
    aux = Image.new("RGB", (size, size), INK[answer])
    return dict(question=f"What colour is the cell {side} the black cell?", answer=answer,
                response=f"<think>Find the black cell and zoom in on the cell {side} it.<latent> <parser>the cell "
                         f"{side} the black cell is {answer}.</parser></think><answer>{answer}</answer>"), query, aux


MAKERS = dict(count=make_count, neighbor=make_neighbor, pattern=make_pattern)


def image_key(img):
    return hashlib.sha1(img.tobytes()).hexdigest()


def write_world(out_dir, n_train, n_val, n_test, seed=0, size=56, families=FAMILIES):
    """Write {train,val,test}.jsonl + img/ under out_dir. Examples cycle through the families; an
    (image, question) pair seen before is redrawn, so no pair repeats within or across splits.
    Returns {split: jsonl path}."""
    from tqdm import tqdm
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "img"), exist_ok=True)
    seen, paths, i = set(), {}, 0
    bar = tqdm(total=n_train + n_val + n_test, desc="world", unit="ex")
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rows = []
        while len(rows) < n:
            fam = families[i % len(families)]
            ex, query, aux = MAKERS[fam](rng, size)
            key = (image_key(query), ex["question"])
            if key in seen:
                continue
            seen.add(key)
            ex_id = f"{fam}-{i:06d}"
            query.save(os.path.join(out_dir, "img", f"{ex_id}.png"))
            aux.save(os.path.join(out_dir, "img", f"{ex_id}_aux.png"))
            rows.append(dict(id=ex_id, image=f"img/{ex_id}.png", question=ex["question"], response=ex["response"],
                             aux_image=f"img/{ex_id}_aux.png", answer=ex["answer"], family=fam))
            i += 1
            bar.update(1)
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        with open(paths[split], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    bar.close()
    return paths


def check_world(paths):
    """No (query image, question) pair in two splits; every image exists. Raises with what repeats."""
    owner = {}
    for split, path in paths.items():
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                base = os.path.dirname(os.path.abspath(path))
                for key in ("image", "aux_image"):
                    if not os.path.exists(os.path.join(base, r[key])):
                        raise FileNotFoundError(f"{path}: {r['id']}: {key} {r[key]} missing")
                with Image.open(os.path.join(base, r["image"])) as im:
                    key = (image_key(im.convert("RGB")), r["question"])
                if key in owner:
                    raise ValueError(f"{split}/{r['id']} repeats {owner[key]} (same image and question)")
                owner[key] = f"{split}/{r['id']}"
    return len(owner)


def corpus(paths):
    """Texts the offline tokenizer is trained on: every question and response of the world, the chat scaffold."""
    import tiny
    texts = []
    for path in paths.values():
        with open(path) as f:
            texts += [t for line in f for t in (json.loads(line)["question"], json.loads(line)["response"])]
    return texts + tiny.corpus_texts()


# ----------------------------------------------------------------------------------------------------------
# pipeline stages, each through the project's own entry points

def scale_vision(model_dir, scale):
    """Multiply the output layer of the vision tower's patch merger by `scale` (the embeddings scale exactly),
    so the toy base's vision embeddings sit in a 7B-like norm regime relative to its text embeddings."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    last = model.model.visual.merger.mlp[-1]
    with torch.no_grad():
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    model.save_pretrained(model_dir, safe_serialization=True)

def train_stage(cfg, name, model, data, **kw):
    import train
    tc = train.TrainConfig(model=model, data=data, out_dir=os.path.join(cfg.out, name), global_batch=cfg.batch,
                           micro_batch=cfg.batch, seed=cfg.seed, **kw)
    print(f"== train {name}: {kw}")
    train.main(tc)
    return tc.out_dir


def difficulty(cfg, ckpt, data, out_path):
    """difficulty.py on the base checkpoint: accuracy = fraction of N sampled base answers (image + question
    only) that match `answer`. Returns the scored rows."""
    import difficulty as difficulty_py
    from common import clear_outputs
    clear_outputs(out_path)  # a fresh measurement, not a resume of an older run
    difficulty_py.main(difficulty_py.DifficultyConfig(
        model=ckpt, data=data, out=out_path, samples=cfg.samples, temperature=cfg.difficulty_temperature,
        max_new_tokens=cfg.max_new_tokens, batch_size=max(1, cfg.eval_batch // cfg.samples), seed=cfg.seed,
        tau=cfg.difficulty_tau))
    with open(out_path) as f:
        return [json.loads(line) for line in f]


def evaluate(cfg, ckpt, mode, test_path):
    """infer.run_batch on the test split; returns (summary, per-example results)."""
    import infer
    from common import clear_outputs
    out = os.path.join(cfg.out, "eval", f"{os.path.basename(ckpt)}_{mode}.jsonl")
    clear_outputs(out)  # a fresh measurement, not a resume of an older run
    ic = infer.InferConfig(ckpt=ckpt, data=test_path, out=out, latent_mode=mode, max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.eval_batch, seed=cfg.seed)
    summary = infer.run_batch(ic, infer.Runner(ic))
    with open(out) as f:
        return summary, [json.loads(line) for line in f]


def latent_norms(cfg, ckpt, test_path, n=64):
    """Mean L2 norms at inference on n test prompts, decoded greedily as in evaluation: the query-image vision
    embeddings, and the latents the model feeds back in the spans it opens itself. If no row opens a span,
    every prompt is ended with <|latent_start|> instead, so the head is still measured (forced=True).
    Returns (vision, latent, forced)."""
    import torch
    import infer
    import latent_loop
    from data import collate, open_image, read_jsonl
    runner = infer.Runner(infer.InferConfig(ckpt=ckpt, seed=cfg.seed))
    gap, tok = runner.gap, runner.tokenizer
    rows = read_jsonl(test_path, need_response=False)[0][:n]
    batch = collate([runner.encode(open_image(r, "image"), r["question"], r["id"]) for r in rows], tok.pad_token_id,
                    left=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for forced in (False, True):
        if forced:
            ids = torch.cat([ids, torch.full((len(rows), 1), gap.start_id)], 1)  # (B, T+1)
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], 1)
        steps = latent_loop.latent_steps(gap.backbone, gap.head, gap.latent_ids, gap.latent_tokens, ids, mask,
                                         batch["pixel_values"], batch["image_grid_thw"], stop_ids=runner.stop_ids,
                                         max_new_tokens=gap.latent_tokens + 1 if forced else cfg.max_new_tokens)
        # the vectors fed at latent slots: rows in a span (slot 0..K-1) at steps that fed anything
        latents = [s.fed[(s.slot >= 0) & (s.slot < gap.latent_tokens)] for s in steps if s.fed is not None]
        latents = torch.cat(latents) if latents else torch.zeros(0)
        if len(latents):
            break
    if len(latents) % gap.latent_tokens:
        raise RuntimeError(f"{len(latents)} latents fed, not a multiple of K={gap.latent_tokens}")
    with torch.no_grad():
        embeds = gap.embed(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"])  # (B, T, D)
    vision = embeds[batch["input_ids"] == gap.image_token_id].norm(dim=-1).mean().item()
    return vision, latents.norm(dim=-1).mean().item(), forced


def toy_encoder(out_dir, image_size, seed):
    """The toy's external vision encoder for REPA: a random stock Dinov2Model (2 layers, width 64, one 14 px
    patch per cell) with its image processor. Nothing pretrained exists for this world; on its flat-colour cells
    random patch features still tell the colours apart (as the frozen random Qwen tower's do)."""
    import torch
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model
    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                             patch_size=14, image_size=image_size)).save_pretrained(out_dir)
    BitImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                         do_center_crop=False, do_resize=False).save_pretrained(out_dir)
    return out_dir


def train_valr(cfg, base, data, pca_path):
    """VaLR on the toy: the encoder's features of the training images, stage 1 (projectors, 2 epochs), then
    stage 2 (everything, self-fed latents, cfg.epochs) from stage 1's checkpoint. Returns the stage-2 checkpoint."""
    import align
    enc = toy_encoder(os.path.join(cfg.out, "encoder"), cfg.image_size, cfg.seed)
    cache = os.path.join(cfg.out, "cache", "align")
    align.extract_features(align.FeaturesConfig(encoders=enc, data=data, latent_tokens=cfg.latent_tokens,
                                                cache_dir=cache, batch_size=64))
    kw = dict(latent_tokens=cfg.latent_tokens, latent_head="hidden", pca_path=pca_path, lambda_latent=0.0,
              align="repa", align_encoders=enc, align_cache=cache, align_dim=128, align_text=True,
              lr=cfg.ft_lr, head_lr=cfg.ft_lr, difficulty_tau=cfg.difficulty_tau)
    stage1 = train_stage(cfg, "valr_stage1", base, data, stage=1, epochs=2, **kw)
    return train_stage(cfg, "valr", stage1, data, stage=2, epochs=cfg.epochs, **kw)


def plot(results, path):
    """Bar chart of accuracy +- 2 stderr per variant, written with PIL (no matplotlib)."""
    W, H, left, bottom, top = 560, 300, 40, 40, 30
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), f"toy world: test accuracy +- 2 stderr (n={results['n_test']})", fill="black")
    ph = H - bottom - top
    d.line([left, top, left, H - bottom, W - 10, H - bottom], fill="black")
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        y = H - bottom - t * ph
        d.line([left - 4, y, left, y], fill="black")
        d.text((4, y - 6), f"{t:.2f}", fill="black")
    modes = [m for m in MODES + ("valr",) if m in results["accuracy"]]
    bw = (W - left - 20) / len(modes)
    fills = dict(base=(150, 150, 150), model=(40, 120, 200), zero=(230, 150, 40), noise=(200, 60, 60),
                 dense_caption=(120, 170, 90), hidden=(150, 100, 180), valr=(60, 170, 170))
    for i, m in enumerate(modes):
        a, s = results["accuracy"][m], results["stderr"][m]
        x0 = left + 10 + i * bw
        d.rectangle([x0, H - bottom - a * ph, x0 + bw - 20, H - bottom], fill=fills[m])
        xc = x0 + (bw - 20) / 2
        d.line([xc, H - bottom - min(1, a + 2 * s) * ph, xc, H - bottom - max(0, a - 2 * s) * ph], fill="black")
        d.text((x0, H - bottom + 6), m, fill="black")
        d.text((x0, H - bottom - a * ph - 14), f"{a:.3f}", fill="black")
    img.save(path)


def run(cfg: ToyConfig):
    """The pipeline, stage after stage as the module docstring lists them (one long function on purpose: it is
    the recipe). Writes results.json and results.png under cfg.out and returns the results."""
    import torch
    import pca as pca_lib
    from data import TargetsConfig, TargetCache, extract_targets, read_jsonl
    from common import atomic_write_text
    from train import fit_basis
    import tiny
    if cfg.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    families = tuple(f for f in cfg.families.split(",") if f)
    for f in families:
        if f not in MAKERS:
            raise ValueError(f"unknown family {f!r}; expected some of {FAMILIES}")
    for sub in ("data", "cache", "eval", "tiny", "base", "gap", "dense_caption", "hidden", "encoder", "valr_stage1",
                "valr"):
        shutil.rmtree(os.path.join(cfg.out, sub), ignore_errors=True)
    os.makedirs(os.path.join(cfg.out, "eval"), exist_ok=True)
    paths = write_world(os.path.join(cfg.out, "data"), cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed,
                        cfg.image_size, families)
    n_unique = check_world(paths)
    print(f"world: {n_unique} unique (image, question) pairs over train/val/test -> {cfg.out}/data")
    tiny_dir = tiny.build_tiny(os.path.join(cfg.out, "tiny"), cfg.hidden, cfg.layers, seed=cfg.seed,
                               texts=corpus(paths))
    scale_vision(tiny_dir, cfg.vision_scale)
    base = train_stage(cfg, "base", tiny_dir, paths["train"], latent_tokens=0, train_vision=cfg.base_train_vision,
                       epochs=cfg.base_epochs, lr=cfg.lr, head_lr=cfg.lr)
    K = cfg.latent_tokens
    cache_dir = os.path.join(cfg.out, "cache")
    extract_targets(TargetsConfig(model=base, data=paths["train"], latent_tokens=K, cache_dir=cache_dir,
                                  batch_size=64))
    basis = fit_basis(TargetCache(cache_dir, K), read_jsonl(paths["train"])[0], cfg.pca_var, 0, 1)
    pca_path = os.path.join(cfg.out, "cache", "pca.safetensors")
    pca_lib.save(pca_path, basis)
    print(f"PCA: k={basis['k']} of d={basis['P'].shape[0]}, var={basis['var']}, rel_mse={basis['rel_mse']:.4f}")
    scored_path = os.path.join(cfg.out, "data", "train.scored.jsonl")
    scored = difficulty(cfg, base, paths["train"], scored_path)
    n_latent = sum(r["accuracy"] <= cfg.difficulty_tau for r in scored)
    print(f"difficulty: {n_latent}/{len(scored)} training examples get latent supervision (tau={cfg.difficulty_tau})")
    ft = dict(epochs=cfg.epochs, lr=cfg.ft_lr, head_lr=cfg.ft_lr, difficulty_tau=cfg.difficulty_tau,
              target_cache=cache_dir)
    ckpts = dict(base=base,
                 gap=train_stage(cfg, "gap", base, scored_path, latent_tokens=K, latent_head="pca", pca_path=pca_path,
                                 **ft),
                 dense_caption=train_stage(cfg, "dense_caption", base, scored_path, latent_tokens=0, **ft),
                 hidden=train_stage(cfg, "hidden", base, scored_path, latent_tokens=K, latent_head="hidden",
                                    pca_path=pca_path, **ft))
    runs = dict(base=(ckpts["base"], "model"), model=(ckpts["gap"], "model"), zero=(ckpts["gap"], "zero"),
                noise=(ckpts["gap"], "noise"), dense_caption=(ckpts["dense_caption"], "model"),
                hidden=(ckpts["hidden"], "model"))
    if cfg.valr:
        runs["valr"] = (train_valr(cfg, base, scored_path, pca_path), "model")
    acc, err, per_family, latent_used, answered = {}, {}, {}, {}, {}
    fam_of = {}
    with open(paths["test"]) as f:
        for line in f:
            r = json.loads(line)
            fam_of[r["id"]] = r["family"]
    for name, (ckpt, mode) in runs.items():
        summary, res = evaluate(cfg, ckpt, mode, paths["test"])
        acc[name], err[name] = summary["accuracy"], summary["stderr"]
        per_family[name] = {f: sum(r["correct"] for r in res if fam_of[r["id"]] == f) /
                            max(1, sum(fam_of[r["id"]] == f for r in res)) for f in families}
        latent_used[name] = sum("<latent>" in r["response"] for r in res) / max(1, len(res))
        answered[name] = sum("<answer>" in r["response"] for r in res) / max(1, len(res))
    vision, latent_pca, forced_pca = latent_norms(cfg, ckpts["gap"], paths["test"])
    _, latent_hidden, forced_hidden = latent_norms(cfg, ckpts["hidden"], paths["test"])
    n_test = len(fam_of)
    results = dict(n_test=n_test, accuracy=acc, stderr=err,
                   pca=dict(k=basis["k"], var=basis["var"], rel_mse=basis["rel_mse"]),
                   norms=dict(vision_embed=vision, latent_pca=latent_pca, latent_hidden=latent_hidden,
                              forced_pca=forced_pca, forced_hidden=forced_hidden),
                   per_family=per_family, latent_rate=latent_used, answer_rate=answered,
                   difficulty=dict(n_train=len(scored), n_latent=n_latent, tau=cfg.difficulty_tau, samples=cfg.samples),
                   gaps_in_stderr={m: (acc["model"] - acc[m]) / max(1e-12, math.hypot(err["model"], err[m]))
                                   for m in runs if m != "model"},
                   config=dataclasses.asdict(cfg), wall_s=round(time.time() - t0, 1))
    atomic_write_text(os.path.join(cfg.out, "results.json"), json.dumps(results, indent=2) + "\n")
    plot(results, os.path.join(cfg.out, "results.png"))
    print(f"\n{'variant':<14}{'accuracy':>10}{'stderr':>9}{'latent%':>9}{'answer%':>9}  " +
          "  ".join(f"{f:>8}" for f in families))
    for m in runs:
        print(f"{m:<14}{acc[m]:>10.4f}{err[m]:>9.4f}{100 * latent_used[m]:>8.0f}%{100 * answered[m]:>8.0f}%  " +
              "  ".join(f"{per_family[m][f]:>8.3f}" for f in families))
    print(f"model - zero = {results['gaps_in_stderr']['zero']:.1f} stderr, model - noise = "
          f"{results['gaps_in_stderr']['noise']:.1f} stderr  (n_test={n_test})")
    print(f"norms: vision {vision:.3f}, latent pca {latent_pca:.3f}, latent hidden {latent_hidden:.3f}; "
          f"PCA k={basis['k']} rel_mse={basis['rel_mse']:.4f}; {results['wall_s']:.0f} s -> {cfg.out}/results.json")
    return results


if __name__ == "__main__":
    from common import parse_config, run_main
    run_main(run, parse_config(ToyConfig))
