"""GAP on Qwen2.5-VL: loading, the latent-token vocabulary, the teacher-forced forward with its two losses,
the batched KV-cached latent generation loop, and checkpoints.

Implements paper sections 4.1-4.2 (eq. 1-3) and appendix F / I on top of the stock transformers
`Qwen2_5_VLForConditionalGeneration`, used only through its public API (inputs_embeds, explicit M-RoPE
position_ids, past_key_values): nothing of its modeling file is copied or patched.

Not run alone; train.py and infer.py drive it:
    python train.py --model path/or/hub-id --data train.jsonl --latent_tokens 36
    python infer.py image.png "question" --ckpt out/gap
"""
import argparse
import dataclasses
import json
import os
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

from latent_head import LatentHead, calibrate, ema_norm
import pca as pca_lib

LATENT_START, LATENT_PAD, LATENT_END = "<|latent_start|>", "<|latent_pad|>", "<|latent_end|>"
IGNORE = -100  # label of a position that carries no LM loss


# ----------------------------------------------------------------------------------------------------------
# small shared helpers: the dataclass -> argparse CLI, atomic file writes, device defaults

def parse_config(cls, argv=None):
    """Build an argparse CLI from a @dataclass: every field is a snake_case flag with its default and its
    `help` metadata; fields with metadata positional=True are optional positionals."""
    p = argparse.ArgumentParser(description=(cls.__doc__ or "").strip())
    for f in dataclasses.fields(cls):
        kw = dict(default=f.default, help=f.metadata.get("help", ""))
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if f.type in (bool, "bool"):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float, "str": str}.get(f.type, f.type)
        if f.metadata.get("positional"):
            p.add_argument(f.name, nargs="?", **kw)
        else:
            p.add_argument("--" + f.name, **kw)
    return cls(**vars(p.parse_args(argv)))


