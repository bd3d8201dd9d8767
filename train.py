"""GAP training (paper section 4, eq. 3; recipe of appendix F): teacher-forced L = L_LM + lambda * L_latent on
Qwen2.5-VL with a PCA-aligned latent head, difficulty-aware latent assignment, AdamW + warmup + cosine.
The same file runs under python (one process) and torchrun (DDP; gloo on CPU, nccl on GPU).

    python tiny.py --out out/tiny --sample_data out/sample
    python data.py --model out/tiny --data out/sample/train.jsonl --latent_tokens 4 --cache_dir out/cache
    python train.py --model out/tiny --data out/sample/train.jsonl --target_cache out/cache --latent_tokens 4 \
        --global_batch 4 --epochs 3 --lr 1e-3 --head_lr 1e-3 --out_dir out/gap
    torchrun --nproc_per_node 8 train.py --model Qwen/Qwen2.5-VL-7B-Instruct --data train.jsonl \
        --target_cache cache --latent_tokens 36
"""
import dataclasses
import math
import os
import random
import time
from dataclasses import field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import pca as pca_lib
from data import DataError, DataSpec, GAPDataset, TargetCache, collate
from latent_head import LatentHead
from model import GAP, add_latent_tokens, load_backbone, parse_config, save_checkpoint


