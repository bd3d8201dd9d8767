"""Per-rank peak memory of one GAP training step (paper eq. 3, recipe of appendix F) at Qwen2.5-VL-7B's widths:
measured at 1 and 2 decoder layers, then extrapolated to 28 layers and to 8, 16 and 32 FSDP2 ranks (benchmarks
document, "Memory per GPU at 7B, measured").

What is measured is the step train.py runs on a GPU: step.train_step over step.wrap(fsdp=True, bf16=True) (FSDP2,
bf16 parameters in compute, fp32 sharded master weights, gradients reduced in fp32, AdamW), on a one-rank process
group, with micro-batches of one example: a short one, then one of --seq tokens (an image, the prompt and
--response supervised tokens with one span of K latents), so the second micro-step runs with the first's gradients
accumulated, as every micro-step after the first of a real step does. LiveBytes counts the bytes of every live
tensor storage through the step and keeps the peak of each phase (forward, backward through the LM head and loss,
through the decoder blocks, through the embeddings, per micro-step; the optimizer), with the parameters, gradients
and optimizer states in it.

    python bench_memory.py --shapes 7b --out out/memory.json    # the sweep on a CPU (L = 1, 2 x 2k, 4k, 8k tokens
                                                                 # x grad_ckpt on / off), then the tables
    torchrun --nproc_per_node 1 bench_memory.py --mode step --shapes 7b --layers 2 --vision_depth 1 --seq 4096 \
        --grad_ckpt                                              # one configuration
    torchrun --nproc_per_node 8 bench_memory.py --mode step --shapes 7b --layers 28 --vocab 0 --vision_depth 32 \
        --seq 8192 --grad_ckpt --table out/memory.json           # 8 GPUs: the sweep's prediction of this step
                                                                 # next to torch.cuda.max_memory_allocated
"""
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

import tiny

GiB = 2 ** 30
HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass
class MemoryConfig(tiny.BenchFlags):
    """Measure the per-rank peak memory of one training step, and extrapolate it to 7B on many GPUs."""
    mode: str = field(default="sweep", metadata={"help": "sweep: every configuration (one process each) and the "
                                                         "table; step: one configuration; vision: the frozen vision "
                                                         "tower on one image; table: the table from --out's JSON",
                                                 "choices": ["sweep", "step", "vision", "table"]})
    seq: int = field(default=2048, metadata={"help": "tokens of the measured micro-batch (one example)"})
    seqs: str = field(default="2048,4096,8192", metadata={"help": "sweep: sequence lengths"})
    response: int = field(default=1024, metadata={"help": "supervised response tokens of that example"})
    first_seq: int = field(default=512, metadata={"help": "tokens of the first (short) micro-batch"})
    grad_ckpt: bool = field(default=False, metadata={"help": "activation checkpointing per decoder block"})
    grad_sync: str = field(default="last", metadata={"help": "step: train.py's --grad_sync (last: the sweep's)",
                                                     "choices": ["last", "every"]})
    vocab: int = field(default=8192, metadata={"help": "vocabulary of the measured model (0: the shape's own; "
                                                       "7b's 152064 does not fit fp32 AdamW on a CPU)"})
    vocab2: int = field(default=32768, metadata={"help": "sweep: a second vocabulary, for the per-row slope"})
    image: str = field(default="3840x2160", metadata={"help": "vision mode: the query image, WxH px"})
    ranks: str = field(default="8,16,32", metadata={"help": "table: FSDP2 ranks to extrapolate to"})
    budget_gib: float = field(default=70.0, metadata={"help": "table: what a step may allocate on an 80 GB GPU "
                                                              "(the rest: CUDA context, NCCL, allocator slack)"})
    limit_gib: float = field(default=11.5, metadata={"help": "sweep: skip a configuration predicted above this"})
    table: str = field(default="", metadata={"help": "step: the sweep's JSON, to print its prediction"})


# ----------------------------------------------------------------------------------------------------------
# the tracker

