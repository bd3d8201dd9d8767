"""The GPU code paths before a real run: one bf16 training step (train.main itself) for DDP and FSDP2, padded and
packed, with SDPA and with FlashAttention-2 when it imports, on a tiny model and sample data written to a temporary
directory; checks finite losses and the attention backend in use, reports time and peak memory. Run it first on
a new GPU machine, under torchrun with the GPUs you have (on a CPU it runs under gloo and says what it skipped):

    torchrun --nproc_per_node 2 smoke.py
"""
import math
import os
import resource
import sys
import tempfile
import time

import torch

import tiny
import train
from common import attn_implementation
from targets import TargetsConfig, extract_targets


def peak_gib(cuda):
    if cuda:
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB: the process's peak RSS


def main():
    """One bf16 step of each GPU path (module docstring); exits non-zero when a run fails its check."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    root = tempfile.mkdtemp(prefix=f"gap_smoke_rank{rank}_")  # each rank its own copy: no process group yet
    model_dir = tiny.build_tiny(os.path.join(root, "tiny"))
    data = tiny.write_sample_data(os.path.join(root, "data"), max(8, 4 * world))
    extract_targets(TargetsConfig(model=model_dir, data=data, latent_tokens=4, cache_dir=os.path.join(root, "cache")))
    attns = ["sdpa"] + (["flash_attention_2"] if attn_implementation() == "flash_attention_2" else [])
    notes = [] if cuda else ["no GPU: bf16 runs on the CPU under gloo, memory is the process's peak RSS"]
    if "flash_attention_2" not in attns:
        notes.append("flash_attention_2 skipped: flash_attn does not import here, or no GPU")
    rows = []
    for attn in attns:
        for fsdp in (False, True):
            for pack in (False, True):
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.time()
                run = train.main(train.TrainConfig(
                    model=model_dir, data=data, target_cache=os.path.join(root, "cache"), latent_tokens=4,
                    adapter_dim=16, global_batch=2 * world, micro_batch=1, max_steps=1, pack=pack, max_len=512,
                    fsdp=fsdp, precision="bf16", attn=attn, num_workers=0, log_every=1,
                    out_dir=os.path.join(root, "out"), fresh=True))
                rows.append(dict(attn=attn, used=run["attn"], wrap="FSDP2" if fsdp else "DDP" if world > 1 else "none",
                                 layout="packed" if pack else "padded", loss=run["losses"][0],
                                 finite=all(math.isfinite(x) for x in run["losses"][0]), seconds=time.time() - t0,
                                 peak_gib=peak_gib(cuda)))
    if rank == 0:
        print(f"\nsmoke: {world} rank(s), bf16, device {'cuda' if cuda else 'cpu'}")
        print(f"{'attention':<18}{'in use':<18}{'wrap':<7}{'layout':<8}{'loss_lm':>9}{'loss_lat':>9}{'s':>7}{'peak GiB':>9}")
        for r in rows:
            print(f"{r['attn']:<18}{r['used']:<18}{r['wrap']:<7}{r['layout']:<8}{r['loss'][0]:>9.4f}{r['loss'][1]:>9.4f}"
                  f"{r['seconds']:>7.1f}{r['peak_gib']:>9.2f}")
        for note in notes:
            print(f"note: {note}")
    bad = [r for r in rows if not r["finite"] or r["used"] != r["attn"]]
    if bad:
        raise SystemExit(f"smoke FAILED: {len(bad)} of {len(rows)} runs had a non-finite loss or another attention "
                         f"backend than asked for: {bad}")
    if rank == 0:
        print(f"smoke OK: {len(rows)} runs")
    return rows


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):  # it takes no flags: --help prints what it does
        print(__doc__)
        sys.exit(0)
    main()
