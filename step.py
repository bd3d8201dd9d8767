"""One optimizer step of GAP training (paper eq. 3 over micro-batches and ranks; recipe of appendix F) and what it
runs on: the FSDP2 / DDP wrapping, AdamW with its parameter groups, the warmup + cosine schedule. train.main calls
train_step() once per step; bench_train.py times the same function.

    model = wrap(gap, device, world, fsdp=..., bf16=...)
    opt = optimizer_for(gap, lr, head_lr, weight_decay)
    losses, info = train_step(model, gap, opt, micro_batches, device, world)   # info: tokens, latent_slots, grad_norm

The model's own counts() and loss() say what is normalized by what and how the terms are weighted (GAP: eq. 3;
align.VaLR adds REPA), so the step is the same for every objective.
"""
import math

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import all_reduce


def train_step(model, gap, opt, micro, device, world, sched=None, grad_clip=1.0, bf16=False, fsdp=False,
               scheduled_sampling=False, on_grads=None, grad_sync="last"):
    """One optimizer step on this rank's micro-batches `micro` (collated dicts) of a step's global batch.
    model: gap wrapped (wrap()); gap: the unwrapped GAP, whose counts() / loss() define the objective.
    on_grads(gap): called with the step's gradients in place, before clipping (a seam for tests and metrics).
    grad_sync: "last" reduces gradients on the last micro-step only (until then DDP and FSDP2 accumulate unreduced,
    full-size gradients: under FSDP2 4 bytes per trainable parameter on every rank, the largest part of a 7B
    step's peak); "every" reduces on each micro-step (FSDP2 then accumulates sharded gradients).
    Returns ({term: the step's mean loss over the global batch}, dict(tokens: real tokens over all ranks,
    latent_slots: latent slots over all ranks, grad_norm: the global gradient norm before clipping))."""
    # the loss is normalized by the global number of supervised tokens and latent slots of the step (not by the
    # number of micro-steps): answers have different lengths, and ranks hold different examples
    local = {}
    for mb in micro:
        for k, v in gap.counts(mb).items():
            local[k] = local.get(k, 0.0) + v
    n = dict(zip(local, all_reduce(list(local.values()), device)))
    (n_micro,) = all_reduce([len(micro)], device, dist.ReduceOp.MAX if dist.is_initialized() else None)
    sums, tokens = {}, 0.0
    for j in range(int(n_micro)):
        # FSDP gathers parameters in every forward, so all ranks run n_micro of them: a rank with fewer
        # micro-batches (packing, skipped examples) repeats its last one with weight 0
        weight, mb = float(j < len(micro)), to_device(micro[min(j, len(micro) - 1)], device)
        set_grad_sync(model, grad_sync == "every" or j == n_micro - 1)  # by default on the last micro-step only
        # bf16: autocast over fp32 weights (DDP, one process); FSDP2 gathers bf16 weights itself (shard())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not fsdp):
            out = model(**mb, scheduled_sampling=scheduled_sampling)
        # x world: DDP and FSDP average gradients over ranks, the global normalization already did
        (gap.loss(out, n) * world * weight).backward()
        for k in (k for k in out if k.endswith("_sum")):
            sums[k] = sums.get(k, 0.0) + weight * out[k].item()
        tokens += weight * (mb["input_ids"].numel() if mb["attention_mask"] is None else mb["attention_mask"].sum().item())
    if on_grads is not None:
        on_grads(gap)
    params = [p for p in gap.parameters() if p.grad is not None]
    # the norm before clipping, over every rank's shard (FSDP2: a DTensor, made whole); one host sync, as the loss
    norm = (torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip
            else torch.nn.utils.get_total_norm([p.grad for p in params]))
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    opt.step()
    if sched is not None:
        sched.step()
    opt.zero_grad(set_to_none=True)
    *totals, tokens = all_reduce(list(sums.values()) + [tokens], device)
    # lm_sum / n_lm, latent_sum / n_latent, align_sum / n_align: each term per supervised position
    losses = {k[:-len("_sum")]: v / max(n["n_" + k[:-len("_sum")]], 1.0) for k, v in zip(sums, totals)}
    return losses, dict(tokens=tokens, latent_slots=n["n_latent"], grad_norm=grad_norm)


