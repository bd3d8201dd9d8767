"""Benchmarks of inference, on randomly initialized Qwen2.5-VL models (no files, no download): the latent loop's
decode (--mode infer, the default), shared-prefill sampling (--mode sample), and infer.py --data / difficulty.py
end to end with either schedule (--mode eval).

--mode infer (default): the latent loop (latent_loop.py) on a random model with a PCA latent head, in one run on one model
and context: a latent step (head + decoder) against a text step (decoder + LM head + sampling) at batch 1; the
cached loop (prefill + K latents) against recomputing the whole sequence for each latent (COCONUT's way); a
batch of --rows prompts against --rows single calls; the decode step in ms at batch 1 and --rows (with
--compile also through torch.compile; on a GPU next to the time to read the weights once at peak HBM
bandwidth); and eval samples/s on a long-tailed mix (--eval_prompts prompts, each opening a K-latent span,
log-normal answer lengths with median --median_new and P90 4x that, given to each prompt as its
max_new_tokens; greedy, no stop ids) with static batches of --rows against continuous batching in --rows rows,
whose outputs must be identical; and the host's reads of device values per decode step (HostReads: .item(),
bool(), .tolist(), nonzero, boolean-mask indexing), counted over 32 more steps of a generation. Step times run
from the first to the last step of a generation (no prefill). Every timed measurement is repeated --repeats
times with its variants interleaved (A, B, A, B, ...), so that a drift of a shared machine falls on all of them,
and reported as min / median / max (value: the median), ratios paired within a repeat. --loop_file adds
another copy of latent_loop.py as variant "before" (e.g. the one before a change; a latent_head.py in the same
directory is its head, with the same weights), and the paired ratio now / before of each measurement.

    OMP_NUM_THREADS=1 python bench_infer.py --mode infer --hidden 128 --compile        # tiny: d=128, 2 layers
    OMP_NUM_THREADS=1 python bench_infer.py --mode infer --shapes small --compile       # d=512, 4 layers
    python bench_infer.py --mode infer --shapes 7b --device cuda --rows 32 --compile    # 7B shapes, random weights
    mkdir -p /tmp/before && git show HEAD~1:latent_loop.py > /tmp/before/latent_loop.py \
        && git show HEAD~1:latent_head.py > /tmp/before/latent_head.py
    OMP_NUM_THREADS=1 python bench_infer.py --mode infer --hidden 128 --loop_file /tmp/before/latent_loop.py

--mode sample: samples/s of difficulty.py's sampler, GAP.generate(num_samples=N) on a batch of prompts -- each
prompt prefilled once, its KV cache repeated into N decode rows -- against a plain loop of N separate batch-1
generate calls per prompt, on a tiny random Qwen2.5-VL (tiny.build_tiny) in a temp dir.

    OMP_NUM_THREADS=1 python bench_infer.py --mode sample                                  # 56 px images: 4 image tokens
    OMP_NUM_THREADS=1 python bench_infer.py --mode sample --image_side 448 --hidden 256    # 256 image tokens

--mode eval: `infer.py --data` end to end (infer.run_batch: prompt encoding, generation, decoding, scoring, result
files) with --schedule static (chunks of --rows) and continuous (--rows rows), on a tiny random GAP checkpoint
(tiny.build_tiny with --hidden, a parameter-free head, K = --latent_tokens) and --eval_prompts sample examples,
sampled at temperature 1 with up to --max_new_tokens tokens: the random model stops with probability about
2/620 per token (<|im_end|>, <|endoftext|> in a near-uniform distribution), so answer lengths are geometric,
median ~210 and P90 ~3.3x that; each example draws from its own generator, so both schedules must write the
same results. samples/s counts run_batch's wall time (the checkpoint loaded before). Then the same for
difficulty.py on the base model: --samples answers per example, static chunks of --rows // --samples prompts
against --rows continuous rows (difficulty.main's wall time, loading the tiny model included).

    OMP_NUM_THREADS=1 python bench_infer.py --mode eval --eval_prompts 64 --max_new_tokens 1024

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
import tempfile
import time
from dataclasses import field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tiny

PEAK_HBM = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L40S": 0.864e12}  # bytes/s


@dataclasses.dataclass
class BenchConfig(tiny.BenchFlags):
    """Benchmark the latent loop's decode, shared-prefill sampling, or the evaluation entry points end to end."""
    mode: str = field(default="infer", metadata={"help": "infer: the latent loop's decode; sample: shared-prefill "
                                                         "sampling; eval: infer.py --data and difficulty.py static "
                                                         "vs continuous", "choices": ["infer", "sample", "eval"]})
    samples: int = field(default=8, metadata={"help": "N samples per prompt"})
    prompts: int = field(default=4, metadata={"help": "prompts per batched call"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per sample (all rows, no stop); "
                                                              "eval: the answer budget"})
    image_side: int = field(default=56, metadata={"help": "query image side in px (28 px = one image token)"})
    hidden: int = field(default=64, metadata={"help": "tiny model width"})
    repeats: int = field(default=3, metadata={"help": "timed repeats per variant (infer: interleaved, min / median / "
                                                      "max; sample: the best)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda (train mode: cuda when there is one)"})
    context: int = field(default=1024, metadata={"help": "prompt tokens for the step ratios and the recompute"})
    rows: int = field(default=8, metadata={"help": "decode rows: batched vs one at a time, static vs continuous"})
    eval_prompts: int = field(default=32, metadata={"help": "prompts in the long-tailed eval mix"})
    median_new: int = field(default=300, metadata={"help": "eval mix: median new tokens (log-normal, P90 = 4x)"})
    new_tokens: int = field(default=64, metadata={"help": "new tokens per row for batched vs one at a time"})
    compile: bool = field(default=False, metadata={"help": "also time the decode step under torch.compile"})
    loop_file: str = field(default="", metadata={"help": "also time this copy of latent_loop.py, interleaved, as "
                                                         "'before' (e.g. git show HEAD~1:latent_loop.py > old.py)"})


