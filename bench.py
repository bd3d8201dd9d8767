"""Training-step benchmark: tokens/s, model FLOPs utilization (MFU) and peak memory of train.py's own step
(GAP.forward + train.train_step + AdamW, wrapped as train.py wraps it) on a randomly initialized Qwen2.5-VL,
padded micro-batches against packed rows on the same length mix, for each attention backend that is available.

    python bench.py                                   # tiny shapes on the CPU (what the README reports)
    python bench.py --shapes small                    # a mid-size model that still runs on a CPU
    torchrun --nproc_per_node 1 bench.py --shapes 7b --layers 8 --fsdp --grad_ckpt   # 7B shapes on one GPU

Shapes `7b` are Qwen2.5-VL-7B's (hidden 3584, intermediate 18944, 28 heads / 4 KV heads, vocab 152064; vision
tower 32 blocks of 1280) with --layers decoder layers (as many as fit). Synthetic examples: an image of U{a..b}
merged vision tokens, a response of log-normal length, one latent span of K slots; no files, no download.

MFU = model FLOPs / (time x peak). Model FLOPs per example of T tokens, counted on real tokens only (padding
is waste, not work): 3 x decoder forward [L x (2 x dense params per layer x T + 2 x T^2 x d causal attention)]
+ 6 x d x V per supervised token (the LM head runs only there) + 2 x vision params x patches (the frozen
vision tower runs forward only). Activation recomputation is not counted. Peak: bf16 dense peak of the GPU
(table below), or on a CPU the measured throughput of a large fp32 matmul (said in the output).
"""
import dataclasses
import json
import math
import random
import resource
import time
from dataclasses import field

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, no sparsity


@dataclasses.dataclass
class BenchConfig:
    """Benchmark train.py's training step: padded vs packed, per attention backend."""
    shapes: str = field(default="tiny", metadata={"help": "model shapes", "choices": ["tiny", "small", "7b"]})
    layers: int = field(default=0, metadata={"help": "decoder layers (0: the shape's own; 7b: 28)"})
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
    seed: int = field(default=0, metadata={"help": "weights and length mix"})
    out: str = field(default="", metadata={"help": "also write the results here as JSON"})


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
    from transformers import Qwen2_5_VLConfig
    text, vision, _, _ = SHAPES[cfg.shapes]
    text = dict(text, num_hidden_layers=cfg.layers or text["num_hidden_layers"], rope_theta=1e6,
                max_position_embeddings=32768, tie_word_embeddings=False)
    half = text["hidden_size"] // text["num_attention_heads"] // 2  # 7b: 64 -> Qwen2.5-VL's own [16, 24, 24]
    section = [16, 24, 24] if half == 64 else [half - 2 * (half // 3), half // 3, half // 3]
    text["rope_scaling"] = {"type": "mrope", "mrope_section": section}
    vision = dict(vision, depth=cfg.vision_depth or vision["depth"], out_hidden_size=text["hidden_size"],
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112)
    vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision["depth"]]
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                            video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                            vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False,
                            attn_implementation=attn)


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
                          labels=torch.tensor([-100] * len(prompt) + labels),
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
        n_sup = int((it["labels"][1:] != -100).sum())
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
            train.train_step(model, micro, tcfg, device, world)
            torch.nn.utils.clip_grad_norm_(gap.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / cfg.steps
        results.append(dict(attn=attn, layout=name, rows=len(micro), pack_len=pack_len if name == "packed" else 0,
                            tokens=real, slots=slots,
                            tokens_per_s=real * world / dt, step_s=dt, flops_per_s=flops * world / dt,
                            peak_mem_gib=peak_memory(device)))
    del model, gap, opt, backbone
    return results, config


def main(cfg: BenchConfig):
    import train
    import tiny
    from model import atomic_write_text, attn_implementation
    rank, world, device = train.setup_distributed()
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


if __name__ == "__main__":
    from model import parse_config
    main(parse_config(BenchConfig))
