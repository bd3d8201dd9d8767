"""VaLR's representation alignment (REPA; VaLR paper, "Vision-aligned Latent Reasoning", method: latent tokens
before each reasoning step aligned with external vision encoders, several fused): the hidden state of one decoder
layer at every latent slot (and, with --align_text, at the text tokens of each reasoning step) goes through a small
projector MLP per encoder and is pulled towards that encoder's patch features of the query image by negative cosine
similarity. The encoders are stock transformers vision models (Dinov2Model, SiglipVisionModel, ...) loaded from
local directories, frozen, and run once offline: their features are cached like GAP's targets, so training and
inference never load them.

This project's choices where the paper summary is silent (docs/REPRODUCING.md "VaLR"): the patch grid is average-pooled to the
span's sqrt(K) x sqrt(K) grid, slot j of every span aligned with cell j (row-major); a text token of a step is
aligned with the mean of the K cells (it has no place on the grid); the prefix tokens of an encoder (CLS,
registers) are dropped; the projector is Linear(d, h) -> SiLU -> Linear(h, h) -> SiLU -> Linear(h, C) as in REPA.

The VaLR model (VaLR, a subclass of model.GAP) trains GAP's backbone and head with VaLR's latent feeding
(--latent_feed targets | pad | self) and adds the REPA loss; build() makes it from train.py's VaLR flags
(VaLRConfig, below), so GAP's forward never meets VaLR.

Cache the features of every encoder once (writes CACHE_DIR/<encoder dir name>/K{K}/shard_*.safetensors and
encoder.json, which records the encoder directory and its config):
    python align.py --encoders enc/dinov2,enc/siglip --data train.jsonl --latent_tokens 36 --cache_dir align_cache
"""
import dataclasses
import hashlib
import json
import math
import os
import socket
import uuid

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (BadExamples, DataError, atomic_write_text, check_files, fsync_dir, parse_config, read_json,
                    reading, short, user_dir, user_file)
import latent_loop
from data import PLACEHOLDER, image_bytes, open_image, read_jsonl
from losses import gap_losses
from model import GAP
from targets import TargetCache


# ----------------------------------------------------------------------------------------------------------
# the frozen encoders and their pooled patch features

def load_encoder(path, device="cpu"):
    """A stock transformers vision model and its image processor from a local directory, frozen, in eval mode."""
    from transformers import AutoImageProcessor, AutoModel
    user_dir(path, "encoder directory")
    check_files(path)  # a truncated config or weights file named before a loader meets it
    try:
        model = AutoModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        return model, AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise DataError(f"{path}: cannot load the encoder: {short(e)}") from None


@torch.no_grad()
def pooled_features(encoder, processor, images, latent_tokens):
    """(N, K, C): the encoder's last-layer patch features of each image, its prefix tokens (CLS, registers)
    dropped, average-pooled from its patch grid to sqrt(K) x sqrt(K), cells in row-major order."""
    side = math.isqrt(latent_tokens)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(next(encoder.parameters()).device)
    states = encoder(pixel_values=pixels).last_hidden_state  # (N, prefix + gh * gw, C)
    patch = encoder.config.patch_size
    gh, gw = pixels.shape[-2] // patch, pixels.shape[-1] // patch
    grid = states[:, -gh * gw:].reshape(len(images), gh, gw, -1).permute(0, 3, 1, 2)  # (N, C, gh, gw)
    return F.adaptive_avg_pool2d(grid.float(), side).flatten(2).transpose(1, 2)  # (N, K, C)


def provenance(encoder_dir, encoder, latent_tokens):
    """What produced a feature cache: the encoder directory, a hash of its config, K and the pooling."""
    config = json.dumps(encoder.config.to_dict(), sort_keys=True, default=str)
    return dict(encoder=os.path.abspath(encoder_dir), config_sha256=hashlib.sha256(config.encode()).hexdigest(),
                latent_tokens=latent_tokens, pooling="adaptive_avg", width=encoder.config.hidden_size)


def image_hash(row):
    """Content hash of a row's query image (its features are valid for these bytes only); DataError naming the row."""
    return hashlib.sha256(image_bytes(row, "image")).hexdigest()[:16]


def encoder_name(encoder_dir):
    return os.path.basename(os.path.normpath(encoder_dir))


