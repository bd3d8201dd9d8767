"""GAP training (paper section 4, eq. 3; recipe of appendix F): teacher-forced L = L_LM + lambda * L_latent on
Qwen2.5-VL with a PCA-aligned latent head, difficulty-aware latent assignment, AdamW + warmup + cosine.
The same file runs under python (one process) and torchrun: DDP, or FSDP2 with --fsdp (gloo on CPU, nccl on GPU);
--pack packs several examples per row; --save_every N writes resumable state, and a run started again (by hand, or by
torchrun --max-restarts after a worker died) continues from it by itself; --fresh starts over; --check_only checks
every example as training would see it and stops. One optimizer step is step.train_step. Every log step appends a
line to OUT_DIR.logs/metrics.jsonl, copied into the checkpoint at the end (metrics.py; --log tensorboard | wandb sends
the same numbers there too), --eval_data validates on held-out examples every --eval_every steps (validate.py), and
curves.py draws the file.

    python tiny.py --out out/tiny --sample_data out/sample
    python targets.py --model out/tiny --data out/sample/train.jsonl --latent_tokens 4 --cache_dir out/cache
    python train.py --model out/tiny --data out/sample/train.jsonl --target_cache out/cache --latent_tokens 4 \\
        --global_batch 4 --epochs 3 --lr 1e-3 --head_lr 1e-3 --out_dir out/gap   # + --eval_data held_out.jsonl
    python curves.py out/gap --out out/gap/curves.png                           # its metrics.jsonl, drawn
    torchrun --nproc_per_node 8 train.py --model Qwen/Qwen2.5-VL-7B-Instruct --data train.jsonl \\
        --target_cache cache --latent_tokens 36 --fsdp --grad_ckpt --pack --save_every 200
VaLR (README "VaLR"): --align repa with cached encoder features (align.py), --stage 1 then --stage 2:
    python train.py --model out/tiny --data valr.jsonl --latent_tokens 4 --latent_head hidden --lambda_latent 0 \\
        --align repa --align_encoders enc/dinov2,enc/siglip --align_cache align_cache --stage 1 --out_dir out/s1
    python train.py --model out/s1 ... --stage 2 --out_dir out/valr
"""
import dataclasses
import os
import random
import time
from dataclasses import field

import torch
import torch.distributed as dist
from tqdm import tqdm

import align as align_lib
import latent_head
from checkpoint import (export, find_state, load_state, read_basis, remove_state, save_state, state_damaged,
                        state_meta)
from common import SQUARE, BadExamples, DataError, all_reduce, parse_config, run_main, setup_distributed
from data import DataSpec, GAPDataset, StepCollate, check_rows, read_jsonl, report
from latent_head import LatentHead
from metrics import LOGGERS, RunLog, logs_dir, peak_memory_gib, require_logger
from model import GAP, add_latent_tokens, load_backbone
from step import lr_factor, optimizer_for, train_step, wrap
from targets import TargetCache, cache_info, fit_basis
from validate import Validation


AUTO_SAVE = 200  # --save_every -1: a state every 200 steps, so a crash loses at most that much of a long run


