"""Tests of the benchmarks (bench_train.py, bench_infer.py) and the GPU smoke run (smoke.py): the 7b shapes are
Qwen2.5-VL-7B's, the FLOP formula (the numerator of MFU) equals an independent count of a real training pass, and
every mode runs. Tiny random models built here, no download.

    python -m pytest -q test_bench.py
"""
import json
import os
import random
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2_5_VLForConditionalGeneration

import bench_infer
import bench_train
import tiny
from losses import IGNORE
from model import add_latent_tokens

HERE = os.path.dirname(os.path.abspath(__file__))


def test_7b_shapes_are_qwen25_vl_7b():
    """Built through tiny.shape_config on the meta device, the 7b shapes have Qwen2.5-VL-7B's exact parameter
    count and its own M-RoPE sections."""
    tokenizer = tiny.build_tokenizer(tiny.corpus_texts())
    config = tiny.shape_config("7b", tokenizer, "sdpa")
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == 8_292_166_656
    assert config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]


def measured_flops(model, items):
    """FlopCounterMode's per-module counts of one training pass over `items` as bench times it: one example at a
    time (no padding), the frozen vision tower forward only, the LM head only at supervised positions."""
    with FlopCounterMode(display=False) as counter:
        for it in items:
            sup = torch.nonzero(it["labels"][1:] != IGNORE)[:, 0]  # position t predicts token t + 1
            logits = model(input_ids=it["input_ids"][None], pixel_values=it["pixel_values"],
                           image_grid_thw=it["image_grid_thw"], logits_to_keep=sup).logits  # (1, n_sup, V)
            F.cross_entropy(logits[0], it["labels"][sup + 1]).backward()
    return {module: {str(op).removeprefix("aten."): n for op, n in ops.items()}
            for module, ops in counter.get_flop_counts().items()}


def test_model_flops_matches_flop_counter():
    """bench_train.model_flops on the tiny shapes equals torch's FlopCounterMode around a real forward + backward of the
    same model on the same items, term by term, with nothing left over but the vision parts the formula omits."""
    torch.manual_seed(0)
    tokenizer = tiny.build_tokenizer(tiny.corpus_texts())
    cfg = bench_train.BenchConfig(shapes="tiny", latent_tokens=4)
    # eager attention: its score and value matmuls are bmm's the counter sees (CPU SDPA is not in its registry)
    config = tiny.shape_config("tiny", tokenizer, "eager")
    model = Qwen2_5_VLForConditionalGeneration(config)
    items = bench_train.length_mix(cfg, tokenizer, add_latent_tokens(model, tokenizer), 3, random.Random(0))
    model.model.visual.requires_grad_(False)  # as bench_train.run: the frozen tower has no backward
    counts = measured_flops(model, items)
    root = "Qwen2_5_VLForConditionalGeneration"
    decoder, head = counts[f"{root}.model.language_model"], counts[f"{root}.lm_head"]
    blocks = [counts[f"{root}.model.visual.blocks.{i}"] for i in range(config.vision_config.depth)]
    assert set(decoder) == {"mm", "addmm", "bmm"} and set(head) == {"mm"}, (decoder, head)
    # the counter counts eager attention's full T x T scores (the causal mask is added, not skipped); the formula
    # counts the causal half, so the decoder's bmm's (its attention and nothing else) are halved
    independent = (decoder["mm"] + decoder["addmm"] + decoder["bmm"] / 2 + head["mm"]
                   + sum(b.get("mm", 0) + b.get("addmm", 0) for b in blocks))  # vision: the blocks' linears
    formula = bench_train.model_flops(config, items)
    assert formula == independent, f"bench_train.model_flops {formula:.6g} != FlopCounterMode {independent:.6g}"
    # all the rest the counter saw is the vision tower's patch embedding, merger and window attention, which the
    # formula leaves out (at these tiny shapes they are large next to the 2-block tower; at 7B shapes small)
    vision = counts[f"{root}.model.visual"]
    omitted = sum(vision.values()) - sum(b.get("mm", 0) + b.get("addmm", 0) for b in blocks)
    total = sum(counts["Global"].values()) - decoder["bmm"] / 2
    assert total == formula + omitted, (total, formula, omitted)
    print(f"model_flops {formula:.6g} == counted {independent:.6g}; vision patch embed + merger + attention "
          f"{omitted:.6g} ({omitted / formula:.1%} of the formula) left out")