def open_caches(cache_dir, encoder_dirs, latent_tokens):
    """{name: (TargetCache, width)} of each encoder's features; fails loudly when a cache is missing or was
    written by another encoder directory, config or K."""
    caches = {}
    for enc in encoder_dirs:
        name = encoder_name(enc)
        path = os.path.join(cache_dir, name, "encoder.json")
        if not os.path.exists(path):
            raise DataError(f"{path}: no feature cache of encoder {enc}; run align.py to write it")
        meta = read_json(path, "feature cache's encoder.json", "; delete its directory and run align.py again")
        if meta["encoder"] != os.path.abspath(enc) or meta["latent_tokens"] != latent_tokens:
            raise DataError(f"{path}: written for {meta['encoder']} K={meta['latent_tokens']}, not for "
                             f"{os.path.abspath(enc)} K={latent_tokens}")
        config_path = os.path.join(enc, "config.json")
        if os.path.exists(config_path):
            from transformers import AutoConfig
            config = json.dumps(AutoConfig.from_pretrained(enc).to_dict(), sort_keys=True, default=str)
            if hashlib.sha256(config.encode()).hexdigest() != meta["config_sha256"]:
                raise DataError(f"{path}: the encoder's config changed since its features were cached; extract again")
        caches[name] = (TargetCache(os.path.join(cache_dir, name), latent_tokens), meta["width"])
    return caches


@dataclasses.dataclass
class FeaturesConfig:
    """Cache the pooled patch features of the query images for each frozen vision encoder (REPA targets)."""
    encoders: str = dataclasses.field(default="", metadata={"help": "comma-separated encoder directories"})
    data: str = dataclasses.field(default="", metadata={"help": "training JSONL"})
    latent_tokens: int = dataclasses.field(default=36, metadata={"help": "K: features pooled to sqrt(K) x sqrt(K)"})
    cache_dir: str = dataclasses.field(default="align_cache", metadata={"help": "writes CACHE_DIR/<encoder>/K{K}/"})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "images per encoder call"})
    skip_bad: bool = dataclasses.field(default=False, metadata={"help": "skip (and count) bad lines/images"})


