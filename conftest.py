"""Shared test fixtures: a tiny random Qwen2.5-VL with an offline tokenizer (built here, no download), sample data
of uneven lengths, its latent targets and PCA basis, a GAP wrapper over it, and helpers to run project commands.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import pca as pca_lib
from data import DataSpec, collate, encode_prompt, open_image, read_jsonl
from targets import TargetCache, TargetsConfig, extract_targets
from latent_head import LatentHead
from model import GAP, add_latent_tokens, load_backbone
from tiny import build_tiny, write_sample_data

HERE = os.path.dirname(os.path.abspath(__file__))
K = 4  # latent tokens in the tests: a 2x2 grid keeps sequences short
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=HERE)


def run(cmd, cwd=HERE, env=None, timeout=600, expect_ok=True):
    """Run a command in a subprocess (python files as `sys.executable file ...`); fail with its output."""
    cmd = [sys.executable, *cmd] if str(cmd[0]).endswith(".py") or cmd[0] == "-m" else cmd
    p = subprocess.run(list(map(str, cmd)), cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    if expect_ok:
        assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny model directory, sample data (uneven answer lengths), its latent targets and a PCA basis."""
    root = tmp_path_factory.mktemp("gap")
    model_dir = build_tiny(str(root / "tiny"))
    data = write_sample_data(str(root / "data"), 12, seed=1)
    extract_targets(TargetsConfig(model=model_dir, data=data, latent_tokens=K, cache_dir=str(root / "cache")),
                    *load_backbone(model_dir, "cpu")[::2])
    cache = TargetCache(str(root / "cache"), K)
    stats = pca_lib.PCAStats()
    for key, by_hash in cache.entries.items():
        stats.update(cache.get(key, *by_hash))
    return dict(root=root, model=model_dir, data=data, cache=cache, basis=pca_lib.fit(stats, 0.95))


def make_gap(world, kind="pca", latent_tokens=K):
    """A GAP over the tiny model with the adapter moved off its zero init, so the head is not a plain projection."""
    torch.manual_seed(0)
    backbone, tokenizer, image_processor = load_backbone(world["model"], "cpu", torch.float32)
    ids = add_latent_tokens(backbone, tokenizer)
    head = LatentHead(kind, backbone.config.text_config.hidden_size, basis=world["basis"], adapter_dim=16)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return GAP(backbone, head, ids, latent_tokens).eval(), tokenizer, image_processor


@pytest.fixture(scope="session")
def gap(world):
    return make_gap(world)


@pytest.fixture(scope="module")
def ckpt(world, tmp_path_factory):
    """make_gap(world) saved as a checkpoint directory (one per test module)."""
    from checkpoint import save_checkpoint
    path = str(tmp_path_factory.mktemp("ckpt") / "gap")
    gap, tokenizer, image_processor = make_gap(world)
    save_checkpoint(gap, tokenizer, image_processor, path, {}, basis=world["basis"])
    return path


def prompts(world, tokenizer, image_processor, questions, end_with_start=()):
    """Left-padded generation batch; rows listed in end_with_start have the prompt end in <|latent_start|>."""
    rows, _ = read_jsonl(world["data"])
    items = []
    for b, q in enumerate(questions):
        it = encode_prompt(tokenizer, image_processor, open_image(rows[b], "image"), q, DataSpec(latent_tokens=K))
        if b in end_with_start:
            start = tokenizer.convert_tokens_to_ids("<|latent_start|>")
            it["input_ids"] = torch.cat([it["input_ids"], torch.tensor([start])])
        items.append(it)
    return collate(items, tokenizer.pad_token_id, left=True)


class BiasedHead(torch.nn.Module):
    """LM head plus a fixed logit bias: makes the random model emit a chosen token (<|latent_start|>) often."""

    def __init__(self, lm_head, bias):
        super().__init__()
        self.lm_head, self.bias = lm_head, bias

    def forward(self, h):
        return self.lm_head(h) + self.bias