class HostReads(TorchDispatchMode):
    """Counts, while active, the points where the host reads device values: .item(), bool(), int() of a tensor
    (what they dispatch to: aten._local_scalar_dense), ops whose output shape depends on the values (nonzero,
    boolean-mask indexing) and Tensor.tolist(). On a CPU nothing waits, but on a GPU each one stalls the host until
    the device has caught up, and none can be captured in a CUDA graph. `n` counts them, `ops` by name."""
    SHAPED = {"aten.nonzero.default", "aten.masked_select.default", "aten.unique_dim.default", "aten._unique2.default"}
    INDEXED = {"aten.index.Tensor", "aten.index_put_.default", "aten.index_put.default",
               "aten._index_put_impl_.default"}

    def __init__(self):
        super().__init__()
        self.ops = {}

    @property
    def n(self):
        return sum(self.ops.values())

    def count(self, name):
        self.ops[name] = self.ops.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if (name == "aten._local_scalar_dense.default" or name in self.SHAPED or name in self.INDEXED and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])):
            self.count(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.tolist, reads = torch.Tensor.tolist, self

        def tolist(t):  # no op is dispatched for it
            reads.count("Tensor.tolist")
            return reads.tolist(t)
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self.tolist
        return super().__exit__(*exc)


def interleaved(variants, repeats, device):
    """{name: [seconds of each repeat]} of zero-argument callables timed in turn (A, B, A, B, ...), after one
    untimed call each, so that a drift of a shared machine falls on every variant alike."""
    times = {name: [] for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, device))
    return times


