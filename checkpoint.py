"""GAP checkpoints and the resumable training state: what train.py writes and infer.py, norms.py and a resumed
run read back (paper appendix F; STYLE 10).

A checkpoint is a directory: the backbone in the stock Qwen2.5-VL format (loads in
`Qwen2_5_VLForConditionalGeneration.from_pretrained` as it is), the tokenizer with the latent tokens, the image
processor, latent_head.safetensors, pca.safetensors (the basis, when the head has one), gap.json (K, the head's
config, the latent-token ids, the training flags) and, for a VaLR run, align.safetensors (training only). The
training state is a torch.distributed.checkpoint directory (each rank its own shards) plus meta.pt and each
rank's RNG states. Both are written to DIR.tmp and swapped in whole (common.replace_dir).

    from checkpoint import load_checkpoint
    gap, tokenizer, image_processor, config = load_checkpoint("out/gap")
"""
import hashlib
import json
import os
import random
import shutil
import warnings

import torch
import torch.distributed as dist

import pca as pca_lib
from common import DataError, atomic_write_text, barrier, replace_dir
from latent_head import LatentHead
from model import LATENT_END, LATENT_PAD, LATENT_START, GAP, load_backbone

# ----------------------------------------------------------------------------------------------------------
# checkpoints: backbone in the stock format + tokenizer + image processor + head + PCA basis + gap.json

