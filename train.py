"""GAP training (paper section 4, eq. 3; recipe of appendix F): teacher-forced L = L_LM + lambda * L_latent on
Qwen2.5-VL with a PCA-aligned latent head, difficulty-aware latent assignment, AdamW + warmup + cosine.
The same file runs under python (one process) and torchrun: DDP, or FSDP2 with --fsdp (gloo on CPU, nccl on GPU);
--pack packs several examples per row; --save_every N writes resumable state, --resume continues from it.

    python tiny.py --out out/tiny --sample_data out/sample
    python data.py --model out/tiny --data out/sample/train.jsonl --latent_tokens 4 --cache_dir out/cache
    python train.py --model out/tiny --data out/sample/train.jsonl --target_cache out/cache --latent_tokens 4 \\
        --global_batch 4 --epochs 3 --lr 1e-3 --head_lr 1e-3 --out_dir out/gap
    torchrun --nproc_per_node 8 train.py --model Qwen/Qwen2.5-VL-7B-Instruct --data train.jsonl \\
        --target_cache cache --latent_tokens 36 --fsdp --grad_ckpt --pack --save_every 200
"""
import dataclasses
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import pca as pca_lib
from data import DataError, DataSpec, GAPDataset, TargetCache, collate, collate_packed, pack
from latent_head import LatentHead
from model import GAP, add_latent_tokens, load_backbone, parse_config, replace_dir, save_checkpoint