def biased(backbone, token_id, value):
    """Context manager: backbone.lm_head with +value on token_id's logit, restored afterwards."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        bias = torch.zeros(backbone.lm_head.out_features)
        bias[token_id] = value
        orig = backbone.lm_head
        backbone.lm_head = BiasedHead(orig, bias)
        try:
            yield
        finally:
            backbone.lm_head = orig
    return ctx()


def kill_after_first_result(cmd, part, timeout=120):
    """Start a project command, SIGKILL it once its part file holds a complete line, and return that file's line
    count: a run interrupted mid-way, as a preemption would leave it."""
    import signal
    import time
    p = subprocess.Popen([sys.executable, *map(str, cmd)], cwd=HERE, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout
        while not (part.exists() and part.read_text().count("\n") >= 1):
            assert p.poll() is None, f"the run ended before it could be killed:\n{p.stderr.read()[-3000:]}"
            assert time.time() < deadline, f"no result line after {timeout} s"
            time.sleep(0.02)
        assert p.poll() is None, "the run finished before the kill: make it slower"
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    return part.read_text().count("\n")


def sampled_and_recomputed(g, batch, bias, seed):
    """A sampling run of the KV-cached loop over `batch` with <|latent_start|> made likely (+bias on its logit: the
    random model then opens spans now and then), its steps read from latent_steps, and an uncached recompute of
    prompt + every fed step at once, at the loop's own positions. Returns dict(batch, out, full)."""
    import latent_loop
    with biased(g.backbone, g.start_id, bias):
        steps = list(latent_loop.latent_steps(g.backbone, g.head, g.latent_ids, g.latent_tokens, batch["input_ids"],
                                              batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"],
                                              max_new_tokens=32, temperature=1.0, logits=True,
                                              generator=torch.Generator().manual_seed(seed)))
        fed = [s for s in steps if s.fed is not None]
        out = dict(tokens=torch.stack([s.token for s in steps], 1), logits=torch.stack([s.logits for s in steps], 1),
                   slots=torch.stack([s.slot for s in steps], 1), embeds=torch.stack([s.fed for s in fed], 1),
                   positions=torch.stack([s.position for s in fed], 2))
        with torch.no_grad():
            prompt = latent_loop.embed_inputs(g.backbone, batch["input_ids"], batch["pixel_values"],
                                              batch["image_grid_thw"])
            prompt_pos = latent_loop.rope_positions(g.backbone, batch["input_ids"], batch["attention_mask"],
                                                    batch["image_grid_thw"])
            S, B = out["embeds"].shape[1], batch["input_ids"].shape[0]
            mask = torch.cat([batch["attention_mask"], torch.ones(B, S, dtype=torch.long)], 1)
            h = g.states(torch.cat([prompt, out["embeds"]], 1), mask, torch.cat([prompt_pos, out["positions"]], 2))
            full = dict(h=h, logits=g.backbone.lm_head(h).float(), T=prompt.shape[1])
    return dict(batch=batch, out=out, full=full)


# ----------------------------------------------------------------------------------------------------------
# torchrun launches of a driver script (test_train.py, test_align.py)

# driver code: train.main's on_grads seam that records the first optimizer step's gradients, gathered to full
# tensors (every rank takes part), saved by rank 0
SAVE_FIRST_GRADS = """
def first_grads(out, rank):
    import os, torch
    def save_grads(gap):  # every step, with its gradients in place, before clipping
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for n, p in gap.named_parameters() if p.grad is not None}
        if rank == 0 and not os.path.exists(out):
            torch.save(grads, out)
    return save_grads
"""


def torchrun(args, nproc=2, expect_ok=True, env=None, timeout=600):
    """Launch the driver under torchrun (nproc > 1) or plain python; with expect_ok a non-zero exit fails the test.
    Never relaunched: a resumed run is not idempotent."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    proc = subprocess.Popen(launcher + list(map(str, args)), cwd=HERE, env=dict(ENV, **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop([proc])  # after a timeout: the launcher and its workers
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if expect_ok:
        assert p.returncode == 0, f"run failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def kill_tree(pid):
    """SIGKILL a process and all its descendants: torchrun starts each worker in a session of its own, so a
    process-group kill of the launcher would leave them running."""
    import signal
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in children:
        kill_tree(int(child))


def stop(launchers, logs=()):
    """Kill the launchers still running, with their workers (after a failure or a timeout too: no orphan is
    left); returns the text of their logs, printed (pytest shows it when the test fails)."""
    for p in launchers:
        if p.poll() is None:  # still ours (an exited process's pid may be another's by now)
            kill_tree(p.pid)
            p.wait()
    outputs = [log.seek(0) or log.read() for log in logs]
    if outputs:
        print(*(o[-4000:] for o in outputs), sep="\n----\n")
    return outputs


