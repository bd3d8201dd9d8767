"""Tests of infer.py's batch mode on a tiny random GAP checkpoint (no download): the continuous schedule against
the static one, two torchrun ranks against one process, a real kill and resume, flags a resume must keep, the
latency summary, and the evaluation settings (pixel budget, max_len) over the checkpoint's. (Single-image mode and the
train -> infer round trip: test_gap.py; the harness adapters: test_harness.py.)

    python -m pytest -q test_infer.py
"""
import json
import sys

import numpy as np
import pytest

from conftest import kill_after_first_result, make_gap, run
from checkpoint import save_checkpoint

# sampled (so the per-example generators matter), long enough that a kill lands mid-run, chunks of 5 so that the
# 12 examples make uneven chunks and two ranks get different numbers of them; the default (continuous) schedule
SLOW = ["--batch_size", "5", "--max_new_tokens", "96", "--temperature", "1.0", "--latent_mode", "noise"]


def cli(ckpt, data, out, *flags):
    return ["infer.py", "--ckpt", ckpt, "--data", data, "--out", str(out), *flags]


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def without_latency(rows):
    """Result lines with the wall-time field dropped: everything else must be identical between runs."""
    return [{k: v for k, v in r.items() if k != "latency_s"} for r in rows]


@pytest.fixture(scope="module")
def reference(ckpt, world, tmp_path_factory):
    """One uninterrupted one-process CLI run: what the torchrun and the killed-and-resumed runs must equal."""
    out = tmp_path_factory.mktemp("reference") / "results.jsonl"
    run(cli(ckpt, world["data"], out, *SLOW))
    return out


@pytest.fixture(scope="module")
def stopping_ckpt(world, tmp_path_factory):
    """The checkpoint with <|im_end|>'s LM-head row a hair above that of a token the random model emits greedily at
    uneven steps (test_loop.py's STOP): greedy answers end at different lengths, so continuous rows are refilled."""
    import torch
    path = str(tmp_path_factory.mktemp("stopping") / "gap")
    gap, tokenizer, image_processor = make_gap(world)
    with torch.no_grad():
        w = gap.backbone.lm_head.weight
        w[tokenizer.convert_tokens_to_ids("<|im_end|>")] = 1.001 * w[400]
    save_checkpoint(gap, tokenizer, image_processor, path, {}, basis=world["basis"])
    return path


@pytest.mark.parametrize("flags", [["--max_new_tokens", "40"],
                                   ["--max_new_tokens", "24", "--temperature", "1.0", "--latent_mode", "noise"]],
                         ids=["greedy", "sampled"])
def test_continuous_schedule_equals_static(stopping_ckpt, world, tmp_path, flags):
    """The continuous schedule (3 rows) writes the results of the static one (chunks of 3), latency aside: greedy
    answers of uneven lengths (rows refilled at different steps), and sampling with noise latents (one generator
    per example). Static latency is one value per chunk; continuous latency is each example's own. The schedule
    changes what latency_s means, so parts of one schedule are not resumed by the other."""
    from common import parse_config
    from infer import InferConfig, Runner, run_batch
    results = {}

    def argv(schedule, out):
        return ["--ckpt", stopping_ckpt, "--data", world["data"], "--out", str(tmp_path / f"{out}.jsonl"),
                "--batch_size", "3", "--schedule", schedule, *flags]
    for schedule in ("static", "continuous"):
        cfg = parse_config(InferConfig, argv(schedule, schedule))
        runner = Runner(cfg)
        summary = run_batch(cfg, runner)
        results[schedule] = read_lines(tmp_path / f"{schedule}.jsonl")
        assert summary["schedule"] == schedule and summary["n"] == 12
    with pytest.raises(ValueError, match="other flags.*'schedule': \\('continuous', 'static'\\)"):
        run_batch(parse_config(InferConfig, argv("static", "continuous")), runner)
    assert without_latency(results["continuous"]) == without_latency(results["static"])
    if "--temperature" not in flags:
        lengths = [len(r["response"]) for r in results["static"]]
        assert len(set(lengths)) >= 5 and max(lengths) > 2 * min(lengths), lengths
    static = [r["latency_s"] for r in results["static"]]
    assert all(len(set(static[i:i + 3])) == 1 for i in range(0, 12, 3)) and len(set(static)) == 4
    assert all(r["latency_s"] > 0 for r in results["continuous"])


