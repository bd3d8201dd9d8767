"""Benchmark of difficulty.py's sampler (not a test): samples per second of GAP.generate(num_samples=N) on a
batch of prompts -- each prompt prefilled once, its KV cache repeated into N decode rows -- against a plain
loop of N separate batch-1 generate calls per prompt, on a tiny random Qwen2.5-VL built in a temp dir.

    OMP_NUM_THREADS=1 python bench_difficulty.py                                  # 56 px images: 4 image tokens
    OMP_NUM_THREADS=1 python bench_difficulty.py --image_side 448 --hidden 256    # 256 image tokens

Every row generates exactly max_new_tokens tokens (no stop ids), so all variants do the same decode work.
Rows: the loop (N calls per prompt); one call per prompt with the prompt repeated N times (batched decode,
N prefills); one call per prompt with num_samples=N (shared prefill); one call for all prompts with
num_samples=N (what difficulty.py runs).
"""
import dataclasses
import os
import tempfile
import time
from dataclasses import field

import torch
from PIL import Image

from data import DataSpec, collate, encode_prompt
from difficulty import load_scorer
from model import parse_config
from tiny import build_tiny, corpus_texts


@dataclasses.dataclass
class BenchConfig:
    """Samples/s of shared-prefill batched sampling against N separate generate calls."""
    samples: int = field(default=8, metadata={"help": "N samples per prompt"})
    prompts: int = field(default=4, metadata={"help": "prompts per batched call"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per sample (all rows, no stop)"})
    image_side: int = field(default=56, metadata={"help": "query image side in px (28 px = one image token)"})
    hidden: int = field(default=64, metadata={"help": "tiny model width"})
    layers: int = field(default=2, metadata={"help": "tiny model decoder layers"})
    repeats: int = field(default=3, metadata={"help": "timed repeats per variant (the best is reported)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})


def best_time(fn, repeats, device):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(cfg: BenchConfig):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny(os.path.join(tmp, "tiny"), hidden=cfg.hidden, layers=cfg.layers)
        gap, tokenizer, image_processor = load_scorer(os.path.join(tmp, "tiny"), cfg.device)
    side = cfg.image_side
    spec = DataSpec(latent_tokens=0, image_min_pixels=side * side, image_max_pixels=side * side)
    questions = [q.split(". ")[0] + "?" for q in corpus_texts()[::10]][:cfg.prompts]
    items = [encode_prompt(tokenizer, image_processor,
                           Image.new("RGB", (side, side), (40 * i % 255, 90, 200)), q, spec, str(i))
             for i, q in enumerate(questions)]
    dev, n = gap.backbone.device, cfg.samples

    def batch(its):
        b = collate(its, tokenizer.pad_token_id, left=True)
        return [b[k].to(dev) for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")]

    singles = [batch([it]) for it in items]
    repeated = [batch([it] * n) for it in items]
    together = batch(items)
    gen = torch.Generator(dev).manual_seed(0)
    kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=1.0, generator=gen)  # no stop ids: full length

    def call(args, rows, **extra):
        tokens = gap.generate(*args, **kw, **extra)["tokens"]
        assert tokens.shape == (rows, cfg.max_new_tokens), tokens.shape

    variants = {
        f"loop: {n} x generate(1 prompt)": lambda: [call(s, 1) for s in singles for _ in range(n)],
        f"generate({n} copies of 1 prompt)": lambda: [call(r, n) for r in repeated],
        f"generate(1 prompt, num_samples={n})": lambda: [call(s, n, num_samples=n) for s in singles],
        f"generate({cfg.prompts} prompts, num_samples={n})": lambda: call(together, cfg.prompts * n, num_samples=n),
    }
    n_prompt = together[0].shape[1]
    print(f"tiny Qwen2.5-VL (hidden {cfg.hidden}, {cfg.layers} layers) on {cfg.device} "
          f"({torch.get_num_threads()} threads): {cfg.prompts} prompts of ~{n_prompt} tokens "
          f"({side}x{side} px image), N={n}, {cfg.max_new_tokens} new tokens per sample")
    print(f"{'variant':<42} {'seconds':>8} {'samples/s':>10} {'speedup':>8}")
    base = None
    for name, fn in variants.items():
        t = best_time(fn, cfg.repeats, cfg.device)
        rate = cfg.prompts * n / t
        base = base or rate
        print(f"{name:<42} {t:>8.3f} {rate:>10.1f} {rate / base:>7.1f}x")


if __name__ == "__main__":
    main(parse_config(BenchConfig))
