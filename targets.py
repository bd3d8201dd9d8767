"""The latent targets of GAP (paper 4.1-4.2; GAP_SPEC "Targets"): the auxiliary image of each latent span through
the frozen vision tower of the *base* model, resized so its merged grid is sqrt(K) x sqrt(K), gives the K vectors
the span's slots are trained on. Extracted once, offline, into a safetensors cache that knows what made it
(TargetCache, cache_info); train.py and pca.py read the cache, and fit_basis() fits the PCA basis from it.

    python targets.py --model Qwen/Qwen2.5-VL-7B-Instruct --data train.jsonl --latent_tokens 36 --cache_dir cache
    torchrun --nproc_per_node 8 targets.py --model $M --data train.jsonl --latent_tokens 36 --cache_dir cache

Resumable and incremental: an example whose targets for its current aux image(s) are cached is skipped, an edited
image is extracted again, and parallel writers never collide (each shard is named by its writer).
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import socket
import uuid

import torch
from PIL import Image

import pca as pca_lib
from common import (SQUARE, BadExamples, DataError, all_reduce, atomic_write_text, fsync_dir, parse_config,
                    perfect_square, read_json, reading, user_file, writing)
from data import PLACEHOLDER, aux_hash, aux_images, read_jsonl
from model import load_backbone


# ----------------------------------------------------------------------------------------------------------
# the cache and what made it

class TargetCache:
    """Auxiliary-image latent targets on disk: DIR/K{K}/shard_*.safetensors, one (S*K, d) tensor per example id (S
    spans, in order), and DIR/K{K}/cache.json, what made them (the vision tower's fingerprint, K, the resize). A
    target is stored as "{id}/{content hash of its aux images}", so an edited image's old targets are stale, never
    used. Shards are named by their writer (host, process, rank), so parallel extractions never collide."""

    def __init__(self, cache_dir, latent_tokens, fingerprint=None):
        """fingerprint: cache_info() of the model in use; a cache made by another one is refused (DataError), as
        require() does. Every file of the cache is read here (cache.json, each shard's header): a missing, damaged
        or foreign one is a DataError naming it."""
        from safetensors import safe_open
        self.dir = os.path.join(cache_dir, f"K{latent_tokens}")
        self.info_path = os.path.join(self.dir, "cache.json")
        self.entries = {}  # id -> {aux image hash: shard file}
        self.info = None
        for path in (cache_dir, self.dir):
            if os.path.exists(path) and not os.path.isdir(path):
                raise DataError(f"{path}: a file, not a target cache directory (targets.py --cache_dir writes one)")
        redo = f"; delete {self.dir} and run targets.py again"
        if os.path.exists(self.info_path):
            self.info = read_json(self.info_path, "target cache's cache.json", redo)
        if fingerprint is not None:
            self.require(fingerprint)
        if not os.path.isdir(self.dir):
            return
        shards = sorted(n for n in os.listdir(self.dir) if n.endswith(".safetensors"))
        if shards and self.info is None:
            raise DataError(f"{self.dir}: shards without cache.json (an older version wrote them): delete the "
                            f"directory and extract again")
        for name in shards:
            path = os.path.join(self.dir, name)
            redo = "; delete it and run targets.py again (it extracts what is missing)"
            with reading(user_file(path, "target shard", redo), "target shard", redo), safe_open(path, "pt") as f:
                for tensor_name in f.keys():  # "{id}/{aux image hash}"
                    key, h = tensor_name.rsplit("/", 1)
                    self.entries.setdefault(key, {})[h] = name

    def require(self, fingerprint):
        """Refuse (DataError) targets made by another vision tower, K or resize than cache_info() `fingerprint`."""
        if self.info is not None and self.info != fingerprint:
            diff = ", ".join(f"{k} {self.info.get(k)!r} -> {v!r}" for k, v in fingerprint.items()
                             if self.info.get(k) != v)
            raise DataError(f"{self.info_path}: these targets were made by another model or with other settings "
                            f"({diff}); extract them again into another --cache_dir, or delete {self.dir}")

    def has(self, key, aux_hash):
        return aux_hash in self.entries.get(key, {})

    def get(self, key, aux_hash):
        """The (K, d) targets of example `key` made from the aux image(s) with content hash `aux_hash`."""
        from safetensors import safe_open
        if not self.has(key, aux_hash):
            why = ("its aux image changed after its targets were extracted" if key in self.entries
                   else "no latent targets for it")
            raise KeyError(f"{why} (id {key!r}, {self.dir}): run targets.py again, it extracts what is missing or stale")
        with safe_open(os.path.join(self.dir, self.entries[key][aux_hash]), "pt") as f:
            return f.get_tensor(f"{key}/{aux_hash}")


def cache_info(backbone, latent_tokens):
    """What a target cache's contents depend on: the vision tower (a hash of its config and weights, as fp32 so a
    bf16 and an fp32 load of one model agree), K and the aux-image resize."""
    vc = backbone.config.vision_config
    config = {k: v for k, v in vc.to_dict().items()
              if k not in ("dtype", "torch_dtype", "transformers_version", "_name_or_path")
              and not k.startswith("_attn_implementation")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(backbone.model.visual.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    side = math.isqrt(latent_tokens) * vc.patch_size * vc.spatial_merge_size
    return dict(vision_tower=h.hexdigest()[:16], width=vc.out_hidden_size, latent_tokens=latent_tokens,
                aux_resize=f"{side}x{side} bicubic", format=2)


def fit_basis(cache: TargetCache, rows, var, rank=0, world=1):
    """PCA basis of the cached targets of `rows` (those with a latent span), each rank streaming a slice, merged
    exactly across ranks. None when no row has a target."""
    if cache.info is None:  # nothing extracted for this K
        return None
    stats = pca_lib.PCAStats(d=cache.info["width"])
    for r in [r for r in rows if PLACEHOLDER in r["response"]][rank::world]:
        with contextlib.suppress(DataError, KeyError):  # a bad or missing one is reported by validation
            stats.update(cache.get(r["id"], aux_hash(r)))
    n = all_reduce([stats.n], torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                   else torch.device("cpu"))[0]
    return pca_lib.fit(stats.all_reduce(), var) if n else None


# ----------------------------------------------------------------------------------------------------------
# offline extraction with the frozen base vision tower

@torch.no_grad()
def aux_targets(backbone, image_processor, images, latent_tokens):
    """(len(images), K, d) vision embeddings of auxiliary images resized so the merged grid is sqrt(K) x sqrt(K)
    (K=36: 6x6 merged = 12x12 patches of 14 px = 168x168 px): what Qwen2.5-VL scatters into <|image_pad|>."""
    vc = backbone.config.vision_config
    side = math.isqrt(latent_tokens) * vc.patch_size * vc.spatial_merge_size
    images = [im.resize((side, side), Image.BICUBIC) for im in images]
    out = image_processor(images=images, size={"shortest_edge": side * side, "longest_edge": side * side},
                          return_tensors="pt")
    grid = out["image_grid_thw"]
    want = torch.tensor([1, side // vc.patch_size, side // vc.patch_size])
    if not bool((grid == want).all()):
        raise ValueError(f"aux image grid {grid[0].tolist()} != {want.tolist()} for K={latent_tokens}")
    device = next(backbone.parameters()).device
    feats = backbone.model.get_image_features(out["pixel_values"].to(device), grid.to(device)).pooler_output
    return torch.stack(feats)  # (N, K, d)


@dataclasses.dataclass
class TargetsConfig:
    """Extract auxiliary-image latent targets with the frozen base vision tower into a safetensors cache."""
    model: str = dataclasses.field(default="", metadata={"help": "base model directory or hub id"})
    data: str = dataclasses.field(default="", metadata={"help": "training JSONL"})
    latent_tokens: int = dataclasses.field(default=36, metadata={"help": "K, a perfect square", "check": SQUARE})
    cache_dir: str = dataclasses.field(default="cache", metadata={"help": "writes CACHE_DIR/K{K}/shard_*.safetensors"})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "aux images per vision-tower call",
                                                              "range": (1, None)})
    shard_size: int = dataclasses.field(default=512, metadata={"help": "examples per shard file", "range": (1, None)})
    skip_bad: bool = dataclasses.field(default=False, metadata={"help": "skip (and count) bad lines/images"})


def extract_targets(cfg: TargetsConfig, backbone=None, image_processor=None, rank=0, world=1):
    """Targets of rank's share of the examples with a latent span. Resumable and incremental: an example whose
    target for its current aux image is cached is skipped (an edited image is extracted again); each shard is
    written whole (tmp + rename) under this writer's own name. Returns the number of bad examples skipped."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    if cfg.latent_tokens <= 0 or not perfect_square(cfg.latent_tokens):
        raise DataError(f"--latent_tokens {cfg.latent_tokens}: extraction needs K > 0, a perfect square (K = 0, the "
                        f"dense-caption control, has no targets)")
    rows, bad_lines = read_jsonl(cfg.data, cfg.skip_bad)
    if backbone is None:
        backbone, _, image_processor = load_backbone(cfg.model)
    info = cache_info(backbone, cfg.latent_tokens)
    cache = TargetCache(cfg.cache_dir, cfg.latent_tokens, info)  # refuses a cache made by another model
    bad, todo, cached = BadExamples(cfg.skip_bad), [], 0
    for r in rows[rank::world]:
        if PLACEHOLDER in r["response"]:
            with bad.guard():
                h = aux_hash(r)
                cached += cache.has(r["id"], h)
                if not cache.has(r["id"], h):
                    todo.append((r, h))
    # this writer's own shard names: host, process, rank and a random part (one process may extract twice)
    writer = f"{socket.gethostname()}-{os.getpid()}-r{rank}-{uuid.uuid4().hex[:8]}"
    shard, shard_no, extracted = {}, 0, 0
    for i in tqdm(range(0, len(todo), cfg.batch_size), desc="targets", unit="batch", disable=rank != 0):
        batch, images = [], []
        for r, h in todo[i:i + cfg.batch_size]:
            with bad.guard():
                images.append(aux_images(r))
                batch.append((r, h))
        if batch:
            feats = aux_targets(backbone, image_processor, [im for ims in images for im in ims], cfg.latent_tokens)
            per_row = torch.split(feats.cpu().flatten(0, 1), [len(ims) * cfg.latent_tokens for ims in images])
            # (S*K, d) per example, spans in order
            shard.update({f"{r['id']}/{h}": f.contiguous() for (r, h), f in zip(batch, per_row)})
            extracted += len(batch)
        if len(shard) >= cfg.shard_size or (i + cfg.batch_size >= len(todo) and shard):
            if shard_no == 0:  # written with the first shard: a run that stops before it leaves nothing behind
                os.makedirs(cache.dir, exist_ok=True)
                if cache.info is None:  # every writer may: the same content, each through its own temporary file
                    atomic_write_text(cache.info_path, json.dumps(info, indent=2) + "\n")
            path = os.path.join(cache.dir, f"shard_{writer}_{shard_no:05d}.safetensors")
            # (safetensors removes a file it could not finish: nothing half written is left)
            with writing(path, f"the targets written before are kept in {cache.dir}: free space and run targets.py "
                               f"again, it extracts what is missing"):
                save_file(shard, path + ".tmp")
                os.replace(path + ".tmp", path)
            fsync_dir(path)
            shard, shard_no = {}, shard_no + 1
    skipped = bad_lines + bad.count
    print(f"targets{f' rank {rank}' if world > 1 else ''}: {extracted} extracted, {cached} already cached, "
          f"{skipped} skipped -> {cache.dir}")
    return skipped


def targets_main(cfg: TargetsConfig):
    """targets.py ...: extraction, under python or torchrun (rank r takes examples r, r + world, ...)."""
    from common import setup_distributed
    rank, world, device = setup_distributed()
    backbone = image_processor = None
    if world > 1:
        backbone, _, image_processor = load_backbone(cfg.model, device)
    try:
        return extract_targets(cfg, backbone, image_processor, rank, world)
    finally:
        if world > 1:
            import torch.distributed as dist
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    from common import run_main
    run_main(targets_main, parse_config(TargetsConfig))