@dataclasses.dataclass
class TrainConfig(align_lib.VaLRConfig):
    """Train GAP on Qwen2.5-VL."""
    model: str = field(default="", metadata={"help": "base model directory or hub id"})
    data: str = field(default="", metadata={"help": "training JSONL (paper appendix I; README 'Data format')"})
    target_cache: str = field(default="cache", metadata={"help": "latent targets written by targets.py"})
    out_dir: str = field(default="out/gap", metadata={"help": "final checkpoint directory (infer.py --ckpt)"})
    latent_tokens: int = field(default=36, metadata={"help": "K latents per span, a perfect square; 0 = dense caption",
                                                     "check": SQUARE})
    latent_head: str = field(default="pca", metadata={"help": "pca (GAP) | full (LH ablation) | hidden (output-as-input)",
                                                      "choices": list(latent_head.KINDS)})
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
    precision: str = field(default="auto", metadata={
        "help": "bf16: bf16 compute, fp32 master weights (DDP / one process: autocast; FSDP2: bf16 parameters, fp32 "
                "gradient reduction); fp32; auto: bf16 on GPU, fp32 on CPU", "choices": ["auto", "bf16", "fp32"]})
    attn: str = field(default="auto", metadata={"help": "attention: auto (FlashAttention-2 if it imports on a GPU, "
                                                        "else SDPA)", "choices": ["auto", "sdpa", "flash_attention_2",
                                                                                  "eager"]})
    grad_ckpt: bool = field(default=False, metadata={"help": "activation checkpointing per decoder block"})
    grad_sync: str = field(default="last", metadata={
        "help": "reduce gradients on the last micro-step only (last), or on each (every: with --fsdp the accumulated "
                "gradients stay sharded: about 25 GiB less per GPU at 7B on 8 GPUs, for a reduce-scatter each time)",
        "choices": ["last", "every"]})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global grad norm (0: off)"})
    seed: int = field(default=12345, metadata={"help": "data order and init seed"})
    save_every: int = field(default=-1, metadata={"help": "write resumable state every N steps (0: never; -1: every "
                                                           f"{AUTO_SAVE} steps when the run is longer than that)",
                                                   "range": (-1, None)})
    state_dir: str = field(default="", metadata={"help": "where the resumable state goes (empty: OUT_DIR.state)"})
    fresh: bool = field(default=False, metadata={"help": "start at step 0 and discard the saved state in state_dir "
                                                         "(default: continue from it when there is one)"})
    skip_bad: bool = field(default=False, metadata={"help": "skip and count bad examples instead of stopping"})
    validate: bool = field(default=True, metadata={"help": "check every example (images, lengths, targets) before "
                                                           "step 1, all ranks sharing the work"})
    check_only: bool = field(default=False, metadata={"help": "check every example, report every problem, and stop "
                                                             "(exit 0: all good; 2: bad examples listed)"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes per rank (0: load in the "
                                                          "training process)", "range": (0, 64)})
    log_every: int = field(default=10, metadata={"help": "a log line (and a line of metrics.jsonl, in OUT_DIR.logs "
                                                          "and then the checkpoint) every N steps", "range": (1, None)})
    log: str = field(default="none", metadata={"help": "also send metrics.jsonl's numbers to tensorboard (tb/) or "
                                                       "wandb (wandb/; WANDB_MODE=offline works), in OUT_DIR.logs "
                                                       "while training; none: neither is imported",
                                                "choices": list(LOGGERS)})
    wandb_project: str = field(default="gap", metadata={"help": "--log wandb: the W&B project"})
    eval_data: str = field(default="", metadata={"help": "held-out JSONL in the training data's format (its targets "
                                                         "in --target_cache): validated every --eval_every steps"})
    eval_every: int = field(default=200, metadata={"help": "--eval_data: validate every N steps, at step 0 and at "
                                                           "the end", "range": (1, None)})
    eval_generate: int = field(default=8, metadata={"help": "--eval_data: greedy answers of its first N examples "
                                                            "(span-open, well-formed and accuracy rates; 0: none)",
                                                    "range": (0, None)})
    eval_max_new_tokens: int = field(default=256, metadata={"help": "--eval_data: generated tokens per answer",
                                                            "range": (1, None)})


# ----------------------------------------------------------------------------------------------------------
# the model and the data set

def build(cfg: TrainConfig, device, rank=0, world=1, basis=None):
    """Backbone + latent vocabulary + head + data set, unwrapped, fp32 on `device` (with VaLR's flags: the
    align.VaLR model). Returns (gap, tokenizer, image_processor, dataset, basis); with --check_only gap is None.
    The files a user gives are read before the model is loaded (the data, the target cache, --pca_path), so a bad
    one is named in seconds, and the data is checked before the PCA basis is fitted from it."""
    lines = read_jsonl(cfg.data, cfg.skip_bad)
    cache = TargetCache(cfg.target_cache, cfg.latent_tokens) if cfg.latent_tokens else None
    if basis is None and cfg.latent_tokens and cfg.pca_path:
        basis = read_basis(cfg.pca_path, "PCA basis (--pca_path)")
    backbone, tokenizer, image_processor = load_backbone(cfg.model, device, torch.float32, cfg.attn)
    ids = add_latent_tokens(backbone, tokenizer)
    backbone.model.visual.requires_grad_(cfg.train_vision)
    if cfg.grad_ckpt:  # recompute each decoder block in backward instead of keeping its activations
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    feed = align_lib.latent_feed(cfg)
    spec = DataSpec(cfg.latent_tokens, cfg.difficulty_tau, cfg.max_len, cfg.image_min_pixels, cfg.image_max_pixels,
                    latent_targets=feed == "targets")
    if cache is not None:  # refuses a cache made by another vision tower, K or resize (the fingerprint is of the
        cache.require(cache_info(backbone, cfg.latent_tokens))  # base weights, before any training of the tower)
    # return_errors: a bad example reaches the training process as a message (from a loader worker too),
    # which stops the run with it or, with --skip_bad, counts it
    dataset = GAPDataset(cfg.data, tokenizer, image_processor, ids, spec, cache, cfg.skip_bad, return_errors=True,
                         lines=lines)
    if cfg.validate or cfg.check_only:  # every example checked before step 1, so no bad one stops the run hours in
        problems = check_rows(dataset.rows, dataset.check, "training", rank, world, cfg.skip_bad)
        bad_rows = {i for i, _, _ in problems}
        if len(bad_rows) == len(dataset.rows):  # before the basis: "no targets to fit a basis from" would hide it
            raise DataError(f"{cfg.data}: nothing to train on, --skip_bad skipped every example: "
                            + (report(problems, len(dataset.rows), "training") if rank == 0 else "rank 0 lists them"))
        dataset.rows = [r for i, r in enumerate(dataset.rows) if i not in bad_rows]
        dataset.skipped += len(bad_rows)
    if cfg.check_only:
        return None, tokenizer, image_processor, dataset, None
    if basis is None and cfg.latent_tokens:
        basis = fit_basis(cache, dataset.rows, cfg.pca_var, rank, world)
        if basis is None and cfg.latent_head == "pca":
            raise DataError(f"--latent_head pca needs a PCA basis: no --pca_path and no targets in {cache.dir}")
    d = backbone.config.text_config.hidden_size
    if basis is not None and basis["P"].shape[0] != d:
        raise DataError(f"{cfg.pca_path or 'the saved PCA basis'}: a basis of {basis['P'].shape[0]}-wide vectors, the "
                        f"model's are {d}-wide (made from another model's targets?)")
    # K = 0 (dense-caption control) never calls the head: a parameter-free one keeps the code path the same
    kind = cfg.latent_head if cfg.latent_tokens else "hidden"
    head = LatentHead(kind, d, basis=basis, adapter_dim=cfg.adapter_dim)
    gap = GAP(backbone, head.to(device), ids, cfg.latent_tokens, cfg.lambda_latent)
    if feed != "targets" or cfg.align != "none":  # VaLR's feeding and REPA loss (align.py)
        gap, dataset = align_lib.build(cfg, gap, dataset, feed)
    return gap, tokenizer, image_processor, dataset, basis


def held_out(cfg, lines, gap, dataset, tokenizer, image_processor, basis, device, rank, world):
    """The validation of --eval_data (validate.py): its examples as training reads them (the same DataSpec, target
    cache and, with VaLR's REPA, encoder features), checked as the training data is before step 1."""
    held = GAPDataset(cfg.eval_data, tokenizer, image_processor, gap.latent_ids, dataset.spec, dataset.targets,
                      cfg.skip_bad, lines=lines)
    problems = check_rows(held.rows, held.check, "validation", rank, world, cfg.skip_bad)
    bad_rows = {i for i, _, _ in problems}
    held.rows = [r for i, r in enumerate(held.rows) if i not in bad_rows]
    if not held.rows:
        raise DataError(f"{cfg.eval_data}: nothing to validate on, --skip_bad skipped every example")
    if isinstance(dataset, align_lib.AlignedDataset):
        held = align_lib.AlignedDataset(held, dataset.caches)
    return Validation(held, tokenizer, image_processor, basis, cfg.micro_batch, cfg.eval_generate,
                      cfg.eval_max_new_tokens, bf16(cfg, device), cfg.fsdp, rank, world)


def bf16(cfg, device):
    """Whether the run computes in bf16 (--precision; auto: on GPU only, where bf16 matmuls are fast)."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


class StepSampler(torch.utils.data.Sampler):
    """The DataLoader's batch sampler: for each step from `start` to `total`, this rank's share of that step's
    global batch. The order is a function of (seed, epoch) alone, so a resumed run draws the same batches."""

    def __init__(self, n, global_batch, rank, world, seed, start, total):
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.start, self.total = seed, start, total

    def __len__(self):
        return self.total - self.start

    def __iter__(self):
        steps_per_epoch = self.n // self.global_batch
        for step in range(self.start, self.total):
            epoch, i = divmod(step, steps_per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            yield perm[i * self.global_batch:(i + 1) * self.global_batch][self.rank::self.world]


# ----------------------------------------------------------------------------------------------------------
# the loop

# flags that set the data order, the schedule or the model: a resumed run must keep them
RESUME_FIXED = ("data", "seed", "global_batch", "epochs", "max_steps", "latent_tokens", "latent_head",
                "difficulty_tau", "lr", "head_lr", "warmup_ratio", "adapter_dim", "stage", "latent_feed", "align",
                "align_encoders", "align_layer", "align_dim", "align_text")


def save_interval(save_every, total):
    """--save_every as steps between saves (0: none): -1 saves every AUTO_SAVE steps in a run longer than that."""
    return (AUTO_SAVE if total > AUTO_SAVE else 0) if save_every < 0 else save_every


def schedule(cfg, world, n_examples):
    """(optimizer steps, tokens per packed row or 0), after checking that the batch flags fit together."""
    pack_len = (cfg.pack_len or cfg.max_len) if cfg.pack else 0
    if cfg.global_batch % world or (not cfg.pack and (cfg.global_batch // world) % cfg.micro_batch):
        raise DataError(f"global_batch {cfg.global_batch} must split into {world} rank(s)"
                         + ("" if cfg.pack else f" x micro-batches of {cfg.micro_batch}"))
    if pack_len and pack_len < cfg.max_len:
        raise DataError(f"--pack_len {pack_len} < --max_len {cfg.max_len}: a long example would not fit a row")
    steps_per_epoch = n_examples // cfg.global_batch
    if steps_per_epoch == 0:
        raise DataError(f"global_batch {cfg.global_batch} > {n_examples} examples in {cfg.data}")
    total = steps_per_epoch * cfg.epochs
    return (min(cfg.max_steps, total) if cfg.max_steps else total), pack_len


def main(cfg: TrainConfig, on_grads=None):
    """The whole run, top to bottom as in nanoGPT's train.py: setup, resume, the step loop (one step.train_step per
    optimizer step: micro-steps, gradient sync on the last, global normalization, clip, AdamW), logging, saving,
    export. on_grads(gap): called in every step with its gradients, before clipping. Returns dict(losses=[(L_LM,
    L_latent[, L_align]) per step], step_s=[seconds per step], attn)."""
    rank, world, device = setup_distributed()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    state_dir = cfg.state_dir or cfg.out_dir.rstrip("/") + ".state"
    if not cfg.check_only:
        check_outputs(cfg, state_dir)
        require_logger(cfg.log)
    resume_from = None if cfg.fresh or cfg.check_only else find_state(state_dir)  # a state an unfinished run left
    saved_basis = None
    if resume_from:  # read before the model is loaded: a damaged state, or one of other flags, is named at once
        state_meta(resume_from, dataclasses.asdict(cfg), RESUME_FIXED)
        path = os.path.join(resume_from, "pca.safetensors")
        saved_basis = read_basis(path, "PCA basis of the saved state", state_damaged(resume_from)) \
            if os.path.exists(path) else None
    eval_lines = read_jsonl(cfg.eval_data, cfg.skip_bad) if cfg.eval_data and not cfg.check_only else None
    gap, tokenizer, image_processor, dataset, basis = build(cfg, device, rank, world, saved_basis)
    if cfg.fresh and rank == 0 and not cfg.check_only:  # discarded only now that the data and the model are good
        remove_state(state_dir)
    if cfg.check_only:
        if rank == 0:
            print(f"all {len(dataset.rows)} examples are good" if not dataset.skipped else
                  f"{len(dataset.rows)} examples are good, {dataset.skipped} bad ones skipped (--skip_bad)")
        if dist.is_initialized():
            dist.destroy_process_group()
        return dict(losses=[], step_s=[], attn=None)
    total, pack_len = schedule(cfg, world, len(dataset))
    save_every = save_interval(cfg.save_every, total)
    model = wrap(gap, device, world, cfg.fsdp, bf16(cfg, device))
    opt = optimizer_for(gap, cfg.lr, cfg.head_lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg.warmup_ratio))
    run_config = dict(dataclasses.asdict(cfg), **dataclasses.asdict(dataset.spec))
    step, skipped = load_state(resume_from, gap, opt, sched, rank, run_config, RESUME_FIXED) if resume_from else (0, 0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepSampler(len(dataset), cfg.global_batch, rank, world, cfg.seed, step, total),
        collate_fn=StepCollate(tokenizer.pad_token_id, cfg.micro_batch, pack_len), num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda", prefetch_factor=2 if cfg.num_workers else None,
        generator=torch.Generator().manual_seed(cfg.seed))  # its own: it must not draw from the restored RNG
    validation = held_out(cfg, eval_lines, gap, dataset, tokenizer, image_processor, basis, device, rank, world) \
        if cfg.eval_data else None
    if rank == 0:
        print(start_line(cfg, gap, dataset, basis, world, total, pack_len)
              + (f"\nresumed from {resume_from} at step {step}" if resume_from else ""), flush=True)
    # metrics.jsonl (and TensorBoard / W&B) in OUT_DIR.logs, continued from the saved step; the export copies them
    log = RunLog(cfg.out_dir, cfg.log, step, run_config, rank, cfg.wandb_project)
    bar = tqdm(total=total, initial=step, unit="step", disable=rank != 0, dynamic_ncols=True)
    steps_per_epoch = len(dataset) // cfg.global_batch
    bad, losses, step_s, window = BadExamples(cfg.skip_bad), [], [], dict(tokens=0.0, latent_slots=0.0, steps=0)
    val_s = 0.0  # seconds spent validating in this process, for the share of the run it takes
    if validation is not None and step == 0:  # the starting point of the validation curves
        val = validation(gap, device)
        val_s += val["val_s"]
        record = dict(step=0, epoch=0.0, **val, wall_s=log.wall_s(), time=time.time())  # no share yet: no training
        log.write(record)
        if rank == 0:
            bar.write(f"step 0/{total} | {summary(record)}")
    t0 = t_log = time.time()
    gap.train()
    try:
        for micro, errors in loader:  # this rank's examples of one step, loaded and collated by the workers
            for message in errors:
                bad.add(message)  # raises DataError (all ranks then stop), or with --skip_bad counts it
            if not micro:  # every example of this rank's share was bad: nothing to keep the ranks' steps alike with
                raise ValueError(f"rank {rank} has no valid example at step {step} (all skipped as bad)")
            lrs = [g["lr"] for g in opt.param_groups]  # what this step uses (the scheduler moves on inside it)
            try:
                loss, info = train_step(model, gap, opt, micro, device, world, sched, cfg.grad_clip,
                                        bf16(cfg, device), cfg.fsdp, cfg.scheduled_sampling, on_grads,
                                        cfg.grad_sync)
            except torch.OutOfMemoryError as e:  # CUDA's; on a CPU the kernel ends the process, nothing to catch
                raise DataError(out_of_memory(cfg, step + 1, micro, e)) from None
            step += 1
            losses.append(tuple(loss.values()))  # (L_LM, L_latent[, L_align])
            step_s.append(time.time() - t0)  # the whole step, waiting for its data included
            t0 = time.time()
            for k in ("tokens", "latent_slots"):
                window[k] += info[k]
            window["steps"] += 1
            bar.update(1)
            val = {}
            if validation is not None and (step % cfg.eval_every == 0 or step == total):
                val = validation(gap, device)  # every rank: the validation set is sharded over them
                val_s += val["val_s"]
            if step % cfg.log_every == 0 or step == total or val:
                seconds = t0 - t_log  # the steps since the last line, validation not included
                (peak,) = all_reduce([peak_memory_gib(device)], device, dist.ReduceOp.MAX if world > 1 else None)
                record = dict(step=step, epoch=step / steps_per_epoch, lr=lrs[0], lr_head=lrs[-1],
                              **{f"loss_{k}": v for k, v in loss.items()}, grad_norm=info["grad_norm"],
                              tokens_per_s=window["tokens"] / seconds,
                              latent_slots_per_s=window["latent_slots"] / seconds,
                              step_s=seconds / window["steps"], peak_mem_gib=peak, **val)
                record.update(val_share=val_s / log.wall_s() if val else None, wall_s=log.wall_s(), time=time.time())
                log.write({k: v for k, v in record.items() if v is not None})
                if rank == 0:
                    bar.set_postfix_str(summary(record), refresh=False)  # the bar says what the line says
                    bar.write(f"step {step}/{total} | {summary(record)}")
                window = dict(tokens=0.0, latent_slots=0.0, steps=0)
                t0 = t_log = time.time()
            if save_every and step % save_every == 0 and step < total:
                n_bad = all_reduce([bad.count], device)[0]
                save_state(state_dir, gap, opt, sched, step, skipped + int(n_bad), basis, rank, run_config)
    finally:
        bar.close()
        log.close()  # TensorBoard / W&B flushed and closed before the export copies their files
    skipped += int(all_reduce([bad.count], device)[0])
    resumes = find_state(state_dir)
    kept = (f"{cfg.out_dir} is as it was" + (f", and the state in {resumes} is kept" if resumes else "")
            + ": free space and run the same command again" + (", it resumes from that state" if resumes else ""))
    export(gap, tokenizer, image_processor, cfg.out_dir, dict(run_config, step=step), basis, rank, cfg.fsdp, kept,
           carry=logs_dir(cfg.out_dir))
    if rank == 0:
        remove_state(state_dir)  # the run is finished: a later run with the same out_dir starts over
        print(f"done: {step} steps, {skipped + dataset.skipped} bad examples skipped, checkpoint -> {cfg.out_dir}"
              + (f"; validation took {100 * val_s / log.wall_s():.1f}% of the run" if validation is not None else ""))
    attn = gap.backbone.config._attn_implementation
    if dist.is_initialized():
        dist.barrier()
        # DDP's reducer holds the process group: released only when main returns, after the group is destroyed,
        # its gloo threads can wait forever for a peer that has exited (seen here); release it first
        del model, opt, sched, loader
        dist.destroy_process_group()
    return dict(losses=losses, step_s=step_s, attn=attn)


def summary(record):
    """A metrics record in a few words: the log line after its "step N/total", and the progress bar's postfix."""
    words = [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("loss_")]
    if "lr" in record:
        words += [f"lr {record['lr']:.2e}", f"grad_norm {record['grad_norm']:.3g}",
                  f"{record['tokens_per_s']:.0f} tok/s"]
    words += [f"{k} {v:.0f}" if k == "val_generated" else f"{k} {v:.4f}" for k, v in record.items()
              if k.startswith("val_") and k not in ("val_s", "val_share")]
    if "val_s" in record:
        words.append(f"validation {record['val_s']:.1f} s" + (f" ({100 * record['val_share']:.1f}% of the run so far)"
                                                                if "val_share" in record else ""))
    return " | ".join(words)


