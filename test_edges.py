"""Tests of the files a user hands to the entry points, at their edges: each one missing, a directory, empty,
truncated or of another kind (a PNG where safetensors or JSON is expected), and unreadable -> exit code 2 and one
line naming it, no traceback, nothing written, nothing lost. Then the faults: a full disk during every save (a
file-size limit, RLIMIT_FSIZE, makes the writes fail as ENOSPC would) ends with one line, the previous files
intact, and the next run resumes; gap.json, states and result files of another layout; an out-of-memory error in
a training step; empty data, or --skip_bad with every example bad.

The cases run in this process through common.run_main, the entry points' own wrapper (a DataError: one line,
exit 2); two run end to end as commands.

    python -m pytest -q test_edges.py
"""
import contextlib
import json
import os
import resource
import shutil

import pytest
import torch
from PIL import Image

import pca as pca_lib
from common import DataError, parse_config, run_main
from conftest import K, run, write_jsonl

TRAIN = ["--latent_tokens", str(K), "--global_batch", "4", "--epochs", "1", "--num_workers", "0", "--adapter_dim", "8",
         "--save_every", "1"]


class Stop(Exception):
    """Raised from train.main's on_grads seam: a run that ends after its first saved state."""


@pytest.fixture(scope="module")
def base(world, tmp_path_factory):
    """A directory of everything a user hands in, all good: data and images, the tiny model, the target cache, a PCA
    basis, a finished checkpoint (gap), the saved state of an unfinished run (gap2.state, step 1) and the results
    of a finished difficulty.py run (s.jsonl and its parts). Named relative to it (runs record their paths), so a
    test works in a copy: copy() below."""
    import difficulty
    import train
    root = tmp_path_factory.mktemp("edges")
    shutil.copytree(os.path.dirname(world["data"]), root / "data")
    shutil.copytree(world["model"], root / "tiny")
    shutil.copytree(world["root"] / "cache", root / "cache")
    pca_lib.save(root / "pca.safetensors", world["basis"])
    write_jsonl(root / "data" / "d4.jsonl", open(world["data"]).read().splitlines()[:4])
    steps = []

    def stop_at_step_2(gap):
        steps.append(1)
        if len(steps) == 2:  # after the state of step 1 was saved
            raise Stop

    cwd = os.getcwd()
    os.chdir(root)
    try:
        train.main(train_config("gap"))
        with pytest.raises(Stop):
            train.main(train_config("gap2"), on_grads=stop_at_step_2)
        difficulty.main(difficulty_config())
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def copy(base, tmp_path, monkeypatch):
    """A copy of the base directory, as the working directory."""
    shutil.copytree(base, tmp_path / "b")
    monkeypatch.chdir(tmp_path / "b")
    return tmp_path / "b"


def train_config(out="gap2", *extra):
    import train
    return parse_config(train.TrainConfig, ["--model", "tiny", "--data", "data/train.jsonl", "--target_cache", "cache",
                                            "--out_dir", out, *TRAIN, *map(str, extra)])


def difficulty_config(*extra):
    import difficulty
    return parse_config(difficulty.DifficultyConfig, [
        "--model", "tiny", "--data", "data/d4.jsonl", "--out", "s.jsonl", "--samples", "2", "--max_new_tokens", "4",
        "--batch_size", "2", *map(str, extra)])


def entry(name, *extra):
    """(main, config) of an entry point over the files of the working directory."""
    import infer
    import targets
    import train
    if name == "train":
        return train.main, train_config("gap2", *extra)
    if name == "infer":
        return infer.main, parse_config(infer.InferConfig, ["data/img/q0.png", "How many?", "--ckpt", "gap",
                                                             "--max_new_tokens", "2", *extra])
    if name == "difficulty":
        import difficulty
        return difficulty.main, difficulty_config(*extra)
    return targets.targets_main, parse_config(targets.TargetsConfig, [
        "--model", "tiny", "--data", "data/d4.jsonl", "--latent_tokens", str(K), "--cache_dir", "cache", *extra])


