"""Day one at 7B, rehearsed on a CPU: the README's "Qwen2.5-VL-7B" commands run as written on a random model with
every width of Qwen2.5-VL-7B (hidden 3584, 28 heads / 4 KV heads of dim 128, M-RoPE sections 16/24/24, intermediate
18944, untied vocab 152064; vision blocks of 1280 with window attention and the merger to 3584; K = 36 at
168x168 px aux images; its image processor's pixel budget), truncated to --layers decoder layers and
--vision_depth vision blocks, with a tokenizer that has Qwen's special tokens and real-size JPEGs. Only $M, the
data paths and the process count change, plus the rehearsal flags printed with each command (fewer steps,
shorter answers: a random model never stops by itself). Run it first on a new cluster, next to smoke.py:

    python rehearse.py                           # L=1, V=2, 2 gloo processes, 1280x960 .. 3840x2160 images
    python rehearse.py --smallest                # the suite's form: small images, a 16384 vocabulary, 4 examples

What does not fit a 24 GB CPU machine is changed as little as it takes, and said: fp32 AdamW over 7B's untied
152064 x 3584 embeddings and LM head (1.09B parameters: 17.4 GB of weights, gradients and AdamW states before any
layer) does not fit twice over, so the training step runs on the same model with its vocabulary cut to
--train_vocab rows (the tokenizer's ids all lie below it; every width stays). At V < 8 none of 7B's full-attention
vision blocks (7, 15, 23, 31) exists; the last block is made one, so both attention kinds of the tower run.
Writes OUT/rehearse.json: each command, its exit code, seconds and the peak RSS of its processes.
"""
import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import field

import numpy as np
from PIL import Image, ImageDraw

import tiny

HERE = os.path.dirname(os.path.abspath(__file__))
QWEN7B_PIXELS = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)  # Qwen2.5-VL-7B's preprocessor_config.json


@dataclasses.dataclass
class RehearseConfig:
    """Run the README's 7B commands on a random Qwen2.5-VL-7B-shaped model, truncated, on this machine."""
    out: str = field(default="out/rehearse", metadata={"help": "model, data, caches, checkpoints, rehearse.json"})
    layers: int = field(default=1, metadata={"help": "decoder layers (7B: 28)", "range": (1, 28)})
    vision_depth: int = field(default=2, metadata={"help": "vision blocks (7B: 32)", "range": (1, 32)})
    nproc: int = field(default=2, metadata={"help": "processes per torchrun command (gloo on a CPU)",
                                            "range": (1, 64)})
    examples: int = field(default=8, metadata={"help": "training examples (each with a latent span)",
                                               "range": (2, None)})
    train_vocab: int = field(default=16384, metadata={"help": "vocabulary of the model the training step runs on "
                                                             "(0: 7B's 152064, which fp32 AdamW on a CPU cannot hold)",
                                                      "range": (0, None)})
    vocab: int = field(default=152064, metadata={"help": "vocabulary of the rehearsal model (7B: 152064)"})
    smallest: bool = field(default=False, metadata={"help": "the suite's form: 448x336 images, a 16384 vocabulary "
                                                           "everywhere, 4 examples"})
    max_new_tokens: int = field(default=4, metadata={"help": "rehearsal flag of difficulty.py and infer.py"})
    seed: int = field(default=0, metadata={"help": "weights and images"})


