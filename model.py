"""GAP on Qwen2.5-VL: loading the stock model, the latent-token vocabulary, the GAP wrapper (the teacher-forced
forward over losses.py, generation over latent_loop.py), checkpoints and the resumable training state.

Implements paper sections 4.1-4.2 (eq. 1-3) and appendix F / I on top of the stock transformers
`Qwen2_5_VLForConditionalGeneration`, used only through its public API (inputs_embeds, explicit M-RoPE
position_ids, past_key_values): nothing of its modeling file is copied or patched.

Not run alone; train.py and infer.py drive it:
    python train.py --model path/or/hub-id --data train.jsonl --latent_tokens 36
    python infer.py image.png "question" --ckpt out/gap
"""
import json
import os
import random
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

import latent_loop
import pca as pca_lib
from common import (DataError, atomic_write_text, attn_implementation, barrier, default_device, default_dtype,
                    replace_dir)
from latent_head import LatentHead
from losses import gap_losses

LATENT_START, LATENT_PAD, LATENT_END = "<|latent_start|>", "<|latent_pad|>", "<|latent_end|>"


# ----------------------------------------------------------------------------------------------------------
# loading the stock model and adding the latent vocabulary

def load_backbone(path, device=None, dtype=None, attn="auto"):
    """Stock Qwen2.5-VL, its tokenizer and its (PIL) image processor from a local directory or a hub id.
    attn: auto (FlashAttention-2 when it imports on a GPU, else SDPA) | sdpa | flash_attention_2 | eager."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if not os.path.isdir(path) and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise DataError(f"--model {path}: no such directory (and not a hub id of the form org/name)")
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation() if attn == "auto" else attn).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    except OSError as e:  # not a model directory, or a hub id that cannot be fetched
        raise DataError(f"--model {path}: cannot load: {str(e).strip().splitlines()[0]}") from None
    return model, tokenizer, image_processor


def add_latent_tokens(model, tokenizer):
    """Add <|latent_start|>, <|latent_pad|>, <|latent_end|> to the tokenizer; resize the embeddings only when
    the vocabulary has no room (Qwen2.5-VL-7B pads its vocab to 152064 > 151665 tokens, so it has room).
    New rows start at the mean embedding, so the new tokens start as an average token, not as noise.
    The ids are read from the tokenizer and recorded in the model config. Returns {start, pad, end}."""
    tokens = [LATENT_START, LATENT_PAD, LATENT_END]
    fresh = [t for t in tokens if t not in tokenizer.get_vocab()]
    if fresh:
        tokenizer.add_tokens(fresh, special_tokens=True)
    ids = dict(zip(("start", "pad", "end"), tokenizer.convert_tokens_to_ids(tokens)))
    emb = model.get_input_embeddings()
    n_rows = emb.weight.shape[0]
    if max(ids.values()) >= n_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if fresh:
        new = [tokenizer.convert_tokens_to_ids(t) for t in fresh]
        with torch.no_grad():
            for w in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
                w[new] = w[:min(n_rows, min(new))].float().mean(0).to(w.dtype)
    model.config.latent_token_ids = ids
    return ids


# ----------------------------------------------------------------------------------------------------------
# the GAP wrapper

class GAP(nn.Module):
    """A stock Qwen2.5-VL backbone plus a latent head. forward() is the teacher-forced training pass (paper eq. 3,
    losses.gap_losses), generate() the KV-cached latent loop (latent_loop.py). `latent_tokens` is K (a perfect
    square; 0: the dense-caption control, no latents)."""

    def __init__(self, backbone, head: LatentHead, latent_ids: dict, latent_tokens: int):
        super().__init__()
        K = int(latent_tokens)
        if K < 0 or int(K ** 0.5) ** 2 != K:
            raise ValueError(f"latent_tokens must be a perfect square (a sqrt(K) x sqrt(K) grid), got {K}")
        self.backbone, self.head, self.latent_tokens = backbone, head, K
        self.latent_ids = dict(start=latent_ids["start"], pad=latent_ids["pad"], end=latent_ids["end"])
        self.start_id, self.pad_id, self.end_id = (self.latent_ids[k] for k in ("start", "pad", "end"))
        self.image_token_id = backbone.config.image_token_id
        # training only (train.py sets them): what the latent slots hold in the teacher-forced pass -- targets
        # (GAP: the aux-image targets), pad (the <|latent_pad|> embedding, no feedback: VaLR stage 1) or self
        # (VaLR stage 2: the model's own latents, as at inference, from feed_passes no-grad passes; 0: exact) --
        # and the REPA aligner (align.Aligner), whose projectors are not part of the checkpoint
        self.latent_feed, self.feed_passes, self.align = "targets", 0, None

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, latent_targets=None):
        """Input embeddings (B, T, D) with image features and (training) latent targets scattered in."""
        return latent_loop.embed_inputs(self.backbone, input_ids, pixel_values, image_grid_thw, self.pad_id,
                                        latent_targets)

    def position_ids(self, input_ids, attention_mask, image_grid_thw=None):
        """M-RoPE position ids (3, B, T) from the full token sequence (latent slots are text positions)."""
        return latent_loop.rope_positions(self.backbone, input_ids, attention_mask, image_grid_thw)

    def packed_position_ids(self, input_ids, seq_lens, image_grid_thw=None):
        """(4, 1, T) position ids of one packed row holding len(seq_lens) examples back to back. Row 0 restarts
        at 0 for each example: from it the stock model builds the block-diagonal causal mask (SDPA / eager) or
        the varlen cu_seqlens (FlashAttention-2), so no token attends across examples. Rows 1-3 are each
        example's own M-RoPE ids, exactly as if it were alone in an unpadded batch."""
        examples = torch.split(input_ids[0], list(seq_lens))
        padded = nn.utils.rnn.pad_sequence(examples, batch_first=True, padding_value=0)  # (n, L_max)
        mask = nn.utils.rnn.pad_sequence([torch.ones_like(e) for e in examples], batch_first=True)
        mrope = self.position_ids(padded, mask, image_grid_thw)[:, mask.bool()]  # (3, T)
        text = torch.cat([torch.arange(len(e), device=input_ids.device) for e in examples])  # (T,)
        return torch.cat([text[None], mrope], dim=0)[:, None]  # (4, 1, T)

    def states(self, embeds, attention_mask, position_ids, layer=None):
        """h_bar (B, T, D): the decoder's final-RMSNorm output (what the LM head and the latent head read); with
        `layer` also the output of that decoder layer (1-based; the stock model's hidden_states[layer])."""
        # use_cache=False: no KV cache in training, and with a cache the stock model would not read packed rows'
        # example boundaries from position_ids (it builds their block-diagonal mask only without one)
        out = self.backbone.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False, output_hidden_states=layer is not None)
        return out.last_hidden_state if layer is None else (out.last_hidden_state, out.hidden_states[layer])

    def self_fed(self, embeds, attention_mask, pos, input_ids):
        """VaLR feeding in training: each latent slot gets head(h_bar of the position before it), as the loop
        feeds at inference. A slot depends on the slots before it, so feed_passes no-grad passes (0: as many as
        the most slots in a row, which makes every slot exact) refine them; the last one is taken with gradient
        into the head only (the states are detached: no backpropagation through the passes)."""
        slots = input_ids == self.pad_id  # (B, T)
        slot_next, v = slots[:, 1:], None
        passes = self.feed_passes or int(slots.sum(1).max())
        if dist.is_initialized():  # FSDP gathers the parameters in every pass: all ranks must run as many
            passes = int(all_reduce_max(passes, embeds.device))
        for i in range(passes):
            with torch.no_grad():
                h = self.states(embeds, attention_mask, pos)[:, :-1][slot_next]
            with torch.set_grad_enabled(torch.is_grad_enabled() and i == passes - 1):
                v = self.head(h)
            embeds = embeds.masked_scatter(slots[..., None], v.to(embeds.dtype))
        return embeds, v

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None,
                latent_targets=None, scheduled_sampling=False, seq_lens=None, align_targets=None):
        """Teacher-forced pass: the target vectors are the inputs at the latent slots (latent_feed targets; see
        __init__ for pad / self). `seq_lens` marks a packed batch (data.collate_packed: one row, examples back to
        back, attention_mask None). Returns losses.gap_losses' sums and counts (the caller normalizes by global
        counts: losses.total_loss), with an aligner also align.Aligner's align_sum and n_align."""
        if self.latent_feed == "targets":
            embeds = self.embed(input_ids, pixel_values, image_grid_thw, latent_targets)
        else:  # the slots keep the <|latent_pad|> embedding, or get the model's own latents below
            embeds = latent_loop.embed_inputs(self.backbone, input_ids, pixel_values, image_grid_thw)
        if seq_lens is not None:
            if attention_mask is not None or input_ids.shape[0] != 1:
                raise ValueError("a packed batch is one row with attention_mask=None (see data.collate_packed)")
            pos = self.packed_position_ids(input_ids, seq_lens, image_grid_thw)
        else:
            pos = self.position_ids(input_ids, attention_mask, image_grid_thw)
        slot_next = input_ids[:, 1:] == self.pad_id  # (B, T-1): the next position is a latent slot
        if scheduled_sampling and bool(slot_next.any()):
            # ablation (appendix F): a no-grad pass predicts every latent, and those predictions replace the
            # targets as inputs of the trained pass, closer to inference where latents are fed back
            with torch.no_grad():
                v_pred = self.head(self.states(embeds, attention_mask, pos)[:, :-1][slot_next])
            embeds = embeds.masked_scatter((input_ids == self.pad_id)[..., None], v_pred.to(embeds.dtype))
        if self.latent_feed != "targets":
            # no aux-image targets: L_latent is computed against what the slots hold (the distance of each
            # prediction to the fed latent, 0 once self-feeding has converged); train.py weighs it 0
            if self.latent_feed == "self":  # also with no slot here: another rank may have some (FSDP)
                embeds, _ = self.self_fed(embeds, attention_mask, pos, input_ids)
            latent_targets = embeds[input_ids == self.pad_id].detach()
        if self.align is None:
            h = self.states(embeds, attention_mask, pos)  # (B, T, D)
            return gap_losses(h, labels, input_ids, self.latent_ids, self.head, self.backbone.lm_head, latent_targets)
        h, h_layer = self.states(embeds, attention_mask, pos, self.align.layer)
        out = gap_losses(h, labels, input_ids, self.latent_ids, self.head, self.backbone.lm_head, latent_targets)
        return dict(out, **self.align(h_layer, input_ids, labels, self.latent_ids, align_targets))

    def generate(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, **kwargs):
        """New tokens (R, S) of latent_loop.generate for left-padded prompts (B, T); R = B * num_samples."""
        return latent_loop.generate(self.backbone, self.head, self.latent_ids, self.latent_tokens, input_ids,
                                    attention_mask, pixel_values, image_grid_thw, **kwargs)

    def decode(self, tokenizer, ids):
        return latent_loop.decode(tokenizer, ids, self.latent_ids)