def set_grad_sync(model, sync):
    """Reduce gradients across ranks in this backward (the last micro-step) or not (the others)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    elif isinstance(model, DDP):
        model.require_backward_grad_sync = sync


def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items() if k != "ids"}


# ----------------------------------------------------------------------------------------------------------
# what the step runs on

def fsdp_units(gap, separate_ends=True):
    """The FSDP2 units of `gap`, inner first, as torchtitan draws them: [(name, modules, reshard_after_forward,
    fp32)]. Each decoder block, the vision tower, the token embeddings, the final norm with the LM head, the latent
    head (kept fp32: its outputs are fed back as inputs), then the root (what is left). reshard_after_forward:
    a unit's gathered parameters are freed after its forward and gathered again for its backward, except where
    backward follows at once -- the final norm + LM head run last in forward and first in backward, and the root
    is gathered for the whole step anyway. separate_ends=False leaves the embeddings, final norm and LM head in
    the root (unsharded for the whole step: at 7B 1.09B parameters; bench_train.py --mode shard compares)."""
    lm, backbone = gap.backbone.model.language_model, gap.backbone
    units = [(f"block{i}", [block], True, False) for i, block in enumerate(lm.layers)]
    units.append(("vision", [backbone.model.visual], True, False))
    tied = backbone.lm_head.weight is lm.embed_tokens.weight
    if separate_ends and not tied:  # tied weights are one parameter: they stay in the root
        units += [("embed", [lm.embed_tokens], True, False), ("norm+lm_head", [lm.norm, backbone.lm_head], False, False)]
    units += [("latent_head", [gap.head], True, True), ("root", [gap], False, False)]
    return units


def shard_bytes(units, world, rank, compute_bytes=2):
    """Per-rank bytes of an FSDP2 layout (step.fsdp_units): each parameter is cut along dim 0 into `world` chunks of
    ceil(rows / world) rows (FSDP2's layout); trainable ones carry an fp32 gradient and two fp32 AdamW states. A unit
    that is not resharded after forward stays gathered (in its compute dtype) from its forward to its backward."""
    seen, out = set(), dict(params=0, grads=0, adam=0, held=0, largest_gather=0)
    for name, modules, reshard, fp32 in units:  # inner first: a parameter belongs to the innermost unit
        params = [p for m in modules for p in m.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        local = 0
        for p in params:
            rows = p.shape[0] if p.dim() else 1
            chunk = -(-rows // world)
            mine = max(0, min(chunk, rows - rank * chunk)) * (p.numel() // max(rows, 1))
            local += mine
            out["params"] += 4 * mine
            if p.requires_grad:
                out["grads"] += 4 * mine
                out["adam"] += 8 * mine
        full = sum(p.numel() for p in params) * (4 if fp32 else compute_bytes)
        out["held" if not reshard else "largest_gather"] = (out["held"] + full if not reshard
                                                            else max(out["largest_gather"], full))
    return out


def shard(gap, device, world, param_dtype=torch.float32, separate_ends=True):
    """FSDP2 (FULL_SHARD semantics) over fsdp_units(gap). Parameters are gathered in param_dtype (bf16 with
    --precision bf16; the latent head fp32) and gradients reduced in fp32; the sharded fp32 parameters are the
    optimizer's master weights. Returns gap, now an FSDPModule."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world,))
    for name, modules, reshard, fp32 in fsdp_units(gap, separate_ends):
        mp = MixedPrecisionPolicy(param_dtype=torch.float32 if fp32 else param_dtype, reduce_dtype=torch.float32)
        fully_shard(modules if len(modules) > 1 else modules[0], mesh=mesh, mp_policy=mp,
                    reshard_after_forward=reshard)
    return gap


def wrap(gap, device, world, fsdp=False, bf16=False):
    """The module the micro-steps run: FSDP2-sharded gap, DDP around gap, or gap itself (one process)."""
    if fsdp:
        return shard(gap, device, world, torch.bfloat16 if bf16 else torch.float32)
    if world > 1:  # buffers (PCA basis, rotary) never change: no per-forward broadcast
        return DDP(gap, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return gap


def optimizer_for(gap, lr, head_lr, weight_decay=0.01):
    """AdamW with decay on matrices only, and the head (and VaLR's projectors) on its own learning rate."""
    groups = {"decay": [], "no_decay": [], "head": []}
    for name, p in gap.named_parameters():
        if p.requires_grad:
            groups["head" if name.startswith(("head.", "align.")) else ("decay" if p.ndim >= 2 else "no_decay")].append(p)
    return torch.optim.AdamW([
        dict(params=groups["decay"], lr=lr, weight_decay=weight_decay),
        dict(params=groups["no_decay"], lr=lr, weight_decay=0.0),
        dict(params=groups["head"], lr=head_lr, weight_decay=weight_decay)])


def lr_factor(step, total, warmup_ratio):
    """Linear warmup over warmup_ratio of the steps, then cosine decay to 0."""
    warmup = max(1, math.ceil(warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
