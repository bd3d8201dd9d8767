"""Benchmarks of training, on randomly initialized Qwen2.5-VL models (no files, no download).

--mode train (default): tokens/s, model FLOPs utilization (MFU) and peak memory of the training step train.py runs
(step.train_step: GAP.forward, the micro-steps with gradient sync on the last, global normalization, clip, AdamW;
wrapped by step.wrap as train.py wraps it) on ready micro-batches, padded micro-batches against packed rows on the
same length mix, for each attention backend that is available. The two layouts' steps alternate (padded, packed,
padded, ...), so that a drift of a shared machine falls on both; the median step is reported, with min / max and
the per-pair ratio.

    python bench_train.py                                   # tiny shapes on the CPU (what the README reports)
    python bench_train.py --shapes small                    # a mid-size model that still runs on a CPU
    torchrun --nproc_per_node 1 bench_train.py --shapes 7b --layers 8 --fsdp --grad_ckpt   # 7B shapes on one GPU

--mode loader: train.main itself with 0 and with --workers DataLoader workers (step time, waiting for data included).
--mode validate: the check train.py runs before step 1 (image tokens from the image's size) against example().
--mode shard: the per-rank bytes of the FSDP2 layout (step.fsdp_units) at the shape's widths, with the embeddings,
final norm and LM head as their own units against in the root (as before): sharded fp32 parameters, gradients and
AdamW states, and what stays gathered (bf16) from forward to backward. Counted from the layout on the meta device
(no weights are allocated); under torchrun the counts are checked against the shards FSDP2 itself makes.

    torchrun --nproc_per_node 2 bench_train.py --mode shard --shapes 7b      # also 4 (gloo on a CPU)

Training shapes (tiny.shape_config): `7b` are Qwen2.5-VL-7B's (hidden 3584, intermediate 18944, 28 heads / 4 KV
heads, vocab 152064; vision tower 32 blocks of 1280) with --layers decoder layers (as many as fit). Synthetic
examples: an image of U{a..b} merged vision tokens, a response of log-normal length, one latent span of K slots.

MFU = model FLOPs / (time x peak). Model FLOPs per example of T tokens, counted on real tokens only (padding
is waste, not work): 3 x decoder forward [L x (2 x dense params per layer x T + 2 x T^2 x d causal attention)]
+ 6 x d x V per supervised token (the LM head runs only there) + 2 x vision block params x patches (the frozen
vision tower runs forward only; its patch embedding, merger and attention are left out). Activation
recomputation is not counted. test_bench.py checks this against torch's FlopCounterMode. Peak: bf16 dense peak of
the GPU (table below), or on a CPU the measured throughput of a large fp32 matmul (said in the output).
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

import tiny
from losses import IGNORE

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, no sparsity


@dataclasses.dataclass
class BenchConfig(tiny.BenchFlags):
    """Benchmark the training step (padded vs packed, per attention backend), data loading, or the check."""
    mode: str = field(default="train", metadata={"help": "train: the training step; loader: train.py with 0 vs N "
                                                         "DataLoader workers; validate: the check before training; "
                                                         "shard: per-rank bytes of the FSDP2 layout",
                                                 "choices": ["train", "loader", "validate", "shard"]})
    examples: int = field(default=16, metadata={"help": "examples per optimizer step (per rank)"})
    micro_batch: int = field(default=4, metadata={"help": "examples per padded forward"})
    pack_len: int = field(default=0, metadata={"help": "tokens per packed row (0: the longest example, rounded up)"})
    steps: int = field(default=4, metadata={"help": "timed steps per layout, padded and packed in turn (the median "
                                                    "is reported)"})
    warmup: int = field(default=1, metadata={"help": "untimed steps first (allocator, kernels)"})
    attn: str = field(default="sdpa,flash_attention_2", metadata={"help": "backends to try, comma-separated"})
    fsdp: bool = field(default=False, metadata={"help": "wrap with FSDP2 as train.py --fsdp does (bf16 on GPU)"})
    grad_ckpt: bool = field(default=False, metadata={"help": "activation checkpointing per decoder block"})
    peak_tflops: float = field(default=0.0, metadata={"help": "peak for MFU (0: GPU table, or measured CPU matmul)"})
    hidden: int = field(default=64, metadata={"help": "tiny model width"})
    workers: int = field(default=2, metadata={"help": "DataLoader workers to compare with 0"})
    loader_image: int = field(default=896, metadata={"help": "side in px of the PNGs written for the loader mode"})
    loader_pixels: int = field(default=448 * 448, metadata={"help": "image_max_pixels given to train.py"})
    validate_examples: int = field(default=200, metadata={"help": "examples with 1280x960 JPEG query images"})


def length_mix(cfg: BenchConfig, tokenizer, latent_ids, n, rng):
    """n synthetic training examples (collate()-able): uniform image sizes, log-normal response lengths."""
    from data import prompt_text, response_ids
    _, _, (lo, hi), median = tiny.SHAPES[cfg.shapes]
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
    from data import collate, collate_packed, pack
    from latent_head import LatentHead
    from model import GAP, add_latent_tokens
    from step import optimizer_for, train_step, wrap
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(cfg.seed)
    config = tiny.shape_config(cfg.shapes, tokenizer, attn, cfg.layers, cfg.vision_depth)
    with torch.device(device):
        backbone = Qwen2_5_VLForConditionalGeneration(config)
    ids = add_latent_tokens(backbone, tokenizer)
    backbone.model.visual.requires_grad_(False)
    if cfg.grad_ckpt:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    d = config.text_config.hidden_size
    basis = dict(P=torch.linalg.qr(torch.randn(d, min(d, 629)))[0], mu=torch.zeros(d), eigenvalues=torch.ones(min(d, 629)))
    gap = GAP(backbone, LatentHead("pca", d, basis=basis).to(device), ids, cfg.latent_tokens)
    bf16 = device.type == "cuda"  # as train.py --precision auto
    model = wrap(gap, device, world, cfg.fsdp, bf16)
    opt = optimizer_for(gap, lr=1e-5, head_lr=1e-5)
    items = length_mix(cfg, tokenizer, ids, cfg.examples, random.Random(cfg.seed + rank))
    for it in items:  # real targets are vision embeddings; random ones of the right shape cost the same
        it["latent_targets"] = torch.randn(cfg.latent_tokens, d)
    longest = max(len(it["input_ids"]) for it in items)
    pack_len = cfg.pack_len or 256 * math.ceil(longest / 256)
    layouts = {"padded": [collate(items[j:j + cfg.micro_batch], tokenizer.pad_token_id)
                          for j in range(0, len(items), cfg.micro_batch)],
               "packed": [collate_packed(r) for r in pack(items, pack_len)]}
    flops, real = model_flops(config, items), sum(len(it["input_ids"]) for it in items)
    times, peaks = {name: [] for name in layouts}, {name: 0.0 for name in layouts}
    for s in range(cfg.warmup + cfg.steps):
        for name, micro in layouts.items():  # interleaved: a drift of a shared machine falls on both layouts alike
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            train_step(model, gap, opt, micro, device, world, bf16=bf16, fsdp=cfg.fsdp)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if s >= cfg.warmup:
                times[name].append(time.perf_counter() - t0)
                peaks[name] = max(peaks[name], peak_memory(device))
    results = []
    for name, micro in layouts.items():
        ts = sorted(times[name])
        dt = ts[len(ts) // 2]  # the median step
        results.append(dict(attn=attn, layout=name, rows=len(micro), pack_len=pack_len if name == "packed" else 0,
                            tokens=real, slots=sum(mb["input_ids"].numel() for mb in micro),
                            tokens_per_s=real * world / dt, step_s=dt, step_s_min=ts[0], step_s_max=ts[-1],
                            flops_per_s=flops * world / dt, peak_mem_gib=peaks[name],
                            # packed / padded tokens/s of each step pair (the padded step ran just before)
                            speedups=[a / b for a, b in zip(times["padded"], times["packed"])]))
    del model, gap, opt, backbone
    return results, config


def bench_train(cfg: BenchConfig):
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
        print(f"{'attention':<18}{'layout':<8}{'rows':>5}{'pad %':>7}{'step s':>9}{'tokens/s':>11}{'MFU %':>7}"
              f"{'peak GiB':>10}  step s min-max")
        for r in rows:
            r["mfu"] = r["flops_per_s"] / (peak * world)
            print(f"{r['attn']:<18}{r['layout']:<8}{r['rows']:>5}{100 * (1 - r['tokens'] / r['slots']):>7.1f}"
                  f"{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}{100 * r['mfu']:>7.1f}{r['peak_mem_gib']:>10.2f}"
                  f"  {r['step_s_min']:.3f}-{r['step_s_max']:.3f}")
        for attn in {r["attn"] for r in rows}:
            by = {r["layout"]: r for r in rows if r["attn"] == attn}
            pairs = sorted(by["packed"]["speedups"])
            print(f"{attn}: packed rows of at most {by['packed']['pack_len']} tokens; packed / padded tokens/s = "
                  f"{by['packed']['tokens_per_s'] / by['padded']['tokens_per_s']:.2f}x (median steps); per step pair "
                  f"min / median / max {pairs[0]:.2f} / {pairs[len(pairs) // 2]:.2f} / {pairs[-1]:.2f}x")
        if cfg.out:
            atomic_write_text(cfg.out, json.dumps(dict(config=dataclasses.asdict(cfg), peak=peak, peak_note=peak_note,
                                                       world=world, device=str(device), rows=rows), indent=2) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return rows


def bench_loader(cfg: BenchConfig):
    """train.main itself on PNGs written here (one query image each, K=0 so no target cache), with 0 and with
    cfg.workers DataLoader workers: the mean step time after warm-up, waiting for data included."""
    import numpy as np
    from PIL import Image
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
    from data import DataSpec, GAPDataset, validate
    from model import add_latent_tokens, load_backbone
    from targets import TargetCache, TargetsConfig, extract_targets
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


def bench_shard(cfg: BenchConfig):
    """Per-rank bytes of the FSDP2 layout, before and after (module docstring, --mode shard)."""
    import torch.distributed as dist
    from transformers import Qwen2_5_VLForConditionalGeneration
    from common import setup_distributed
    from latent_head import LatentHead
    from model import GAP, add_latent_tokens
    from step import fsdp_units, shard, shard_bytes
    rank, world, device = setup_distributed()
    tokenizer = tiny.build_tokenizer(tiny.corpus_texts())
    config = tiny.shape_config(cfg.shapes, tokenizer, "sdpa", cfg.layers, cfg.vision_depth)
    d, k = config.text_config.hidden_size, min(config.text_config.hidden_size, 629)

    def model():
        with torch.device("meta"):
            backbone = Qwen2_5_VLForConditionalGeneration(config)
        ids = add_latent_tokens(backbone, tokenizer)
        backbone.model.visual.requires_grad_(False)  # frozen, as train.py's default
        head = LatentHead("pca", d, basis=dict(P=torch.linalg.qr(torch.randn(d, k))[0], mu=torch.zeros(d),
                                               eigenvalues=torch.ones(k)))
        return GAP(backbone, head, ids, cfg.latent_tokens)

    rows = {}
    for layout, separate in (("before: ends in the root", False), ("after: ends as units", True)):
        gap = model()
        rows[layout] = shard_bytes(fsdp_units(gap, separate), world, rank)
        if world > 1:  # the counts against the shards FSDP2 makes of the same model
            shard(gap, device, world, torch.bfloat16, separate)
            local = sum(4 * p.to_local().numel() for p in gap.parameters())
            if local != rows[layout]["params"]:
                raise RuntimeError(f"rank {rank}: FSDP2 holds {local} parameter bytes, the count says "
                                   f"{rows[layout]['params']}")
    if rank == 0:
        t = config.text_config
        print(f"shapes={cfg.shapes}: d={t.hidden_size} layers={t.num_hidden_layers} vocab={t.vocab_size} vision "
              f"depth={config.vision_config.depth}, {world} rank(s); GiB per rank (rank 0)"
              + ("; counts checked against FSDP2's own shards" if world > 1 else ""))
        print(f"{'layout':<26}{'params':>9}{'grads':>9}{'AdamW':>9}{'held bf16':>11}{'largest gather':>16}{'total':>9}")
        for layout, r in rows.items():
            g = {k: v / 2 ** 30 for k, v in r.items()}
            print(f"{layout:<26}{g['params']:>9.2f}{g['grads']:>9.2f}{g['adam']:>9.2f}{g['held']:>11.2f}"
                  f"{g['largest_gather']:>16.2f}{g['params'] + g['grads'] + g['adam'] + g['held']:>9.2f}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return rows


def main(cfg: BenchConfig):
    return dict(train=bench_train, loader=bench_loader, validate=bench_validate, shard=bench_shard)[cfg.mode](cfg)


if __name__ == "__main__":
    from common import parse_config, run_main
    run_main(main, parse_config(BenchConfig))