def all_reduce_max(n, device):
    t = torch.tensor([n], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


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
    align_state = {k: v.detach().float().cpu().contiguous() for k, v in part("align.").items()}
    if align_state:  # REPA projectors: training only (a stage-2 run starts from them); inference ignores them
        save_file(align_state, os.path.join(tmp, "align.safetensors"))
    if basis is not None:
        pca_lib.save(os.path.join(tmp, "pca.safetensors"), basis)
    config = dict(gap_config, latent_tokens=gap.latent_tokens, head_config=gap.head.config(),
                  latent_token_ids=gap.latent_ids)
    atomic_write_text(os.path.join(tmp, "gap.json"), json.dumps(config, indent=2) + "\n")
    replace_dir(tmp, out_dir)


def load_checkpoint(ckpt_dir, device=None, dtype=None):
    """Load a GAP checkpoint written by save_checkpoint(). Returns (gap, tokenizer, image_processor, config).
    The latent-token ids in gap.json must match the tokenizer's, else it fails loudly."""
    from safetensors.torch import load_file
    if not os.path.exists(ckpt_dir) and os.path.exists(ckpt_dir.rstrip("/") + ".old"):
        ckpt_dir = ckpt_dir.rstrip("/") + ".old"  # a crash between the two renames of replace_dir()
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
