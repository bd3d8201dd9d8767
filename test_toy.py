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
            assert " <latent>" not in r["response"]  # a lone space before the span breaks latent_mode zero (toy.py)
            assert r["response"].count("<parser>") == 1 and r["response"].count("</parser>") == 1
            assert r["response"].index("<latent>") < r["response"].index("<parser>") < r["response"].index("</parser>")
            assert r["response"].endswith(f"<answer>{r['answer']}</answer>")
            for key in ("image", "aux_image"):
                assert os.path.exists(os.path.join(out, r[key])), f"{split}/{r['id']}: {key} missing"
    assert fams == set(toy.FAMILIES)


def _cell_colours(path):
    """{(row, col): colour name} of the non-white cells of a toy image, checking every cell is one flat colour."""
    from PIL import Image
    names = {rgb: name for name, rgb in toy.INK.items()}
    with Image.open(path) as im:
        im = im.convert("RGB")
    cells = {}
    for r in range(im.height // toy.CELL):
        for c in range(im.width // toy.CELL):
            box = im.crop((c * toy.CELL, r * toy.CELL, (c + 1) * toy.CELL, (r + 1) * toy.CELL))
            colours = box.getcolors()
            assert len(colours) == 1, f"{path}: cell {(r, c)} is not one flat colour: {colours}"
            if colours[0][1] != (255, 255, 255):
                cells[(r, c)] = names[colours[0][1]]
    return cells


def test_aux_image_holds_the_answer(world):
    """The auxiliary image makes the evidence explicit: the answer can be read off it (and off the query with
    the question's rule), so a latent that reconstructs it carries what the answer needs."""
    out, paths = world
    for split, path in paths.items():
        for r in _read(path):
            query, aux = _cell_colours(os.path.join(out, r["image"])), _cell_colours(os.path.join(out, r["aux_image"]))
            if r["family"] == "count":
                colour = r["question"].split()[2]
                n = list(query.values()).count(colour)
                assert aux == {divmod(i, 4): colour for i in range(n)} and str(n) == r["answer"]  # lined up
            elif r["family"] == "pattern":
                assert set(aux.values()) == {r["answer"]} and len(aux) == len(query) + 1  # zoomed-in missing cell
                (hole,) = {(i, j) for i in range(4) for j in range(4)} - set(query)
                line = 0 if "row" in r["question"] else 1
                assert {c for p, c in query.items() if p[line] == hole[line]} == {r["answer"]}
            else:
                assert set(aux.values()) == {r["answer"]} and len(aux) == 16  # the neighbour, zoomed in
                (black,) = [p for p, c in query.items() if c == "black"]
                dr, dc = (0, 1) if "right of" in r["question"] else (1, 0)
                assert query[(black[0] + dr, black[1] + dc)] == r["answer"]


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


def test_scale_vision_scales_the_embeddings_exactly(tmp_path):
    import torch
    import tiny
    from model import load_backbone
    from data import process_image
    model_dir = tiny.build_tiny(str(tmp_path / "tiny"), hidden=32, layers=1, texts=["a b c"] * 4)
    image = toy._paint(toy._canvas(56), {(0, 0): "red", (2, 3): "black"})

    def features():
        backbone, _, proc = load_backbone(model_dir, "cpu", torch.float32)
        with torch.no_grad():
            return torch.cat(backbone.model.get_image_features(*process_image(proc, image)).pooler_output)

    before = features()
    toy.scale_vision(model_dir, 40.0)
    torch.testing.assert_close(features(), 40.0 * before, rtol=1e-5, atol=1e-5)


def test_quick_pipeline(tmp_path):
    """toy.py --quick end to end; every number in results.json is recomputed here from the files the stages
    wrote (per-example evaluation results, the scored training data, the PCA basis)."""
    import pca
    from answers import answers_match, extract_answer
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "toy.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(tmp_path / "results.json") as f:
        res = json.load(f)  # strict JSON: no NaN
    test = {r["id"]: r for r in _read(tmp_path / "data" / "test.jsonl")}
    n = len(test)
    assert res["n_test"] == n == toy.QUICK["n_test"]
    ckpt = dict(base="base", model="gap", zero="gap", noise="gap", dense_caption="dense_caption", hidden="hidden")
    mode = dict(model="model", zero="zero", noise="noise")
    for variant in toy.MODES:
        results = _read(tmp_path / "eval" / f"{ckpt[variant]}_{mode.get(variant, 'model')}.jsonl")
        assert sorted(r["id"] for r in results) == sorted(test)
        correct = [answers_match(extract_answer(r["response"]), test[r["id"]]["answer"], test[r["id"]]["question"])
                   for r in results]
        acc = sum(correct) / n
        assert res["accuracy"][variant] == pytest.approx(acc)
        assert res["stderr"][variant] == pytest.approx(math.sqrt(acc * (1 - acc) / n))
        assert res["latent_rate"][variant] == pytest.approx(sum("<latent>" in r["response"] for r in results) / n)
        for family in res["per_family"][variant]:
            mine = [c for r, c in zip(results, correct) if test[r["id"]]["family"] == family]
            assert res["per_family"][variant][family] == pytest.approx(sum(mine) / len(mine))
    for variant in ("base", "zero", "dense_caption"):  # no span can be opened: banned, or never trained
        assert res["latent_rate"][variant] == 0.0
    scored = _read(tmp_path / "data" / "train.scored.jsonl")
    assert res["difficulty"]["n_latent"] == sum(r["accuracy"] <= res["difficulty"]["tau"] for r in scored)
    assert all(len(r["answers"]) == toy.QUICK["samples"] for r in scored)
    basis = pca.load(tmp_path / "cache" / "pca.safetensors")
    lam = basis["eigenvalues"].double()
    assert res["pca"]["k"] == basis["k"] and res["pca"]["rel_mse"] == pytest.approx(
        float(1 - lam[:basis["k"]].sum() / lam.sum()), rel=1e-5)
    assert (tmp_path / "results.png").stat().st_size > 0
