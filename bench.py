"""Benchmarks of the two hot loops, on randomly initialized Qwen2.5-VL models (no files, no download).

--mode train (default): tokens/s, model FLOPs utilization (MFU) and peak memory of train.py's step on ready
micro-batches (GAP.forward + the micro-step loop of train.main + AdamW, wrapped as train.py wraps it), padded
micro-batches against packed rows
on the same length mix, for each attention backend that is available.

    python bench.py                                   # tiny shapes on the CPU (what the README reports)
    python bench.py --shapes small                    # a mid-size model that still runs on a CPU
    torchrun --nproc_per_node 1 bench.py --shapes 7b --layers 8 --fsdp --grad_ckpt   # 7B shapes on one GPU

--mode sample: samples/s of difficulty.py's sampler, GAP.generate(num_samples=N) on a batch of prompts -- each
prompt prefilled once, its KV cache repeated into N decode rows -- against a plain loop of N separate batch-1
generate calls per prompt, on a tiny random Qwen2.5-VL (tiny.build_tiny) in a temp dir.

    OMP_NUM_THREADS=1 python bench.py --mode sample                                  # 56 px images: 4 image tokens
    OMP_NUM_THREADS=1 python bench.py --mode sample --image_side 448 --hidden 256    # 256 image tokens

--mode infer: the latent loop (latent_loop.py) on a random model with a PCA latent head, in one run on one model
and context: a latent step (head + decoder) against a text step (decoder + LM head + sampling) at batch 1; the
cached loop (prefill + K latents) against recomputing the whole sequence for each latent (COCONUT's way); a
batch of --rows prompts against --rows single calls; the decode step in ms at batch 1 and --rows (with
--compile also through torch.compile; on a GPU next to the time to read the weights once at peak HBM
bandwidth); and eval samples/s on a long-tailed mix (--eval_prompts prompts, each opening a K-latent span,
log-normal answer lengths with median --median_new and P90 4x that, given to each prompt as its
max_new_tokens; greedy, no stop ids) with static batches of --rows against continuous batching in --rows rows,
whose outputs must be identical. Step times run from the first to the last step of a generation (no
prefill), best of --repeats. --loop_file times another copy of latent_loop.py (e.g. the one before a change).

    OMP_NUM_THREADS=1 python bench.py --mode infer --hidden 128 --compile        # tiny: d=128, 2 layers
    OMP_NUM_THREADS=1 python bench.py --mode infer --shapes small --compile       # d=512, 4 layers
    python bench.py --mode infer --shapes 7b --device cuda --rows 32 --compile    # 7B shapes, random weights

--mode eval: `infer.py --data` end to end (infer.run_batch: prompt encoding, generation, decoding, scoring, result
files) with --schedule static (chunks of --rows) and continuous (--rows rows), on a tiny random GAP checkpoint
(tiny.build_tiny with --hidden, a parameter-free head, K = --latent_tokens) and --eval_prompts sample examples,
sampled at temperature 1 with up to --max_new_tokens tokens: the random model stops with probability about
2/620 per token (<|im_end|>, <|endoftext|> in a near-uniform distribution), so answer lengths are geometric,
median ~210 and P90 ~3.3x that; each example draws from its own generator, so both schedules must write the
same results. samples/s counts run_batch's wall time (the checkpoint loaded before). Then the same for
difficulty.py on the base model: --samples answers per example, static chunks of --rows // --samples prompts
against --rows continuous rows (difficulty.main's wall time, loading the tiny model included).

    OMP_NUM_THREADS=1 python bench.py --mode eval --eval_prompts 64 --max_new_tokens 1024

Training shapes (tiny.tiny_config with SHAPES' overrides): `7b` are Qwen2.5-VL-7B's (hidden 3584, intermediate
18944, 28 heads / 4 KV heads, vocab 152064; vision tower 32 blocks of 1280) with --layers decoder layers (as many
as fit). Synthetic examples: an image of U{a..b} merged vision tokens, a response of log-normal length, one
latent span of K slots.

MFU = model FLOPs / (time x peak). Model FLOPs per example of T tokens, counted on real tokens only (padding
is waste, not work): 3 x decoder forward [L x (2 x dense params per layer x T + 2 x T^2 x d causal attention)]
+ 6 x d x V per supervised token (the LM head runs only there) + 2 x vision block params x patches (the frozen
vision tower runs forward only; its patch embedding, merger and attention are left out). Activation
recomputation is not counted. test_bench.py checks this against torch's FlopCounterMode. Peak: bf16 dense peak of
the GPU (table below), or on a CPU the measured throughput of a large fp32 matmul (said in the output).

Sampling: every row generates exactly max_new_tokens tokens (no stop ids), so all variants do the same decode
work. Rows: the loop (N calls per prompt); one call per prompt with the prompt repeated N times (batched decode,
N prefills); one call per prompt with num_samples=N (shared prefill); one call for all prompts with
num_samples=N (what difficulty.py runs).
"""
import dataclasses
import json
import math
import os
import random
import resource
import tempfile
import time
from dataclasses import field

import torch

from losses import IGNORE

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, no sparsity