def storages(t):
    """The untyped storages under a tensor (a DTensor's local tensor, a subclass's inner tensors)."""
    if is_traceable_wrapper_subclass(t):
        inner = (getattr(t, name) for name in t.__tensor_flatten__()[0])
        return [s for x in inner if isinstance(x, torch.Tensor) for s in storages(x)]
    return [t.untyped_storage()]


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages, with the running peak overall and per phase. A storage counts from the first
    op that outputs it (or track()) until it is freed (a weakref on it: PyTorch keeps a storage's Python object as
    long as the storage lives). FSDP2 frees and re-allocates its gathered parameters with storage.resize_, which no
    op sees: resize_ is wrapped while the tracker is active. Kernels' internal workspaces are not tensors and are
    not counted (on a GPU torch.cuda.max_memory_allocated sees them). `classify() -> {id(storage): category}` splits
    each phase's peak, the rest being "other" (the split is redone when the peak has grown by `resolution` bytes
    or 1 %, whichever is less)."""

    def __init__(self, classify=None, resolution=32 * 2 ** 20):
        super().__init__()
        self.refs, self.now, self.peak = {}, 0, 0  # id(storage) -> (weakref, bytes)
        self.classify, self.resolution = classify, resolution
        self.phase, self.phases = "start", {"start": dict(peak=0, at_peak={}, start=0, at_start={})}
        self._snapped = None

    def track(self, t):
        for st in storages(t):
            self._set(st, st.nbytes())

    def _set(self, st, nbytes):
        key = id(st)
        ref, old = self.refs.get(key, (None, 0))
        if ref is None or ref() is not st:
            ref, old = weakref.ref(st, lambda _, key=key: self._free(key)), 0
        self.refs[key] = (ref, nbytes)
        self._add(nbytes - old)

    def _free(self, key):
        _, nbytes = self.refs.pop(key, (None, 0))
        self.now -= nbytes

    def _add(self, delta):
        self.now += delta
        self.peak = max(self.peak, self.now)
        p = self.phases[self.phase]
        if self.now > p["peak"]:
            p["peak"] = self.now
            if self.classify is not None and (self._snapped is None or self.now >= self._snapped + min(
                    self.resolution, self._snapped // 100)):
                p["at_peak"], self._snapped = self.snapshot(), self.now

    def snapshot(self):
        """{category: bytes} of the storages live now."""
        out, known = {}, self.classify()
        for ref, nbytes in list(self.refs.values()):
            st = ref()
            if st is not None and nbytes:
                cat = known.get(id(st), "other")
                out[cat] = out.get(cat, 0) + nbytes
        return out

    def set_phase(self, name):
        self.phase, self._snapped = name, None
        if name not in self.phases:  # what is live as the phase starts (gradients accumulated by earlier micro-steps)
            self.phases[name] = dict(peak=0, at_peak={}, start=self.now,
                                     at_start=self.snapshot() if self.classify else {})
        self._add(0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                for st in storages(t):  # a new storage (not a view, not in place), or one resized by the op
                    ref, nbytes = self.refs.get(id(st), (None, -1))
                    if ref is None or ref() is not st or nbytes != st.nbytes():
                        self._set(st, st.nbytes())
        return out

    def __enter__(self):
        self._resize = torch.UntypedStorage.resize_
        tracker, resize = self, self._resize

        def resize_(st, size):
            out = resize(st, size)
            tracker._set(st, st.nbytes())
            return out
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)


class RSSPeak:
    """The process's peak resident set size while active, sampled every 5 ms from /proc (a CPU cross-check of
    LiveBytes: RSS also holds the allocator's cached pages, the interpreter and the libraries)."""

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @staticmethod
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------------------------------
# one configuration: the step, and the vision tower alone