def timed(fn, device):
    """Seconds of one call of fn (on a GPU, from an idle device to its work done)."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def spread(values):
    """min, median, max."""
    v = sorted(values)
    return v[0], v[len(v) // 2], v[-1]


def best_time(fn, repeats, device):
    """Seconds of the fastest of `repeats` timed calls of fn, after one untimed warm-up call."""
    fn()  # warm-up
    times = [timed(fn, device) for _ in range(repeats)]
    return min(times)


def bench_sample(cfg: BenchConfig):
    """Time the four sampling variants (module docstring) on one tiny model; returns one row per variant."""
    from PIL import Image

    from common import atomic_write_text
    from data import DataSpec, collate, encode_prompt
    from difficulty import load_scorer
    layers = cfg.layers or tiny.SHAPES["tiny"][0]["num_hidden_layers"]
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


def bench_infer(cfg: BenchConfig):
    """The latent loop at inference on a random model (module docstring, --mode infer): step ratios, cache vs
    recompute, batched vs single, host reads per step, static vs continuous batching on a long-tailed mix; one row
    per measurement. With --loop_file every measurement also runs that copy of the loop, interleaved with this one
    (A, B, A, B, ...), and the rows give min / median / max over the repeats and the paired ratio now / before."""
    import importlib.util

    import latent_loop
    from common import atomic_write_text, attn_implementation
    from latent_head import LatentHead
    from model import add_latent_tokens
    from transformers import Qwen2_5_VLForConditionalGeneration
    loops = {"now": latent_loop}
    if cfg.loop_file:  # another version of the loop, e.g. the one before a change
        spec = importlib.util.spec_from_file_location("latent_loop_before", cfg.loop_file)
        loops["before"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loops["before"])
    device = torch.device(cfg.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = tiny.build_tokenizer(tiny.corpus_texts())
    attn = attn_implementation() if device.type == "cuda" else "sdpa"
    config = (tiny.tiny_config(tokenizer, cfg.hidden, cfg.layers or 2, attn=attn) if cfg.shapes == "tiny"
              else tiny.shape_config(cfg.shapes, tokenizer, attn, cfg.layers, cfg.vision_depth))
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype).eval()
    ids = add_latent_tokens(model, tokenizer)
    d, K, R = config.text_config.hidden_size, cfg.latent_tokens, cfg.rows
    k = min(d, 629)  # the PCA head of the paper: 629 components at 7B
    head = LatentHead("pca", d, basis=dict(P=torch.linalg.qr(torch.randn(d, k))[0], mu=torch.zeros(d),
                                           eigenvalues=torch.ones(k))).to(device)
    heads = {"now": head}
    if cfg.loop_file and os.path.exists(os.path.join(os.path.dirname(cfg.loop_file), "latent_head.py")):
        spec = importlib.util.spec_from_file_location("latent_head_before", os.path.join(
            os.path.dirname(cfg.loop_file), "latent_head.py"))  # the head of before, with the same weights
        before = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(before)
        heads["before"] = before.LatentHead("pca", d, basis={k: getattr(head, k) for k in ("P", "mu", "eigenvalues")})
        heads["before"].load_state_dict(head.state_dict())
        heads["before"].to(device)
    words = range(len(tiny.QWEN_SPECIALS), min(ids.values()))  # ordinary tokens: no image, no latent ids
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    head_of = {loop: heads.get(v, head) for v, loop in loops.items()}

    def prompt(n):  # (n,) random ordinary tokens
        return torch.tensor(rng.choices(words, k=n), device=device)

    def gen(loop, x, n, **kw):  # n new tokens for unpadded prompts x (B, T), no stop ids
        return loop.generate(model, head_of[loop], ids, K, x, torch.ones_like(x), max_new_tokens=n, **kw)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step_s(loop, x, n, **kw):  # seconds per decode step: from the first to the last of n + 1 steps (no prefill)
        def steps():
            it = loop.latent_steps(model, head_of[loop], ids, K, x, torch.ones_like(x), max_new_tokens=n + 1, **kw)
            next(it)  # no stop ids: every step comes as it is done
            sync()
            t0 = time.perf_counter()
            for _ in it:
                pass
            sync()
            return (time.perf_counter() - t0) / n
        return steps

    rows = []

    def measure(name, fns, scale=1.0, unit=""):
        """One row per variant of {variant: callable returning seconds, or None to time it} (interleaved), plus
        the paired ratio now / before of each repeat."""
        times = {v: [] for v in fns}
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(cfg.repeats):
            for v, fn in fns.items():
                sync()
                t0 = time.perf_counter()
                t = fn()
                sync()
                times[v].append(t if isinstance(t, float) else time.perf_counter() - t0)
        for v, ts in times.items():
            lo, med, hi = spread([scale * t for t in ts])
            rows.append(dict(name=name + ("" if v == "now" else f" [{v}]"), value=med, min=lo, max=hi, unit=unit))
        if "before" in times:
            lo, med, hi = spread([a / b for a, b in zip(times["now"], times["before"])])
            rows.append(dict(name=f"{name}: now / before", value=med, min=lo, max=hi))
        return times

    text = dict(latent_mode="zero")  # zero: <|latent_start|> banned, every step a text step
    context = prompt(cfg.context)[None]  # (1, T)
    opened = torch.cat([context, torch.tensor([[ids["start"]]], device=device)], 1)  # ends in a span: K latents
    batch = torch.stack([prompt(cfg.context) for _ in range(R)])  # (R, T)
    print(f"{cfg.shapes} Qwen2.5-VL (d={d}, {config.text_config.num_hidden_layers} layers, vocab "
          f"{config.text_config.vocab_size}) on {device} ({torch.get_num_threads()} threads), {dtype}, {attn}, "
          f"K={K}, context {cfg.context} tokens, loops: " + ", ".join(f"{v} {l.__file__}" for v, l in loops.items()))

    # 1. a latent step (head + decoder) against a text step (decoder + LM head + sampling), batch 1
    for v, loop in loops.items():
        t = measure("latent step / text step ms" + ("" if v == "now" else f" [{v}]"),
                    {"latent": step_s(loop, opened, K), "text": step_s(loop, context, K, **text)}, 1e3, "ms")
        lo, med, hi = spread([a / b for a, b in zip(t["latent"], t["text"])])
        rows.append(dict(name="latent step / text step" + ("" if v == "now" else f" [{v}]"), value=med, min=lo,
                         max=hi, latent_ms=1e3 * spread(t["latent"])[1], text_ms=1e3 * spread(t["text"])[1]))
    # decode step time at batch 1 and R (text steps), eager and compiled
    for r in (1, R):
        measure(f"decode step ms, batch {r}", {v: step_s(loop, batch[:r], cfg.new_tokens, **text)
                                               for v, loop in loops.items()}, 1e3, "ms")
        if cfg.compile:
            measure(f"decode step ms, batch {r}, compiled", {
                v: step_s(loop, batch[:r], cfg.new_tokens, compile_step=True, **text) for v, loop in loops.items()},
                1e3, "ms")
    # the interval between two reads of the rows' state: with model latents a text row may open a span unseen, so
    # the loop reads every sync_every steps, and until then runs the latent head as well as the LM head
    every = latent_loop.Sampling().sync_every  # the default, as variant "now"
    for r in (1, R):
        measure(f"decode step ms, batch {r}, model latents", {
            "now" if n == every else f"sync_every {n}": step_s(latent_loop, batch[:r], cfg.new_tokens, sync_every=n)
            for n in (every, 1, 2, 32)}, 1e3, "ms")
    if device.type == "cuda":  # batch 1 reads every decoder and LM-head weight once per token
        weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                      if "visual" not in n and "embed_tokens" not in n)
        bw = next((v for name, v in PEAK_HBM.items() if name in torch.cuda.get_device_name(device)), None)
        if bw:
            rows.append(dict(name="decode step ms, batch 1, weight-bandwidth limit", value=1e3 * weights / bw))

    # 2. the cached loop (prefill + K latents) against recomputing the whole sequence for each latent
    @torch.no_grad()
    def recompute():
        embeds = model.get_input_embeddings()(opened)  # (1, T + 1, D)
        for _ in range(K):
            n = embeds.shape[1]
            h = model.model(inputs_embeds=embeds, attention_mask=torch.ones(1, n, dtype=torch.long, device=device),
                            position_ids=torch.arange(n, device=device).expand(3, 1, n)).last_hidden_state
            embeds = torch.cat([embeds, head(h[:, -1:]).to(embeds.dtype)], 1)

    t = measure("recompute / cached, seconds", {"recompute": recompute, **{
        v: (lambda loop=loop: gen(loop, opened, K + 1)) for v, loop in loops.items()}}, 1.0, "s")
    for v in loops:
        lo, med, hi = spread([a / b for a, b in zip(t["recompute"], t[v])])
        rows.append(dict(name=f"recompute / cached, {K} latents" + ("" if v == "now" else f" [{v}]"), value=med,
                         min=lo, max=hi))
    # 3. one batch of R prompts against R calls of one prompt, same new tokens
    for v, loop in loops.items():
        t = measure(f"batch of {R} / {R} single calls, seconds" + ("" if v == "now" else f" [{v}]"), {
            "batched": lambda loop=loop: gen(loop, batch, cfg.new_tokens, **text),
            "single": lambda loop=loop: [gen(loop, batch[i:i + 1], cfg.new_tokens, **text) for i in range(R)]},
            1.0, "s")
        lo, med, hi = spread([a / b for a, b in zip(t["single"], t["batched"])])
        rows.append(dict(name=f"batch of {R} / {R} single calls, throughput" + ("" if v == "now" else f" [{v}]"),
                         value=med, min=lo, max=hi))

    # 4. host reads per decode step (HostReads), counted between two lengths of one generation so that the
    #    prefill's reads cancel out: greedy, model latents, a stop id (never sampled here: the checks alone)
    def reads(loop, x, n, **kw):
        with HostReads() as counter:
            for _ in loop.latent_steps(model, head_of[loop], ids, K, x, torch.ones_like(x), max_new_tokens=n, **kw):
                pass
        return counter.n

    for v, loop in loops.items():
        for name, x, kw in ((f"static, batch {R}, stop id", batch, dict(stop_ids=stop)),
                            ("static, batch 1, zero latents, no stop ids", batch[:1], text)):
            n0, n1 = 1 + K, 1 + K + 4 * 8
            rows.append(dict(name=f"host reads per step, {name}" + ("" if v == "now" else f" [{v}]"),
                             value=(reads(loop, x, n1, **kw) - reads(loop, x, n0, **kw)) / (n1 - n0)))

    # 5. eval samples/s on a long-tailed length mix: static batches of R against continuous batching in R rows
    items = []
    for i in range(cfg.eval_prompts):  # P90 / median of the log-normal = exp(1.2816 * 1.08) = 4.0
        n_new = int(min(8 * cfg.median_new, max(8, rng.lognormvariate(math.log(cfg.median_new), 1.08))))
        ids_i = torch.cat([prompt(rng.randint(cfg.context // 8, cfg.context // 2)),
                           torch.tensor([ids["start"]], device=device)])  # every answer opens with a span
        items.append(dict(input_ids=ids_i, pixel_values=None, image_grid_thw=None, max_new_tokens=n_new))
    new = sorted(it["max_new_tokens"] for it in items)

    def static(loop):
        out = {}
        for c in range(0, len(items), R):
            chunk = items[c:c + R]
            T = max(len(it["input_ids"]) for it in chunk)
            x = torch.full((len(chunk), T), tokenizer.pad_token_id, device=device)
            mask = torch.zeros_like(x)
            for j, it in enumerate(chunk):  # left padding
                x[j, T - len(it["input_ids"]):], mask[j, T - len(it["input_ids"]):] = it["input_ids"], 1
            longest = max(it["max_new_tokens"] for it in chunk)
            tokens = loop.generate(model, head_of[loop], ids, K, x, mask, max_new_tokens=longest)
            out.update({c + j: tokens[j, :it["max_new_tokens"]] for j, it in enumerate(chunk)})
        return out

    for v, loop in loops.items():
        results, rate = {}, {}
        for name, fn in (("static", lambda: static(loop)),
                         ("continuous", lambda: dict(loop.generate_continuous(model, head_of[loop], ids, K, items,
                                                                              R)))):
            with HostReads() as counter:
                t0 = time.perf_counter()
                results[name] = fn()
                rate[name] = len(items) / (time.perf_counter() - t0)
            rows.append(dict(name=f"eval samples/s, {name} batching" + ("" if v == "now" else f" [{v}]"),
                             value=rate[name], host_reads=counter.n))
        same = all(torch.equal(results["static"][i].cpu(), results["continuous"][i].cpu()) for i in range(len(items)))
        rows.append(dict(name="eval samples/s, continuous / static" + ("" if v == "now" else f" [{v}]"),
                         value=rate["continuous"] / rate["static"], identical_outputs=same, prompts=len(items),
                         median_new=new[len(new) // 2], p90_new=new[int(0.9 * len(new))], max_new=new[-1]))
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in ("name", "value")}
        print(f"{r['name']:<58} {r['value']:>9.3f}  " + " ".join(
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
    import stats
    from latent_head import LatentHead
    from checkpoint import save_checkpoint
    from model import GAP, add_latent_tokens, load_backbone
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
                         min_tokens=new[0], median_tokens=stats.percentile(new, 0.5),
                         p90_tokens=stats.percentile(new, 0.9), max_tokens=new[-1]))
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


def main(cfg: BenchConfig):
    return dict(infer=bench_infer, sample=bench_sample, eval=bench_eval)[cfg.mode](cfg)


if __name__ == "__main__":
    from common import parse_config, run_main
    run_main(main, parse_config(BenchConfig))