@dataclasses.dataclass
class TrainConfig:
    """Train GAP on Qwen2.5-VL."""
    model: str = field(default="", metadata={"help": "base model directory or hub id"})
    data: str = field(default="", metadata={"help": "training JSONL (GAP_SPEC 'Data')"})
    target_cache: str = field(default="cache", metadata={"help": "latent targets written by data.py"})
    out_dir: str = field(default="out/gap", metadata={"help": "checkpoint directory (infer.py --ckpt)"})
    latent_tokens: int = field(default=36, metadata={"help": "K latents per span, a perfect square; 0 = dense caption"})
    latent_head: str = field(default="pca", metadata={"help": "pca (GAP) | full (LH ablation) | hidden (output-as-input)",
                                                      "choices": ["pca", "full", "hidden"]})
    pca_path: str = field(default="", metadata={"help": "PCA basis from pca.py; empty: fit it from the target cache"})
    pca_var: float = field(default=0.95, metadata={"help": "explained variance that sets k (paper: 0.95 -> k=629)"})
    adapter_dim: int = field(default=256, metadata={"help": "hidden width of the head's SwiGLU adapter"})
    lambda_latent: float = field(default=1.0, metadata={"help": "weight of L_latent in L (eq. 3)"})
    scheduled_sampling: bool = field(default=False, metadata={"help": "ablation: feed predicted latents, not targets"})
    difficulty_tau: float = field(default=0.0, metadata={"help": "latent supervision only where accuracy <= tau"})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate of the backbone"})
    head_lr: float = field(default=1e-5, metadata={"help": "peak learning rate of the latent head"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decay on matrices (not norms/biases)"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "linear warmup share of all steps, then cosine"})
    epochs: int = field(default=2, metadata={"help": "passes over the data"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0: all epochs)"})
    global_batch: int = field(default=128, metadata={"help": "examples per optimizer step, over all ranks"})
    micro_batch: int = field(default=1, metadata={"help": "examples per forward; accumulation fills the rest"})
    max_len: int = field(default=8192, metadata={"help": "longest sequence allowed (error, or skip with --skip_bad)"})
    image_min_pixels: int = field(default=0, metadata={"help": "query-image min pixels (0: processor's)"})
    image_max_pixels: int = field(default=0, metadata={"help": "query-image max pixels (0: processor's)"})
    train_vision: bool = field(default=False, metadata={"help": "also train the vision tower (frozen in the paper)"})
    grad_ckpt: bool = field(default=False, metadata={"help": "activation checkpointing in the decoder"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global grad norm (0: off)"})
    seed: int = field(default=12345, metadata={"help": "data order and init seed"})
    save_every: int = field(default=0, metadata={"help": "also checkpoint every N steps (0: only at the end)"})
    resume: bool = field(default=False, metadata={"help": "continue from the checkpoint in out_dir"})
    skip_bad: bool = field(default=False, metadata={"help": "skip and count bad examples instead of stopping"})


def setup_distributed():
    """(rank, world, device). One process without torchrun; DDP with nccl (GPU) or gloo (CPU) under it."""
    if "RANK" not in os.environ:
        return 0, 1, (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def all_sum(values, device):
    """Sum a list of numbers over ranks (one all_reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def fit_basis(cache: TargetCache, var, rank, world):
    """PCA basis of all cached targets, each rank streaming a slice, merged exactly across ranks."""
    stats = pca_lib.PCAStats()
    for key in sorted(cache.where)[rank::world]:
        stats.update(cache.get(key))
    return pca_lib.fit(stats.all_reduce(), var)


def build(cfg: TrainConfig, device, rank=0, world=1):
    """Backbone + latent vocabulary + head + data set. Returns (gap, tokenizer, image_processor, dataset, basis).
    With --resume the backbone, tokenizer, head and basis come from the checkpoint in out_dir."""
    ckpt = cfg.out_dir if cfg.resume else None
    if ckpt and not os.path.exists(os.path.join(ckpt, "train_state.pt")):
        raise FileNotFoundError(f"--resume: no checkpoint with train_state.pt in {ckpt}")
    backbone, tokenizer, image_processor = load_backbone(ckpt or cfg.model, device, torch.float32)
    ids = add_latent_tokens(backbone, tokenizer)
    backbone.model.visual.requires_grad_(cfg.train_vision)
    if cfg.grad_ckpt:
        backbone.gradient_checkpointing_enable()
    spec = DataSpec(cfg.latent_tokens, cfg.difficulty_tau, cfg.max_len, cfg.image_min_pixels, cfg.image_max_pixels)
    cache = TargetCache(cfg.target_cache, cfg.latent_tokens) if cfg.latent_tokens else None
    dataset = GAPDataset(cfg.data, tokenizer, image_processor, ids, spec, cache, cfg.skip_bad)
    basis = None
    if ckpt and os.path.exists(os.path.join(ckpt, "pca.safetensors")):
        basis = pca_lib.load(os.path.join(ckpt, "pca.safetensors"))
    elif cfg.latent_tokens:
        basis = pca_lib.load(cfg.pca_path) if cfg.pca_path else (fit_basis(cache, cfg.pca_var, rank, world)
                                                                  if cache.where else None)
        if basis is None and cfg.latent_head == "pca":
            raise ValueError(f"--latent_head pca needs a PCA basis: no --pca_path and no targets in {cache.dir}")
    # K = 0 (dense-caption control) never calls the head: a parameter-free one keeps the code path the same
    kind = cfg.latent_head if cfg.latent_tokens else "hidden"
    head = LatentHead(kind, backbone.config.text_config.hidden_size, basis=basis, adapter_dim=cfg.adapter_dim)
    if ckpt:
        from safetensors.torch import load_file
        head.load_state_dict(load_file(os.path.join(ckpt, "latent_head.safetensors")))
    return GAP(backbone, head.to(device), ids, cfg.latent_tokens), tokenizer, image_processor, dataset, basis


def optimizer_for(gap, cfg):
    """AdamW with decay on matrices only, and the head on its own learning rate."""
    groups = {"decay": [], "no_decay": [], "head": []}
    for name, p in gap.named_parameters():
        if p.requires_grad:
            groups["head" if name.startswith("head.") else ("decay" if p.ndim >= 2 else "no_decay")].append(p)
    return torch.optim.AdamW([
        dict(params=groups["decay"], lr=cfg.lr, weight_decay=cfg.weight_decay),
        dict(params=groups["no_decay"], lr=cfg.lr, weight_decay=0.0),
        dict(params=groups["head"], lr=cfg.head_lr, weight_decay=cfg.weight_decay)])


def lr_factor(step, total, warmup_ratio):
    """Linear warmup over warmup_ratio of the steps, then cosine decay to 0."""
    warmup = max(1, math.ceil(warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def load_micro_batches(dataset, indices, micro_batch, pad_id, skip_bad):
    """This rank's examples for one step, as micro-batches; bad examples raise, or are counted with skip_bad."""
    items, skipped = [], 0
    for i in indices:
        try:
            items.append(dataset[i])
        except DataError as e:
            if not skip_bad:
                raise
            skipped += 1
            print(f"skipping bad example: {e}")
    return [collate(items[j:j + micro_batch], pad_id) for j in range(0, len(items), micro_batch)], skipped


def train_step(model, micro_batches, cfg, device, world):
    """Forward/backward over this rank's micro-batches for one optimizer step. The loss is normalized by the
    *global* number of supervised tokens and latent slots (known from the labels before any forward), times
    world size because DDP averages gradients; gradients sync only on the last micro-step. Returns the step's
    global (lm_sum, n_lm, latent_sum, n_latent, n_tokens)."""
    local = [sum(float((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches),
             sum(float(mb["latent_targets"].shape[0]) if mb["latent_targets"] is not None else 0.0
                 for mb in micro_batches)]
    n_lm, n_latent = all_sum(local, device)
    lm_sum = latent_sum = n_tokens = 0.0
    for j, mb in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        if isinstance(model, DDP):
            model.require_backward_grad_sync = last
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in mb.items() if k != "ids"}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(**batch, scheduled_sampling=cfg.scheduled_sampling)
        loss = (out["lm_sum"] / max(n_lm, 1) + cfg.lambda_latent * out["latent_sum"] / max(n_latent, 1)) * world
        loss.backward()
        lm_sum, latent_sum = lm_sum + out["lm_sum"].item(), latent_sum + out["latent_sum"].item()
        n_tokens += float(batch["attention_mask"].sum())
    lm_sum, latent_sum, n_tokens = all_sum([lm_sum, latent_sum, n_tokens], device)
    return lm_sum, n_lm, latent_sum, n_latent, n_tokens


def main(cfg: TrainConfig):
    from tqdm import tqdm
    rank, world, device = setup_distributed()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    gap, tokenizer, image_processor, dataset, basis = build(cfg, device, rank, world)
    if cfg.global_batch % (cfg.micro_batch * world):
        raise ValueError(f"global_batch {cfg.global_batch} is not a multiple of micro_batch x world "
                         f"= {cfg.micro_batch} x {world}")
    steps_per_epoch = len(dataset) // cfg.global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"global_batch {cfg.global_batch} > {len(dataset)} examples in {cfg.data}")
    total = steps_per_epoch * cfg.epochs if not cfg.max_steps else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    model = DDP(gap, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else gap
    opt = optimizer_for(gap, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg.warmup_ratio))
    n_latent_rows = sum(dataset.keeps_latent(r) for r in dataset.rows)
    if rank == 0:
        print(f"{len(dataset)} examples ({n_latent_rows} with latent supervision at tau={cfg.difficulty_tau}, "
              f"{dataset.skipped} bad lines skipped), {world} rank(s), {total} steps of {cfg.global_batch}, "
              f"K={cfg.latent_tokens}, head={gap.head.kind}" + (f" k={basis['k']}" if basis else "") +
              f", attention={gap.backbone.config._attn_implementation}")
    gap_config = dict(dataclasses.asdict(cfg), **dataclasses.asdict(dataset.spec))
    step = 0
    if cfg.resume:  # data order is a function of (seed, epoch), so the step number is the data position
        state = torch.load(os.path.join(cfg.out_dir, "train_state.pt"), weights_only=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        random.setstate(state["rng_python"])
        step = state["step"]
        if rank == 0:
            print(f"resumed from {cfg.out_dir} at step {step}")
    skipped, losses, bar = 0, [], tqdm(total=total, initial=step, disable=rank != 0, desc="train")
    gap.train()
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        mine = perm[k * cfg.global_batch:(k + 1) * cfg.global_batch][rank::world]
        micro, bad = load_micro_batches(dataset, mine, cfg.micro_batch, tokenizer.pad_token_id, cfg.skip_bad)
        skipped += bad
        t0 = time.time()
        lm_sum, n_lm, latent_sum, n_latent, n_tokens = train_step(model, micro, cfg, device, world)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(gap.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        losses.append((lm_sum / max(n_lm, 1), latent_sum / max(n_latent, 1)))
        bar.set_postfix(loss_lm=f"{lm_sum / max(n_lm, 1):.4f}", loss_latent=f"{latent_sum / max(n_latent, 1):.4f}",
                        lr=f"{sched.get_last_lr()[0]:.2e}", tok_s=f"{n_tokens / (time.time() - t0):.0f}")
        if rank == 0 and ((cfg.save_every and step % cfg.save_every == 0) or step == total):
            train_state = dict(optimizer=opt.state_dict(), scheduler=sched.state_dict(), step=step,
                               rng_cpu=torch.get_rng_state(), rng_python=random.getstate())
            save_checkpoint(gap, tokenizer, image_processor, cfg.out_dir, dict(gap_config, step=step), basis,
                            train_state)
    bar.close()
    if rank == 0:
        print(f"done: {step} steps, {skipped} bad examples skipped, checkpoint -> {cfg.out_dir}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main(parse_config(TrainConfig))