def example(tokenizer, latent_ids, T, response, K, d, seed=0):
    """One training example of about T tokens (collated): a query image of as many merged tokens as leave room for
    the prompt and a response of about `response` tokens (text, one span of K latents, the answer), all supervised
    but the latent slots. Random pixels and latent targets: their values do not change what is allocated."""
    from data import collate, prompt_text, response_ids
    from losses import IGNORE
    g = torch.Generator().manual_seed(seed)
    words = "so the red circle is left of the blue one and there are".split()
    body = lambda n: " ".join(words[i % len(words)] for i in range(n))  # noqa: E731
    tail = " <latent> so</think><answer>3</answer>"
    size = lambda n: len(response_ids(tokenizer, f"<think>{body(n)}{tail}", latent_ids, K, True)[0])  # noqa: E731
    base, n = size(0), response
    for _ in range(2):  # words -> tokens is not one to one: scale the word count by the tokens per word, twice
        n = max(1, round((response - base) * n / max(1, size(n) - base)))
    ids, labels = response_ids(tokenizer, f"<think>{body(n)}{tail}", latent_ids, K, True)
    def prompt(m):
        return tokenizer(prompt_text("What is in the image?", m), add_special_tokens=False)["input_ids"]
    room = T - len(prompt(0)) - len(ids)
    if room < 1:
        raise ValueError(f"--seq {T} leaves no room for an image beside a {len(ids)}-token response")
    h = max(range(max(1, int(room ** 0.5) - 16), int(room ** 0.5) + 1), key=lambda h: h * (room // h))
    w = room // h  # the h x w grid closest to the room left
    p = prompt(h * w)
    item = dict(id="0", input_ids=torch.tensor(p + ids), labels=torch.tensor([IGNORE] * len(p) + labels),
                pixel_values=torch.randn(4 * h * w, 3 * 2 * 14 * 14, generator=g),
                image_grid_thw=torch.tensor([[1, 2 * h, 2 * w]]), latent_targets=torch.randn(K, d, generator=g))
    return collate([item], tokenizer.pad_token_id)


def build(cfg: MemoryConfig, tokenizer, device, vocab=None):
    """The random GAP model of cfg's shapes (vocabulary `vocab`, 0: the shape's own), with a PCA head of k = 629
    (7B's) on fp32 weights, as train.build makes it: frozen vision tower, checkpointing per decoder block."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from common import attn_implementation
    from latent_head import LatentHead
    from model import GAP, add_latent_tokens
    torch.manual_seed(cfg.seed)
    config = tiny.shape_config(cfg.shapes, tokenizer, attn_implementation(), cfg.layers, cfg.vision_depth)
    if vocab:
        config.text_config.vocab_size = vocab
    with torch.device(device):
        backbone = Qwen2_5_VLForConditionalGeneration(config)
    ids = add_latent_tokens(backbone, tokenizer)
    backbone.model.visual.requires_grad_(False)
    if cfg.grad_ckpt:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    d = config.text_config.hidden_size
    k = min(d, 629)
    basis = dict(P=torch.linalg.qr(torch.randn(d, k))[0], mu=torch.zeros(d), eigenvalues=torch.ones(k))
    return GAP(backbone, LatentHead("pca", d, basis=basis).to(device), ids, cfg.latent_tokens), config


def phase_hooks(gap, tracker):
    """Name the tracker's phases from the model's own points: the root's forward (micro-step i), its end (backward
    starts at the loss and LM head), the gradient reaching the final norm's output (the decoder blocks) and the
    embeddings' output (the embeddings); on_grads of train_step is the optimizer."""
    lm, step = gap.backbone.model.language_model, [-1]

    def on_grad(name):
        def hook(module, args, out):
            if out.requires_grad:
                out.register_hook(lambda g: tracker.set_phase(f"{step[0]}:backward {name}"))
        return hook

    def pre(module, args):
        step[0] += 1
        tracker.set_phase(f"{step[0]}:forward")
    # prepend: the phase starts before FSDP2's own pre-forward (its gathers, its bf16 copies of the inputs)
    return [gap.register_forward_pre_hook(pre, prepend=True),
            gap.register_forward_hook(lambda m, a, o: tracker.set_phase(f"{step[0]}:backward LM head+loss")),
            lm.norm.register_forward_hook(on_grad("blocks")),
            lm.embed_tokens.register_forward_hook(on_grad("embeddings"))]


def measure_step(cfg: MemoryConfig):
    """One train_step (FSDP2, bf16 compute) on [a short micro-batch, one of cfg.seq tokens], tracked."""
    from common import setup_distributed
    from step import optimizer_for, train_step, wrap
    rank, world, device = setup_distributed()
    tokenizer = tiny.build_tokenizer(tiny.corpus_texts())
    gap, config = build(cfg, tokenizer, device, cfg.vocab)
    model = wrap(gap, device, world, fsdp=True, bf16=True)
    opt = optimizer_for(gap, lr=1e-5, head_lr=1e-5)
    d = config.text_config.hidden_size
    micro = [example(tokenizer, gap.latent_ids, T, min(cfg.response, T // 2), cfg.latent_tokens, d, seed)
             for seed, T in enumerate((cfg.first_seq, cfg.seq))]

    # FSDP2 swaps a gathered unit's parameters for unsharded bf16 ones while it computes: the sharded fp32
    # parameters (and the gradients FSDP2 reduces into them) are these objects, taken at rest
    sharded = list(gap.parameters())
    params = {id(s): "params" for p in sharded for s in storages(p)}
    params.update({id(s): "buffers" for b in gap.buffers() for s in storages(b)})
    params.update({id(s): "inputs" for mb in micro for v in mb.values() if torch.is_tensor(v) for s in storages(v)})

    def classify():  # the sharded fp32 states; everything else is "other" (activations, gathered bf16 units, ...)
        known = dict(params)
        known.update({id(s): "grads" for p in sharded if p.grad is not None for s in storages(p.grad)})
        known.update({id(s): "adamw" for st in opt.state.values() for v in st.values() if torch.is_tensor(v)
                      for s in storages(v)})
        return known
    tracker = LiveBytes(classify)
    for t in [*sharded, *gap.buffers(), *(v for mb in micro for v in mb.values() if torch.is_tensor(v))]:
        tracker.track(t)  # what is allocated before the step (on a GPU, the inputs are copied in it)
    hooks = phase_hooks(gap, tracker)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with RSSPeak() as rss, tracker:
        tracker.set_phase("start")
        train_step(model, gap, opt, micro, device, world, bf16=True, fsdp=True,
                   on_grads=lambda _: tracker.set_phase("optimizer"), grad_sync=cfg.grad_sync)
        tracker.set_phase("end")
    seconds = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    numel = lambda ps: sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in ps)  # noqa: E731
    trainable = numel(p for p in gap.parameters() if p.requires_grad)
    t = config.text_config
    out = dict(layers=t.num_hidden_layers, vocab=t.vocab_size, vision_depth=config.vision_config.depth,
               seq=int(micro[1]["input_ids"].numel()), first_seq=int(micro[0]["input_ids"].numel()),
               supervised=int((micro[1]["labels"] != -100).sum()), grad_ckpt=cfg.grad_ckpt, world=world,
               device=str(device), seconds=seconds, peak=tracker.peak, params_numel=numel(gap.parameters()),
               trainable_numel=trainable, adamw_bytes=8 * trainable, phases={},
               rss_start=rss.start, rss_peak=rss.peak,
               cuda_peak=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
    for name, p in tracker.phases.items():
        cats = {k: p["at_peak"].get(k, 0) for k in ("params", "buffers", "inputs", "grads", "adamw")}
        out["phases"][name] = dict(peak=p["peak"], **cats, other=p["peak"] - sum(cats.values()),
                                   start_other=p["at_start"].get("other", 0))
    if rank == 0:
        print(f"L={out['layers']} vocab={out['vocab']} V={out['vision_depth']} seq={out['seq']} "
              f"(supervised {out['supervised']}, first micro-batch {out['first_seq']}) grad_ckpt={cfg.grad_ckpt} "
              f"world={world} {device}: step {seconds:.0f} s; GiB per phase peak:")
        print(f"{'phase':<32}{'peak':>8}{'params':>8}{'grads':>8}{'AdamW':>8}{'other':>8}")
        for name, p in out["phases"].items():
            print(f"{name:<32}" + "".join(f"{p[k] / GiB:>8.2f}" for k in ("peak", "params", "grads", "adamw", "other")))
        print(f"tracker peak {tracker.peak / GiB:.2f} GiB; RSS {rss.start / GiB:.2f} -> {rss.peak / GiB:.2f} GiB "
              f"(+{(rss.peak - rss.start) / GiB:.2f}); live at start {tracker.phases['start']['peak'] / GiB:.2f} GiB"
              + (f"; torch.cuda.max_memory_allocated {out['cuda_peak'] / GiB:.2f} GiB" if out["cuda_peak"] else ""))
        if cfg.table:  # the sweep's JSON: its fits' prediction of this very step (the first: no AdamW states yet)
            res = json.load(open(cfg.table))
            fits = dict(fit(res["steps"]), shapes=cfg.shapes, foreach=res["adamw_transient_per_param"]["foreach"])
            guess = predict(fits, out)
            print(f"the sweep's prediction for this step: {guess / GiB:.3f} GiB; measured / predicted "
                  f"{(out['cuda_peak'] or tracker.peak) / guess:.3f}")
        if cfg.out:
            from common import atomic_write_text
            atomic_write_text(cfg.out, json.dumps(out, indent=1) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return out


QWEN7B_MAX_PIXELS = 28 * 28 * 16384  # Qwen2.5-VL-7B's preprocessor_config.json (max_pixels)


def measure_vision(cfg: MemoryConfig):
    """The frozen vision tower's forward on one cfg.image-sized image at the shape's widths in bf16 (as FSDP2
    gathers it), with cfg.vision_depth blocks (default 2), the last one full attention: the peak bytes allocated
    above its weights. Frozen and fed no gradient, it keeps nothing for backward: one block's working memory at a
    time, whatever the depth (the peak does not grow with more blocks)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    from common import attn_implementation, default_device
    device = default_device()
    width, height = (int(x) for x in cfg.image.split("x"))
    depth = cfg.vision_depth or 2
    config = tiny.shape_config(cfg.shapes, tiny.build_tokenizer(tiny.corpus_texts()), attn_implementation(), 1,
                               depth).vision_config
    config.fullatt_block_indexes = [depth - 1]  # both attention kinds run; the full one is the costly one
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, dtype=torch.bfloat16)
    tower.requires_grad_(False)
    h, w = smart_resize(height, width, 28, 56 * 56, QWEN7B_MAX_PIXELS)  # the image processor's resize
    grid = torch.tensor([[1, h // 14, w // 14]], device=device)
    pixels = torch.randn(int(grid.prod()), 3 * 2 * 14 * 14, device=device, dtype=torch.bfloat16)
    tracker = LiveBytes()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t0 = time.perf_counter()
    with tracker:
        tower(pixels, grid_thw=grid)
    out = dict(image=cfg.image, resized=f"{w}x{h}", patches=int(grid.prod()), tokens=int(grid.prod()) // 4,
               depth=depth, peak=tracker.peak, seconds=time.perf_counter() - t0, device=str(device),
               cuda_peak=torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None)
    print(f"vision tower ({depth} blocks of {config.hidden_size}, block {depth - 1} full attention), {cfg.image} "
          f"image resized to {out['resized']}: {out['patches']} patches, {out['tokens']} merged tokens; peak "
          f"{tracker.peak / GiB:.2f} GiB above the weights in {out['seconds']:.0f} s"
          + (f"; torch.cuda.max_memory_allocated {out['cuda_peak'] / GiB:.2f} GiB" if out["cuda_peak"] else ""))
    if cfg.out:
        from common import atomic_write_text
        atomic_write_text(cfg.out, json.dumps(out, indent=1) + "\n")
    return out


def measure_adamw(foreach, numel=64 * 2 ** 20):
    """Bytes per parameter that one AdamW step allocates above parameters, gradients and its two states (the second
    step, states made): foreach (the GPU default) against the per-tensor loop (a CPU's)."""
    params = [torch.nn.Parameter(torch.randn(numel // 4)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, foreach=foreach)
    opt.step()
    tracker = LiveBytes()
    for t in [*params, *(p.grad for p in params), *(v for st in opt.state.values() for v in st.values())]:
        tracker.track(t)
    start = tracker.now
    with tracker:
        opt.step()
    return (tracker.peak - start) / numel


def sweep(cfg: MemoryConfig):
    """Every configuration in its own process (one-rank torchrun, so each is a fresh process whose RSS is its own):
    L = 1, 2 x cfg.seqs x grad_ckpt on / off at vocabulary cfg.vocab, then L = 1 at the first length and cfg.vocab2
    (the per-row slope), the vision tower on cfg.image, AdamW's own transient; then the table (table())."""
    from common import atomic_write_text
    root = os.path.splitext(cfg.out or "out/memory.json")[0]
    os.makedirs(root, exist_ok=True)
    seqs = [int(x) for x in cfg.seqs.split(",")]
    runs = [(L, T, ckpt, cfg.vocab) for T in seqs for ckpt in (True, False) for L in (1, 2)]
    runs += [(1, seqs[0], ckpt, cfg.vocab2) for ckpt in (True, False)]
    steps = []
    for L, T, ckpt, vocab in runs:
        name = f"step_L{L}_T{T}_{'ckpt' if ckpt else 'nockpt'}_V{vocab}"
        path = os.path.join(root, name + ".json")
        guess = 0 if os.path.exists(path) else guess_rss(steps, L, T, ckpt, vocab)
        if guess > cfg.limit_gib * GiB:
            print(f"\n{name}: skipped, its peak RSS would be about {guess / GiB:.1f} GiB (--limit_gib {cfg.limit_gib})")
            steps.append(dict(layers=L, seq_asked=T, grad_ckpt=ckpt, vocab=vocab, skipped=guess))
            continue
        if not os.path.exists(path):  # a sweep started again keeps what it measured
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                    os.path.join(HERE, "bench_memory.py"), "--mode", "step", "--shapes", cfg.shapes, "--layers", str(L),
                    "--vision_depth", str(cfg.vision_depth or 1), "--seq", str(T), "--vocab", str(vocab),
                    "--response", str(cfg.response), "--first_seq", str(cfg.first_seq),
                    "--latent_tokens", str(cfg.latent_tokens), "--grad_ckpt" if ckpt else "--no-grad_ckpt",
                    "--out", path]
            print(f"\n$ {' '.join(argv[3:])}", flush=True)
            subprocess.run(argv, check=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        steps.append(dict(json.load(open(path)), seq_asked=T))
    path = os.path.join(root, "vision.json")
    if not os.path.exists(path):
        subprocess.run([sys.executable, os.path.join(HERE, "bench_memory.py"), "--mode", "vision", "--shapes",
                        cfg.shapes, "--image", cfg.image, "--out", path], check=True)
    vision = json.load(open(path))
    adamw = {"foreach": measure_adamw(True), "for-loop": measure_adamw(False)}
    result = dict(config=dataclasses.asdict(cfg), steps=steps, vision=vision, adamw_transient_per_param=adamw)
    atomic_write_text(root + ".json", json.dumps(result, indent=1) + "\n")
    return table(dataclasses.replace(cfg, out=root + ".json"))


def guess_rss(steps, L, T, ckpt, vocab):
    """A sweep's guess of a configuration's peak RSS from those measured before it (0: no guess): the same
    configuration at one layer, plus what the second layer added at a shorter length, plus what one layer's
    length-dependent part can add from there (at most all that the one-layer run grew by)."""
    done = {(s["layers"], s["seq_asked"], s["grad_ckpt"], s["vocab"]): s for s in steps if "peak" in s}
    one = done.get((1, T, ckpt, vocab))
    if L == 1 or one is None:
        return 0
    shorter = [t for (l, t, c, v) in done if l == 2 and c == ckpt and v == vocab and t < T and (1, t, c, v) in done]
    if not shorter:
        return 0
    t = max(shorter)
    per_layer = done[(2, t, ckpt, vocab)]["rss_peak"] - done[(1, t, ckpt, vocab)]["rss_peak"]
    return one["rss_peak"] + per_layer + max(0, one["rss_peak"] - done[(1, t, ckpt, vocab)]["rss_peak"])


# ----------------------------------------------------------------------------------------------------------
# the extrapolation: 28 layers, 7B's vocabulary and vision tower, W ranks

def layout(shapes, layers, vocab, vision_depth, world, latent_tokens=36):
    """Exact per-rank counts of the FSDP2 layout (step.fsdp_units, step.shard_bytes on rank 0, the largest shard)
    of the GAP model at these shapes, built on the meta device: sharded fp32 parameters, gradients, AdamW states,
    and the numels the extrapolation needs."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from latent_head import LatentHead
    from model import GAP, add_latent_tokens
    from step import fsdp_units, shard_bytes
    tokenizer = tiny.build_tokenizer(tiny.corpus_texts())
    config = tiny.shape_config(shapes, tokenizer, "sdpa", layers, vision_depth)
    config.text_config.vocab_size = vocab or config.text_config.vocab_size
    d = config.text_config.hidden_size
    with torch.device("meta"):
        backbone = Qwen2_5_VLForConditionalGeneration(config)
    ids = add_latent_tokens(backbone, tokenizer)
    backbone.model.visual.requires_grad_(False)
    k = min(d, 629)
    head = LatentHead("pca", d, basis=dict(P=torch.zeros(d, k), mu=torch.zeros(d), eigenvalues=torch.ones(k)))
    gap = GAP(backbone, head, ids, latent_tokens)
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    lm = backbone.model.language_model
    return dict(shard_bytes(fsdp_units(gap), world, 0), trainable=sum(p.numel() for p in gap.parameters()
                                                                      if p.requires_grad),
                block=numel(lm.layers[0]), vision=numel(backbone.model.visual), head=numel(gap.head),
                head_buffers=sum(b.numel() * 4 for b in gap.head.buffers()), vocab=config.text_config.vocab_size)


def linear(xs, ys):
    """Least-squares (intercept, slope) of ys over xs (exact through two points)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - slope * mx, slope


def fit(steps):
    """Per grad_ckpt and phase, the unsharded bytes X (everything but the sharded states: activations, gathered
    bf16 units, unsharded and accumulated gradients, the inputs) and the sharded gradients G at the phase's peak as
    a + b T for 1 and 2 layers at the first vocabulary, plus each one's slope per vocabulary row (L = 1, first
    length): X(L, V, T) = X1(T) + (L - 1) (X2(T) - X1(T)) + (V - V1) c. Also the unsharded bytes at the start of
    the second micro-step (the first's accumulated gradients)."""
    done = [s for s in steps if "phases" in s]  # not the configurations skipped
    v1 = min(s["vocab"] for s in done)
    fits = {}
    for ckpt in (True, False):
        runs = [s for s in done if s["grad_ckpt"] == ckpt]
        if not runs:
            continue
        names = [n for n in runs[0]["phases"] if n not in ("start", "end")]
        f = fits["ckpt" if ckpt else "nockpt"] = dict(vocab1=v1, phases={})
        for name in names:
            val = lambda s, what: (s["phases"][name]["other"] + s["phases"][name]["inputs"] if what == "X"  # noqa: E731
                                   else s["phases"][name]["grads"] if what == "G" else s["phases"][name]["start_other"])
            ph = f["phases"][name] = {}
            for what in ("X", "G", "S"):
                byl = {L: [s for s in runs if s["layers"] == L and s["vocab"] == v1] for L in (1, 2)}
                ab = {L: linear([s["seq"] for s in byl[L]], [val(s, what) for s in byl[L]]) for L in (1, 2)}
                t0 = min(s["seq"] for s in byl[1])
                base = [s for s in byl[1] if s["seq"] == t0][0]
                other_v = [s for s in runs if s["layers"] == 1 and s["vocab"] != v1]
                c = ((val(other_v[0], what) - val(base, what)) / (other_v[0]["vocab"] - v1)) if other_v else 0.0
                ph[what] = dict(one=ab[1], two=ab[2], per_row=c,
                                seqs={L: sorted(s["seq"] for s in byl[L]) for L in (1, 2)})
        for name in names:
            # backward through the blocks peaks at its first block (the last layer) once the layers are many: every
            # layer's kept activations and accumulated gradient still live, as at the end of the forward. At 2
            # layers on one rank it can peak later (a block's gradient transients outweigh short activations), a
            # moment that does not scale: its growth per layer is taken from the forward's, its reduced gradients
            # from L = 1
            if name.endswith("backward blocks") and name.replace("backward blocks", "forward") in f["phases"]:
                ph, fwd = f["phases"][name], f["phases"][name.replace("backward blocks", "forward")]
                one, f1, f2 = ph["X"]["one"], fwd["X"]["one"], fwd["X"]["two"]
                ph["X"]["two"] = (one[0] + f2[0] - f1[0], one[1] + f2[1] - f1[1])
                ph["G"]["two"] = ph["G"]["one"]
    return fits


def phase_value(ph, L, vocab, T, vocab1):
    """A fitted quantity (fit()) at L layers, vocabulary `vocab` and T tokens."""
    x1, x2 = ph["one"][0] + ph["one"][1] * T, ph["two"][0] + ph["two"][1] * T
    return x1 + (L - 1) * (x2 - x1) + (vocab - vocab1) * ph["per_row"]


def predict_phases(fits, lay, L, vocab, T, ckpt, world, steady=True, gpu=True, foreach=4.0):
    """{phase: predicted per-rank bytes} of a step at L layers, vocabulary `vocab`, T tokens, `world` ranks. lay:
    layout() of that model at that world. steady: AdamW's states live through the step (every step after the
    first); gpu: one more decoder block gathered in bf16 outside the optimizer (FSDP2's forward prefetch on a
    GPU's streams, which a CPU does not run) and AdamW's foreach transient (`foreach` bytes per local parameter,
    measured) in place of the CPU's per-tensor loop."""
    f = fits["ckpt" if ckpt else "nockpt"]
    out = {}
    for name, ph in f["phases"].items():
        X, G = (phase_value(ph[w], L, vocab, T, f["vocab1"]) for w in ("X", "G"))
        G = min(max(G, 0.0), lay["grads"] * world)  # which blocks have reduced at a peak is not linear in L: bound it
        if name == "optimizer":
            out[name] = lay["params"] + lay["grads"] + lay["adam"] + (foreach * lay["trainable"] / world if gpu else X)
            continue
        out[name] = (lay["params"] + G / world + X + (lay["adam"] if steady else 0)
                     + (2 * lay["block"] if gpu else 0))
    return out


def predict(fits, out, steady=False, gpu=None):
    """The predicted peak of a measured step (out: measure_step's result) from the sweep's fits."""
    lay = layout(fits["shapes"], out["layers"], out["vocab"], out["vision_depth"], out["world"])
    gpu = out["device"].startswith("cuda") if gpu is None else gpu
    return max(predict_phases(fits, lay, out["layers"], out["vocab"], out["seq"], out["grad_ckpt"], out["world"],
                              steady, gpu, fits["foreach"]).values())


def vision_phase(fits, lay, vision, L, vocab, T, pixels):
    """The vision tower's forward at the start of a micro-step after the first: the states, the gradients the
    earlier micro-steps accumulated (measured at 1 and 2 layers), the whole tower gathered in bf16 (one FSDP2 unit)
    and its working memory on an image of `pixels`, scaled by patches from the measured image."""
    f = fits.get("ckpt") or fits["nockpt"]  # what a micro-step starts with does not depend on checkpointing
    acc = phase_value(f["phases"]["1:forward"]["S"], L, vocab, T, f["vocab1"])
    return lay["params"] + lay["adam"] + acc + 2 * lay["vision"] + vision["peak"] * pixels / (vision["patches"] * 196)


def breakdown(fits, cfg, vision, L, V, vis_depth, T, ckpt, ranks):
    """Markdown: the predicted peak at T tokens split into what it is made of, per rank count."""
    f = fits["ckpt" if ckpt else "nockpt"]
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    def at(what, phase, layers, vocab):
        return phase_value(f["phases"][phase][what], layers, vocab, T, f["vocab1"])
    rows = {}
    for W in ranks:
        lay = layout(cfg.shapes, L, V, vis_depth, W)
        phases = predict_phases(fits, lay, L, V, T, ckpt, W, foreach=fits["foreach"])
        name = max(phases, key=phases.get)
        r = rows[W] = dict(phase=name, params=lay["params"], adam=lay["adam"], total=phases[name],
                           acc=4 * lay["trainable"], acc_layer=4 * lay["block"],
                           act_layer=at("X", "1:forward", 2, f["vocab1"]) - at("X", "1:forward", 1, f["vocab1"])
                           - 4 * lay["block"], head=lay["head"] * 16 / W + lay["head_buffers"],
                           vision=vision_phase(fits, lay, vision, L, V, T, vision["patches"] * 196))
        if name == "optimizer":
            r.update(grads=lay["grads"], optimizer=fits["foreach"] * lay["trainable"] / W)
            continue
        per_layer = at("X", name, 2, f["vocab1"]) - at("X", name, 1, f["vocab1"])
        r.update(grads=min(max(at("G", name, L, V), 0.0), lay["grads"] * W) / W, layers=L * per_layer,
                 vocab=(V - f["vocab1"]) * f["phases"][name]["X"]["per_row"],
                 fixed=at("X", name, 1, f["vocab1"]) - per_layer, prefetch=2 * lay["block"])
    what = [("phase of the peak", "phase", "measured"),
            ("parameters (fp32, sharded)", "params", "computed"),
            ("AdamW states (fp32, sharded)", "adam", "computed"),
            ("gradients (fp32, sharded) live at the peak", "grads", "measured at 1-2 layers, / W"),
            (f"unsharded, {L} layers x (L=2 - L=1)", "layers", "measured per layer, x L"),
            (f"unsharded, fixed (L=1 - one layer; vocab {f['vocab1']})", "fixed", "measured"),
            (f"unsharded, vocabulary {V} - {f['vocab1']} rows", "vocab", "measured slope per row (two vocabularies), "
             "x rows"),
            ("one more block gathered in bf16 (GPU prefetch)", "prefetch", "computed"),
            ("AdamW foreach transient", "optimizer", "measured per parameter"),
            ("**peak per rank**", "total", "extrapolated"),
            ("(in the unsharded part) gradients accumulated over micro-steps, fp32, all of them", "acc",
             "computed = 4 B x trainable; measured so at 1-2 layers"),
            ("(in the per-layer part) accumulated gradient of one layer", "acc_layer", "computed"),
            ("activations kept by one layer at the forward's peak", "act_layer",
             "measured (L=2 - L=1 at the forward's peak) - the layer's gradient"),
            ("(in the states) latent head + PCA basis", "head", "computed"),
            (f"vision phase: states, accumulated gradients, tower gathered, {vision['image']} image", "vision",
             "measured (2 blocks), computed")]
    lines = ["", f"Peak per rank at {T} tokens, grad_ckpt {'on' if ckpt else 'off'}, GiB:", "",
             "| part | " + " | ".join(f"W={W}" for W in ranks) + " | how |",
             "| --- | " + " | ".join("---" for _ in ranks) + " | --- |"]
    for label, key, how in what:
        cells = [rows[W].get(key, 0) if key == "phase" else g(rows[W].get(key, 0)) for W in ranks]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {how} |")
    return lines


def table(cfg: MemoryConfig):
    """The Markdown tables of the sweep's JSON (cfg.out): measured, then extrapolated to 7B on cfg.ranks GPUs."""
    res = json.load(open(cfg.out))
    steps, vision = res["steps"], res["vision"]
    fits = dict(fit(steps), shapes=cfg.shapes, foreach=res["adamw_transient_per_param"]["foreach"])
    text, vis_depth = tiny.SHAPES[cfg.shapes][0], tiny.SHAPES[cfg.shapes][1]["depth"]
    L, V = text["num_hidden_layers"], text["vocab_size"]
    g = lambda b: f"{b / GiB:.1f}"  # noqa: E731
    lines = ["Measured (one train_step, FSDP2 on 1 rank, bf16 compute, CPU; LiveBytes peak of the first step, "
             "AdamW states made in it; rise: the peak over what was live before the step, RSS rise: the same of the "
             "process's resident set; fitted: the fits' forward + backward peak at that point):", "",
             "| layers | tokens | grad_ckpt | vocab | peak GiB (phase) | forward + backward GiB (phase) | rise GiB | "
             "RSS rise GiB | fitted GiB | step s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in steps:
        if "peak" not in s:
            lines.append(f"| {s['layers']} | {s['seq_asked']} | {'on' if s['grad_ckpt'] else 'off'} | {s['vocab']} "
                         f"| not run: about {g(s['skipped'])} GiB of RSS, over this machine's share | | | | | |")
            continue
        ph = {n: p["peak"] for n, p in s["phases"].items() if n not in ("start", "end")}
        worst, fb = max(ph, key=ph.get), max((n for n in ph if n != "optimizer"), key=ph.get)
        lay = layout(cfg.shapes, s["layers"], s["vocab"], s["vision_depth"], 1)
        fitted = max(v for n, v in predict_phases(fits, lay, s["layers"], s["vocab"], s["seq"], s["grad_ckpt"], 1,
                                                  steady=False, gpu=False, foreach=0).items() if n != "optimizer")
        before = sum(s["phases"]["start"][k] for k in ("params", "buffers", "inputs"))  # live before the step
        lines.append(f"| {s['layers']} | {s['seq']} | {'on' if s['grad_ckpt'] else 'off'} | {s['vocab']} | "
                     f"{g(s['peak'])} ({worst}) | {g(ph[fb])} ({fb}) | {g(s['peak'] - before)} | "
                     f"{g(s['rss_peak'] - s['rss_start'])} | {g(fitted)} | {s['seconds']:.0f} |")
    lines += ["", f"Vision tower alone (frozen, forward only, {vision['depth']} blocks at 7B's width, bf16): "
              f"{vision['image']} image -> {vision['resized']}, {vision['patches']} patches, {vision['tokens']} "
              "tokens: "
              f"peak {g(vision['peak'])} GiB above the weights (measured).",
              f"AdamW step transient per local parameter: {res['adamw_transient_per_param']['foreach']:.1f} B with "
              f"foreach (a GPU's default), {res['adamw_transient_per_param']['for-loop']:.1f} B per-tensor (a CPU's) "
              "(measured).", ""]
    ranks = [int(r) for r in cfg.ranks.split(",")]
    seqs = sorted({s["seq_asked"] for s in steps})
    lines += [f"Extrapolated to the {cfg.shapes} shapes ({L} layers, vocab {V}, {vis_depth} vision blocks), FSDP2 on "
              f"W GPUs, micro-batch 1, steady state (AdamW states live): predicted torch.cuda.max_memory_allocated "
              f"GiB per rank; fits: at most {cfg.budget_gib:g} GiB; lengths past {max(seqs)} extrapolate the "
              "measured lengths too:", "",
              "| W | grad_ckpt | " + " | ".join(f"{t} tokens" for t in seqs) + " | largest --max_len | "
              "largest --image_max_pixels |", "| --- | --- | " + " | ".join("---" for _ in seqs) + " | --- | --- |"]
    for W in ranks:
        lay = layout(cfg.shapes, L, V, vis_depth, W)
        for ckpt in (True, False):
            def peak(T):  # the step's phases, and the vision tower on the largest image T leaves room for
                return max(*predict_phases(fits, lay, L, V, T, ckpt, W, foreach=fits["foreach"]).values(),
                           vision_phase(fits, lay, vision, L, V, T, 28 * 28 * max(0, T - cfg.response - 32)))
            cells = [f"{g(peak(T))} {'fits' if peak(T) <= cfg.budget_gib * GiB else 'OOM'}" for T in seqs]
            best = max((T for T in range(1024, 32769, 256) if peak(T) <= cfg.budget_gib * GiB), default=0)
            px = 28 * 28 * max(0, best - cfg.response - 32)
            cap = " (the largest tried)" if best == 32768 else ""
            lines.append(f"| {W} | {'on' if ckpt else 'off'} | " + " | ".join(cells) + f" | {best or 'none'}{cap} | "
                         f"{px or 'none'} |")
    T = max(seqs)
    for ckpt in (True, False):
        lines += breakdown(fits, cfg, vision, L, V, vis_depth, T, ckpt, ranks)
    lay1 = layout(cfg.shapes, L, V, vis_depth, 1)
    ddp = lay1["params"] + lay1["grads"] + lay1["adam"]
    lines += ["", f"DDP (replicated fp32 weights, gradients and AdamW states, bf16 autocast): {g(ddp)} GiB of states "
              "per GPU before any activation" + (f": over {cfg.budget_gib:g} GiB at any length" if ddp >
                                                  cfg.budget_gib * GiB else "") + " (computed).", ""]
    print("\n".join(lines))
    return lines


def main(cfg: MemoryConfig):
    return dict(sweep=sweep, step=measure_step, vision=measure_vision, table=table)[cfg.mode](cfg)


if __name__ == "__main__":
    from common import parse_config, run_main
    run_main(main, parse_config(MemoryConfig))
