"""Tests of the pipeline under bad input and faults: images as Qwen2.5-VL's preprocessing sees them (alpha, 16-bit,
float, EXIF), the processor's own limits named by row, every example checked before a long job starts, flags
checked before any work with one line and exit code 2, target caches and result files that know what they were
derived from (stale and foreign ones refused or redone), shard files that parallel writers never overwrite, kills
mid-extraction and mid-merge, and a saved state that cannot run code when loaded.

    python -m pytest -q test_reliability.py
"""
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from common import DataError
from conftest import ENV, HERE, K, run, write_jsonl
from data import DataSpec, GAPDataset, open_image, read_jsonl, to_rgb
from model import load_backbone
from targets import TargetCache, TargetsConfig, aux_targets, extract_targets


def copy_world(world, tmp_path, n=None):
    """A private copy of the sample data (its images too, so a test may edit them); returns the JSONL path."""
    src = os.path.dirname(world["data"])
    shutil.copytree(os.path.join(src, "img"), tmp_path / "img")
    lines = open(world["data"]).read().splitlines()[:n]
    return write_jsonl(tmp_path / "train.jsonl", lines)


def targets_of(cache_dir):
    """{id: tensor} of every current target in a cache directory."""
    cache = TargetCache(str(cache_dir), K)
    return {key: cache.get(key, h) for key, by_hash in cache.entries.items() for h in by_hash}


def one_line_error(p, *needles):
    """Bad input: exit code 2, no traceback, and a message with every needle."""
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    for needle in needles:
        assert needle in p.stderr, p.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------
# images as Qwen2.5-VL sees them

def png(im, **kw):
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    buf.seek(0)
    return Image.open(buf)