def atomic_write_text(path, text):
    """Write a file so that a crash leaves either the old or the new content, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir(tmp, path):
    """Swap a fully written directory `tmp` into `path`: a crash at any point leaves a whole `path` or a whole
    `path`.old (which the loaders fall back to), never a half-written one."""
    old = path.rstrip("/") + ".old"
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def default_device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device):
    # bf16 on GPU as in the paper; fp32 on CPU where bf16 matmuls are slow and tests want exact numbers
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def attn_implementation():
    """FlashAttention-2 when it imports (and a GPU is there), else PyTorch SDPA (a flash kernel on Hopper)."""
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


# ----------------------------------------------------------------------------------------------------------
# loading the stock model and adding the latent vocabulary

def load_backbone(path, device=None, dtype=None):
    """Stock Qwen2.5-VL, its tokenizer and its (PIL) image processor from a local directory or a hub id."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation()).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
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
    """A Qwen2.5-VL backbone plus a latent head. forward() is the teacher-forced training pass of GAP_SPEC,
    generate() the KV-cached latent loop. `latent_tokens` is K (0: the dense-caption control, no latents)."""

    def __init__(self, backbone, head: LatentHead, latent_ids: dict, latent_tokens: int):
        super().__init__()
        k = int(latent_tokens)
        if k < 0 or int(k ** 0.5) ** 2 != k:
            raise ValueError(f"latent_tokens must be a perfect square (a sqrt(K) x sqrt(K) grid), got {k}")
        self.backbone, self.head, self.latent_tokens = backbone, head, k
        self.start_id, self.pad_id, self.end_id = latent_ids["start"], latent_ids["pad"], latent_ids["end"]
        self.image_token_id = backbone.config.image_token_id

    # -- pieces shared by training and generation --------------------------------------------------------

    def image_features(self, pixel_values, image_grid_thw):
        """Query-image vision embeddings, (N_image_tokens, D). No graph when the vision tower is frozen."""
        visual = self.backbone.model.visual
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in visual.parameters())
        with torch.set_grad_enabled(trainable):
            out = self.backbone.model.get_image_features(pixel_values, image_grid_thw)
        return torch.cat(out.pooler_output, dim=0)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, latent_targets=None):
        """Input embeddings (B, T, D): token embeddings, query-image features scattered into <|image_pad|>
        positions and, in training, the latent target vectors scattered into <|latent_pad|> positions."""
        embeds = self.backbone.get_input_embeddings()(input_ids)  # (B, T, D)
        image_mask = input_ids == self.image_token_id
        n_image = int(image_mask.sum())
        if n_image:
            if pixel_values is None:
                raise ValueError(f"{n_image} <|image_pad|> tokens but no pixel_values")
            feats = self.image_features(pixel_values, image_grid_thw)
            if feats.shape[0] != n_image:
                raise ValueError(f"{n_image} <|image_pad|> tokens but the vision tower gave {feats.shape[0]} features")
            embeds = embeds.masked_scatter(image_mask[..., None], feats.to(embeds.dtype))
        latent_mask = input_ids == self.pad_id
        n_latent = int(latent_mask.sum())
        if n_latent or latent_targets is not None:
            n_given = 0 if latent_targets is None else latent_targets.shape[0]
            if n_given != n_latent:
                raise ValueError(f"{n_latent} <|latent_pad|> tokens but {n_given} latent target vectors")
            embeds = embeds.masked_scatter(latent_mask[..., None], latent_targets.to(embeds.dtype))
        return embeds

    def position_ids(self, input_ids, attention_mask, image_grid_thw=None):
        """M-RoPE position ids (3, B, T) computed once from the full token sequence. Latent slots are text
        tokens (type 0), so they get the same id on all three axes; padding gets 0."""
        mm_token_type_ids = (input_ids == self.image_token_id).int()
        pos, _ = self.backbone.model.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                                    image_grid_thw=image_grid_thw, attention_mask=attention_mask)
        return pos

    def packed_position_ids(self, input_ids, seq_lens, image_grid_thw=None):
        """(4, 1, T) position ids of one packed row holding len(seq_lens) examples back to back. Row 0 restarts
        at 0 for each example: from it the stock model builds the block-diagonal causal mask (SDPA / eager) or
        the varlen cu_seqlens (FlashAttention-2), so no token attends across examples. Rows 1-3 are each
        example's own M-RoPE ids, exactly as if it were alone in an unpadded batch."""
        rows = torch.split(input_ids[0], list(seq_lens))
        padded = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0)  # (n, L_max)
        mask = nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
        mrope = self.position_ids(padded, mask, image_grid_thw)[:, mask.bool()]  # (3, T)
        text = torch.cat([torch.arange(len(r), device=input_ids.device) for r in rows])  # (T,)
        return torch.cat([text[None], mrope], dim=0)[:, None]  # (4, 1, T)

    def states(self, embeds, attention_mask, position_ids, past_key_values=None, use_cache=False):
        """Run the decoder on embeddings; returns h_bar (B, T, D) = final-RMSNorm output (what the LM head
        reads, and what the latent head reads) and the KV cache."""
        out = self.backbone.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=past_key_values, use_cache=use_cache)
        return out.last_hidden_state, out.past_key_values

    # -- training -----------------------------------------------------------------------------------------

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None,
                latent_targets=None, scheduled_sampling=False, seq_lens=None):
        """Teacher-forced pass. `seq_lens` marks a packed batch (data.collate_packed: one row, examples back to
        back, attention_mask None). Returns sums and counts so the caller can normalize by the *global* number
        of supervised tokens / latent slots (see loss()):
          lm_sum     = sum of next-token CE over positions whose next token has a label (assistant tokens;
                       data.py already masks <|latent_pad|> and <|latent_end|> targets),
          latent_sum = sum over latent slots t of MSE(head(h_bar_{t-1}), v_t), in fp32."""
        embeds = self.embed(input_ids, pixel_values, image_grid_thw, latent_targets)
        if seq_lens is not None:
            if attention_mask is not None or input_ids.shape[0] != 1:
                raise ValueError("a packed batch is one row with attention_mask=None (see data.collate_packed)")
            pos = self.packed_position_ids(input_ids, seq_lens, image_grid_thw)
        else:
            pos = self.position_ids(input_ids, attention_mask, image_grid_thw)
        slot_next = input_ids[:, 1:] == self.pad_id  # (B, T-1): the next token is a latent slot
        if scheduled_sampling and bool(slot_next.any()):
            # ablation (appendix F): a no-grad pass predicts every latent, and those predictions replace the
            # targets as inputs of the trained pass, closer to inference where latents are fed back
            with torch.no_grad():
                h, _ = self.states(embeds, attention_mask, pos)
                v_pred = self.head(h[:, :-1][slot_next])
            embeds = embeds.masked_scatter((input_ids == self.pad_id)[..., None], v_pred.to(embeds.dtype))
        h, _ = self.states(embeds, attention_mask, pos)  # (B, T, D)
        h_prev, next_labels = h[:, :-1], labels[:, 1:]  # position t predicts token t+1
        supervised = next_labels != IGNORE
        logits = self.backbone.lm_head(h_prev[supervised]).float()  # (N_lm, V): only where there is a target
        lm_sum = F.cross_entropy(logits, next_labels[supervised], reduction="sum")
        # slot t's latent is predicted from the state one position earlier (<|latent_start|> for the first)
        v_hat = self.head(h_prev[slot_next])  # (N_slots, D) fp32; called even when empty so DDP sees the head
        if latent_targets is None:
            latent_targets = v_hat.new_zeros(0, v_hat.shape[-1])
        # GAP_SPEC's MSE: mean over the d dims per slot (paper eq. 2 sums them: the same loss divided by d)
        latent_sum = (v_hat - latent_targets.float()).pow(2).mean(-1).sum()
        return dict(lm_sum=lm_sum, n_lm=supervised.sum(), latent_sum=latent_sum, n_latent=slot_next.sum())

    # -- generation ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *, max_new_tokens=512,
                 temperature=0.0, top_p=1.0, latent_mode="model", norm_calib="none", num_samples=1,
                 stop_ids=(), generator=None, trace=False):
        """Batched KV-cached generation with latent spans (GAP_SPEC "Generation").
        input_ids/attention_mask are left-padded prompts (B, T). Each row keeps its own state: text mode
        samples from the LM head; after it emits <|latent_start|> (or if the prompt ends with it) the next K
        steps feed v_hat = head(h_bar of the previous step) and record <|latent_pad|>; then <|latent_end|> is
        fed and the row returns to text. One KV cache holds the whole answer. num_samples > 1 shares one
        prefill per prompt across that many sampled rows (row b*num_samples + j is sample j of prompt b).
        latent_mode: model | zero (<|latent_start|> banned) | noise (Gaussian PCA coefficients);
        norm_calib: none | ema (rescale latents to the EMA norm of the query image's vision embeddings).
        Returns dict(tokens=(B*N, S) new token ids (pad after stop), plus with trace=True the per-step
        logits (B*N, S, V), fed embeddings (B*N, S, D), position ids (3, B*N, S) and prompt embeddings)."""
        if latent_mode not in ("model", "zero", "noise"):
            raise ValueError(f"latent_mode must be model, zero or noise, got {latent_mode!r}")
        if norm_calib not in ("none", "ema"):
            raise ValueError(f"norm_calib must be none or ema, got {norm_calib!r}")
        K, dev = self.latent_tokens, input_ids.device
        embeds = self.embed(input_ids, pixel_values, image_grid_thw)  # (B, T, D)
        pos = self.position_ids(input_ids, attention_mask, image_grid_thw)  # (3, B, T)
        n_ema = None
        if norm_calib == "ema":
            image_mask = input_ids == self.image_token_id
            if not bool(image_mask.any(1).all()):
                raise ValueError("norm_calib=ema needs a query image in every prompt")
            n_ema = torch.stack([ema_norm(embeds[b][image_mask[b]].float().norm(dim=-1))
                                 for b in range(len(input_ids))])  # (B,)
        h, cache = self.states(embeds, attention_mask, pos, use_cache=True)
        h_last = h[:, -1]  # (B, D)
        next_pos = pos.amax(dim=(0, 2)) + 1  # (B,) text positions continue after the prompt's largest id
        lat = torch.where(input_ids[:, -1] == self.start_id, 0, -1)  # -1 text; j in 0..K latents fed so far
        if num_samples > 1:
            cache.batch_repeat_interleave(num_samples)
            rep = lambda x: x.repeat_interleave(num_samples, dim=0)  # noqa: E731
            h_last, next_pos, lat, attention_mask = rep(h_last), rep(next_pos), rep(lat), rep(attention_mask)
            n_ema = rep(n_ema) if n_ema is not None else None
        rows = h_last.shape[0]
        stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=dev)
        banned = [self.pad_id, self.end_id] + ([self.start_id] if K == 0 or latent_mode == "zero" else [])
        embed_tokens = self.backbone.get_input_embeddings()
        done = torch.zeros(rows, dtype=torch.bool, device=dev)
        tokens, rec = [], dict(logits=[], embeds=[], positions=[])
        for step in range(max_new_tokens):
            logits = self.backbone.lm_head(h_last).float()  # (rows, V)
            logits[:, banned] = float("-inf")
            sampled = sample(logits, temperature, top_p, generator)
            in_latent, at_end = (lat >= 0) & (lat < K), lat == K
            tok = torch.where(in_latent, self.pad_id, torch.where(at_end, self.end_id, sampled))
            tok = torch.where(done, IGNORE, tok)
            tokens.append(tok)
            done = done | (torch.isin(tok, stop) & (lat < 0))
            if trace:
                rec["logits"].append(logits)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            x = embed_tokens(tok.clamp(min=0))[:, None]  # (rows, 1, D)
            if bool(in_latent.any()):
                x[in_latent, 0] = self.latent_vectors(h_last[in_latent], latent_mode, n_ema, in_latent,
                                                      generator).to(x.dtype)
            lat = torch.where(in_latent, lat + 1, torch.where(at_end | (tok != self.start_id), -1, 0))
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(rows, 1)], dim=1)
            step_pos = next_pos.view(1, rows, 1).expand(3, rows, 1)
            h, cache = self.states(x, attention_mask, step_pos, past_key_values=cache, use_cache=True)
            h_last, next_pos = h[:, -1], next_pos + 1
            if trace:
                rec["embeds"].append(x[:, 0])
                rec["positions"].append(step_pos)
        out = dict(tokens=torch.stack(tokens, dim=1))
        if trace:
            out.update(logits=torch.stack(rec["logits"], 1), prompt_embeds=embeds, prompt_positions=pos,
                       embeds=torch.stack(rec["embeds"], 1) if rec["embeds"] else None,
                       positions=torch.cat(rec["positions"], 2) if rec["positions"] else None)
        return out

    def latent_vectors(self, h_bar, latent_mode, n_ema, rows, generator):
        """The vectors fed back at latent steps: head(h_bar) (or PCA noise), optionally norm-calibrated."""
        if latent_mode == "noise":
            v = self.head.noise(h_bar.shape[0], generator=generator).to(h_bar.device)
        else:
            v = self.head(h_bar)
        if n_ema is not None:
            v = calibrate(v, n_ema[rows])
        return v

    def decode(self, tokenizer, ids):
        """Text of generated ids with each latent span shown as `<latent>` (never the raw pad ids); stops at
        the first negative (post-stop) id; special tokens such as <|im_end|> are dropped."""
        pieces, buf, in_span = [], [], False
        for t in ids:
            t = int(t)
            if t < 0:
                break
            if t == self.start_id:
                pieces.append(tokenizer.decode(buf, skip_special_tokens=True))
                pieces.append("<latent>")
                buf, in_span = [], True
            elif in_span and t in (self.pad_id, self.end_id):
                in_span = t != self.end_id
            else:
                in_span = False
                buf.append(t)
        pieces.append(tokenizer.decode(buf, skip_special_tokens=True))
        return "".join(pieces)