@dataclasses.dataclass
class BenchConfig:
    """Benchmark train.py's training step (padded vs packed, per attention backend) or difficulty.py's sampler."""
    mode: str = field(default="train", metadata={"help": "train: the training step; sample: shared-prefill "
                                                         "sampling; loader: train.py with 0 vs N DataLoader workers; "
                                                         "infer: the latent loop's decode; eval: infer.py --data "
                                                         "static vs continuous; smoke: one bf16 step of each GPU "
                                                         "path (run it first on a GPU machine); validate: the "
                                                         "check before training",
                                                 "choices": ["train", "sample", "loader", "infer", "eval", "smoke",
                                                             "validate"]})
    layers: int = field(default=0, metadata={"help": "decoder layers (0: the shape's own; 7b: 28; sample: tiny's 2)"})
    seed: int = field(default=0, metadata={"help": "weights, length mix and sampling"})
    out: str = field(default="", metadata={"help": "also write the results here as JSON"})
    # --mode train
    shapes: str = field(default="tiny", metadata={"help": "model shapes", "choices": ["tiny", "small", "7b"]})
    vision_depth: int = field(default=0, metadata={"help": "vision blocks (0: the shape's own; 7b: 32)"})
    latent_tokens: int = field(default=36, metadata={"help": "K latent slots per example"})
    examples: int = field(default=16, metadata={"help": "examples per optimizer step (per rank)"})
    micro_batch: int = field(default=4, metadata={"help": "examples per padded forward"})
    pack_len: int = field(default=0, metadata={"help": "tokens per packed row (0: the longest example, rounded up)"})
    steps: int = field(default=4, metadata={"help": "timed steps per setting"})
    warmup: int = field(default=1, metadata={"help": "untimed steps first (allocator, kernels)"})
    attn: str = field(default="sdpa,flash_attention_2", metadata={"help": "backends to try, comma-separated"})
    fsdp: bool = field(default=False, metadata={"help": "wrap with FSDP2 as train.py --fsdp does (bf16 on GPU)"})
    grad_ckpt: bool = field(default=False, metadata={"help": "activation checkpointing per decoder block"})
    peak_tflops: float = field(default=0.0, metadata={"help": "peak for MFU (0: GPU table, or measured CPU matmul)"})
    # --mode sample
    samples: int = field(default=8, metadata={"help": "N samples per prompt"})
    prompts: int = field(default=4, metadata={"help": "prompts per batched call"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per sample (all rows, no stop); "
                                                              "eval: the answer budget"})
    image_side: int = field(default=56, metadata={"help": "query image side in px (28 px = one image token)"})
    hidden: int = field(default=64, metadata={"help": "tiny model width"})
    repeats: int = field(default=3, metadata={"help": "timed repeats per variant (the best is reported)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda (train mode: cuda when there is one)"})
    # --mode loader (also uses micro_batch, steps, warmup, hidden, layers)
    workers: int = field(default=2, metadata={"help": "DataLoader workers to compare with 0"})
    loader_image: int = field(default=896, metadata={"help": "side in px of the PNGs written for the loader mode"})
    loader_pixels: int = field(default=448 * 448, metadata={"help": "image_max_pixels given to train.py"})
    # --mode validate (also uses loader_pixels)
    validate_examples: int = field(default=200, metadata={"help": "examples with 1280x960 JPEG query images"})
    # --mode infer (also uses shapes, layers, hidden (tiny's width), latent_tokens, repeats, device)
    context: int = field(default=1024, metadata={"help": "prompt tokens for the step ratios and the recompute"})
    rows: int = field(default=8, metadata={"help": "decode rows: batched vs one at a time, static vs continuous"})
    eval_prompts: int = field(default=32, metadata={"help": "prompts in the long-tailed eval mix"})
    median_new: int = field(default=300, metadata={"help": "eval mix: median new tokens (log-normal, P90 = 4x)"})
    new_tokens: int = field(default=64, metadata={"help": "new tokens per row for batched vs one at a time"})
    compile: bool = field(default=False, metadata={"help": "also time the decode step under torch.compile"})
    loop_file: str = field(default="", metadata={"help": "time this copy of latent_loop.py's decode step instead "
                                                         "(e.g. git show HEAD~1:latent_loop.py > old.py)"})


# shape -> (text, vision, image tokens range, median response tokens)
SHAPES = {
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=768),
             dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1]), (4, 128), 48),
    "small": (dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=4096),
              dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, fullatt_block_indexes=[3]),
              (16, 256), 96),
    "7b": (dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064),
           dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, fullatt_block_indexes=[7, 15, 23, 31]),
           (64, 1024), 384),
}


def make_config(cfg: BenchConfig, tokenizer, attn):
    """The shape's Qwen2.5-VL config (tiny.tiny_config with SHAPES' overrides), --layers and --vision_depth applied."""
    import tiny
    text, vision, _, _ = SHAPES[cfg.shapes]
    depth = cfg.vision_depth or vision["depth"]
    text = dict(text, num_hidden_layers=cfg.layers or text["num_hidden_layers"], rope_theta=1e6,
                max_position_embeddings=32768)
    vision = dict(vision, depth=depth, window_size=112,
                  fullatt_block_indexes=[i for i in vision["fullatt_block_indexes"] if i < depth])
    return tiny.tiny_config(tokenizer, text=text, vision=vision, attn=attn)


