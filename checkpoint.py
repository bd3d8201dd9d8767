"""GAP checkpoints and the resumable training state: what train.py writes and infer.py, norms.py and a resumed
run read back (paper appendix F; STYLE 10).

A checkpoint is a directory: the backbone in the stock Qwen2.5-VL format (loads in
`Qwen2_5_VLForConditionalGeneration.from_pretrained` as it is), the tokenizer with the latent tokens, the image
processor, latent_head.safetensors, pca.safetensors (the basis, when the head has one), gap.json (the version of
its layout, K, the head's config, the latent-token ids, the training flags) and, for a VaLR run, align.safetensors
(training only). The training state is a torch.distributed.checkpoint directory (each rank its own shards) plus
meta.pt and each rank's RNG states. Both are written to DIR.tmp and swapped in whole (common.replace_dir); a save
the disk has no room for removes DIR.tmp and ends with one line, the previous DIR intact. A file of either that
is missing, truncated or of another kind is named, with what to do, before anything is built from it.

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
from common import (DataError, atomic_write_text, barrier, check_files, read_json, reading, replace_dir,
                    user_dir, user_file, writing)
from latent_head import LatentHead
from model import LATENT_END, LATENT_PAD, LATENT_START, GAP, load_backbone

# ----------------------------------------------------------------------------------------------------------
# checkpoints: backbone in the stock format + tokenizer + image processor + head + PCA basis + gap.json

# the layout of gap.json, recorded in it as "layout": 1 (no "layout" key) was written before the head's config
# was recorded: its head is rebuilt from "latent_head" and the weights; 2 records "head_config". A layout newer
# than this code's is refused, naming both.
GAP_LAYOUT = 2
GAP_KEYS = {1: ("latent_tokens", "latent_token_ids", "latent_head"), 2: ("latent_tokens", "latent_token_ids",
                                                                       "head_config")}
DAMAGED = ("; the checkpoint is damaged: use another one, or train it again (a run that did not finish resumes from "
           "its saved state)")


def save_checkpoint(gap, tokenizer, image_processor, out_dir, gap_config: dict, basis=None, state_dict=None,
                    kept=None, carry=None):
    """Write a complete checkpoint directory atomically: everything goes to DIR.tmp, which then replaces DIR,
    so a crash mid-save never damages the previous checkpoint. The backbone directory loads in the stock
    Qwen2_5_VLForConditionalGeneration; load_checkpoint() loads the whole of it. gap.json records the head's
    own configuration, so any caller's checkpoint loads. `state_dict`: a full GAP state dict to write instead
    of gap's own (export() gathers one from FSDP2 shards). `kept`: what a save the disk has no room for leaves
    intact, for its one line (default: OUT_DIR as it was). `carry`: a directory whose files go into the checkpoint
    too (a training run's metrics.jsonl and logs, metrics.logs_dir)."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(out_dir, kept or f"{out_dir} is as it was: free space and save again",
                 cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
        write_checkpoint(gap, tokenizer, image_processor, tmp, gap_config, basis, state_dict)
        if carry and os.path.isdir(carry):  # W&B's latest-run link stays a link
            shutil.copytree(carry, tmp, symlinks=True, dirs_exist_ok=True)
    replace_dir(tmp, out_dir)


def write_checkpoint(gap, tokenizer, image_processor, tmp, gap_config, basis, state_dict):
    from safetensors.torch import save_file
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
    config = dict(gap_config, layout=GAP_LAYOUT, latent_tokens=gap.latent_tokens, head_config=gap.head.config(),
                  latent_token_ids=gap.latent_ids)
    atomic_write_text(os.path.join(tmp, "gap.json"), json.dumps(config, indent=2) + "\n")


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


def read_gap_json(ckpt_dir, flag="--ckpt"):
    """gap.json of a checkpoint directory, after checking that this code can read its layout (an older one when
    it is compatible: GAP_LAYOUT); a DataError naming what is missing or damaged otherwise, and for a directory
    that is not a checkpoint the flag (`flag`) that names another."""
    user_dir(ckpt_dir, "checkpoint directory", f" (pass {flag} the directory train.py wrote)")
    path = os.path.join(ckpt_dir, "gap.json")
    if not os.path.exists(path):
        raise DataError(f"{path}: not a GAP checkpoint (no gap.json): pass {flag} the directory train.py wrote "
                        f"(its --out_dir), or train one with train.py")
    config = read_json(path, "checkpoint's gap.json", DAMAGED)
    layout = config.get("layout", 1)
    if not isinstance(layout, int) or layout > GAP_LAYOUT:
        raise DataError(f"{path}: gap.json layout {layout!r}, but this version of GAP reads layouts 1 to {GAP_LAYOUT}: "
                        f"load it with the version that wrote it")
    need = GAP_KEYS[2] if layout >= 2 or "head_config" in config else GAP_KEYS[layout]
    missing = [k for k in need if k not in config]
    if missing:
        raise DataError(f"{path}: a layout-{layout} gap.json without {', '.join(map(repr, missing))}{DAMAGED}")
    return config


def read_basis(path, what="PCA basis", hint=""):
    """pca.load(path), or a DataError naming the file when it is missing, empty, truncated or not a basis."""
    with reading(user_file(path, what, hint), what, hint):
        return pca_lib.load(path)


def load_checkpoint(ckpt_dir, device=None, dtype=None, flag="--ckpt"):
    """Load a GAP checkpoint written by save_checkpoint(). Returns (gap, tokenizer, image_processor, config).
    Every file is checked before the model is built: a missing, truncated or foreign one, or latent-token ids in
    gap.json that are not the tokenizer's, is a DataError naming it (and `flag`, the entry point's flag that
    names the checkpoint, where another directory is the fix)."""
    from safetensors.torch import load_file
    ckpt_dir = checkpoint_dir(ckpt_dir)
    config = read_gap_json(ckpt_dir, flag)
    path = os.path.join(ckpt_dir, "gap.json")
    head_path = user_file(os.path.join(ckpt_dir, "latent_head.safetensors"), "latent head", DAMAGED)
    check_files(ckpt_dir, DAMAGED)  # every JSON and safetensors file whole, before anything is loaded
    basis_path = os.path.join(ckpt_dir, "pca.safetensors")
    kind = (config.get("head_config") or {}).get("kind", config.get("latent_head"))
    # the pca head cannot be built without its basis: a missing one is named as missing
    basis = read_basis(basis_path, "PCA basis", DAMAGED) if os.path.exists(basis_path) or kind == "pca" else None
    backbone, tokenizer, image_processor = load_backbone(ckpt_dir, device, dtype, what="checkpoint", hint=DAMAGED)
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in zip(("start", "pad", "end"),
                                                                   (LATENT_START, LATENT_PAD, LATENT_END))}
    if ids != config["latent_token_ids"]:
        raise DataError(f"{path}: latent_token_ids {config['latent_token_ids']} != the tokenizer's {ids} (files of "
                        f"two checkpoints mixed?){DAMAGED}")
    with reading(head_path, "latent head for this gap.json", DAMAGED):
        head_state = load_file(head_path)
        head_config = config.get("head_config") or dict(  # layout 1: gap.json did not record the head's config
            kind=config["latent_head"], d=backbone.config.text_config.hidden_size,
            adapter_dim=head_state["A.gate.weight"].shape[0] if "A.gate.weight" in head_state else 256)
        head = LatentHead(head_config["kind"], head_config["d"], basis=basis, adapter_dim=head_config["adapter_dim"])
        head.load_state_dict(head_state)
    gap = GAP(backbone, head.to(backbone.device), ids, config["latent_tokens"])
    return gap.eval(), tokenizer, image_processor, config