def extract_features(cfg: FeaturesConfig):
    """Every example with a latent span gets (K, C) per encoder under its id, one shard file per encoder and
    run (written atomically); examples already cached are skipped."""
    from safetensors.torch import save_file
    rows, skipped = read_jsonl(cfg.data, cfg.skip_bad)
    for enc in filter(None, cfg.encoders.split(",")):
        encoder, processor = load_encoder(enc)
        out = os.path.join(cfg.cache_dir, encoder_name(enc))
        meta = provenance(enc, encoder, cfg.latent_tokens)
        cache = TargetCache(out, cfg.latent_tokens, meta)  # refuses features of another encoder config or K
        os.makedirs(cache.dir, exist_ok=True)
        atomic_write_text(cache.info_path, json.dumps(meta, indent=2) + "\n")
        bad, todo, feats = BadExamples(cfg.skip_bad), [], {}
        for r in rows:  # features are stored under "{id}/{content hash of the query image}": an edited one is redone
            if PLACEHOLDER in r["response"]:
                with bad.guard():
                    h = image_hash(r)
                    if not cache.has(r["id"], h):
                        todo.append((r, h))
        for i in range(0, len(todo), cfg.batch_size):
            batch, images = [], []
            for r, h in todo[i:i + cfg.batch_size]:
                with bad.guard():
                    images.append(open_image(r, "image"))
                    batch.append(f"{r['id']}/{h}")
            if batch:
                feats.update(zip(batch, pooled_features(encoder, processor, images, cfg.latent_tokens).contiguous()))
        if feats:  # this writer's own file name: parallel runs never overwrite each other
            path = os.path.join(cache.dir, f"shard_{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                                           f".safetensors")
            save_file(feats, path + ".tmp")
            os.replace(path + ".tmp", path)
            fsync_dir(path)
        atomic_write_text(os.path.join(out, "encoder.json"), json.dumps(meta, indent=2) + "\n")
        skipped += bad.count
        print(f"align features [{encoder_name(enc)}]: {len(feats)} extracted, {bad.count} skipped -> {cache.dir}")
    return skipped


class AlignedDataset(torch.utils.data.Dataset):
    """A GAPDataset whose items also carry `align_targets` (S*K, sum of C): every encoder's cached (K, C)
    features, side by side, repeated for each of the example's S spans (every step aligns with the query image)."""

    def __init__(self, dataset, caches):
        self.dataset, self.caches = dataset, caches

    def __getattr__(self, name):  # rows, spec, skipped, keeps_latent, ... of the wrapped data set
        if name == "dataset":  # not set yet (unpickling in a spawned loader worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        if "error" in item:
            return item
        row, n_spans = self.dataset.rows[i], int((item["input_ids"] == self.dataset.latent_ids["start"]).sum())
        item["align_targets"] = None
        if n_spans:
            try:
                h = image_hash(row)
                feats = torch.cat([cache.get(row["id"], h) for cache, _ in self.caches.values()], dim=1)  # (K, sum C)
            except KeyError as e:
                err = DataError(row["_file"], row["_line"], "image", str(e))
                if not self.dataset.return_errors:
                    raise err from None
                return dict(id=row["id"], error=str(err))
            item["align_targets"] = feats.repeat(n_spans, 1)
        return item


@dataclasses.dataclass
class VaLRConfig:
    """VaLR (README "VaLR"; align.py): the REPA loss and the latent feeding of align.VaLR"""
    stage: int = dataclasses.field(default=0, metadata={
        "help": "VaLR curriculum: 1 (slots hold the pad embedding), 2 (slots self-fed, projectors from --model's "
                "align.safetensors); 0: none", "range": (0, 2)})
    latent_feed: str = dataclasses.field(default="auto", metadata={
        "help": "latent slot inputs in training: targets (GAP) | pad | self (the model's own latents); auto: targets, "
                "pad in stage 1, self in stage 2", "choices": ["auto", "targets", "pad", "self"]})
    feed_passes: int = dataclasses.field(default=0, metadata={
        "help": "no-grad passes that compute self-fed latents (0: exact, as many as an example's latent slots)",
        "range": (0, None)})
    align: str = dataclasses.field(default="none", metadata={
        "help": "repa: align a decoder layer with vision-encoder features", "choices": ["none", "repa"]})
    align_encoders: str = dataclasses.field(default="", metadata={"help": "comma-separated encoder directories"})
    align_cache: str = dataclasses.field(default="align_cache", metadata={"help": "encoder features from align.py"})
    align_layer: int = dataclasses.field(default=0, metadata={
        "help": "decoder layer aligned, 1-based (0: the middle one, L // 2)", "range": (0, None)})
    align_dim: int = dataclasses.field(default=2048, metadata={"help": "hidden width of each encoder's projector"})
    align_text: bool = dataclasses.field(default=False, metadata={"help": "also align each reasoning step's text"})
    lambda_align: float = dataclasses.field(default=0.5, metadata={"help": "weight of the REPA loss"})


def latent_feed(cfg):
    """What the latent slots hold in training (--latent_feed; auto follows --stage), after checking that the VaLR
    flags fit together. Without aux-image targets L_latent has nothing to learn from, so its weight must be 0."""
    if cfg.stage and cfg.align != "repa":
        raise DataError(f"--stage {cfg.stage} is VaLR's curriculum: it needs --align repa")
    feed = cfg.latent_feed if cfg.latent_feed != "auto" else {0: "targets", 1: "pad", 2: "self"}[cfg.stage]
    if feed != "targets" and cfg.lambda_latent and cfg.latent_tokens:
        raise ValueError(f"--latent_feed {feed} has no latent targets: pass --lambda_latent 0")
    return feed


def build(cfg, gap, dataset, feed):
    """The VaLR model for train.py's flags, and the data set (with --align repa, wrapped to carry the encoders'
    features): the projectors (--align_encoders, --align_cache, --align_layer, --align_dim, --align_text; in
    stage 2 from --model's align.safetensors, written by a stage-1 run, when it has one), the latent feed and
    the number of self-feeding passes; in stage 2 the head starts from --model's (stage 1's)."""
    from safetensors.torch import load_file
    aligner = None
    if cfg.align == "repa":
        encoders = [e for e in cfg.align_encoders.split(",") if e]
        if not encoders:
            raise DataError("--align repa needs --align_encoders (comma-separated encoder directories)")
        caches = open_caches(cfg.align_cache, encoders, cfg.latent_tokens)
        text_config = gap.backbone.config.text_config
        layer = cfg.align_layer or text_config.num_hidden_layers // 2
        if not 1 <= layer <= text_config.num_hidden_layers:
            raise DataError(f"--align_layer {layer} is not a decoder layer (1..{text_config.num_hidden_layers})")
        aligner = Aligner(text_config.hidden_size, {n: w for n, (_, w) in caches.items()}, cfg.align_dim, layer,
                          cfg.align_text)
        path = os.path.join(cfg.model, "align.safetensors")
        if cfg.stage == 2 and os.path.exists(path):
            with reading(user_file(path, "projector file"), "projector file for these flags"):
                aligner.load_state_dict(load_file(path))
        dataset = AlignedDataset(dataset, caches)
    if cfg.stage == 1:  # only the projectors and the latent head learn (README "VaLR")
        gap.backbone.requires_grad_(False)
    head_path = os.path.join(cfg.model, "latent_head.safetensors")
    if cfg.stage == 2 and os.path.exists(head_path):  # stage 2 goes on from stage 1's head
        with reading(user_file(head_path, "latent head"), "latent head for these flags"):
            gap.head.load_state_dict(load_file(head_path))
    # self-feeding is exact after as many passes as an example has latent slots; the same number on every rank
    # (FSDP gathers the parameters in every pass), from the data set all ranks hold, so no collective is needed
    spans = max([r["response"].count(PLACEHOLDER) for r in dataset.rows if dataset.keeps_latent(r)] or [0])
    passes = cfg.feed_passes or max(1, spans * cfg.latent_tokens)
    model = VaLR(gap, aligner, feed, passes, cfg.lambda_align)
    return model.to(next(gap.parameters()).device), dataset


# ----------------------------------------------------------------------------------------------------------
# the projectors and the loss

def step_text(input_ids, labels, latent_ids):
    """(B, T) bool: text tokens of a reasoning step, i.e. supervised tokens after a <|latent_end|> up to the next
    <|latent_start|> or the end of the response. (B, T) long: the index of the span each one follows, counted
    over the batch in row-major order (the order of the latent targets)."""
    B, T = input_ids.shape
    flat, lab = input_ids.reshape(-1), labels.reshape(-1)
    idx = torch.arange(flat.numel(), device=flat.device)
    is_end, is_pad = flat == latent_ids["end"], flat == latent_ids["pad"]
    closes = (flat == latent_ids["start"]) | ((lab == -100) & ~is_end & ~is_pad)  # a new span, or no response
    opened = torch.where(is_end, idx, -1).cummax(0).values
    closed = torch.where(closes, idx, -1).cummax(0).values
    text = (opened > closed) & ~is_end
    span = is_end.long().cumsum(0) - 1
    return text.reshape(B, T), span.reshape(B, T)


def n_positions(input_ids, labels, latent_ids, text):
    """How many positions a batch aligns: its latent slots, plus with `text` its step-text tokens."""
    n = int((input_ids == latent_ids["pad"]).sum())
    return n + (int(step_text(input_ids, labels, latent_ids)[0].sum()) if text else 0)


class Aligner(nn.Module):
    """One projector per encoder, d -> hidden -> hidden -> C_e (SiLU between), and the REPA loss over them."""

    def __init__(self, d, widths: dict, hidden=2048, layer=1, text=False):
        super().__init__()
        self.widths, self.layer, self.text = dict(widths), layer, text
        self.proj = nn.ModuleDict({name: nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                                       nn.SiLU(), nn.Linear(hidden, c)) for name, c in widths.items()})

    def forward(self, h, input_ids, labels, latent_ids, align_targets):
        """h (B, T, D): hidden states of the aligned layer; align_targets (N_slots, sum C) in slot order.
        Returns align_sum: the sum over aligned positions of -cos(projector(h), feature), averaged over encoders
        (the caller divides by the global n_positions), and n_align."""
        latent_mask = input_ids == latent_ids["pad"]  # (B, T)
        n_slots = int(latent_mask.sum())
        if align_targets is None:
            if n_slots:
                raise ValueError(f"{n_slots} latent slots but no align_targets")
            align_targets = h.new_zeros(0, sum(self.widths.values()))
        if align_targets.shape[0] != n_slots:
            raise ValueError(f"align_targets has {align_targets.shape[0]} rows for {n_slots} latent slots")
        states, targets = h[latent_mask], align_targets.float()  # (N, D), (N, sum C)
        if self.text:
            text, span = step_text(input_ids, labels, latent_ids)
            K = n_slots // max(int(((input_ids == latent_ids["end"]).sum())), 1)
            step_targets = targets.reshape(-1, K, targets.shape[-1]).mean(1) if n_slots else targets  # (S, sum C)
            states, targets = torch.cat([states, h[text]]), torch.cat([targets, step_targets[span[text]]])
        total, offset = 0.0, 0
        for name, c in self.widths.items():  # every projector runs, also on no rows, so DDP / FSDP see it
            z = self.proj[name](states.float())  # (N, C)
            total = total - F.cosine_similarity(z, targets[:, offset:offset + c], dim=-1).sum()
            offset += c
        return dict(align_sum=total / len(self.widths), n_align=torch.tensor(states.shape[0]))