def check_outputs(cfg, state_dir):
    """--out_dir and the state directory are replaced whole by a save (the old one moved away and deleted): refuse,
    before any work, a file there or a directory that is neither a checkpoint nor a state (a mistyped flag must not
    delete someone's data)."""
    for flag, path, mark, what in (("--out_dir", cfg.out_dir, "gap.json", "GAP checkpoint"),
                                   ("--state_dir", state_dir, "meta.pt", "training state")):
        if os.path.exists(path) and not os.path.isdir(path):
            raise DataError(f"{flag} {path}: a file, not a directory: training would replace it; give another {flag}")
        if os.path.isdir(path) and os.listdir(path) and not os.path.exists(os.path.join(path, mark)):
            raise DataError(f"{flag} {path}: a directory that is not a {what} (no {mark}): training would replace "
                            f"it; give another {flag}, or delete it")


def out_of_memory(cfg, step, micro, e):
    """The message for an out-of-memory error in a training step: the knobs that shrink a step's memory."""
    longest = max(mb["input_ids"].shape[1] for mb in micro)
    knobs = (f"--pack_len {cfg.pack_len or cfg.max_len}" if cfg.pack else f"--micro_batch {cfg.micro_batch}")
    what = ". ".join(str(e).split(". ")[:2])  # "CUDA out of memory. Tried to allocate 2.00 GiB", not the advice after
    return (f"out of memory in step {step} ({what}); its longest row is {longest} tokens: lower {knobs}, --max_len "
            f"{cfg.max_len} or --image_max_pixels {cfg.image_max_pixels or '(the processor default)'}"
            + ("" if cfg.grad_ckpt else ", or pass --grad_ckpt") + ("" if cfg.fsdp else " / --fsdp"))


def start_line(cfg, gap, dataset, basis, world, total, pack_len):
    attn = gap.backbone.config._attn_implementation
    n_latent_rows = sum(dataset.keeps_latent(r) for r in dataset.rows)
    return (f"attention: {attn}" + (" (flash_attn not importable)" if attn != "flash_attention_2" else "")
            + (f"; packed rows of {pack_len} tokens" if pack_len else "") + "\n"
            + f"{len(dataset)} examples ({n_latent_rows} with latent supervision at tau={cfg.difficulty_tau}, "
            f"{dataset.skipped} bad examples skipped), {world} rank(s)"
            f"{' FSDP2' if cfg.fsdp else ' DDP' if world > 1 else ''}, {total} steps of {cfg.global_batch}, "
            f"K={cfg.latent_tokens}, head={gap.head.kind}" + (f" k={basis['k']}" if basis else ""))


if __name__ == "__main__":
    run_main(main, parse_config(TrainConfig))
