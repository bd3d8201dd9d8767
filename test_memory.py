"""Tests of the memory benchmark (bench_memory.py): the live-bytes tracker counts a hand-made allocation pattern
exactly, the step mode runs the real training step under FSDP2 with the states where they must be (the AdamW states
and gradients are exactly their numel's bytes, and micro-steps after the first start with every trainable
parameter's gradient held unsharded in fp32), and the extrapolation is exact on data that is linear. Tiny shapes.

    python -m pytest -q test_memory.py
"""
import json
import os
import subprocess
import sys

import torch

import bench_memory

HERE = os.path.dirname(os.path.abspath(__file__))


def test_livebytes_counts_a_hand_made_pattern():
    """Peaks, per phase and overall, and the live bytes at the end, against a count by hand: a view and an in-place
    op allocate nothing, a storage lives while any view of it does, storage.resize_ (how FSDP2 frees and re-gathers
    parameters) counts both ways, and the split at a phase's peak names the tracked states."""
    w = torch.zeros(250)  # 1000 B made before: counted only once handed to track()
    tracker = bench_memory.LiveBytes(classify=lambda: {id(w.untyped_storage()): "w"}, resolution=0)
    tracker.track(w)
    with tracker:
        a = torch.empty(1000)  # 4000: 5000
        v = a[10:]  # a view: nothing new
        b = torch.empty(500, dtype=torch.float64)  # 4000: 9000
        a.add_(1)  # in place: nothing new
        del a  # v keeps the storage alive: 9000
        tracker.set_phase("second")
        c = v * 2  # 990 x 4 = 3960: 12960, the peak
        del v, b  # 4960
        c.untyped_storage().resize_(0)  # 1000
        c.untyped_storage().resize_(800)  # 1800
        d = torch.empty(100)  # 2200
    assert tracker.peak == 12960 and tracker.now == 2200, (tracker.peak, tracker.now)
    assert tracker.phases["start"]["peak"] == 9000 and tracker.phases["second"]["start"] == 9000
    assert tracker.phases["second"]["peak"] == 12960
    assert tracker.phases["second"]["at_peak"] == {"w": 1000, "other": 11960}
    del c, d
    assert tracker.now == 1000


def test_step_mode_holds_the_states_it_should(tmp_path):
    """--mode step at tiny shapes under a one-rank torchrun: the phases of both micro-steps and the optimizer are
    there; in the optimizer, the parameters, gradients and AdamW states are 4, 4 and 8 bytes per (trainable)
    parameter plus AdamW's step counters; the second micro-step starts with the first's gradients accumulated
    unsharded in fp32 (4 bytes per trainable parameter: what FSDP2 keeps when gradient sync is off)."""
    out = tmp_path / "step.json"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                        "bench_memory.py", "--mode", "step", "--shapes", "tiny", "--seq", "256", "--response", "64",
                        "--first_seq", "128", "--latent_tokens", "4", "--vocab", "0", "--out", str(out)],
                       cwd=HERE, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [n for n in r["phases"] if n.startswith("1:")] == [
        "1:forward", "1:backward LM head+loss", "1:backward blocks", "1:backward embeddings"]
    opt, trainable = r["phases"]["optimizer"], r["trainable_numel"]
    assert opt["params"] == 4 * r["params_numel"] and opt["grads"] == 4 * trainable
    assert 0 <= opt["adamw"] - 8 * trainable <= 4 * 64, (opt["adamw"], 8 * trainable)  # + one counter per tensor
    accumulated = r["phases"]["1:forward"]["start_other"]
    assert 0 <= accumulated - 4 * trainable <= 64, (accumulated, 4 * trainable)
    assert r["peak"] == max(p["peak"] for p in r["phases"].values()) and "tracker peak" in p.stdout


def test_fit_is_exact_on_linear_data():
    """fit() + phase_value() give back X = a + b T + L (c + e T) + f (V - V1) at a point none of the inputs has
    (28 layers, another vocabulary, another length): the per-layer, per-token and per-row parts separate."""
    X = lambda L, T, V: 1e9 + 3e4 * T + L * (2e8 + 5e4 * T) + 7e3 * (V - 1000)  # noqa: E731
    steps = []
    for L, T, V in [(1, 2000, 1000), (2, 2000, 1000), (1, 4000, 1000), (2, 4000, 1000), (1, 8000, 1000),
                    (1, 2000, 3000)]:
        phase = dict(other=X(L, T, V), inputs=0, grads=L * 1e6 + V, start_other=L * 4e6)
        steps.append(dict(layers=L, seq=T, vocab=V, grad_ckpt=True, phases={"start": phase, "0:forward": phase}))
    f = bench_memory.fit(steps)["ckpt"]
    got = bench_memory.phase_value(f["phases"]["0:forward"]["X"], 28, 12000, 16000, f["vocab1"])
    assert abs(got - X(28, 16000, 12000)) < 1e-3 * X(28, 16000, 12000), (got, X(28, 16000, 12000))
    grads = bench_memory.phase_value(f["phases"]["0:forward"]["G"], 28, 12000, 16000, f["vocab1"])
    assert abs(grads - (28e6 + 12000)) < 1, grads