if __name__ == "__main__":
    from common import run_main
    run_main(extract_features, parse_config(FeaturesConfig))


# ----------------------------------------------------------------------------------------------------------
# the VaLR model: GAP's, with its own latent feeding and the REPA loss

class VaLR(GAP):
    """GAP's backbone and head trained VaLR's way: the latent slots hold `feed` -- targets (GAP's aux-image
    targets), pad (the <|latent_pad|> embedding, no feedback: stage 1) or self (the model's own latents, as at
    inference: stage 2) -- and, with an Aligner, REPA on one decoder layer's states is added to the loss. At
    inference it is GAP (the checkpoint holds the backbone and head; the projectors go to align.safetensors)."""

    def __init__(self, gap: GAP, aligner=None, feed="targets", passes=1, lambda_align=0.5):
        super().__init__(gap.backbone, gap.head, gap.latent_ids, gap.latent_tokens, gap.lambda_latent)
        if feed not in ("targets", "pad", "self"):
            raise ValueError(f"latent feed must be targets, pad or self, got {feed!r}")
        self.align, self.feed, self.passes, self.lambda_align = aligner, feed, passes, lambda_align

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None,
                latent_targets=None, scheduled_sampling=False, seq_lens=None, align_targets=None):
        """GAP.forward with VaLR's feed; with an aligner also its align_sum and n_align."""
        if scheduled_sampling:
            raise ValueError("scheduled sampling is an ablation of GAP's target feeding, not of VaLR's")
        if self.feed == "targets":
            embeds = self.embed(input_ids, pixel_values, image_grid_thw, latent_targets)
        else:  # the slots keep the <|latent_pad|> embedding, or get the model's own latents below
            embeds = latent_loop.embed_inputs(self.backbone, input_ids, pixel_values, image_grid_thw)
        pos = self.positions(input_ids, attention_mask, image_grid_thw, seq_lens)
        if self.feed != "targets":
            # no aux-image targets: L_latent is computed against what the slots hold (the distance of each
            # prediction to the fed latent, 0 once self-feeding has converged); train.py weighs it 0
            if self.feed == "self":  # also with no slot here: another rank may have some (FSDP)
                embeds, _ = self.self_fed(embeds, attention_mask, pos, input_ids)
            latent_targets = embeds[input_ids == self.pad_id].detach()
        if self.align is None:
            h = self.states(embeds, attention_mask, pos)
            return gap_losses(h, labels, input_ids, self.latent_ids, self.head, self.backbone.lm_head, latent_targets)
        h, h_layer = self.states(embeds, attention_mask, pos, self.align.layer)
        out = gap_losses(h, labels, input_ids, self.latent_ids, self.head, self.backbone.lm_head, latent_targets)
        return dict(out, **self.align(h_layer, input_ids, labels, self.latent_ids, align_targets))

    def self_fed(self, embeds, attention_mask, pos, input_ids):
        """Each latent slot gets head(h_bar of the position before it), as the loop feeds at inference. A slot
        depends on the slots before it, so `passes` no-grad passes refine them (as many as an example's slots make
        every slot exact; more change nothing); the last one is taken with gradient into the head only (the states
        are detached: no backpropagation through the passes)."""
        latent_mask = input_ids == self.pad_id  # (B, T)
        slot_next, v = latent_mask[:, 1:], None
        for i in range(self.passes):
            with torch.no_grad():
                h = self.states(embeds, attention_mask, pos)[:, :-1][slot_next]
            with torch.set_grad_enabled(torch.is_grad_enabled() and i == self.passes - 1):
                v = self.head(h)
            embeds = embeds.masked_scatter(latent_mask[..., None], v.to(embeds.dtype))
        return embeds, v

    def counts(self, batch):
        n = super().counts(batch)
        if self.align is not None:
            n["n_align"] = float(n_positions(batch["input_ids"], batch["labels"], self.latent_ids, self.align.text))
        return n

    def loss(self, out, n):
        """GAP's eq. 3 plus lambda_align x the REPA loss, normalized by the global number of aligned positions."""
        loss = super().loss(out, n)
        if self.align is not None:
            loss = loss + self.lambda_align * out["align_sum"] / max(n["n_align"], 1.0)
        return loss