def test_sample_mode(tmp_path):
    """`bench_infer.py --mode sample` at tiny size: four variants, each with a positive rate, the loop as the baseline."""
    out = tmp_path / "sample.json"
    p = subprocess.run([sys.executable, "bench_infer.py", "--mode", "sample", "--samples", "2", "--prompts", "2",
                        "--max_new_tokens", "4", "--repeats", "1", "--out", str(out)], cwd=HERE, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["loop: 2 x generate(1 prompt)", "generate(2 copies of 1 prompt)",
                                            "generate(1 prompt, num_samples=2)", "generate(2 prompts, num_samples=2)"]
    assert all(r["seconds"] > 0 and r["samples_per_s"] > 0 for r in rows) and rows[0]["speedup"] == 1.0
    assert all(r["variant"] in p.stdout for r in rows) and "samples/s" in p.stdout


def test_train_mode_counts_the_length_mix():
    """One timed step per layout: both see exactly the length mix's tokens; packing removes all padding."""
    cfg = bench_train.BenchConfig(examples=4, micro_batch=2, steps=1, warmup=0, latent_tokens=4, attn="sdpa",
                            peak_tflops=1.0)
    tokenizer = tiny.build_tokenizer(tiny.corpus_texts())
    ids = dict(start=1, pad=2, end=3)  # only the lengths matter here
    items = bench_train.length_mix(cfg, tokenizer, ids, cfg.examples, random.Random(cfg.seed))
    rows = bench_train.main(cfg)
    by = {r["layout"]: r for r in rows}
    assert by["padded"]["tokens"] == by["packed"]["tokens"] == sum(len(it["input_ids"]) for it in items)
    assert by["packed"]["slots"] == by["packed"]["tokens"] < by["padded"]["slots"]
    assert all(r["step_s"] > 0 for r in rows)


def test_loader_mode_trains_the_same_with_workers():
    """--mode loader runs train.main with 0 and 2 DataLoader workers: the same steps give the same losses."""
    rows = bench_train.main(bench_train.BenchConfig(mode="loader", micro_batch=2, steps=2, warmup=1, loader_image=112,
                                        loader_pixels=56 * 56))
    assert [r["workers"] for r in rows] == [0, 2] and all(r["steps"] == 2 for r in rows)
    assert rows[0]["losses"] == rows[1]["losses"] and len(rows[0]["losses"]) == 3


def test_smoke_mode_runs_every_path_under_torchrun():
    """smoke.py under torchrun with 2 gloo ranks: one bf16 step of DDP and FSDP2, padded and packed,
    each with finite losses and the attention backend asked for; on a CPU it says what it skipped."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "smoke.py"], cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "smoke OK: 4 runs" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [line.split() for line in p.stdout.splitlines() if line.startswith("sdpa ")]
    assert sorted((r[2], r[3]) for r in rows) == [("DDP", "packed"), ("DDP", "padded"), ("FSDP2", "packed"),
                                                  ("FSDP2", "padded")]
    if not torch.cuda.is_available():
        assert "note: flash_attention_2 skipped" in p.stdout


def test_eval_mode_schedules_agree():
    """bench_infer.py --mode eval at toy sizes: infer.py's batch mode and difficulty.py with either schedule write the same
    results (sampled, one generator per example or sample), and the answers end at uneven lengths (continuous
    rows are refilled)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a busy 2-core machine spin against the other processes
    try:
        rows = bench_infer.main(bench_infer.BenchConfig(mode="eval", eval_prompts=6, max_new_tokens=80, rows=4, samples=2,
                                            latent_tokens=4))
    finally:
        torch.set_num_threads(threads)
    by = {r["name"]: r for r in rows}
    ratio = by["infer.py --data samples/s, continuous / static"]
    assert ratio["identical_outputs"] and ratio["examples"] == 6
    assert ratio["min_tokens"] < ratio["max_tokens"] == 80, "some answers must stop early, some run to the budget"
    assert by["difficulty.py samples/s, continuous / static"]["identical_outputs"]
    assert all(r["value"] > 0 for r in rows)