@dataclasses.dataclass
class TrainConfig:
    """Train GAP on Qwen2.5-VL."""
    model: str = field(default="", metadata={"help": "base model directory or hub id"})
    data: str = field(default="", metadata={"help": "training JSONL (GAP_SPEC 'Data')"})
    target_cache: str = field(default="cache", metadata={"help": "latent targets written by data.py"})
    out_dir: str = field(default="out/gap", metadata={"help": "final checkpoint directory (infer.py --ckpt)"})
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
    micro_batch: int = field(default=1, metadata={"help": "examples per padded forward (without --pack)"})
    pack: bool = field(default=False, metadata={"help": "pack a rank's examples into rows of --pack_len tokens"})
    pack_len: int = field(default=0, metadata={"help": "tokens per packed row (0: max_len)"})
    max_len: int = field(default=8192, metadata={"help": "longest sequence allowed (error, or skip with --skip_bad)"})
    image_min_pixels: int = field(default=0, metadata={"help": "query-image min pixels (0: processor's)"})
    image_max_pixels: int = field(default=0, metadata={"help": "query-image max pixels (0: processor's)"})
    train_vision: bool = field(default=False, metadata={"help": "also train the vision tower (frozen in the paper)"})
    fsdp: bool = field(default=False, metadata={"help": "FSDP2: shard params, grads and optimizer state (else DDP)"})
    grad_ckpt: bool = field(default=False, metadata={"help": "activation checkpointing per decoder block"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global grad norm (0: off)"})
    seed: int = field(default=12345, metadata={"help": "data order and init seed"})
    save_every: int = field(default=0, metadata={"help": "write resumable state every N steps (0: never)"})
    state_dir: str = field(default="", metadata={"help": "where the resumable state goes (empty: OUT_DIR.state)"})
    resume: bool = field(default=False, metadata={"help": "continue from the state in state_dir"})
    skip_bad: bool = field(default=False, metadata={"help": "skip and count bad examples instead of stopping"})


# ----------------------------------------------------------------------------------------------------------
# distributed setup and collectives

def setup_distributed():
    """(rank, world, device). One process without torchrun; a process group (nccl on GPU, gloo on CPU) under it."""
    if "RANK" not in os.environ:
        return 0, 1, (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce(values, device, op=None):
    """Sum (or `op`) a list of numbers over ranks with one all_reduce."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------
# model, data set, sharding, optimizer

def fit_basis(cache: TargetCache, var, rank, world):
    """PCA basis of all cached targets, each rank streaming a slice, merged exactly across ranks."""
    stats = pca_lib.PCAStats()
    for key in sorted(cache.where)[rank::world]:
        stats.update(cache.get(key))
    return pca_lib.fit(stats.all_reduce(), var)


def build(cfg: TrainConfig, device, rank=0, world=1, basis=None):
    """Backbone + latent vocabulary + head + data set, unwrapped, fp32 on `device`.
    Returns (gap, tokenizer, image_processor, dataset, basis)."""
    backbone, tokenizer, image_processor = load_backbone(cfg.model, device, torch.float32)
    ids = add_latent_tokens(backbone, tokenizer)
    backbone.model.visual.requires_grad_(cfg.train_vision)
    if cfg.grad_ckpt:  # recompute each decoder block in backward instead of keeping its activations
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    spec = DataSpec(cfg.latent_tokens, cfg.difficulty_tau, cfg.max_len, cfg.image_min_pixels, cfg.image_max_pixels)
    cache = TargetCache(cfg.target_cache, cfg.latent_tokens) if cfg.latent_tokens else None
    dataset = GAPDataset(cfg.data, tokenizer, image_processor, ids, spec, cache, cfg.skip_bad)
    if basis is None and cfg.latent_tokens:
        basis = pca_lib.load(cfg.pca_path) if cfg.pca_path else (fit_basis(cache, cfg.pca_var, rank, world)
                                                                  if cache.where else None)
        if basis is None and cfg.latent_head == "pca":
            raise ValueError(f"--latent_head pca needs a PCA basis: no --pca_path and no targets in {cache.dir}")
    # K = 0 (dense-caption control) never calls the head: a parameter-free one keeps the code path the same
    kind = cfg.latent_head if cfg.latent_tokens else "hidden"
    head = LatentHead(kind, backbone.config.text_config.hidden_size, basis=basis, adapter_dim=cfg.adapter_dim)
    return GAP(backbone, head.to(device), ids, cfg.latent_tokens), tokenizer, image_processor, dataset, basis


def shard(gap, device, world):
    """FSDP2 (ShardingStrategy FULL_SHARD semantics): each decoder block, the vision tower as one unit, the
    latent head (kept fp32), then the root. On GPU parameters are gathered in bf16 and gradients reduced in
    fp32; the sharded fp32 parameters are the optimizer's master weights. Returns gap, now an FSDPModule."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                              reduce_dtype=torch.float32)
    for block in gap.backbone.model.language_model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(gap.backbone.model.visual, mesh=mesh, mp_policy=mp)
    fully_shard(gap.head, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
    return fully_shard(gap, mesh=mesh, mp_policy=mp)


def wrap(gap, cfg, device, world):
    """The module train_step() runs: FSDP2-sharded gap, DDP around gap, or gap itself (one process)."""
    if cfg.fsdp:
        return shard(gap, device, world)
    if world > 1:  # buffers (PCA basis, rotary) never change: no per-forward broadcast
        return DDP(gap, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return gap


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


# ----------------------------------------------------------------------------------------------------------
# one optimizer step

def load_micro_batches(dataset, indices, micro_batch, pad_id, skip_bad, pack_len=0):
    """This rank's examples for one step as micro-batches: padded batches of micro_batch, or (pack_len > 0)
    packed rows of at most pack_len tokens. Bad examples raise, or are counted with skip_bad."""
    items, skipped = [], 0
    for i in indices:
        try:
            items.append(dataset[i])
        except DataError as e:
            if not skip_bad:
                raise
            skipped += 1
            print(f"skipping bad example: {e}")
    if pack_len:
        return [collate_packed(row) for row in pack(items, pack_len)], skipped
    return [collate(items[j:j + micro_batch], pad_id) for j in range(0, len(items), micro_batch)], skipped


def train_step(model, micro_batches, cfg, device, world):
    """Forward/backward over this rank's micro-batches for one optimizer step. The loss is normalized by the
    *global* number of supervised tokens and latent slots (known from the labels before any forward), times
    world size because DDP and FSDP average gradients over ranks; gradients sync only on the last micro-step.
    Ranks may hold different numbers of micro-batches (packing, skipped examples), but FSDP gathers parameters
    in every forward: a rank with fewer repeats its last one with weight 0 so all run the same count.
    Returns the step's global (lm_sum, n_lm, latent_sum, n_latent, n_tokens)."""
    n_lm = sum(float((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)
    n_latent = sum(float(mb["latent_targets"].shape[0]) if mb["latent_targets"] is not None else 0.0
                   for mb in micro_batches)
    n_lm, n_latent = all_reduce([n_lm, n_latent], device)
    (n_micro,) = all_reduce([len(micro_batches)], device, dist.ReduceOp.MAX if dist.is_initialized() else None)
    if not micro_batches:
        raise ValueError(f"rank {dist.get_rank() if dist.is_initialized() else 0} has no valid example this step")
    fsdp = hasattr(model, "set_requires_gradient_sync")
    lm_sum = latent_sum = n_tokens = 0.0
    for j in range(int(n_micro)):
        last, weight = j == n_micro - 1, float(j < len(micro_batches))
        mb = micro_batches[min(j, len(micro_batches) - 1)]
        if fsdp:
            model.set_requires_gradient_sync(last)
        elif isinstance(model, DDP):
            model.require_backward_grad_sync = last
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in mb.items() if k != "ids"}
        # DDP on GPU: bf16 autocast over fp32 weights; FSDP2 gathers bf16 weights itself (shard())
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and not fsdp):
            out = model(**batch, scheduled_sampling=cfg.scheduled_sampling)
        loss = (out["lm_sum"] / max(n_lm, 1) + cfg.lambda_latent * out["latent_sum"] / max(n_latent, 1)) * world
        (loss * weight).backward()
        if weight:
            lm_sum, latent_sum = lm_sum + out["lm_sum"].item(), latent_sum + out["latent_sum"].item()
            n_tokens += batch["input_ids"].numel() if mb["attention_mask"] is None else float(mb["attention_mask"].sum())
    lm_sum, latent_sum, n_tokens = all_reduce([lm_sum, latent_sum, n_tokens], device)
    return lm_sum, n_lm, latent_sum, n_latent, n_tokens


# ----------------------------------------------------------------------------------------------------------
# resumable state (sharded, atomic) and the final export

# flags that set the data order, the schedule or the model: a resumed run must keep them
RESUME_FIXED = ("data", "seed", "global_batch", "epochs", "max_steps", "latent_tokens", "latent_head",
                "difficulty_tau", "lr", "head_lr", "warmup_ratio", "adapter_dim")


def save_state(path, gap, opt, sched, step, skipped, basis, rank, cfg):
    """Everything --resume needs: model and optimizer through torch.distributed.checkpoint (each rank writes its
    own shards; DDP replicas are written once), scheduler and data position (the step: the data order is a
    function of seed and epoch), bad-example count, PCA basis, and each rank's RNG states. All of it goes to
    PATH.tmp first, then replaces PATH (model.replace_dir): a crash mid-save leaves the previous state whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    tmp = path.rstrip("/") + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    model_state, optim_state = get_state_dict(gap, opt)
    with warnings.catch_warnings():  # one process: DCP warns that it saves without a process group, as meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(dict(model=model_state, optim=optim_state), checkpoint_id=tmp, no_dist=not dist.is_initialized())
    torch.save(dict(cpu=torch.get_rng_state(), python=random.getstate(),
                    cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None),
               os.path.join(tmp, f"rng_rank{rank}.pt"))
    barrier()
    if rank == 0:
        torch.save(dict(step=step, scheduler=sched.state_dict(), skipped=skipped, config=dataclasses.asdict(cfg)),
                   os.path.join(tmp, "meta.pt"))
        if basis is not None:
            pca_lib.save(os.path.join(tmp, "pca.safetensors"), basis)
        replace_dir(tmp, path)
    barrier()


def find_state(path):
    """The state directory to resume from: PATH, or PATH.old after a crash between replace_dir's two renames."""
    for p in (path, path.rstrip("/") + ".old"):
        if os.path.exists(os.path.join(p, "meta.pt")):
            return p
    raise FileNotFoundError(f"--resume: no saved state in {path} (train with --save_every N to write one)")


def load_state(path, gap, opt, sched, rank, cfg):
    """Inverse of save_state(); returns (step, skipped). DCP reshards, so the world size may change, but then
    the RNG streams of the new ranks start from the seed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    meta = torch.load(os.path.join(path, "meta.pt"), weights_only=False)
    changed = [f"--{k} {meta['config'][k]!r} -> {getattr(cfg, k)!r}" for k in RESUME_FIXED
               if meta["config"][k] != getattr(cfg, k)]
    if changed:
        raise ValueError(f"--resume from {path}: these flags differ from the saved run: {', '.join(changed)}")
    model_state, optim_state = get_state_dict(gap, opt)
    state = dict(model=model_state, optim=optim_state)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_state_dict(gap, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sched.load_state_dict(meta["scheduler"])
    rng_path = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.exists(rng_path):
        rng = torch.load(rng_path, weights_only=False)
        torch.set_rng_state(rng["cpu"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        print(f"rank {rank}: no RNG state in {path} (saved with fewer ranks): RNG streams restart from the seed")
    return meta["step"], meta["skipped"]


def export(gap, tokenizer, image_processor, out_dir, gap_config, basis, rank, fsdp):
    """The infer.py checkpoint (model.save_checkpoint). Under FSDP2 every rank takes part in gathering the
    full state dict, which only rank 0 holds (on CPU) and writes."""
    state_dict = None
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state_dict = get_model_state_dict(gap, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_checkpoint(gap, tokenizer, image_processor, out_dir, gap_config, basis, state_dict=state_dict)
    barrier()


# ----------------------------------------------------------------------------------------------------------
# the loop

def main(cfg: TrainConfig):
    from tqdm import tqdm
    rank, world, device = setup_distributed()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    state_dir = cfg.state_dir or cfg.out_dir.rstrip("/") + ".state"
    resume_from = find_state(state_dir) if cfg.resume else None
    saved_basis = os.path.join(resume_from, "pca.safetensors") if resume_from else ""
    gap, tokenizer, image_processor, dataset, basis = build(
        cfg, device, rank, world, pca_lib.load(saved_basis) if os.path.exists(saved_basis) else None)
    pack_len = (cfg.pack_len or cfg.max_len) if cfg.pack else 0
    per_rank = cfg.global_batch // world
    if cfg.global_batch % world or (not cfg.pack and per_rank % cfg.micro_batch):
        raise ValueError(f"global_batch {cfg.global_batch} must split into {world} rank(s)"
                         + ("" if cfg.pack else f" x micro-batches of {cfg.micro_batch}"))
    if pack_len and pack_len < cfg.max_len:
        raise ValueError(f"--pack_len {pack_len} < --max_len {cfg.max_len}: a long example would not fit a row")
    steps_per_epoch = len(dataset) // cfg.global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"global_batch {cfg.global_batch} > {len(dataset)} examples in {cfg.data}")
    total = steps_per_epoch * cfg.epochs if not cfg.max_steps else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    model = wrap(gap, cfg, device, world)
    opt = optimizer_for(gap, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg.warmup_ratio))
    n_latent_rows = sum(dataset.keeps_latent(r) for r in dataset.rows)
    if rank == 0:
        attn = gap.backbone.config._attn_implementation
        print(f"attention: {attn}" + (" (flash_attn not importable)" if attn != "flash_attention_2" else "")
              + (f"; packed rows of {pack_len} tokens" if pack_len else ""))
        print(f"{len(dataset)} examples ({n_latent_rows} with latent supervision at tau={cfg.difficulty_tau}, "
              f"{dataset.skipped} bad lines skipped), {world} rank(s){' FSDP2' if cfg.fsdp else ' DDP' if world > 1 else ''}, "
              f"{total} steps of {cfg.global_batch}, K={cfg.latent_tokens}, head={gap.head.kind}"
              + (f" k={basis['k']}" if basis else ""))
    gap_config = dict(dataclasses.asdict(cfg), **dataclasses.asdict(dataset.spec))
    step, skipped = 0, 0
    if resume_from:
        step, skipped = load_state(resume_from, gap, opt, sched, rank, cfg)
        if rank == 0:
            print(f"resumed from {resume_from} at step {step}")
    losses, bar = [], tqdm(total=total, initial=step, disable=rank != 0, desc="train")
    gap.train()
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        mine = perm[k * cfg.global_batch:(k + 1) * cfg.global_batch][rank::world]
        micro, bad = load_micro_batches(dataset, mine, cfg.micro_batch, tokenizer.pad_token_id, cfg.skip_bad,
                                        pack_len)
        (bad,) = all_reduce([bad], device)
        skipped += int(bad)
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
        bar.set_postfix(loss_lm=f"{losses[-1][0]:.4f}", loss_latent=f"{losses[-1][1]:.4f}",
                        lr=f"{sched.get_last_lr()[0]:.2e}", tok_s=f"{n_tokens / (time.time() - t0):.0f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            save_state(state_dir, gap, opt, sched, step, skipped, basis, rank, cfg)
    bar.close()
    export(gap, tokenizer, image_processor, cfg.out_dir, dict(gap_config, step=step), basis, rank, cfg.fsdp)
    if rank == 0:
        print(f"done: {step} steps, {skipped} bad examples skipped, checkpoint -> {cfg.out_dir}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main(parse_config(TrainConfig))