def export(gap, tokenizer, image_processor, out_dir, gap_config, basis, rank, fsdp, kept=None, carry=None):
    """The final checkpoint, from every rank of a run. Under FSDP2 every rank takes part in gathering the full
    state dict, which only rank 0 holds (on CPU) and writes. `kept`, `carry`: as in save_checkpoint."""
    state_dict = None
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state_dict = get_model_state_dict(gap, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_checkpoint(gap, tokenizer, image_processor, out_dir, gap_config, basis, state_dict, kept, carry)
    barrier()


# ----------------------------------------------------------------------------------------------------------
# resumable training state (sharded, atomic)

# meta.pt's layout, recorded in it as "layout": 1 (no "layout" key) holds the same entries as 2. A state must
# record every flag a resumed run has to keep (train.RESUME_FIXED); one saved by a version without some of them
# is refused, naming them.
STATE_LAYOUT = 2
META_KEYS = ("step", "scheduler", "skipped", "config")


def state_damaged(path):
    return f"; the saved state is damaged: delete {path} (or pass --fresh) to start over, or restore it"


def save_state(path, gap, opt, sched, step, skipped, basis, rank, config: dict):
    """Everything a resumed run needs: model and optimizer through torch.distributed.checkpoint (each rank writes
    its own shards; DDP replicas are written once), scheduler and data position (the step: the data order is a
    function of seed and epoch), bad-example count, PCA basis, the run's config and each rank's RNG states. All
    of it goes to PATH.tmp first, then replaces PATH (replace_dir): a crash mid-save leaves the last state whole,
    and a save the disk has no room for ends the run with one line, PATH.tmp removed and PATH as it was."""
    tmp = path.rstrip("/") + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    with writing(path, f"the state saved before in {path}, if any, is intact: free space and run the same command "
                       f"again, it resumes from that state", cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
        write_state(tmp, gap, opt, sched, step, skipped, basis, rank, config)
    if rank == 0:
        replace_dir(tmp, path)
    barrier()


def write_state(tmp, gap, opt, sched, step, skipped, basis, rank, config):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(gap, opt)
    with warnings.catch_warnings():  # one process: DCP warns that it saves without a process group, as meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(dict(model=model_state, optim=optim_state), checkpoint_id=tmp, no_dist=not dist.is_initialized())
    torch.save(dict(cpu=torch.get_rng_state(), python=random.getstate(),
                    cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None),
               os.path.join(tmp, f"rng_rank{rank}.pt"))
    barrier()
    if rank == 0:
        torch.save(dict(layout=STATE_LAYOUT, step=step, scheduler=sched.state_dict(), skipped=skipped, config=config),
                   os.path.join(tmp, "meta.pt"))
        if basis is not None:
            pca_lib.save(os.path.join(tmp, "pca.safetensors"), basis)


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


def state_meta(path, config: dict, fixed):
    """meta.pt of the state in `path`, read as data (weights_only: a pickle that would run code is refused),
    after checking that a run with `config` may continue it: its layout is readable and the `fixed` keys (data
    order, schedule, model) are the saved run's. A DataError naming the file or what differs otherwise."""
    meta_path = os.path.join(path, "meta.pt")
    with reading(user_file(meta_path, "training state file", state_damaged(path)), "training state file",
                 state_damaged(path)):
        meta = torch.load(meta_path, weights_only=True)
    if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS) or not isinstance(meta["config"], dict):
        raise DataError(f"{meta_path}: not a training state's meta.pt (it lacks {', '.join(META_KEYS)})"
                        f"{state_damaged(path)}")
    if not isinstance(meta.get("layout", 1), int) or meta.get("layout", 1) > STATE_LAYOUT:
        raise DataError(f"{meta_path}: state layout {meta.get('layout')!r}, but this version of GAP reads layouts 1 "
                        f"to {STATE_LAYOUT}: continue the run with the version that saved it, or pass --fresh")
    unknown = [k for k in fixed if k not in meta["config"]]
    if unknown:
        flags = ", ".join("--" + k for k in unknown)
        raise DataError(f"{path} was saved by a version of GAP without the flags {flags}: continue the run with that "
                        f"version, or pass --fresh to start over")
    changed = [f"--{k} {meta['config'][k]!r} -> {config[k]!r}" for k in fixed if meta["config"][k] != config[k]]
    if changed:
        raise DataError(f"{path} holds the state of a run with other flags ({', '.join(changed)}): use those to "
                        f"continue it, --fresh to discard it, or another --out_dir / --state_dir")
    return meta


def load_state(path, gap, opt, sched, rank, config: dict, fixed):
    """Inverse of save_state(); returns (step, skipped). The state must fit `config` (state_meta). DCP reshards, so
    the world size may change, but then the RNG streams of the new ranks start from the seed. A file of the state
    that cannot be read is a DataError naming it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    meta = state_meta(path, config, fixed)
    model_state, optim_state = get_state_dict(gap, opt)
    state = dict(model=model_state, optim=optim_state)
    with warnings.catch_warnings(), reading(path, "training state (model and optimizer shards)", state_damaged(path)):
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_state_dict(gap, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sched.load_state_dict(meta["scheduler"])
    rng_path = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.exists(rng_path):
        with reading(user_file(rng_path, "training state file", state_damaged(path)), "training state file",
                     state_damaged(path)):
            rng = torch.load(rng_path, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            random.setstate(rng["python"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
    else:
        print(f"rank {rank}: no RNG state in {path} (saved with fewer ranks): RNG streams restart from the seed")
    return meta["step"], meta["skipped"]
