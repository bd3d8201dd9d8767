"""Tests of the toy world (toy.py): the generator (seeded, no repeats across splits, files present, GAP response
format) and the whole pipeline at --quick size in a subprocess, so the one-command run does not rot.

    python -m pytest test_toy.py -q
"""
import json
import math
import os
import subprocess
import sys

import pytest

import toy

HERE = os.path.dirname(os.path.abspath(__file__))


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return out, toy.write_world(str(out), 30, 6, 15, seed=3)


def test_world_is_seeded(world, tmp_path):
    out, paths = world
    again = toy.write_world(str(tmp_path), 30, 6, 15, seed=3)
    for split in paths:
        assert _read(paths[split]) == _read(again[split])
        for r in _read(paths[split])[:5]:
            for key in ("image", "aux_image"):
                with open(os.path.join(out, r[key]), "rb") as a, open(os.path.join(tmp_path, r[key]), "rb") as b:
                    assert a.read() == b.read(), f"{split}/{r['id']}: {key} differs between two seeded runs"
    other = toy.write_world(str(tmp_path / "other"), 30, 6, 15, seed=4)
    assert _read(other["train"]) != _read(paths["train"])


def test_world_format(world):
    out, paths = world
    assert toy.check_world(paths) == 30 + 6 + 15  # raises on a repeated (image, question) or a missing file
    fams = set()
    for split, path in paths.items():
        for r in _read(path):
            fams.add(r["family"])
            assert r["response"].count("<latent>") == 1, r["response"]
            assert r["response"].count("<parser>") == 1 and r["response"].count("</parser>") == 1
            assert r["response"].index("<latent>") < r["response"].index("<parser>") < r["response"].index("</parser>")
            assert r["response"].endswith(f"<answer>{r['answer']}</answer>")
            for key in ("image", "aux_image"):
                assert os.path.exists(os.path.join(out, r[key])), f"{split}/{r['id']}: {key} missing"
    assert fams == set(toy.FAMILIES)


def test_world_no_cross_split_repeats(world):
    """Repeats are checked on image pixels + question, independently of check_world's own bookkeeping."""
    from PIL import Image
    out, paths = world
    owner = {}
    for split, path in paths.items():
        for r in _read(path):
            with Image.open(os.path.join(out, r["image"])) as im:
                key = (im.convert("RGB").tobytes(), r["question"])
            assert owner.setdefault(key, split) == split, f"{r['id']} repeats across {owner[key]} and {split}"


def test_check_world_catches_a_repeat(world, tmp_path):
    out, paths = world
    bad = dict(paths)
    bad["val"] = str(os.path.join(out, "val_bad.jsonl"))
    with open(paths["val"]) as f, open(bad["val"], "w") as g:
        g.write(f.read())
        g.write(open(paths["train"]).readline())
    with pytest.raises(ValueError, match="repeats"):
        toy.check_world(bad)


def test_quick_pipeline(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "toy.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(tmp_path / "results.json") as f:
        res = json.load(f)  # strict JSON: no NaN
    n = len(_read(tmp_path / "data" / "test.jsonl"))
    assert res["n_test"] == n == toy.QUICK["n_test"]
    for group in ("accuracy", "stderr"):
        assert set(res[group]) >= {"base", "model", "zero", "noise", "dense_caption", "hidden"}
    for key, acc in res["accuracy"].items():
        assert 0.0 <= acc <= 1.0
        assert math.isclose(res["stderr"][key], math.sqrt(acc * (1 - acc) / n), rel_tol=1e-6, abs_tol=1e-9)
        assert round(acc * n) == pytest.approx(acc * n, abs=1e-6)  # a whole number of correct answers
    assert res["pca"]["k"] >= 1 and 0 < res["pca"]["var"] <= 1 and 0 <= res["pca"]["rel_mse"] <= 1 - res["pca"]["var"] + 1e-6
    assert set(res["norms"]) >= {"vision_embed", "latent_pca", "latent_hidden"}
    assert res["norms"]["vision_embed"] > 0
    assert (tmp_path / "results.png").stat().st_size > 0