def save_checkpoint(gap, tokenizer, image_processor, out_dir, gap_config: dict, basis=None, state_dict=None):
    """Write a complete checkpoint directory atomically: everything goes to DIR.tmp, which then replaces DIR,
    so a crash mid-save never damages the previous checkpoint. The backbone directory loads in the stock
    Qwen2_5_VLForConditionalGeneration; load_checkpoint() loads the whole of it. gap.json records the head's
    own configuration, so any caller's checkpoint loads. `state_dict`: a full GAP state dict to write instead
    of gap's own (export() gathers one from FSDP2 shards)."""
    from safetensors.torch import save_file
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = state_dict if state_dict is not None else gap.state_dict()
    part = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    gap.backbone.save_pretrained(tmp, state_dict=part("backbone."), safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    head_state = {k: v.detach().float().cpu().contiguous() for k, v in part("head.").items()}
    save_file(head_state, os.path.join(tmp, "latent_head.safetensors"))
    for extra in sorted({k.split(".", 1)[0] for k in state} - {"backbone", "head"}):
        # a subclass's own modules (VaLR's REPA projectors -> align.safetensors): training only (a stage-2 run starts
        # from them); inference ignores them
        save_file({k: v.detach().float().cpu().contiguous() for k, v in part(extra + ".").items()},
                  os.path.join(tmp, f"{extra}.safetensors"))
    if basis is not None:
        pca_lib.save(os.path.join(tmp, "pca.safetensors"), basis)
    config = dict(gap_config, latent_tokens=gap.latent_tokens, head_config=gap.head.config(),
                  latent_token_ids=gap.latent_ids)
    atomic_write_text(os.path.join(tmp, "gap.json"), json.dumps(config, indent=2) + "\n")
    replace_dir(tmp, out_dir)


def checkpoint_dir(ckpt_dir):
    """The directory to read: CKPT, or CKPT.old after a crash between the two renames of replace_dir()."""
    if not os.path.exists(ckpt_dir) and os.path.exists(ckpt_dir.rstrip("/") + ".old"):
        return ckpt_dir.rstrip("/") + ".old"
    return ckpt_dir


def checkpoint_stamp(ckpt):
    """A hash of the checkpoint's gap.json and latent head (small files, and a retrained checkpoint changes the
    head), so that results answered by an older checkpoint at the same path are not resumed as this one's."""
    h = hashlib.sha256()
    for name in ("gap.json", "latent_head.safetensors"):
        with open(os.path.join(checkpoint_dir(ckpt), name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def load_checkpoint(ckpt_dir, device=None, dtype=None):
    """Load a GAP checkpoint written by save_checkpoint(). Returns (gap, tokenizer, image_processor, config).
    The latent-token ids in gap.json must match the tokenizer's, else it fails loudly."""
    from safetensors.torch import load_file
    ckpt_dir = checkpoint_dir(ckpt_dir)
    path = os.path.join(ckpt_dir, "gap.json")
    if not os.path.exists(path):
        raise DataError(f"{path}: not a GAP checkpoint (no gap.json); train one with train.py")
    with open(path) as f:
        config = json.load(f)
    backbone, tokenizer, image_processor = load_backbone(ckpt_dir, device, dtype)
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in zip(("start", "pad", "end"),
                                                                   (LATENT_START, LATENT_PAD, LATENT_END))}
    if ids != config["latent_token_ids"]:
        raise ValueError(f"{path}: latent_token_ids {config['latent_token_ids']} != tokenizer's {ids}")
    basis_path = os.path.join(ckpt_dir, "pca.safetensors")
    basis = pca_lib.load(basis_path) if os.path.exists(basis_path) else None
    head_state = load_file(os.path.join(ckpt_dir, "latent_head.safetensors"))
    head_config = config.get("head_config") or dict(  # gap.json written before it recorded the head's config
        kind=config["latent_head"], d=backbone.config.text_config.hidden_size,
        adapter_dim=head_state["A.gate.weight"].shape[0] if "A.gate.weight" in head_state else 256)
    head = LatentHead(head_config["kind"], head_config["d"], basis=basis, adapter_dim=head_config["adapter_dim"])
    head.load_state_dict(head_state)
    gap = GAP(backbone, head.to(backbone.device), ids, config["latent_tokens"])
    return gap.eval(), tokenizer, image_processor, config


def export(gap, tokenizer, image_processor, out_dir, gap_config, basis, rank, fsdp):
    """The final checkpoint, from every rank of a run. Under FSDP2 every rank takes part in gathering the full
    state dict, which only rank 0 holds (on CPU) and writes."""
    state_dict = None
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state_dict = get_model_state_dict(gap, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_checkpoint(gap, tokenizer, image_processor, out_dir, gap_config, basis, state_dict=state_dict)
    barrier()


# ----------------------------------------------------------------------------------------------------------
# resumable training state (sharded, atomic)

def save_state(path, gap, opt, sched, step, skipped, basis, rank, config: dict):
    """Everything a resumed run needs: model and optimizer through torch.distributed.checkpoint (each rank writes
    its own shards; DDP replicas are written once), scheduler and data position (the step: the data order is a
    function of seed and epoch), bad-example count, PCA basis, the run's config and each rank's RNG states. All
    of it goes to PATH.tmp first, then replaces PATH (replace_dir): a crash mid-save leaves the last state whole."""
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
        torch.save(dict(step=step, scheduler=sched.state_dict(), skipped=skipped, config=config),
                   os.path.join(tmp, "meta.pt"))
        if basis is not None:
            pca_lib.save(os.path.join(tmp, "pca.safetensors"), basis)
        replace_dir(tmp, path)
    barrier()


def find_state(path):
    """The state directory to resume from: PATH, or PATH.old after a crash between replace_dir's two renames;
    None when there is none."""
    for p in (path, path.rstrip("/") + ".old"):
        if os.path.exists(os.path.join(p, "meta.pt")):
            return p
    return None


def remove_state(path):
    for p in (path, path.rstrip("/") + ".old", path.rstrip("/") + ".tmp"):
        shutil.rmtree(p, ignore_errors=True)


def load_state(path, gap, opt, sched, rank, config: dict, fixed):
    """Inverse of save_state(); returns (step, skipped). The `fixed` keys of config (data order, schedule,
    model) must equal the saved run's. DCP reshards, so the world size may change, but then the RNG streams
    of the new ranks start from the seed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    meta = torch.load(os.path.join(path, "meta.pt"), weights_only=True)
    changed = [f"--{k} {meta['config'][k]!r} -> {config[k]!r}" for k in fixed if meta["config"][k] != config[k]]
    if changed:
        raise DataError(f"{path} holds the state of a run with other flags ({', '.join(changed)}): use those to "
                         f"continue it, --fresh to discard it, or another --out_dir / --state_dir")
    model_state, optim_state = get_state_dict(gap, opt)
    state = dict(model=model_state, optim=optim_state)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_state_dict(gap, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sched.load_state_dict(meta["scheduler"])
    rng_path = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.exists(rng_path):
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        print(f"rank {rank}: no RNG state in {path} (saved with fewer ranks): RNG streams restart from the seed")
    return meta["step"], meta["skipped"]