def snapshot(root):
    """Every path under root with its size and modification time: what a run wrote, changed or removed."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.stat(path)
            out[os.path.relpath(path, root)] = (os.path.isdir(path), st.st_size, st.st_mtime_ns)
    return out


def one_line_exit_2(capsys, main, cfg):
    """Run an entry point as its command does (common.run_main): it must end with exit code 2 and one line on
    stderr, no traceback. Returns the line."""
    with pytest.raises(SystemExit) as e:
        run_main(main, cfg)
    err = capsys.readouterr().err
    assert e.value.code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------------------------------------
# every file a user hands in, damaged every way

def png_bytes():
    import io
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "PNG")
    return buf.getvalue()


def damage(path, how):
    """Make the file at `path` missing, a directory, empty, truncated (its first half), a PNG image, a text file, or
    a whole safetensors file of other tensors ("foreign")."""
    from safetensors.torch import save_file
    data = open(path, "rb").read() if os.path.isfile(path) else b""
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if how == "directory":
        os.makedirs(path)
    elif how == "foreign":
        save_file({"weight": torch.zeros(2, 3)}, path)
    elif how != "missing":
        with open(path, "wb") as f:
            f.write({"empty": b"", "truncated": data[:len(data) // 2], "png": png_bytes(),
                     "text": b"not an image\n"}[how])


ALL = ("missing", "directory", "empty", "truncated", "png")
# (entry point, file under the base directory, ways to damage it, what the line names when it does not begin with
# the file: an example's file, line and field, or the directory of the file)
FILES = [
    ("train", "data/train.jsonl", ALL, {"truncated": "field '<json>': malformed JSON"}),
    ("train", "pca.safetensors", ALL + ("foreign",), {}),
    ("train", "tiny", ("missing", "png"), {"missing": "--model tiny: no such directory",
                                          "png": "--model tiny: a file, not a model directory"}),
    ("train", "tiny/model.safetensors", ALL[1:] + ("foreign",), {"foreign": "--model tiny: its weights lack 57 of the "
                                                                            "model's tensors"}),
    ("train", "tiny/config.json", ALL[1:], {}),
    ("train", "gap2.state/meta.pt", ALL, {"missing": "gap2.state: a directory that is not a training state"}),
    ("train", "gap2.state/__0_0.distcp", ALL, {h: "gap2.state: not a readable training state" for h in ALL}),
    ("train", "gap2.state/rng_rank0.pt", ALL[1:], {}),
    ("train", "gap2.state/pca.safetensors", ALL[1:] + ("foreign",), {}),
    ("train", "data/img/q3.png", ("missing", "directory", "empty", "truncated", "text"),
     {h: "the first: data/train.jsonl:4: field 'image': " + {"missing": "image file not found", "directory":
                                                               "a directory, not an image file"}.get(h, "cannot read")
      for h in ALL + ("text",)}),
    ("train", "data/img/a3.png", ("missing", "directory"), {
        "missing": "the first: data/train.jsonl:4: field 'aux_image': image file not found",
        "directory": "the first: data/train.jsonl:4: field 'aux_image': a directory, not an image file"}),
    ("infer", "gap", ("missing", "png"), {}),
    ("infer", "gap/gap.json", ALL, {}),
    ("infer", "gap/latent_head.safetensors", ALL + ("foreign",), {}),
    ("infer", "gap/model.safetensors", ALL + ("foreign",), {"missing": "gap: cannot load",
                                                           "foreign": "gap: its weights lack 57 of the model's tensors"}),
    ("infer", "gap/pca.safetensors", ALL + ("foreign",), {}),
    ("infer", "gap/tokenizer.json", ALL, {"missing": "gap: cannot load"}),
    ("infer", "data/img/q0.png", ("missing", "directory", "empty", "truncated", "text"), {}),
    ("targets", "cache", ("png",), {}),
    ("targets", "cache/K4/cache.json", ALL[1:], {}),
    ("targets", "cache/K4/SHARD", ALL[1:] + ("foreign",), {}),
    ("targets", "data/img/a2.png", ("missing", "directory"), {h: "data/d4.jsonl:3: field 'aux_image': " for h in ALL}),
    ("difficulty", "tiny/preprocessor_config.json", ("truncated",), {}),
    ("difficulty", "s.config.json", ALL[1:], {}),
    ("difficulty", "s.rank0.jsonl", ("directory", "png"), {"png": "s.rank0.jsonl:1: not a result line"}),
    ("difficulty", "s.jsonl", ("directory",), {}),
]
CASES = [(e, f, how, names.get(how)) for e, f, ways, names in FILES for how in ways]


@pytest.mark.parametrize("name,file,how,named", CASES, ids=[f"{e}-{f}-{how}" for e, f, how, _ in CASES])
def test_a_damaged_file_is_one_line_naming_it_and_nothing_is_written(copy, capsys, name, file, how, named):
    """Exit code 2 and one line that begins with the file (or names the example's line and field), no traceback,
    and every file under the directory as it was."""
    if file.endswith("SHARD"):
        file = os.path.join(os.path.dirname(file), next(n for n in os.listdir(os.path.dirname(file))
                                                         if n.startswith("shard_")))
    damage(file, how)
    before = snapshot(copy)
    # --pca_path is read by a run that does not resume (a resumed one uses the saved state's basis); an extraction
    # that stops on a bad example writes no new cache (not even its cache.json)
    main, cfg = entry(name, *(["--pca_path", file, "--fresh"] if file == "pca.safetensors" else
                              ["--cache_dir", "new_cache"] if name == "targets" and file.startswith("data") else []))
    line = one_line_exit_2(capsys, main, cfg)
    assert line.startswith(f"error: {file}: ") if named is None else named in line, line
    assert snapshot(copy) == before, "a run stopped by a bad file wrote, changed or removed a file"


@pytest.mark.parametrize("how,message", [
    ("missing", "x.json: checkpoint's gap.json not found"),
    ("directory", "x.json: a directory, not a checkpoint's gap.json"),
    ("empty", "x.json: empty checkpoint's gap.json"),
    ("list", "x.json: not a checkpoint's gap.json (a JSON list, not an object)"),
    ("truncated", "x.json: not a readable checkpoint's gap.json (damaged, truncated or of another kind: Expecting "
                  "property name enclosed in double quotes: line 1 column 9 (char 8))"),
    ("png", "x.json: not a readable checkpoint's gap.json (damaged, truncated or of another kind: 'utf-8' codec can't "
            "decode byte 0x89 in position 0: invalid start byte)"),
])
def test_the_file_checks_say_what_is_wrong(tmp_path, monkeypatch, how, message):
    """common.user_file / read_json, the checks every entry point reads a user's file through."""
    from common import read_json
    monkeypatch.chdir(tmp_path)
    open("x.json", "w").write('{"a": 1, "b": 2}')
    damage("x.json", "truncated" if how == "list" else how)
    if how == "list":
        open("x.json", "w").write("[1, 2]")
    with pytest.raises(DataError) as e:
        read_json("x.json", "checkpoint's gap.json", "; HINT")
    assert str(e.value) == message + "; HINT"


def test_end_to_end_a_data_directory_and_a_truncated_checkpoint(copy):
    """The issue's first cases as a user runs them: `train.py --data DIR` and `infer.py` on a checkpoint whose
    model.safetensors is cut in half."""
    p = run(["train.py", "--model", copy / "tiny", "--data", copy / "data", "--target_cache", copy / "cache",
             "--out_dir", copy / "gap3", *TRAIN], expect_ok=False, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == f"error: {copy / 'data'}: a directory, not a data file"
    damage("gap/model.safetensors", "truncated")
    p = run(["infer.py", copy / "data/img/q0.png", "How many?", "--ckpt", copy / "gap"], expect_ok=False, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith(
        f"error: {copy / 'gap/model.safetensors'}: not a readable safetensors file (damaged, truncated or of another "
        f"kind: Error while deserializing header"), p.stderr[-2000:]
    assert "the checkpoint is damaged: use another one, or train it again" in p.stderr


@contextlib.contextmanager
def as_nobody():
    """Run the block as user `nobody` (effective uid), so that file permissions apply: root reads a chmod 000 file."""
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.mark.skipif(os.geteuid() != 0, reason="drops root's effective uid (without root, chmod 000 alone would do)")
@pytest.mark.parametrize("file", ["train.jsonl", "img/a0.png", "gap/gap.json", "pca.safetensors"])
def test_an_unreadable_file_is_named(base, file):
    """chmod 000 stops a reader only when it is not root: the reads run as `nobody`, in a directory it may enter
    (pytest's own temporary directories are closed to other users)."""
    import tempfile
    from checkpoint import load_checkpoint, read_basis
    from data import aux_hash, read_jsonl
    root = tempfile.mkdtemp(prefix="gap-perm-")
    try:
        os.chmod(root, 0o755)
        shutil.copytree(base / "gap", os.path.join(root, "gap"))
        shutil.copytree(base / "data/img", os.path.join(root, "img"))
        shutil.copy(base / "data/train.jsonl", root)
        shutil.copy(base / "pca.safetensors", root)
        path = os.path.join(root, file)
        row = read_jsonl(os.path.join(root, "train.jsonl"))[0][0]  # its aux image: img/a0.png
        os.chmod(path, 0)
        load = {"train.jsonl": read_jsonl, "img/a0.png": lambda p: aux_hash(row),
                "gap/gap.json": lambda p: load_checkpoint(os.path.dirname(p)), "pca.safetensors": read_basis}[file]
        with as_nobody(), pytest.raises(DataError) as e:
            load(path)
        where = f"{root}/train.jsonl:1: field 'aux_image': cannot read image {path}" if file == "img/a0.png" else \
            f"{path}: cannot read this "
        assert str(e.value).startswith(where) and "Permission denied" in str(e.value), e.value
    finally:
        shutil.rmtree(root)


def test_the_other_entry_points_name_their_files(copy, capsys):
    """pca.py (copies out alone: its own one line), align.py's encoder directory and feature cache, and a
    difficulty.py --out under a file."""
    import align
    import difficulty
    os.makedirs("targets")
    damage(shutil.copy("pca.safetensors", "targets/t.safetensors"), "truncated")
    with pytest.raises(SystemExit) as e:
        pca_lib.main(pca_lib.Config(targets="targets"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("pca.py: error: targets/t.safetensors: not a readable safetensors "
                                                "file (Error while deserializing header") and err.count("\n") == 1, err
    shutil.copytree("tiny", "enc")
    damage("enc/config.json", "truncated")
    with pytest.raises(DataError, match=r"^enc/config\.json: not a readable JSON file \(damaged, truncated"):
        align.load_encoder("enc")
    os.makedirs("feats/enc")
    open("feats/enc/encoder.json", "w").write('{"encoder": ')
    with pytest.raises(DataError, match=r"^feats/enc/encoder\.json: not a readable feature cache's encoder\.json"):
        align.open_caches("feats", ["enc"], K)
    line = one_line_exit_2(capsys, difficulty.main, difficulty_config("--out", "data/d4.jsonl/s.jsonl"))
    assert line == "error: data/d4.jsonl: a file, not a directory to write s.jsonl in"


def test_one_image_errors_name_the_flag_that_fixes_them(copy, capsys):
    """infer.py on one image: a checkpoint directory that is missing or not a checkpoint names --ckpt (the
    default out/gap is what a new user hits first), and an image too large for --max_len names the pixel flag,
    never --skip_bad (one image has nothing to skip)."""
    import infer
    for ckpt in ("out/gap", "data"):
        line = one_line_exit_2(capsys, infer.main, parse_config(infer.InferConfig, ["data/img/q0.png", "Q", "--ckpt", ckpt]))
        assert "pass --ckpt the directory train.py wrote" in line, line
    line = one_line_exit_2(capsys, *entry("infer", "--max_len", "28"))
    assert "exceeds max_len=28" in line and "--image_max_pixels" in line and "--skip_bad" not in line, line


# ----------------------------------------------------------------------------------------------------------
# runs that stop on bad input delete nothing; nothing to train on is said as such

def test_a_run_stopped_by_bad_input_deletes_no_state_and_no_directory(copy, capsys):
    """--fresh with a bad --data keeps the saved state (it is discarded only once the data and model are good); an
    --out_dir or --state_dir that is not ours (training would replace it) is refused before any work."""
    import train
    before = snapshot(copy)
    line = one_line_exit_2(capsys, train.main, train_config("gap2", "--fresh", "--data", "missing.jsonl"))
    assert "missing.jsonl: data file not found" in line
    for flag, path in (("--out_dir", "data"), ("--state_dir", "cache"), ("--out_dir", "pca.safetensors")):
        line = one_line_exit_2(capsys, train.main, train_config("gap2", flag, path))
        assert f"{flag} {path}: a " in line and f"training would replace it; give another {flag}" in line, line
    assert snapshot(copy) == before


@pytest.mark.parametrize("case", ["empty", "blank_lines", "all_bad_skipped"])
def test_no_example_to_train_on_is_said_before_the_basis(copy, capsys, case):
    import train
    data = "data/train.jsonl"
    rows = [json.loads(line) for line in open(data)]
    if case == "empty":
        open(data, "w").close()
    elif case == "blank_lines":
        open(data, "w").write("\n  \n")
    else:
        write_jsonl(data, [dict(r, image="img/gone.png") for r in rows])
    line = one_line_exit_2(capsys, train.main, train_config("gap2", "--fresh", *(["--skip_bad"] * (case != "empty"))))
    assert {"empty": f"{data}: empty data file", "blank_lines": f"{data}: no examples: the file holds only blank lines",
            "all_bad_skipped": f"{data}: nothing to train on, --skip_bad skipped every example: 12 of 12 examples are "
                               f"bad (image: 12), found before training; the first: {data}:1: field 'image': image "
                               f"file not found"}[case] in line, line


# ----------------------------------------------------------------------------------------------------------
# a full disk during every save: one line, the previous files intact, the next run resumes

@contextlib.contextmanager
def file_size_limit(n_bytes):
    """Writes past n_bytes in any file fail with EFBIG (Python ignores SIGXFSZ), as a full disk fails them with
    ENOSPC: the same short writes and errors, in the writers of torch, safetensors and Python."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def head_of(ckpt):
    from safetensors.torch import load_file
    return load_file(os.path.join(ckpt, "latent_head.safetensors"))


@pytest.mark.parametrize("save", ["state", "checkpoint"])
def test_a_full_disk_during_a_save_keeps_what_was_saved_and_the_next_run_resumes(copy, capsys, save):
    """The disk fills during the state save of step 2, or the checkpoint export after the last step (3): one line,
    the state of the step before and the checkpoint already in --out_dir are intact, no DIR.tmp is left; the same
    command again resumes and ends with the uninterrupted run's checkpoint."""
    import train
    from checkpoint import load_checkpoint, state_meta
    shutil.rmtree("gap2.state")
    shutil.copytree("gap", "gap2")  # the checkpoint of an earlier run at --out_dir
    steps, limit = [], contextlib.ExitStack()
    full_at = {"state": 2, "checkpoint": 3}[save]

    def fill_disk(gap):
        steps.append(1)
        if len(steps) == full_at:
            limit.enter_context(file_size_limit(64 << 10))  # the model's shards are 900 KB

    before = snapshot("gap2")
    try:
        with pytest.raises(SystemExit) as e:
            run_main(lambda cfg: train.main(cfg, on_grads=fill_disk), train_config("gap2"))
    finally:
        limit.close()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err[-3000:]
    where = "gap2.state" if save == "state" else "gap2"
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {where}: cannot write it (") and "file-size limit" in line, err[-2000:]
    assert "free space and run the same command again, it resumes from that state" in err
    assert not os.path.exists(f"{where}.tmp") and snapshot("gap2") == before
    assert state_meta("gap2.state", {}, ())["step"] == full_at - 1
    load_checkpoint("gap2", "cpu")
    capsys.readouterr()
    run_main(train.main, train_config("gap2"))
    assert f"resumed from gap2.state at step {full_at - 1}" in capsys.readouterr().out
    for name, t in head_of("gap").items():
        torch.testing.assert_close(head_of("gap2")[name], t, rtol=0, atol=0)


def test_a_full_disk_during_extraction_keeps_the_cache_and_a_rerun_extracts_the_rest(copy, capsys):
    from model import load_backbone
    from targets import TargetCache, TargetsConfig, extract_targets
    backbone, _, image_processor = load_backbone("tiny", "cpu")
    cfg = TargetsConfig(data="data/d4.jsonl", latent_tokens=K, cache_dir="c", shard_size=100)
    extract_targets(cfg, backbone, image_processor)  # 4 targets cached
    cfg.data = "data/train.jsonl"
    with file_size_limit(2 << 10), pytest.raises(DataError) as e:  # the shard of the 8 others is 8 KB
        extract_targets(cfg, backbone, image_processor)
    assert str(e.value).startswith("c/K4/shard_") and "cannot write it (file too large for this process's file-size " \
                                                      "limit" in str(e.value), e.value
    assert "the targets written before are kept in c/K4: free space and run targets.py again" in str(e.value)
    assert not [n for n in os.listdir("c/K4") if ".tmp" in n]
    assert len(TargetCache("c", K).entries) == 4
    capsys.readouterr()
    extract_targets(cfg, backbone, image_processor)
    assert "8 extracted, 4 already cached" in capsys.readouterr().out
    assert len(TargetCache("c", K).entries) == 12


def test_a_full_disk_during_results_keeps_every_finished_line_and_the_merged_output(copy):
    """difficulty.py (infer.py --data runs the same sharded.run): the disk fills while a part file is appended to,
    then while the merged output is written. Each time one line; the finished lines and the previous output stay;
    the same command again gives the uninterrupted run's output byte for byte."""
    import difficulty
    reference = open("s.jsonl", "rb").read()
    for name in ("s.jsonl", "s.rank0.jsonl", "s.config.json", "s.summary.json"):
        os.remove(name)
    first = len(reference.splitlines(keepends=True)[0])
    with file_size_limit(first + 20), pytest.raises(DataError) as e:  # the second result line does not fit
        difficulty.main(difficulty_config())
    assert str(e.value).startswith("s.rank0.jsonl: cannot write it (file too large") and "it resumes" in str(e.value)
    assert open("s.rank0.jsonl", "rb").read()[:first] == reference[:first] and not os.path.exists("s.jsonl")
    difficulty.main(difficulty_config())
    assert open("s.jsonl", "rb").read() == reference
    before = snapshot(copy)
    with file_size_limit(len(reference) - 1), pytest.raises(DataError) as e:  # the merge (every part is whole)
        difficulty.main(difficulty_config())
    assert str(e.value).startswith("s.jsonl: cannot write it (file too large"), e.value
    assert "is as it was, and every result is kept in the part files" in str(e.value)
    assert snapshot(copy) == before  # the output as it was, no temporary file left
    difficulty.main(difficulty_config())
    assert open("s.jsonl", "rb").read() == reference


# ----------------------------------------------------------------------------------------------------------
# another version's files: accepted when compatible, else refused with what differs

def edit_json(path, **changes):
    config = dict(json.load(open(path)), **changes)
    json.dump({k: v for k, v in config.items() if v is not None}, open(path, "w"))


@pytest.mark.parametrize("case,changes,refused", [
    ("layout_1", dict(layout=None, head_config=None), None),
    ("layout_3", dict(layout=3), "gap.json layout 3, but this version of GAP reads layouts 1 to 2: load it with the "
                                 "version that wrote it"),
    ("layout_1_without_ids", dict(layout=None, head_config=None, latent_token_ids=None),
     "a layout-1 gap.json without 'latent_token_ids'; the checkpoint is damaged"),
    ("other_ids", dict(latent_token_ids=dict(start=1, pad=2, end=3)), "latent_token_ids {'start': 1, 'pad': 2, 'end': "
                                                                       "3} != the tokenizer's"),
])
def test_a_checkpoint_of_another_layout_loads_when_compatible(copy, case, changes, refused):
    """gap.json records its layout; layout 1 (no "layout", no "head_config") still loads, with the same head."""
    from checkpoint import load_checkpoint
    edit_json("gap/gap.json", **changes)
    if refused:
        with pytest.raises(DataError) as e:
            load_checkpoint("gap", "cpu")
        assert str(e.value).startswith("gap/gap.json: ") and refused in str(e.value), e.value
        return
    gap = load_checkpoint("gap", "cpu")[0]
    for name, t in head_of("gap").items():
        torch.testing.assert_close(gap.head.state_dict()[name], t, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["layout_1", "layout_3", "without_a_flag"])
def test_a_state_of_another_layout_resumes_when_compatible(copy, capsys, case):
    import train
    meta = torch.load("gap2.state/meta.pt", weights_only=True)
    if case == "layout_1":
        del meta["layout"]
    elif case == "layout_3":
        meta["layout"] = 3
    else:
        del meta["config"]["align_text"]
    torch.save(meta, "gap2.state/meta.pt")
    if case == "layout_1":
        run_main(train.main, train_config())
        assert "resumed from gap2.state at step 1" in capsys.readouterr().out
        return
    line = one_line_exit_2(capsys, train.main, train_config())
    assert {"layout_3": "state layout 3, but this version of GAP reads layouts 1 to 2",
            "without_a_flag": "was saved by a version of GAP without the flags --align_text"}[case] in line, line


def test_results_of_another_version_are_refused_with_what_differs(copy, capsys):
    """A results config.json with a key this version does not write (or without one it writes) is named."""
    import difficulty
    edit_json("s.config.json", sampler="v0", seed=None)
    line = one_line_exit_2(capsys, difficulty.main, difficulty_config())
    assert "made with other flags, data or checkpoint (was, now): {'sampler': ('v0', None), 'seed': (None, 0)}" in line


# ----------------------------------------------------------------------------------------------------------
# out of memory in a training step

def test_out_of_memory_in_a_step_names_the_knobs(copy, capsys, monkeypatch):
    """A CUDA out-of-memory error in the first step (raised through train.train_step here: this machine has no GPU)
    is one line naming --micro_batch, --max_len and --image_max_pixels; nothing is saved."""
    import train

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train_step", no_memory)
    shutil.rmtree("gap2.state")
    line = one_line_exit_2(capsys, train.main, train_config("gap2", "--max_len", "300"))
    assert line.startswith("error: out of memory in step 1 (CUDA out of memory. Tried to allocate 2.00 GiB); its "
                           "longest row is "), line
    assert "lower --micro_batch 1, --max_len 300 or --image_max_pixels (the processor default)" in line, line
    assert not os.path.exists("gap2") and not os.path.exists("gap2.state")