def test_results_in_input_order_with_summary(world, reference):
    """Every example once, in input order, scored by the answers.py matcher; the summary's latency mean, P50
    and P90 are those of the per-example latency_s (numpy's percentiles) and its accuracy that of the lines."""
    from answers import answers_match
    from data import read_jsonl
    rows, _ = read_jsonl(world["data"])
    results = read_lines(reference)
    assert [r["id"] for r in results] == [r["id"] for r in rows]
    assert [r["correct"] for r in results] == [answers_match(r["pred"], x["answer"], x["question"])
                                                for r, x in zip(results, rows)]
    summary = json.load(open(str(reference).replace(".jsonl", ".summary.json")))
    lat = np.array([r["latency_s"] for r in results])
    assert (lat > 0).all() and len(set(lat.tolist())) > 3  # continuous: each example its own time
    assert summary["latency_s"] == pytest.approx(dict(mean=lat.mean(), p50=np.percentile(lat, 50),
                                                      p90=np.percentile(lat, 90)), rel=1e-9)
    assert summary["n"] == 12 and summary["accuracy"] == pytest.approx(np.mean([r["correct"] for r in results]))


def test_torchrun_two_ranks_equal_one_process(ckpt, world, reference, tmp_path):
    """Two gloo ranks each answer a slice of the chunks; the merged file is the one-process file (latency
    aside), in input order, and the summary agrees except for the rank count and the timings."""
    out = tmp_path / "results.jsonl"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *cli(ckpt, world["data"], out, *SLOW)])
    assert (tmp_path / "results.rank0.jsonl").exists() and (tmp_path / "results.rank1.jsonl").exists()
    assert len(read_lines(tmp_path / "results.rank1.jsonl")) == 5  # chunk 1 of 0, 1, 2: the ranks split the work
    assert without_latency(read_lines(out)) == without_latency(read_lines(reference))
    one = json.load(open(str(reference).replace(".jsonl", ".summary.json")))
    two = json.load(open(tmp_path / "results.summary.json"))
    drop = ("latency_s", "ranks", "out")
    assert {k: v for k, v in two.items() if k not in drop} == {k: v for k, v in one.items() if k not in drop}
    assert (one["ranks"], two["ranks"]) == (1, 2)


def test_kill_and_resume_equals_uninterrupted(ckpt, world, reference, tmp_path):
    """SIGKILL a run after its first result is written (continuous: each example as it ends), keep its first line
    and a torn second, as a kill mid-write would leave them, restart: the restart skips the done id and the
    results equal the uninterrupted run's (latency aside)."""
    out = tmp_path / "results.jsonl"
    part = tmp_path / "results.rank0.jsonl"
    n_done = kill_after_first_result(cli(ckpt, world["data"], out, *SLOW), part)
    assert 1 <= n_done < 12 and not out.exists()
    # as if killed after the first line, mid-way through the second: the rest of its chunk is not done
    part.write_text(part.read_text().splitlines(keepends=True)[0] + '{"id": "s11", "response": "<think>')
    resumed = run(cli(ckpt, world["data"], out, *SLOW))
    assert "12 examples, 1 already done" in resumed.stdout
    assert without_latency(read_lines(out)) == without_latency(read_lines(reference))
    ids = [r["id"] for r in read_lines(part)]
    assert len(ids) == len(set(ids)) == 12


def test_resume_with_other_flags_is_refused(ckpt, world, reference, tmp_path):
    """Parts made with one --latent_mode are not resumed by a run with another: it fails and names the flag."""
    out = tmp_path / "results.jsonl"
    for name in ("results.rank0.jsonl", "results.config.json"):
        (tmp_path / name).write_bytes((reference.parent / name).read_bytes())
    p = run(cli(ckpt, world["data"], out, *SLOW[:-1], "model"), expect_ok=False)
    assert p.returncode != 0 and "latent_mode" in p.stderr and "other flags" in p.stderr
    assert not out.exists()