def length_mix(cfg: BenchConfig, tokenizer, latent_ids, n, rng):
    """n synthetic training examples (collate()-able): uniform image sizes, log-normal response lengths."""
    from data import prompt_text, response_ids
    _, _, (lo, hi), median = SHAPES[cfg.shapes]
    words = ["red", "green", "blue", "circle", "count", "the", "answer", "is", "left", "of", "so", "there", "are"]
    items = []
    for i in range(n):
        tokens = rng.randint(lo, hi)  # merged vision tokens = (h/2) x (w/2)
        h = max(1, int(math.sqrt(tokens)))
        w = max(1, tokens // h)
        grid = torch.tensor([[1, 2 * h, 2 * w]])
        prompt = tokenizer(prompt_text("What is in the image?", h * w), add_special_tokens=False)["input_ids"]
        n_words = int(min(8 * median, max(8, rng.lognormvariate(math.log(median), 0.8))))
        text = " ".join(rng.choices(words, k=n_words))
        ids, labels = response_ids(tokenizer, f"<think>{text} <latent> so</think><answer>3</answer>", latent_ids,
                                   cfg.latent_tokens, True)
        items.append(dict(id=str(i), input_ids=torch.tensor(prompt + ids),
                          labels=torch.tensor([IGNORE] * len(prompt) + labels),
                          pixel_values=torch.randn(4 * h * w, 3 * 2 * 14 * 14), image_grid_thw=grid,
                          latent_targets=None))
    return items


def model_flops(config, items):
    """Training FLOPs of one pass over `items` (see the module docstring)."""
    t, v = config.text_config, config.vision_config
    d, L, kv = t.hidden_size, t.num_hidden_layers, t.hidden_size // t.num_attention_heads * t.num_key_value_heads
    dense = 2 * d * d + 2 * d * kv + 3 * d * t.intermediate_size  # q, o; k, v; gate, up, down
    vis = v.depth * (4 * v.hidden_size ** 2 + 3 * v.hidden_size * v.intermediate_size)
    total = 0.0
    for it in items:
        T = len(it["input_ids"])
        n_sup = int((it["labels"][1:] != IGNORE).sum())
        total += 3 * L * (2 * dense * T + 2 * T * T * d) + 6 * d * t.vocab_size * n_sup
        total += 2 * vis * int(it["image_grid_thw"].prod())
    return total


def cpu_peak():
    """Measured fp32 matmul FLOP/s on this CPU: the ceiling a CPU MFU is reported against."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048 ** 3 / (time.perf_counter() - t0)


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB: the process's peak RSS


def run(cfg: BenchConfig, attn, rank, world, device, tokenizer):
    """Build a random model for one backend, then time padded and packed steps on the same examples."""
    import train
    from data import collate, collate_packed, pack
    from latent_head import LatentHead
    from model import GAP, add_latent_tokens
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(cfg.seed)
    config = make_config(cfg, tokenizer, attn)
    with torch.device(device):
        backbone = Qwen2_5_VLForConditionalGeneration(config)
    ids = add_latent_tokens(backbone, tokenizer)
    backbone.model.visual.requires_grad_(False)
    if cfg.grad_ckpt:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    d = config.text_config.hidden_size
    basis = dict(P=torch.linalg.qr(torch.randn(d, min(d, 629)))[0], mu=torch.zeros(d), eigenvalues=torch.ones(min(d, 629)))
    gap = GAP(backbone, LatentHead("pca", d, basis=basis).to(device), ids, cfg.latent_tokens)
    tcfg = train.TrainConfig(latent_tokens=cfg.latent_tokens, fsdp=cfg.fsdp, lr=1e-5, head_lr=1e-5)
    model = train.wrap(gap, tcfg, device, world)
    opt = train.optimizer_for(gap, tcfg)
    items = length_mix(cfg, tokenizer, ids, cfg.examples, random.Random(cfg.seed + rank))
    for it in items:  # real targets are vision embeddings; random ones of the right shape cost the same
        it["latent_targets"] = torch.randn(cfg.latent_tokens, d)
    longest = max(len(it["input_ids"]) for it in items)
    pack_len = cfg.pack_len or 256 * math.ceil(longest / 256)
    layouts = {"padded": [collate(items[j:j + cfg.micro_batch], tokenizer.pad_token_id)
                          for j in range(0, len(items), cfg.micro_batch)],
               "packed": [collate_packed(r) for r in pack(items, pack_len)]}
    flops, real = model_flops(config, items), sum(len(it["input_ids"]) for it in items)
    results = []
    for name, micro in layouts.items():
        slots = sum(mb["input_ids"].numel() for mb in micro)
        for s in range(cfg.warmup + cfg.steps):
            if s == cfg.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
            train_step(model, gap, opt, micro, tcfg, device, world)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / cfg.steps
        results.append(dict(attn=attn, layout=name, rows=len(micro), pack_len=pack_len if name == "packed" else 0,
                            tokens=real, slots=slots,
                            tokens_per_s=real * world / dt, step_s=dt, flops_per_s=flops * world / dt,
                            peak_mem_gib=peak_memory(device)))
    del model, gap, opt, backbone
    return results, config


def train_step(model, gap, opt, micro, tcfg, device, world):
    """One optimizer step on ready micro-batches, a copy of the step in train.main's loop without its data
    loading and logging (keep the two alike): sync on the last micro-step, loss normalized by the global counts,
    weight-0 repeats so ranks run the same number of forwards."""
    import train
    from common import all_reduce
    from losses import lm_targets, total_loss
    n_lm = sum(int(lm_targets(mb["labels"], mb["input_ids"], gap.latent_ids).sum()) for mb in micro)
    n_latent = sum(len(mb["latent_targets"]) for mb in micro if mb["latent_targets"] is not None)
    n_lm, n_latent = all_reduce([n_lm, n_latent], device)
    (n_micro,) = all_reduce([len(micro)], device, torch.distributed.ReduceOp.MAX if world > 1 else None)
    for j in range(int(n_micro)):
        train.set_grad_sync(model, j == n_micro - 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=train.bf16(tcfg, device) and not tcfg.fsdp):
            out = model(**train.to_device(micro[min(j, len(micro) - 1)], device))
        (total_loss(out, n_lm, n_latent, tcfg.lambda_latent) * world * float(j < len(micro))).backward()
    torch.nn.utils.clip_grad_norm_(gap.parameters(), tcfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_train(cfg: BenchConfig):
    import tiny
    from common import atomic_write_text, attn_implementation, setup_distributed
    rank, world, device = setup_distributed()
    tokenizer = tiny.build_tokenizer(tiny.corpus_texts())
    if cfg.peak_tflops:
        peak, peak_note = cfg.peak_tflops * 1e12, "given"
    elif device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak is None:
            raise ValueError(f"no bf16 peak known for {name}: pass --peak_tflops")
        peak_note = f"{name} bf16 dense peak"
    else:
        peak, peak_note = cpu_peak(), f"measured fp32 matmul on this CPU ({torch.get_num_threads()} threads)"
    rows = []
    for attn in cfg.attn.split(","):
        if attn == "flash_attention_2" and attn_implementation() != attn:  # model.py's own choice
            if rank == 0:
                print("flash_attention_2: skipped (flash_attn does not import here, or no GPU)")
            continue
        results, config = run(cfg, attn, rank, world, device, tokenizer)
        rows += results
    world_note = f"{world} rank(s) {'FSDP2' if cfg.fsdp else 'DDP' if world > 1 else ''}".strip()
    if rank == 0:
        t = config.text_config
        print(f"shapes={cfg.shapes}: d={t.hidden_size} layers={t.num_hidden_layers} vocab={t.vocab_size} "
              f"vision depth={config.vision_config.depth}, {cfg.examples} examples/step/rank, K={cfg.latent_tokens}, "
              f"{world_note}, grad_ckpt={cfg.grad_ckpt}, device={device}, peak {peak / 1e12:.2f} TFLOP/s ({peak_note})")
        print(f"{'attention':<18}{'layout':<8}{'rows':>5}{'pad %':>7}{'step s':>9}{'tokens/s':>11}{'MFU %':>7}{'peak GiB':>10}")
        for r in rows:
            r["mfu"] = r["flops_per_s"] / (peak * world)
            print(f"{r['attn']:<18}{r['layout']:<8}{r['rows']:>5}{100 * (1 - r['tokens'] / r['slots']):>7.1f}"
                  f"{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}{100 * r['mfu']:>7.1f}{r['peak_mem_gib']:>10.2f}")
        for attn in {r["attn"] for r in rows}:
            by = {r["layout"]: r for r in rows if r["attn"] == attn}
            print(f"{attn}: packed rows of at most {by['packed']['pack_len']} tokens; packed / padded tokens/s = {by['packed']['tokens_per_s'] / by['padded']['tokens_per_s']:.2f}x")
        if cfg.out:
            atomic_write_text(cfg.out, json.dumps(dict(config=dataclasses.asdict(cfg), peak=peak, peak_note=peak_note,
                                                       world=world, device=str(device), rows=rows), indent=2) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return rows


def best_time(fn, repeats, device):
    """Seconds of the fastest of `repeats` timed calls of fn, after one untimed warm-up call."""
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


def bench_sample(cfg: BenchConfig):
    """Time the four sampling variants (module docstring) on one tiny model; returns one row per variant."""
    from PIL import Image

    import tiny
    from common import atomic_write_text
    from data import DataSpec, collate, encode_prompt
    from difficulty import load_scorer
    layers = cfg.layers or SHAPES["tiny"][0]["num_hidden_layers"]
    with tempfile.TemporaryDirectory() as tmp:
        tiny.build_tiny(os.path.join(tmp, "tiny"), hidden=cfg.hidden, layers=layers, seed=cfg.seed)
        gap, tokenizer, image_processor = load_scorer(os.path.join(tmp, "tiny"), cfg.device)
    side = cfg.image_side
    spec = DataSpec(latent_tokens=0, image_min_pixels=side * side, image_max_pixels=side * side)
    questions = [q.split(". ")[0] + "?" for q in tiny.corpus_texts()[::10]][:cfg.prompts]
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
    gen = torch.Generator(dev).manual_seed(cfg.seed)
    kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=1.0, generator=gen)  # no stop ids: full length

    def call(args, rows, **extra):
        tokens = gap.generate(*args, **kw, **extra)
        if tokens.shape != (rows, cfg.max_new_tokens):
            raise RuntimeError(f"generate gave {tuple(tokens.shape)} tokens, not ({rows}, {cfg.max_new_tokens})")

    variants = {
        f"loop: {n} x generate(1 prompt)": lambda: [call(s, 1) for s in singles for _ in range(n)],
        f"generate({n} copies of 1 prompt)": lambda: [call(r, n) for r in repeated],
        f"generate(1 prompt, num_samples={n})": lambda: [call(s, n, num_samples=n) for s in singles],
        f"generate({cfg.prompts} prompts, num_samples={n})": lambda: call(together, cfg.prompts * n, num_samples=n),
    }
    n_prompt = together[0].shape[1]
    print(f"tiny Qwen2.5-VL (hidden {cfg.hidden}, {layers} layers) on {cfg.device} "
          f"({torch.get_num_threads()} threads): {cfg.prompts} prompts of ~{n_prompt} tokens "
          f"({side}x{side} px image), N={n}, {cfg.max_new_tokens} new tokens per sample")
    print(f"{'variant':<42} {'seconds':>8} {'samples/s':>10} {'speedup':>8}")
    rows, base = [], None
    for name, fn in variants.items():
        t = best_time(fn, cfg.repeats, cfg.device)
        rate = cfg.prompts * n / t
        base = base or rate
        rows.append(dict(variant=name, seconds=t, samples_per_s=rate, speedup=rate / base))
        print(f"{name:<42} {t:>8.3f} {rate:>10.1f} {rate / base:>7.1f}x")
    if cfg.out:
        atomic_write_text(cfg.out, json.dumps(dict(config=dataclasses.asdict(cfg), device=cfg.device,
                                                   threads=torch.get_num_threads(), rows=rows), indent=2) + "\n")
    return rows


def bench_loader(cfg: BenchConfig):
    """train.main itself on PNGs written here (one query image each, K=0 so no target cache), with 0 and with
    cfg.workers DataLoader workers: the mean step time after warm-up, waiting for data included."""
    import numpy as np
    from PIL import Image
    import tiny
    import train
    rng = np.random.default_rng(cfg.seed)
    n = cfg.micro_batch * (cfg.warmup + cfg.steps)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny.build_tiny(os.path.join(tmp, "tiny"), hidden=cfg.hidden, layers=cfg.layers or 2)
        os.makedirs(os.path.join(tmp, "img"))
        with open(os.path.join(tmp, "train.jsonl"), "w") as f:
            for i in range(n):  # noise compresses badly: a PNG as costly to decode as a photo of that size
                side = cfg.loader_image
                pixels = rng.integers(0, 256, (side, side * 3 // 4, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(tmp, "img", f"{i}.png"))
                f.write(json.dumps(dict(id=str(i), image=f"img/{i}.png", question="How many red circles are there?",
                                        response="<think>I need to count the red circles.</think><answer>3</answer>",
                                        answer="3")) + "\n")
        rows = []
        for workers in (0, cfg.workers):
            run = train.main(train.TrainConfig(
                model=model_dir, data=os.path.join(tmp, "train.jsonl"), latent_tokens=0, global_batch=cfg.micro_batch,
                micro_batch=cfg.micro_batch, epochs=1, image_max_pixels=cfg.loader_pixels, num_workers=workers,
                out_dir=os.path.join(tmp, "out"), log_every=10 ** 6, seed=cfg.seed))
            times = run["step_s"][cfg.warmup:]
            rows.append(dict(workers=workers, step_s=sum(times) / len(times), steps=len(times), losses=run["losses"]))
    print(f"train.py, tiny Qwen2.5-VL (hidden {cfg.hidden}, {cfg.layers or 2} layers), {cfg.micro_batch} images per "
          f"micro-batch ({cfg.loader_image}x{cfg.loader_image * 3 // 4} px PNGs, max_pixels {cfg.loader_pixels}), "
          f"{torch.get_num_threads()} torch threads")
    for r in rows:
        print(f"num_workers {r['workers']}: {r['step_s']:.3f} s/step (mean of {r['steps']} steps after {cfg.warmup} warm-up)")
    print(f"speed-up with {cfg.workers} workers: {rows[0]['step_s'] / rows[1]['step_s']:.2f}x")
    return rows


def bench_validate(cfg: BenchConfig):
    """The check train.py runs before step 1 (GAPDataset.check: image tokens from the image's size) against the
    same pass through example() (the processor's pixel work), per example, in this one process."""
    import numpy as np
    from PIL import Image
    import tiny
    from data import DataSpec, GAPDataset, TargetCache, TargetsConfig, extract_targets, validate
    from model import add_latent_tokens, load_backbone
    rng = np.random.default_rng(cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        backbone, tokenizer, image_processor = load_backbone(tiny.build_tiny(os.path.join(tmp, "tiny")), "cpu")
        os.makedirs(os.path.join(tmp, "img"))
        with open(os.path.join(tmp, "t.jsonl"), "w") as f:
            for i in range(cfg.validate_examples):  # smooth content: JPEGs of photo-like size
                ramp = np.linspace(0, 255, 1280)[None, :, None] / rng.integers(1, 4)
                Image.fromarray(np.broadcast_to(ramp, (960, 1280, 3)).astype(np.uint8)).save(
                    os.path.join(tmp, "img", f"q{i}.jpg"), quality=90)
                Image.new("RGB", (300, 300), "gray").save(os.path.join(tmp, "img", f"a{i}.png"))
                f.write(json.dumps(dict(id=str(i), image=f"img/q{i}.jpg", question="How many circles?", answer="3",
                                        response="<think>Look. <latent> ok</think><answer>3</answer>",
                                        aux_image=f"img/a{i}.png")) + "\n")
        data = os.path.join(tmp, "t.jsonl")
        extract_targets(TargetsConfig(data=data, latent_tokens=4, cache_dir=os.path.join(tmp, "c")), backbone,
                        image_processor)
        spec = DataSpec(latent_tokens=4, image_max_pixels=cfg.loader_pixels)
        ds = GAPDataset(data, tokenizer, image_processor, add_latent_tokens(backbone, tokenizer), spec,
                        TargetCache(os.path.join(tmp, "c"), 4))
        rates = {}
        for name, check in (("check (size only)", ds.check), ("example() (pixels processed)", ds.example)):
            t0 = time.perf_counter()
            assert not validate(ds.rows, check)
            rates[name] = len(ds.rows) / (time.perf_counter() - t0)
    print(f"{cfg.validate_examples} examples, 1280x960 JPEG query images at image_max_pixels {cfg.loader_pixels}, "
          f"one process, {torch.get_num_threads()} torch threads")
    for name, rate in rates.items():
        print(f"{name}: {rate:.1f} examples/s")
    return rates


PEAK_HBM = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L40S": 0.864e12}  # bytes/s


def bench_infer(cfg: BenchConfig):
    """The latent loop at inference on a random model (module docstring, --mode infer): step ratios, cache vs
    recompute, batched vs single, static vs continuous batching on a long-tailed mix; one row per measurement."""
    import importlib.util

    import latent_loop
    import tiny
    from common import atomic_write_text, attn_implementation
    from latent_head import LatentHead
    from model import add_latent_tokens
    from transformers import Qwen2_5_VLForConditionalGeneration
    loop = latent_loop
    if cfg.loop_file:  # another version of the loop, e.g. the one before a change
        spec = importlib.util.spec_from_file_location("latent_loop_under_test", cfg.loop_file)
        loop = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loop)
    device = torch.device(cfg.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = tiny.build_tokenizer(tiny.corpus_texts())
    attn = attn_implementation() if device.type == "cuda" else "sdpa"
    config = (tiny.tiny_config(tokenizer, cfg.hidden, cfg.layers or 2, attn=attn) if cfg.shapes == "tiny"
              else make_config(cfg, tokenizer, attn))
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype).eval()
    ids = add_latent_tokens(model, tokenizer)
    d, K, R = config.text_config.hidden_size, cfg.latent_tokens, cfg.rows
    k = min(d, 629)  # the PCA head of the paper: 629 components at 7B
    head = LatentHead("pca", d, basis=dict(P=torch.linalg.qr(torch.randn(d, k))[0], mu=torch.zeros(d),
                                           eigenvalues=torch.ones(k))).to(device)
    words = range(len(tiny.QWEN_SPECIALS), min(ids.values()))  # ordinary tokens: no image, no latent ids

    def prompt(n):  # (n,) random ordinary tokens
        return torch.tensor(rng.choices(words, k=n), device=device)

    def gen(x, n, **kw):  # n new tokens for unpadded prompts x (B, T), no stop ids
        return loop.generate(model, head, ids, K, x, torch.ones_like(x), max_new_tokens=n, **kw)

    def timed(fn):
        return best_time(fn, cfg.repeats, device.type)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step_s(x, n, **kw):  # seconds per decode step: from the first to the last of n + 1 steps (no prefill)
        def steps():
            it = loop.latent_steps(model, head, ids, K, x, torch.ones_like(x), max_new_tokens=n + 1, **kw)
            next(it)
            sync()
            t0 = time.perf_counter()
            for _ in it:
                pass
            sync()
            return time.perf_counter() - t0
        return min(steps() for _ in range(cfg.repeats + 1)) / n

    rows, text = [], dict(latent_mode="zero")  # zero: <|latent_start|> banned, every step a text step
    context = prompt(cfg.context)[None]  # (1, T)
    opened = torch.cat([context, torch.tensor([[ids["start"]]], device=device)], 1)  # ends in a span: K latents
    print(f"{cfg.shapes} Qwen2.5-VL (d={d}, {config.text_config.num_hidden_layers} layers, vocab "
          f"{config.text_config.vocab_size}) on {device} ({torch.get_num_threads()} threads), {dtype}, {attn}, "
          f"K={K}, context {cfg.context} tokens, loop {cfg.loop_file or 'latent_loop.py'}")

    # 1. a latent step (head + decoder) against a text step (decoder + LM head + sampling), batch 1
    latent, txt = step_s(opened, K), step_s(context, K, **text)
    rows.append(dict(name="latent step / text step", value=latent / txt, latent_ms=1e3 * latent, text_ms=1e3 * txt))
    # 2. the cached loop (prefill + K latents) against recomputing the whole sequence for each latent
    cached = timed(lambda: gen(opened, K + 1))

    @torch.no_grad()
    def recompute():
        embeds = model.get_input_embeddings()(opened)  # (1, T + 1, D)
        for _ in range(K):
            n = embeds.shape[1]
            h = model.model(inputs_embeds=embeds, attention_mask=torch.ones(1, n, dtype=torch.long, device=device),
                            position_ids=torch.arange(n, device=device).expand(3, 1, n)).last_hidden_state
            embeds = torch.cat([embeds, head(h[:, -1:]).to(embeds.dtype)], 1)

    again = timed(recompute)
    rows.append(dict(name=f"recompute / cached, {K} latents", value=again / cached, cached_s=cached, recompute_s=again))
    # 3. one batch of R prompts against R calls of one prompt, same new tokens
    batch = torch.stack([prompt(cfg.context) for _ in range(R)])  # (R, T)
    together = timed(lambda: gen(batch, cfg.new_tokens, **text))
    alone = timed(lambda: [gen(batch[i:i + 1], cfg.new_tokens, **text) for i in range(R)])
    rows.append(dict(name=f"batch of {R} / {R} single calls, throughput", value=alone / together,
                     batched_s=together, single_s=alone))
    # decode step time at batch 1 and R, eager and compiled
    for r in (1, R):
        x = batch[:r]
        rows.append(dict(name=f"decode step ms, batch {r}", value=1e3 * step_s(x, cfg.new_tokens, **text)))
        if cfg.compile:
            gen(x, cfg.new_tokens + 1, compile_step=True, **text)  # compiles once for this shape
            rows.append(dict(name=f"decode step ms, batch {r}, compiled",
                             value=1e3 * step_s(x, cfg.new_tokens, compile_step=True, **text)))
    if device.type == "cuda":  # batch 1 reads every decoder and LM-head weight once per token
        weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                      if "visual" not in n and "embed_tokens" not in n)
        bw = next((v for name, v in PEAK_HBM.items() if name in torch.cuda.get_device_name(device)), None)
        if bw:
            rows.append(dict(name="decode step ms, batch 1, weight-bandwidth limit", value=1e3 * weights / bw))
    # 4. eval samples/s on a long-tailed length mix: static batches of R against continuous batching in R rows
    if hasattr(loop, "generate_continuous"):
        items = []
        for i in range(cfg.eval_prompts):  # P90 / median of the log-normal = exp(1.2816 * 1.08) = 4.0
            n_new = int(min(8 * cfg.median_new, max(8, rng.lognormvariate(math.log(cfg.median_new), 1.08))))
            ids_i = torch.cat([prompt(rng.randint(cfg.context // 8, cfg.context // 2)),
                               torch.tensor([ids["start"]], device=device)])  # every answer opens with a span
            items.append(dict(input_ids=ids_i, pixel_values=None, image_grid_thw=None, max_new_tokens=n_new))
        new = sorted(it["max_new_tokens"] for it in items)

        def static():
            out = {}
            for c in range(0, len(items), R):
                chunk = items[c:c + R]
                T = max(len(it["input_ids"]) for it in chunk)
                x = torch.full((len(chunk), T), tokenizer.pad_token_id, device=device)
                mask = torch.zeros_like(x)
                for j, it in enumerate(chunk):  # left padding
                    x[j, T - len(it["input_ids"]):], mask[j, T - len(it["input_ids"]):] = it["input_ids"], 1
                longest = max(it["max_new_tokens"] for it in chunk)
                tokens = loop.generate(model, head, ids, K, x, mask, max_new_tokens=longest)
                out.update({c + j: tokens[j, :it["max_new_tokens"]] for j, it in enumerate(chunk)})
            return out

        results = {}
        for name, fn in (("static", static), ("continuous", lambda: dict(loop.generate_continuous(
                model, head, ids, K, items, R)))):
            t0 = time.perf_counter()
            results[name] = fn()
            rows.append(dict(name=f"eval samples/s, {name} batching", value=len(items) / (time.perf_counter() - t0)))
        same = all(torch.equal(results["static"][i].cpu(), results["continuous"][i].cpu()) for i in range(len(items)))
        rows.append(dict(name="eval samples/s, continuous / static", value=rows[-1]["value"] / rows[-2]["value"],
                         identical_outputs=same, prompts=len(items), median_new=new[len(new) // 2],
                         p90_new=new[int(0.9 * len(new))], max_new=new[-1]))
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in ("name", "value")}
        print(f"{r['name']:<52} {r['value']:>9.3f}  " + " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()))
    if cfg.out:
        atomic_write_text(cfg.out, json.dumps(dict(config=dataclasses.asdict(cfg), device=str(device),
                                                   threads=torch.get_num_threads(), rows=rows), indent=2) + "\n")
    return rows


def bench_eval(cfg: BenchConfig):
    """infer.py --data and difficulty.py end to end with each schedule (module docstring, --mode eval); one row per
    schedule and their ratios, which require identical results (latency aside)."""
    import difficulty  # the entry points' batch modes are what is measured, as toy.py evaluates with them
    import infer
    import latent_loop
    import tiny
    from latent_head import LatentHead
    from model import GAP, add_latent_tokens, load_backbone, save_checkpoint
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny.build_tiny(os.path.join(tmp, "tiny"), cfg.hidden, cfg.layers or 2, seed=cfg.seed)
        data = tiny.write_sample_data(os.path.join(tmp, "data"), cfg.eval_prompts, seed=cfg.seed)
        backbone, tokenizer, image_processor = load_backbone(model_dir, "cpu")
        ids = add_latent_tokens(backbone, tokenizer)
        head = LatentHead("hidden", backbone.config.text_config.hidden_size)
        ckpt = os.path.join(tmp, "gap")
        save_checkpoint(GAP(backbone, head, ids, cfg.latent_tokens), tokenizer, image_processor, ckpt, {})
        for schedule in ("static", "continuous"):
            ic = infer.InferConfig(ckpt=ckpt, data=data, out=os.path.join(tmp, f"{schedule}.jsonl"), temperature=1.0,
                                   max_new_tokens=cfg.max_new_tokens, batch_size=cfg.rows, schedule=schedule,
                                   seed=cfg.seed)
            runner = infer.Runner(ic, torch.device(cfg.device))
            decode, new = runner.gap.decode, []

            def counted(tok, ids):  # each answer's new tokens (a row of static batching: up to its first DONE)
                new.append(int((ids != latent_loop.DONE).sum()))
                return decode(tok, ids)
            runner.gap.decode = counted
            t0 = time.perf_counter()
            summary = infer.run_batch(ic, runner)
            seconds = time.perf_counter() - t0
            with open(ic.out) as f:
                results[schedule] = [{k: v for k, v in json.loads(line).items() if k != "latency_s"} for line in f]
            lat = summary["latency_s"]
            rows.append(dict(name=f"infer.py --data samples/s, {schedule}", value=len(results[schedule]) / seconds,
                             seconds=seconds, latency_mean=lat["mean"], latency_p50=lat["p50"],
                             latency_p90=lat["p90"]))
        new = sorted(new)
        rows.append(dict(name="infer.py --data samples/s, continuous / static",
                         value=rows[1]["value"] / rows[0]["value"],
                         identical_outputs=results["static"] == results["continuous"], examples=len(new),
                         min_tokens=new[0], median_tokens=infer.percentile(new, 0.5),
                         p90_tokens=infer.percentile(new, 0.9), max_tokens=new[-1]))
        for schedule in ("static", "continuous"):
            out = os.path.join(tmp, f"scored_{schedule}.jsonl")
            t0 = time.perf_counter()
            difficulty.main(difficulty.DifficultyConfig(
                model=model_dir, data=data, out=out, samples=cfg.samples, temperature=1.0,
                max_new_tokens=cfg.max_new_tokens, batch_size=max(1, cfg.rows // cfg.samples), schedule=schedule,
                seed=cfg.seed))
            seconds = time.perf_counter() - t0
            with open(out) as f:
                results[schedule] = f.read()
            n = cfg.eval_prompts * cfg.samples
            rows.append(dict(name=f"difficulty.py samples/s, {schedule}", value=n / seconds, seconds=seconds))
        rows.append(dict(name="difficulty.py samples/s, continuous / static", value=rows[4]["value"] / rows[3]["value"],
                         identical_outputs=results["static"] == results["continuous"], samples=n))
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in ("name", "value")}
        print(f"{r['name']:<52} {r['value']:>9.3f}  " + " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()))
    return rows


def bench_smoke(cfg: BenchConfig):
    """The GPU code paths before a real run: one bf16 training step (train.main itself) for DDP and FSDP2, padded
    and packed, with SDPA and with FlashAttention-2 when it imports, on a tiny model and sample data written to a
    temporary directory; checks finite losses and the attention backend in use, reports time and peak memory.
    Run it first on a new GPU machine, under torchrun with the GPUs you have (on a CPU it runs under gloo and says
    what it skipped):  torchrun --nproc_per_node 2 bench.py --mode smoke"""
    import math
    import tiny
    import train
    from common import attn_implementation
    from data import TargetsConfig, extract_targets
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    root = tempfile.mkdtemp(prefix=f"gap_smoke_rank{rank}_")  # each rank its own copy: no process group yet
    model_dir = tiny.build_tiny(os.path.join(root, "tiny"))
    data = tiny.write_sample_data(os.path.join(root, "data"), max(8, 4 * world))
    extract_targets(TargetsConfig(model=model_dir, data=data, latent_tokens=4, cache_dir=os.path.join(root, "cache")))
    attns = ["sdpa"] + (["flash_attention_2"] if attn_implementation() == "flash_attention_2" else [])
    notes = [] if cuda else ["no GPU: bf16 runs on the CPU under gloo, memory is the process's peak RSS"]
    if "flash_attention_2" not in attns:
        notes.append("flash_attention_2 skipped: flash_attn does not import here, or no GPU")
    rows = []
    for attn in attns:
        for fsdp in (False, True):
            for pack in (False, True):
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.time()
                run = train.main(train.TrainConfig(
                    model=model_dir, data=data, target_cache=os.path.join(root, "cache"), latent_tokens=4,
                    adapter_dim=16, global_batch=2 * world, micro_batch=1, max_steps=1, pack=pack, max_len=512,
                    fsdp=fsdp, precision="bf16", attn=attn, num_workers=0, log_every=1,
                    out_dir=os.path.join(root, "out"), fresh=True))
                rows.append(dict(attn=attn, used=run["attn"], wrap="FSDP2" if fsdp else "DDP" if world > 1 else "none",
                                 layout="packed" if pack else "padded", loss=run["losses"][0],
                                 finite=all(math.isfinite(x) for x in run["losses"][0]), seconds=time.time() - t0,
                                 peak_gib=peak_memory(torch.device("cuda" if cuda else "cpu"))))
    if rank == 0:
        print(f"\nsmoke: {world} rank(s), bf16, device {'cuda' if cuda else 'cpu'}")
        print(f"{'attention':<18}{'in use':<18}{'wrap':<7}{'layout':<8}{'loss_lm':>9}{'loss_lat':>9}{'s':>7}{'peak GiB':>9}")
        for r in rows:
            print(f"{r['attn']:<18}{r['used']:<18}{r['wrap']:<7}{r['layout']:<8}{r['loss'][0]:>9.4f}{r['loss'][1]:>9.4f}"
                  f"{r['seconds']:>7.1f}{r['peak_gib']:>9.2f}")
        for note in notes:
            print(f"note: {note}")
    bad = [r for r in rows if not r["finite"] or r["used"] != r["attn"]]
    if bad:
        raise SystemExit(f"smoke FAILED: {len(bad)} of {len(rows)} runs had a non-finite loss or another attention "
                         f"backend than asked for: {bad}")
    if rank == 0:
        print(f"smoke OK: {len(rows)} runs")
    return rows


def main(cfg: BenchConfig):
    return dict(sample=bench_sample, loader=bench_loader, train=bench_train, infer=bench_infer, eval=bench_eval,
                smoke=bench_smoke, validate=bench_validate)[cfg.mode](cfg)


if __name__ == "__main__":
    from common import parse_config, run_main
    run_main(main, parse_config(BenchConfig))