def exif_rotated():
    """A 2x1 image, left red and right blue, stored with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    im = Image.new("RGB", (2, 1))
    im.putpixel((0, 0), (255, 0, 0))
    im.putpixel((1, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes(), quality=100, subsampling=0)
    buf.seek(0)
    return Image.open(buf)


IMAGE_CASES = [  # (name, image, expected RGB pixels as an (H, W, 3) array)
    ("rgba_transparent_on_white", Image.new("RGBA", (2, 2), (0, 0, 0, 0)), np.full((2, 2, 3), 255)),
    ("rgba_half_alpha", Image.new("RGBA", (1, 1), (0, 0, 0, 128)), np.full((1, 1, 3), 127)),
    ("la_black_stroke_kept", Image.new("LA", (1, 1), (0, 255)), np.zeros((1, 1, 3))),
    ("palette_with_transparency", png(Image.new("P", (1, 1), 0), transparency=0), np.full((1, 1, 3), 255)),
    ("png_16bit_mid_gray", png(Image.fromarray(np.full((2, 2), 32896, np.uint16))), np.full((2, 2, 3), 128)),
    ("float_half", Image.fromarray(np.full((1, 1), 0.5, np.float32)), np.full((1, 1, 3), 128)),
    ("exif_orientation", exif_rotated(), None),
]


@pytest.mark.parametrize("name,image,expected", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_images_are_converted_as_qwen_sees_them(name, image, expected):
    out = to_rgb(image)
    assert out.mode == "RGB"
    a = np.asarray(out).astype(int)
    if name == "exif_orientation":  # rotated to 1 wide x 2 high: red on top, blue below
        assert a.shape == (2, 1, 3) and a[0, 0, 0] > 200 > a[0, 0, 2] and a[1, 0, 2] > 200 > a[1, 0, 0], a
    else:
        assert np.abs(a - expected).max() <= 1, (a, expected)


def test_processor_limits_are_named_by_row_and_skippable(world, gap, tmp_path):
    """An image wider than 200:1 fails in the image processor: the error names file, line and field, and
    --skip_bad skips it like any other bad image."""
    g, tokenizer, image_processor = gap
    data = copy_world(world, tmp_path, 3)
    Image.new("RGB", (2020, 10), "white").save(tmp_path / "img" / "wide.png")
    rows = [json.loads(line) for line in open(data)]
    rows[1]["image"] = "img/wide.png"
    write_jsonl(data, rows)
    ds = GAPDataset(data, tokenizer, image_processor, g.latent_ids, DataSpec(latent_tokens=K), world["cache"],
                    return_errors=True)
    assert "train.jsonl:2: field 'image': absolute aspect ratio must be smaller than 200" in ds[1]["error"]


@pytest.mark.parametrize("size,budget", [((56, 56), 0), ((2000, 30), 0), ((560, 560), 313600), ((700, 90), 313600),
                                         ((30, 30), 0), ((1280, 960), 1003520), ((33, 4000), 50000), ((20, 4040), 0)])
def test_the_check_counts_the_image_tokens_the_processor_gives(gap, tmp_path, size, budget):
    """The check before training counts image tokens from the image's size (query_tokens), without the processor's
    pixel work: the same count as processing it (query_pixels), or the same refusal."""
    from data import n_image_tokens, query_pixels, query_tokens
    _, _, image_processor = gap
    Image.new("RGB", size, "white").save(tmp_path / "q.png")
    row = dict(image="q.png", _file=str(tmp_path / "t.jsonl"), _line=1)
    spec = DataSpec(latent_tokens=K, image_max_pixels=budget)
    try:
        expected = n_image_tokens(query_pixels(row, image_processor, spec)[1])
    except DataError as e:
        with pytest.raises(DataError, match="aspect ratio"):
            query_tokens(row, image_processor, spec)
        assert "aspect ratio" in str(e)
        return
    assert query_tokens(row, image_processor, spec) == expected


def test_too_long_names_the_pixel_budget_that_fits(world, gap, tmp_path):
    """A sequence over max_len names the --image_max_pixels that would make it fit, and that value does."""
    g, tokenizer, image_processor = gap
    data = copy_world(world, tmp_path, 1)
    Image.new("RGB", (560, 560), "white").save(tmp_path / "img" / "big.png")  # 400 image tokens
    write_jsonl(data, [dict(json.loads(open(data).readline()), image="img/big.png")])

    def example(max_pixels):
        spec = DataSpec(latent_tokens=K, max_len=300, image_max_pixels=max_pixels)
        return GAPDataset(data, tokenizer, image_processor, g.latent_ids, spec, world["cache"])[0]

    with pytest.raises(DataError, match=r"train\.jsonl:1: field 'response': sequence of \d+ tokens exceeds "
                                        r"max_len=300 \(400 of them for the query image\): pass --image_max_pixels "
                                        r"(\d+) or less") as e:
        example(560 * 560)  # the tiny processor's own budget is 16 image tokens; a 7B's is 16,384
    suggested = int(str(e.value).split("--image_max_pixels ")[1].split()[0])
    assert len(example(suggested)["input_ids"]) <= 300


# ----------------------------------------------------------------------------------------------------------
# flags and bad input at the command line: one line, exit code 2

@pytest.mark.parametrize("script,k", [("targets.py", "5"), ("targets.py", "-4"), ("targets.py", "0"), ("train.py", "5")])
def test_latent_tokens_must_be_a_perfect_square(world, tmp_path, script, k):
    args = ["--model", world["model"], "--data", world["data"], "--latent_tokens", k]
    p = run([script, *args, "--cache_dir" if script == "targets.py" else "--target_cache", tmp_path / "c"],
            expect_ok=False, timeout=120)
    one_line_error(p, f"--latent_tokens {k}")
    assert not (tmp_path / "c").exists()


def test_bad_input_is_one_line_and_exit_code_2(world, tmp_path):
    """A missing data file, a missing model directory and a cache of another K end before any work."""
    base = ["--model", world["model"], "--data", world["data"], "--target_cache", world["root"] / "cache"]
    p = run(["train.py", *base[:2], "--data", tmp_path / "nope.jsonl"], expect_ok=False, timeout=120)
    one_line_error(p, "nope.jsonl: data file not found")
    p = run(["train.py", "--model", tmp_path / "no_model", *base[2:]], expect_ok=False, timeout=120)
    one_line_error(p, "no_model")
    p = run(["train.py", *base, "--latent_tokens", "16"], expect_ok=False, timeout=120)
    one_line_error(p, "no latent targets for K=16 (the cache holds K4)")


# ----------------------------------------------------------------------------------------------------------
# every example checked before step 1

def test_bad_examples_are_all_found_before_the_first_step(world, tmp_path):
    """Two bad lines near the end of the data (a missing image, an image too wide for the processor): train.py and
    `train.py --check_only` list both and count them by field before any training step, exit 2; with --skip_bad the
    run trains on the others and reports 2 skipped."""
    data = copy_world(world, tmp_path)
    Image.new("RGB", (2020, 10), "white").save(tmp_path / "img" / "wide.png")
    rows = [json.loads(line) for line in open(data)]
    rows[9]["image"], rows[11]["image"] = "img/missing.png", "img/wide.png"
    write_jsonl(data, rows)
    args = ["--model", world["model"], "--data", data, "--target_cache", world["root"] / "cache",
            "--latent_tokens", str(K), "--max_len", "200"]
    p = run(["train.py", "--check_only", *args], expect_ok=False, timeout=120)
    one_line_error(p, "2 of 12 examples are bad (image: 2)")
    assert "train.jsonl:10: field 'image': image file not found" in p.stdout
    assert "train.jsonl:12: field 'image': absolute aspect ratio" in p.stdout
    train = ["train.py", *args, "--global_batch", "2", "--epochs", "1", "--num_workers", "0", "--out_dir",
             tmp_path / "gap", "--adapter_dim", "8"]
    p = run(train, expect_ok=False, timeout=300)
    one_line_error(p, "2 of 12 examples are bad (image: 2), found before training")
    assert "step 1/" not in p.stdout
    p = run([*train, "--skip_bad"], timeout=300)
    assert "done: 5 steps, 2 bad examples skipped" in p.stdout, p.stdout[-2000:]
    write_jsonl(data, [json.loads(line) for line in open(world["data"])])
    assert "all 12 examples are good" in run(["train.py", "--check_only", *args], timeout=120).stdout


# ----------------------------------------------------------------------------------------------------------
# the target cache knows what it was made from

def test_an_edited_aux_image_is_stale_until_extracted_again(world, gap, tmp_path):
    g, tokenizer, image_processor = gap
    backbone, _, _ = load_backbone(world["model"], "cpu")
    data = copy_world(world, tmp_path, 4)
    cfg = TargetsConfig(data=data, latent_tokens=K, cache_dir=str(tmp_path / "c"))
    extract_targets(cfg, backbone, image_processor)
    rows, _ = read_jsonl(data)
    Image.new("RGB", (56, 56), "black").save(tmp_path / rows[2]["aux_image"])
    ds = GAPDataset(data, tokenizer, image_processor, g.latent_ids, DataSpec(latent_tokens=K),
                    TargetCache(cfg.cache_dir, K))
    with pytest.raises(DataError, match=r"train\.jsonl:3: field 'aux_image': its aux image changed after its "
                                        r"targets were extracted"):
        ds[2]
    ds[1]
    extract_targets(cfg, backbone, image_processor)  # only the edited one is extracted again
    ds.targets = TargetCache(cfg.cache_dir, K)
    fresh = aux_targets(backbone, image_processor, [open_image(rows[2], "aux_image")], K)[0]
    torch.testing.assert_close(ds[2]["latent_targets"], fresh)
    assert len(ds.targets.entries[rows[2]["id"]]) == 2  # the stale entry stays on disk, never used


def test_a_cache_from_another_model_is_refused_with_what_differs(world, tmp_path):
    import tiny
    data = copy_world(world, tmp_path, 2)
    other = tiny.build_tiny(str(tmp_path / "other"), hidden=32, seed=1)
    run(["targets.py", "--model", other, "--data", data, "--latent_tokens", K, "--cache_dir", tmp_path / "c"],
        timeout=120)
    p = run(["targets.py", "--model", world["model"], "--data", data, "--latent_tokens", K, "--cache_dir",
             tmp_path / "c"], expect_ok=False, timeout=120)
    one_line_error(p, "made by another model or with other settings", "vision_tower", "width 32 -> 64")
    p = run(["train.py", "--model", world["model"], "--data", data, "--latent_tokens", K, "--target_cache",
             tmp_path / "c"], expect_ok=False, timeout=120)
    one_line_error(p, "made by another model or with other settings", "width 32 -> 64")


def test_a_deleted_shard_is_extracted_again_and_parallel_writers_never_collide(world, tmp_path):
    """Two targets.py processes on one cache at once (the natural way to parallelize) keep every target; after a
    shard is deleted, a rerun writes what is missing and the cache is whole again."""
    data = copy_world(world, tmp_path)
    lines = open(data).read().splitlines()
    halves = [write_jsonl(tmp_path / "a.jsonl", lines[:6]), write_jsonl(tmp_path / "b.jsonl", lines[6:])]
    cmd = [sys.executable, "targets.py", "--model", world["model"], "--data", data, "--latent_tokens", str(K),
           "--cache_dir", str(tmp_path / "c"), "--shard_size", "2", "--batch_size", "2"]
    procs = [subprocess.Popen([c if c != data else half for c in cmd], cwd=HERE, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for half in halves]
    for p in procs:
        out = p.communicate(timeout=180)[0]
        assert p.returncode == 0, out[-2000:]
    reference = targets_of(world["root"] / "cache")
    got = targets_of(tmp_path / "c")
    assert got.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(got[key], reference[key])
    shards = sorted((tmp_path / "c" / f"K{K}").glob("shard_*.safetensors"))
    os.remove(shards[0])
    out = run(cmd[1:], timeout=180).stdout
    assert "targets: 2 extracted, 10 already cached" in out, out
    assert targets_of(tmp_path / "c").keys() == reference.keys()


def test_extraction_killed_midway_resumes_to_the_uninterrupted_cache(world, tmp_path):
    data = copy_world(world, tmp_path)
    cmd = [sys.executable, "targets.py", "--model", world["model"], "--data", data, "--latent_tokens", str(K),
           "--cache_dir", str(tmp_path / "c"), "--shard_size", "1", "--batch_size", "1"]
    p = subprocess.Popen(cmd, cwd=HERE, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "c" / f"K{K}").glob("shard_*.safetensors")):
        assert p.poll() is None and time.time() < deadline, "extraction ended before it could be killed"
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    partial = len(targets_of(tmp_path / "c"))
    assert 1 <= partial < 12
    out = run(cmd[1:], timeout=180).stdout
    assert f"{12 - partial} extracted, {partial} already cached" in out, out
    reference = targets_of(world["root"] / "cache")
    got = targets_of(tmp_path / "c")
    assert got.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(got[key], reference[key])


def test_extraction_under_torchrun_and_a_failing_rank(world, tmp_path):
    """2 ranks write the 1-process cache; a bad aux image in one rank's share ends every rank with its message."""
    data = copy_world(world, tmp_path)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "targets.py",
              "--model", world["model"], "--latent_tokens", str(K)]
    p = subprocess.run([*launch, "--data", data, "--cache_dir", str(tmp_path / "c")], cwd=HERE, env=ENV,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    reference = targets_of(world["root"] / "cache")
    got = targets_of(tmp_path / "c")
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in reference)
    rows = [json.loads(line) for line in open(data)]
    rows[3]["aux_image"] = "img/missing.png"  # line 4: rank 1's share
    write_jsonl(data, rows)
    t0 = time.time()
    p = subprocess.run([*launch, "--data", data, "--cache_dir", str(tmp_path / "c2")], cwd=HERE, env=ENV,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode != 0 and time.time() - t0 < 200
    assert "rank 1: error: " in p.stderr and "train.jsonl:4: field 'aux_image': image file not found" in p.stderr


# ----------------------------------------------------------------------------------------------------------
# result files know what they were derived from; a kill mid-merge loses nothing

def test_difficulty_results_of_edited_data_are_refused_not_mixed(world, tmp_path):
    data = copy_world(world, tmp_path, 4)
    args = ["difficulty.py", "--model", world["model"], "--data", data, "--out", tmp_path / "s.jsonl",
            "--samples", "2", "--max_new_tokens", "4", "--batch_size", "2"]
    run(args, timeout=180)
    rows = [json.loads(line) for line in open(data)]
    rows[1]["answer"] = "99"
    write_jsonl(data, rows)
    p = run(args, expect_ok=False, timeout=180)
    one_line_error(p, "made with other flags", "data_sha256")


MERGE_KILL = """
import os, signal, sys
import common, difficulty, sharded
real = sharded.atomic_write_text
def torn(path, text, **kw):  # the merge's write of OUT is cut by a kill halfway
    if path.endswith("s.jsonl"):
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text[:len(text) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, text, **kw)
sharded.atomic_write_text = torn  # the merge (sharded.run) writes OUT
common.run_main(difficulty.main, common.parse_config(difficulty.DifficultyConfig, sys.argv[1:]))
"""


def test_difficulty_killed_mid_merge_reruns_to_the_same_output(world, tmp_path):
    data = copy_world(world, tmp_path, 4)
    flags = ["--model", world["model"], "--data", data, "--samples", "2", "--max_new_tokens", "4", "--batch_size", "2"]
    run(["difficulty.py", *flags, "--out", tmp_path / "ref.jsonl"], timeout=180)
    (tmp_path / "kill.py").write_text(MERGE_KILL)
    p = run([tmp_path / "kill.py", *flags, "--out", tmp_path / "s.jsonl"], expect_ok=False, timeout=180)
    assert p.returncode == -signal.SIGKILL and not (tmp_path / "s.jsonl").exists()
    run(["difficulty.py", *flags, "--out", tmp_path / "s.jsonl"], timeout=180)
    assert (tmp_path / "s.jsonl").read_text() == (tmp_path / "ref.jsonl").read_text()


# ----------------------------------------------------------------------------------------------------------
# a saved training state is data, not code

class Payload:
    def __reduce__(self):
        return (open, (os.environ["GAP_PWNED"], "w"))


def test_a_saved_state_cannot_run_code_when_loaded(world, tmp_path, monkeypatch):
    """meta.pt and the RNG files are read with weights_only=True: a pickle that would run code is refused, as a
    training state file that cannot be read (one line naming it)."""
    from checkpoint import load_state
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("GAP_PWNED", str(tmp_path / "pwned"))
    with open(state / "meta.pt", "wb") as f:
        pickle.dump(dict(step=1, config={}, payload=Payload()), f, protocol=2)
    with pytest.raises(DataError, match=r"state/meta\.pt: not a readable training state file \(damaged, truncated or "
                                        r"of another kind: Weights only load failed\)"):
        load_state(str(state), None, None, None, 0, {}, ())
    assert not (tmp_path / "pwned").exists()


def test_long_runs_save_resumable_state_by_default():
    """--save_every's default (-1) saves a run longer than AUTO_SAVE steps every AUTO_SAVE steps; 0 never saves."""
    import train
    assert train.TrainConfig().save_every == -1
    assert train.save_interval(-1, train.AUTO_SAVE + 1) == train.AUTO_SAVE
    assert train.save_interval(-1, train.AUTO_SAVE) == 0 and train.save_interval(0, 10_000) == 0
    assert train.save_interval(7, 10) == 7


def test_difficulty_under_torchrun_a_bad_example_ends_every_rank(world, tmp_path):
    """A missing image in rank 1's share: found by the check before sampling, every rank ends (exit 2), in
    bounded time, with the example named."""
    data = copy_world(world, tmp_path, 4)
    rows = [json.loads(line) for line in open(data)]
    rows[3]["image"] = "img/missing.png"
    write_jsonl(data, rows)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "difficulty.py", "--model", world["model"], "--data", data, "--out", str(tmp_path / "s.jsonl"),
                        "--samples", "2", "--max_new_tokens", "4", "--batch_size", "1"],
                       cwd=HERE, env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode != 0 and time.time() - t0 < 200
    assert "bad example: " in p.stdout and "train.jsonl:4: field 'image': image file not found" in p.stdout
    assert "1 of 4 examples are bad (image: 1), found before scoring" in p.stderr