def write_model(path, cfg: RehearseConfig):
    """The 7B-shaped random model directory (bf16 safetensors, tokenizer, Qwen2.5-VL-7B's image processor) and,
    when the training vocabulary differs, the same model with its embeddings and LM head cut to it."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil
    torch.manual_seed(cfg.seed)
    tokenizer = tiny.build_tokenizer(tiny.corpus_texts() + [QUESTION, RESPONSE])
    config = tiny.shape_config("7b", tokenizer, "sdpa", cfg.layers, cfg.vision_depth)
    config.text_config.vocab_size = cfg.vocab
    if not config.vision_config.fullatt_block_indexes:  # V < 8: make the last block full attention (docstring)
        config.vision_config.fullatt_block_indexes = [cfg.vision_depth - 1]
    model = Qwen2_5_VLForConditionalGeneration(config)
    paths = {"model": path}
    for name, vocab in (("model", cfg.vocab), ("train", cfg.train_vocab or cfg.vocab)):
        if name == "train" and vocab == cfg.vocab:
            paths["train"] = path
            continue
        if vocab != cfg.vocab:  # keep the first `vocab` rows: every id the tokenizer has lies below
            model.resize_token_embeddings(vocab, mean_resizing=False)
        out = path if name == "model" else path + f"_vocab{vocab}"
        model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        Qwen2VLImageProcessorPil(**QWEN7B_PIXELS).save_pretrained(out)
        paths[name] = out
    return paths


QUESTION = "How many bricks are missing in the wall?"
RESPONSE = ("<think>I look for gaps in the wall. <latent> <parser>the wall with its missing bricks marked.</parser> "
            "There are 3 gaps.</think><answer>3</answer>")


def photo(path, width, height, rng):
    """A JPEG of photo-like size and content (smooth gradients, shapes, noise: it compresses like a photo)."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    noise = rng.integers(0, 24, (height, width, 3))
    im = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        draw.rectangle([x0, y0, x0 + width // 12, y0 + height // 16], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    im.save(path, quality=90)


def write_data(root, cfg: RehearseConfig):
    """train.jsonl (query images 1280x960 and 2048x1536, aux images including one 3840x2160) and test.jsonl (with
    a 3840x2160 query image); the smallest form uses 448x336 images throughout."""
    rng = np.random.default_rng(cfg.seed)
    img = os.path.join(root, "img")
    os.makedirs(img, exist_ok=True)
    sizes = [(448, 336)] if cfg.smallest else [(1280, 960), (2048, 1536)]
    big = (448, 336) if cfg.smallest else (3840, 2160)
    rows = []
    for i in range(cfg.examples):
        photo(os.path.join(img, f"q{i}.jpg"), *sizes[i % len(sizes)], rng)
        photo(os.path.join(img, f"a{i}.jpg"), *(big if i == 0 else (640, 480)), rng)
        rows.append(dict(id=f"r{i}", image=f"img/q{i}.jpg", question=QUESTION, response=RESPONSE,
                         aux_image=f"img/a{i}.jpg", answer="3"))
    photo(os.path.join(img, "test_4k.jpg"), *big, rng)
    tests = [dict(id="t0", image="img/test_4k.jpg", question=QUESTION, answer="3"),
             dict(id="t1", image="img/q1.jpg", question=QUESTION, answer="3")]
    for name, data in (("train.jsonl", rows), ("test.jsonl", tests)):
        with open(os.path.join(root, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in data)
    return os.path.join(img, "q0.jpg")


def commands(cfg: RehearseConfig, paths, image):
    """The README's 7B block, line by line: (README command with $M, data paths and process count substituted,
    the rehearsal flags appended to it)."""
    P = cfg.nproc
    run = f"torchrun --nproc_per_node {P}" if P > 1 else "python"
    M, T = paths["model"], paths["train"]
    n = cfg.max_new_tokens
    return [
        (f"{run} targets.py --model {M} --data train.jsonl --latent_tokens 36 --cache_dir cache", ""),
        (f"{run} train.py --check_only --model {M} --data train.jsonl --target_cache cache --latent_tokens 36", ""),
        ("python pca.py --targets cache/K36 --var 0.95 --out cache/pca_K36.safetensors", ""),
        (f"{run} difficulty.py --model {M} --data train.jsonl --out train.scored.jsonl --samples 8",
         f"--max_new_tokens {n}"),
        (f"{run} train.py --model {T} --data train.scored.jsonl --target_cache cache "
         f"--pca_path cache/pca_K36.safetensors --latent_tokens 36 --fsdp --grad_ckpt --pack --save_every 100",
         f"--global_batch {2 * P} --max_steps 2 --save_every 1 --num_workers 0"),
        (f'python infer.py {image} "{QUESTION}" --ckpt out/gap', f"--max_new_tokens {n}"),
        # a 3840x2160 query image is 10.5k tokens at the 7B budget, over the max_len 8192 the model trained at:
        # infer.py refuses it unless told (README "Inference"), so the rehearsal says --max_len
        ("python infer.py --ckpt out/gap --data test.jsonl --latent_mode noise --norm_calib none",
         f"--max_new_tokens {n} --max_len 16384"),
    ]


def main(cfg: RehearseConfig):
    import shlex
    if cfg.smallest:
        cfg = dataclasses.replace(cfg, vocab=16384, train_vocab=0, examples=min(cfg.examples, 4))
    root = os.path.abspath(cfg.out)
    os.makedirs(root, exist_ok=True)
    t0 = time.time()
    paths = write_model(os.path.join(root, "model"), cfg)
    image = write_data(root, cfg)
    print(f"rehearsal model ({cfg.layers} decoder layers, {cfg.vision_depth} vision blocks, vocab {cfg.vocab}; "
          f"trained at vocab {cfg.train_vocab or cfg.vocab}) and data written in {time.time() - t0:.0f} s -> {root}",
          flush=True)
    env = dict(os.environ, PYTHONPATH=HERE, TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc))))
    results = []
    for readme, extra in commands(cfg, paths, image):
        argv = shlex.split(readme + " " + extra)
        if argv[0] == "torchrun":
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", *argv[1:]]
        else:
            argv = [sys.executable, *argv[1:]]
        argv = [os.path.join(HERE, a) if a.endswith(".py") else a for a in argv]
        print(f"\n$ {readme}" + (f"   [rehearsal: {extra}]" if extra else ""), flush=True)
        start = time.time()
        p = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20  # GiB, the largest process so far
        text = p.stdout if p.returncode == 0 else p.stdout + p.stderr  # stderr: progress bars, warnings
        tail = [line for line in text.splitlines() if line.strip() and not re.search(r"\|\s*\d+/\d+ \[", line)][-6:]
        print("\n".join("  " + line[:200] for line in tail), flush=True)
        results.append(dict(command=readme, rehearsal_flags=extra, exit=p.returncode, seconds=time.time() - start,
                            peak_rss_gib_so_far=peak, output_tail=tail))
        if p.returncode != 0:
            break
    ok = all(r["exit"] == 0 for r in results) and len(results) == len(commands(cfg, paths, image))
    with open(os.path.join(root, "rehearse.json"), "w") as f:
        json.dump(dict(config=dataclasses.asdict(cfg), ok=ok, seconds=time.time() - t0, commands=results), f, indent=2)
    print(f"\nrehearsal {'OK' if ok else 'FAILED'}: {len(results)} commands in {time.time() - t0:.0f} s -> "
          f"{root}/rehearse.json")
    if not ok:
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    from common import parse_config, run_main
    run_main(main, parse_config(RehearseConfig))