def test_resume_with_another_checkpoint_at_the_same_path_is_refused(ckpt, world, reference, tmp_path):
    """A checkpoint retrained to the same path (here: its latent head changed) does not resume the old parts."""
    import shutil
    from safetensors.torch import load_file, save_file
    other = tmp_path / "gap"
    shutil.copytree(ckpt, other)
    head = load_file(str(other / "latent_head.safetensors"))
    save_file({k: v + 1 for k, v in head.items()}, str(other / "latent_head.safetensors"))
    config = json.load(open(reference.parent / "results.config.json"))
    (tmp_path / "results.config.json").write_text(json.dumps(dict(config, ckpt=str(other))))
    (tmp_path / "results.rank0.jsonl").write_bytes((reference.parent / "results.rank0.jsonl").read_bytes())
    p = run(cli(str(other), world["data"], tmp_path / "results.jsonl", *SLOW), expect_ok=False)
    assert p.returncode != 0 and "ckpt_stamp" in p.stderr and "other flags" in p.stderr


def test_bad_image_is_an_error_or_skipped_once_and_counted(ckpt, world, tmp_path, capsys):
    """An unreadable image stops the run naming its line; with --skip_bad it is left out of the results, counted
    in the summary, and a re-run does not try it again."""
    from common import DataError, parse_config
    from infer import InferConfig, Runner, run_batch
    lines = open(world["data"]).read().splitlines()
    lines[3] = json.dumps(dict(json.loads(lines[3]), image="img/missing.png"))  # line 4
    data = world["root"] / "data" / "bad_image.jsonl"  # image paths are relative to the JSONL
    data.write_text("\n".join(lines) + "\n")
    argv = ["--ckpt", ckpt, "--data", str(data), "--out", str(tmp_path / "r.jsonl"), "--max_new_tokens", "4",
            "--batch_size", "5"]
    cfg = parse_config(InferConfig, argv)
    runner = Runner(cfg)
    with pytest.raises(DataError, match=r"bad_image\.jsonl:4: field 'image'"):
        run_batch(cfg, runner)
    for attempt in range(2):
        summary = run_batch(parse_config(InferConfig, argv + ["--skip_bad"]), runner)
        assert summary["skipped"] == 1 and summary["n"] == 11
        assert [r["id"] for r in read_lines(tmp_path / "r.jsonl")] == [json.loads(x)["id"] for i, x in
                                                                     enumerate(lines) if i != 3]
    assert "12 examples, 12 already done" in capsys.readouterr().out  # the re-run tried nothing again


def test_pixel_budget_reaches_the_processor_and_the_summary(ckpt, world, tmp_path):
    """--image_max_pixels over the checkpoint's budget: the processor gets it (the vision tokens of a 112x56 image:
    84x28 after Qwen2.5-VL's resize rule, 3 tokens, against 8 at the checkpoint's own), the summary records the
    budget and max_len in force, and a --max_len that the prompts exceed stops the run before it starts, naming the
    budget that fits."""
    import dataclasses
    from PIL import Image
    from common import DataError
    from data import read_jsonl
    from infer import InferConfig, Runner, main
    cfg = InferConfig(ckpt=ckpt, data=world["data"], out=str(tmp_path / "results.jsonl"), max_new_tokens=1,
                      image_max_pixels=84 * 56)
    summary = main(cfg)
    assert (summary["image_min_pixels"], summary["image_max_pixels"], summary["max_len"]) == (3136, 84 * 56, 8192)
    wide = Image.new("RGB", (112, 56), "white")
    tokens = lambda c: int(Runner(c, "cpu").encode(wide, "Which?")["image_grid_thw"].prod()) // 4  # noqa: E731
    assert tokens(cfg) == 3 and tokens(InferConfig(ckpt=ckpt)) == 8
    rows, _ = read_jsonl(world["data"])
    n = len(Runner(cfg, "cpu").encode_row(rows[0])["input_ids"])  # an 84x56 image: 6 of them the image's
    short = dataclasses.replace(cfg, out=str(tmp_path / "short.jsonl"), max_len=n - 1)
    with pytest.raises(DataError, match=rf"examples are bad \(image: \d+\).*train.jsonl:1: field 'image': sequence "
                                        rf"of {n} tokens exceeds max_len={n - 1} \(6 of them for the query image\): "
                                        rf"pass --image_max_pixels 3920 or less, or raise --max_len"):
        main(short)
