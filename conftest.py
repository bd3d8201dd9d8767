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
from data import DataSpec, TargetCache, TargetsConfig, collate, encode_prompt, extract_targets, open_image, read_jsonl
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