def sample(logits, temperature, top_p, generator=None):
    """Greedy when temperature == 0, else temperature + nucleus (top-p) sampling. logits (B, V) fp32."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def loss(out, n_lm, n_latent, lambda_latent):
    """L = L_LM + lambda * L_latent with each term normalized by a (global) count of supervised tokens."""
    return out["lm_sum"] / max(int(n_lm), 1) + lambda_latent * out["latent_sum"] / max(int(n_latent), 1)


# ----------------------------------------------------------------------------------------------------------
# checkpoints: backbone in the stock format + tokenizer + image processor + head + PCA basis + gap.json

def save_checkpoint(gap, tokenizer, image_processor, out_dir, gap_config: dict, basis=None, state_dict=None):
    """Write a complete checkpoint directory atomically: everything goes to DIR.tmp, which then replaces DIR,
    so a crash mid-save never damages the previous checkpoint. The backbone directory loads in the stock
    Qwen2_5_VLForConditionalGeneration; infer.py loads the whole of it with load_checkpoint(). `state_dict`:
    a full GAP state dict to write instead of gap's own (train.py gathers one from FSDP2 shards)."""
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
    if basis is not None:
        pca_lib.save(os.path.join(tmp, "pca.safetensors"), basis)
    config = dict(gap_config, latent_tokens=gap.latent_tokens, latent_head=gap.head.kind,
                  latent_token_ids=dict(start=gap.start_id, pad=gap.pad_id, end=gap.end_id))
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
        raise FileNotFoundError(f"{path}: not a GAP checkpoint (no gap.json); train one with train.py")
    with open(path) as f:
        config = json.load(f)
    backbone, tokenizer, image_processor = load_backbone(ckpt_dir, device, dtype)
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in zip(("start", "pad", "end"),
                                                                   (LATENT_START, LATENT_PAD, LATENT_END))}
    if ids != config["latent_token_ids"]:
        raise ValueError(f"{path}: latent_token_ids {config['latent_token_ids']} != tokenizer's {ids}")
    basis_path = os.path.join(ckpt_dir, "pca.safetensors")
    basis = pca_lib.load(basis_path) if os.path.exists(basis_path) else None
    d = backbone.config.text_config.hidden_size
    head = LatentHead(config["latent_head"], d, basis=basis, adapter_dim=config.get("adapter_dim", 256))
    head.load_state_dict(load_file(os.path.join(ckpt_dir, "latent_head.safetensors")))
    gap = GAP(backbone, head.to(backbone.device), ids, config["latent_tokens"])
    return gap.eval(), tokenizer, image_processor, config
