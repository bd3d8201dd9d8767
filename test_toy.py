"""Tests of the toy world (toy.py) and its statistics (stats.py): the generator (seeded, no repeats across splits,
files present, GAP response format), the invariants that make its controls mean something (the aux image is
evidence that varies within an answer class, the parser text never states the answer, the 7B norm regime is
set and keeps every logit), and the whole --quick --full grid in a subprocess with every number of
results.json recomputed from the files the stages wrote.

    python -m pytest -q test_toy.py
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

import stats
import toy
import toy_report
import toy_world

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = dict(pretrain=12, train=240, val=6, test=15, test_seen=8)


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return out, toy_world.write_world(str(out), SIZES, seed=3)[0]


def test_world_is_seeded(world, tmp_path):
    out, paths = world
    again = toy_world.write_world(str(tmp_path), SIZES, seed=3)[0]
    for split in paths:
        assert _read(paths[split]) == _read(again[split])
        for r in _read(paths[split])[:5]:
            for key in ("image", "aux_image"):
                with open(os.path.join(out, r[key]), "rb") as a, open(os.path.join(tmp_path, r[key]), "rb") as b:
                    assert a.read() == b.read(), f"{split}/{r['id']}: {key} differs between two seeded runs"
    other = toy_world.write_world(str(tmp_path / "other"), SIZES, seed=4)[0]
    assert _read(other["train"]) != _read(paths["train"])


def test_world_format(world):
    out, paths = world
    assert toy_world.check_world(paths) == sum(SIZES.values())  # raises on a repeated (image, question) or missing file
    fams = set()
    for split, path in paths.items():
        for r in _read(path):
            fams.add(r["family"])
            if split == "pretrain":  # the base answers directly
                assert r["response"] == f"<answer>{r['answer']}</answer>"
                continue
            assert r["response"].count("<latent>") == 1, r["response"]
            assert " <latent>" not in r["response"]  # a lone space before the span breaks latent_mode zero (toy.py)
            assert r["response"].index("<latent>") < r["response"].index("<parser>") < r["response"].index("</parser>")
            assert r["response"].endswith(f"<answer>{r['answer']}</answer>")
    assert fams == set(toy_world.FAMILIES)


def _cells(path, grid, rgb=False):
    """{(row, col): colour name} (rgb: its RGB) of the non-white cells of a toy image split into grid x grid cells,
    checking every cell is one flat colour, a shade of a colour of the world."""
    from PIL import Image
    names = toy_world.NAME_OF
    with Image.open(path) as im:
        im = im.convert("RGB")
    cell = im.width // grid
    cells = {}
    for r in range(im.height // cell):
        for c in range(im.width // cell):
            colours = im.crop((c * cell, r * cell, (c + 1) * cell, (r + 1) * cell)).getcolors()
            assert len(colours) == 1, f"{path}: cell {(r, c)} is not one flat colour: {colours}"
            if colours[0][1] != (255, 255, 255):
                cells[(r, c)] = colours[0][1] if rgb else names[colours[0][1]]
    return cells


def test_aux_image_is_the_evidence(world):
    """The aux image shows what the answer needs, read back from its pixels (shades included): the two tallies
    (compare, total), the commonest colour's cells (majority), each in the query's raster order, or the black
    cell's 2 x 2 block (neighbor) of the query image; the answer follows from it by the question's rule."""
    out, paths = world
    name = toy_world.NAME_OF
    for split, path in paths.items():
        for r in _read(path):
            query = _cells(os.path.join(out, r["image"]), 4, rgb=True)
            names = [name[c] for c in query.values()]

            def shades_of(colour):  # the RGBs of a colour's query cells in raster order
                return [c for p, c in sorted(query.items()) if name[c] == colour]
            if r["family"] in ("compare", "total"):
                a, b = re.search(r"(?:more|many) (\w+) (?:cells than|and) (\w+) cells", r["question"]).groups()
                aux = _cells(os.path.join(out, r["aux_image"]), 4, rgb=True)
                na, nb = names.count(a), names.count(b)
                assert aux == ({(0, i): c for i, c in enumerate(shades_of(a))}
                               | {(2, i): c for i, c in enumerate(shades_of(b))})
                assert r["answer"] == (("yes" if na > nb else "no") if r["family"] == "compare" else str(na + nb))
            elif r["family"] == "majority":
                aux = _cells(os.path.join(out, r["aux_image"]), 4, rgb=True)
                top = max(set(names), key=names.count)
                assert names.count(top) > max(names.count(c) for c in set(names) - {top})  # one commonest colour
                assert aux == {(i // 4, i % 4): c for i, c in enumerate(shades_of(top))} and r["answer"] == top
            else:
                aux = _cells(os.path.join(out, r["aux_image"]), 2, rgb=True)
                (black,) = [p for p, c in query.items() if c == (0, 0, 0)]
                block = {(i, j): query[(black[0] + i, black[1] + j)] for i in (0, 1) for j in (0, 1)
                         if (black[0] + i, black[1] + j) in query}
                assert aux == block
                assert r["answer"] == name[aux[(0, 1) if "right of" in r["question"] else (1, 0)]]


def test_aux_images_vary_within_an_answer_class(world):
    """No aux image is a code for its answer: every answer class of every family has several distinct aux images
    (counted here from the image bytes, and as world_stats reports it)."""
    out, paths = world
    by = {}
    for r in _read(paths["train"]):
        with open(os.path.join(out, r["aux_image"]), "rb") as f:
            by.setdefault((r["family"], r["answer"]), set()).add(f.read())
    assert {f for f, _ in by} == set(toy_world.FAMILIES)
    assert min(len(v) for v in by.values()) >= 2, {k: len(v) for k, v in by.items()}
    reported = toy_world.world_stats(paths["train"])
    for fam in toy_world.FAMILIES:
        mine = [len(v) for (f, _), v in by.items() if f == fam]
        assert reported[fam]["min_aux_per_answer"] == min(mine) and reported[fam]["answers"] == len(mine)


def test_seen_and_unseen_evidence(world, tmp_path, monkeypatch):
    """test holds only aux images the train split never showed, test_seen only aux images it showed (each a train
    example's evidence of the same family, under a query image no split has); a plain draw (val) is mostly new
    evidence, and write_world reports the share that a plain draw sees, as shared_aux counts it."""
    out, paths = world
    train = {}
    for r in _read(paths["train"]):
        with open(os.path.join(out, r["aux_image"]), "rb") as f:
            train.setdefault(f.read(), set()).add(r["family"])
    for split, want in (("test", False), ("test_seen", True)):
        for r in _read(paths[split]):
            with open(os.path.join(out, r["aux_image"]), "rb") as f:
                fams = train.get(f.read())
            assert (fams is not None) == want, (split, r["id"])
            assert not want or r["family"] in fams
    assert toy_world.shared_aux(paths["test"], paths["train"]) == 0
    assert toy_world.shared_aux(paths["test_seen"], paths["train"]) == 1
    # one shade: the compare family has 240 aux images, so plain draws repeat train's evidence often
    monkeypatch.setattr(toy_world, "SHADES", 1)
    small, drawn = toy_world.write_world(str(tmp_path), dict(train=120, val=40, test=20), seed=5, families=("compare",))
    assert drawn["val"] == toy_world.shared_aux(small["val"], small["train"]) > 0.2
    assert drawn["test"] > 0.2 and toy_world.shared_aux(small["test"], small["train"]) == 0


def test_parser_text_never_states_the_answer(world):
    out, paths = world
    for split in ("train", "val", "test"):
        for r in _read(paths[split]):
            words = re.findall(r"\w+", toy_world.parser_text(r["response"]).lower())
            assert r["answer"].lower() not in words, (r["id"], toy_world.parser_text(r["response"]))


def test_norm_regime_is_set_and_keeps_the_logits(world, tmp_path):
    """set_norm_regime puts the final state at 8.6x the vision-embedding norm (within 20% on prompts it was not
    set on) and leaves every logit as it was."""
    import torch
    import tiny
    from data import read_jsonl
    from model import load_backbone
    out, paths = world
    model_dir = tiny.build_tiny(str(tmp_path / "tiny"), hidden=64, layers=2, texts=toy_world.corpus(paths))
    toy.scale_vision(model_dir, 40.0)
    rows = read_jsonl(paths["train"])[0]

    def logits():
        backbone, tok, ip = load_backbone(model_dir, "cpu", torch.float32)
        b = toy.prompt_batch(tok, ip, rows[:6])
        with torch.no_grad():
            return backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"]).logits

    before = logits()
    ratio, c = toy.set_norm_regime(model_dir, rows[:16], 8.6)
    assert c > 2 and toy.norm_profile(model_dir, rows[:16])["ratio"] == pytest.approx(8.6, rel=1e-3)
    assert abs(toy.norm_profile(model_dir, rows[100:132])["ratio"] / 8.6 - 1) < 0.2
    torch.testing.assert_close(logits(), before, rtol=1e-4, atol=1e-4)


def test_stats():
    assert stats.mcnemar([1] * 10 + [0] * 2 + [1] * 5, [0] * 10 + [1] * 2 + [1] * 5) == (10, 2, 79 / 2048)
    assert stats.mcnemar([1, 0], [1, 0]) == (0, 0, 1.0)
    a, b = [1] * 60 + [0] * 40, [1] * 45 + [0] * 55
    boot = stats.paired_bootstrap([a], [b], n_boot=2000)
    assert boot["diff"] == pytest.approx(0.15) and boot["lo"] < 0.15 < boot["hi"] and boot["p"] < 0.01
    assert stats.paired_bootstrap([a], [a], n_boot=200)["p"] == 1.0
    assert stats.paired_bootstrap([[1, 0] * 50], [[0, 1] * 50], n_boot=2000)["p"] > 0.5  # same accuracy, unpaired items
    # two items, differences 1 and 0: a resample's mean is 0, 1/2 or 1 with chances 1/4, 1/2, 1/4 -> p = 2 * 1/4
    two = stats.paired_bootstrap([[1, 1]], [[0, 1]], n_boot=20000)
    assert (two["lo"], two["hi"]) == (0.0, 1.0) and two["p"] == pytest.approx(0.5, abs=0.02)
    # two runs (seeds) that disagree, every item alike within a run: only resampling the runs shows the spread
    # (both runs drawn: mean 1/2; run 0 twice: 1; run 1 twice: 0, chance 1/4 -> p = 1/2); items alone would give
    # a point interval at 1/2 and p = 1 / n_boot
    runs = stats.paired_bootstrap([[1] * 50, [0] * 50], [[0] * 50, [0] * 50], n_boot=20000)
    assert runs["diff"] == 0.5 and (runs["lo"], runs["hi"]) == (0.0, 1.0) and runs["p"] == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="runs"):
        stats.paired_bootstrap([a], [b[:-1]])
    assert stats.mean_sd([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))


def test_quick_full_grid(tmp_path):
    """toy.py --quick --full end to end; the numbers of results.json are recomputed here from the per-example
    evaluation files of both test splits (unseen and seen evidence), the scored training data and the validation
    runs."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "toy.py"), "--quick", "--full", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(tmp_path / "results.json") as f:
        res = json.load(f)  # strict JSON: no NaN
    seeds = res["seeds"]
    assert seeds == [0, 1] and res["eval_splits"] == ["test", "test_seen"]
    # tau: the best GAP of the first seed on the validation split
    val = {t: _read(tmp_path / "eval" / f"val_tau{t}.jsonl") for t in toy.floats(toy.QUICK["taus"])}
    assert res["selection_on_val"] == {str(t): pytest.approx(sum(r["correct"] for r in v) / toy.QUICK["n_val"])
                                       for t, v in val.items()}
    assert res["selection_on_val_per_family"] == {str(t): toy_report.summarize(v)["per_family"] for t, v in val.items()}
    assert res["tau"] == max(val, key=lambda t: res["selection_on_val"][str(t)])
    tau = res["tau"]
    files = {"base": "base", "dense caption": "dense_s{s}", "GAP": f"pca_K4_tau{tau}_s{{s}}",
             "GAP zero": f"pca_K4_tau{tau}_s{{s}}_zero", "GAP noise": f"pca_K4_tau{tau}_s{{s}}_noise",
             "GAP shuffled": f"pca_K4_tau{tau}_s{{s}}_shuffled",
             "GAP oracle": f"pca_K4_tau{tau}_s{{s}}_oracle", "hidden": f"hidden_K4_tau{tau}_s{{s}}",
             "hidden + EMA": f"hidden_K4_tau{tau}_s{{s}}_ema", "full head": f"full_K4_tau{tau}_s{{s}}",
             "GAP no DA": "pca_K4_tau1.0_s{s}", "GAP K=1": f"pca_K1_tau{tau}_s{{s}}"}
    for split, size in (("test", "n_test"), ("test_seen", "n_test_seen")):
        test = {r["id"]: r for r in _read(tmp_path / "data" / f"{split}.jsonl")}
        got = res["splits"][split]
        assert got["n"] == len(test) == toy.QUICK[size]
        per_item = {}
        for label, name in files.items():
            v = got["variants"][label]
            for s in seeds:
                results = _read(tmp_path / "eval" / split / (name.format(s=s) + ".jsonl"))
                assert sorted(r["id"] for r in results) == sorted(test)
                per_item[label, s] = sorted(results, key=lambda r: r["id"])
                if label != "base":
                    assert v["seeds"][str(s)] == pytest.approx(sum(r["correct"] for r in results) / len(test))
                if label in ("base", "dense caption", "GAP zero"):  # no span can be opened: never trained, or banned
                    assert not any("<latent>" in r["response"] for r in results)
                if label == "GAP shuffled":  # donor and placebo: two other rows of the row's evidence pool
                    assert all(toy.evidence_pool(test[r["donor"]]) == toy.evidence_pool(test[r["placebo"]])
                               == toy.evidence_pool(r) and len({r["id"], r["donor"], r["placebo"]}) == 3
                               for r in results if "donor" in r)
            accs = [sum(r["correct"] for r in per_item[label, s]) / len(test) for s in seeds]
            assert (v["mean"], v["sd"]) == pytest.approx(stats.mean_sd(accs))
        assert {c.get("family") for c in got["comparisons"]} == {None, *toy_world.FAMILIES}
        for c in got["comparisons"]:
            def correct(label, s):
                rows = per_item[label, s if label != "base" else seeds[0]]
                return [r["correct"] for r in rows if c.get("family") in (None, r["family"])]
            for m in c["mcnemar"]:
                a, b = correct(c["a"], m["seed"]), correct(c["b"], m["seed"])
                assert (m["n10"], m["n01"]) == (sum(x and not y for x, y in zip(a, b)),
                                                sum(y and not x for x, y in zip(a, b)))
            diff = sum(sum(correct(c["a"], s)) - sum(correct(c["b"], s)) for s in seeds) / len(seeds)
            assert c["diff"] == pytest.approx(diff / len(correct(c["a"], seeds[0])))
    scored = _read(tmp_path / "data" / "train.scored.jsonl")
    for t, n in res["difficulty"]["kept_latent"].items():
        assert n == sum(r["accuracy"] <= float(t) for r in scored)
    for fam, d in res["difficulty"]["per_family"].items():
        mine = [r for r in scored if r["family"] == fam]
        assert d["n"] == len(mine) and d["base_accuracy"] == pytest.approx(sum(r["accuracy"] for r in mine) / len(mine))
        assert d["kept_latent"] == {t: sum(r["accuracy"] <= float(t) for r in mine) for t in d["kept_latent"]}
    assert all(len(r["answers"]) == toy.QUICK["samples"] for r in scored)
    assert abs(res["norms"]["ratio"] / 8.6 - 1) < 0.2  # the 7B regime, measured on validation prompts
    # one aux image gives one target at every K, and distinct aux images distinct targets (one patch per cell at K=4)
    aux = set()
    for r in _read(tmp_path / "data" / "train.jsonl"):
        with open(tmp_path / "data" / r["aux_image"], "rb") as f:
            aux.add(f.read())
    assert res["world"]["train_targets"] == {"1": len(aux), "4": len(aux)}
    for split in ("val", "test", "test_seen"):
        seen = []
        for r in _read(tmp_path / "data" / f"{split}.jsonl"):
            with open(tmp_path / "data" / r["aux_image"], "rb") as f:
                seen.append(f.read() in aux)
        assert res["world"]["aux_in_train"][split] == pytest.approx(sum(seen) / len(seen))
    assert res["world"]["aux_in_train"]["test"] == 0 and res["world"]["aux_in_train"]["test_seen"] == 1
    assert res["code"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", res["code"])  # what made the numbers
    for name in ("results.png", "norms.png", "results.md"):
        assert (tmp_path / name).stat().st_size > 0
    _resume(tmp_path, res, tau, env)


def _resume(out, res, tau, env):
    """--resume after an interruption: the finished stages are kept (one removed checkpoint retrained, nothing
    else), a checkpoint that changed under its name is evaluated again (not its stale answers reused), and the
    numbers are the uninterrupted run's; other settings are refused."""
    answers = {p: p.read_text() for p in (out / "eval").rglob("*.jsonl")}
    shutil.rmtree(out / "ckpt" / "dense_s1")  # killed before this stage ended (its state was not saved yet)
    (out / "results.json").unlink()
    gap1, hid1 = out / "ckpt" / f"pca_K4_tau{tau}_s1", out / "ckpt" / f"hidden_K4_tau{tau}_s1"
    shutil.rmtree(gap1)
    shutil.copytree(hid1, gap1)  # another model under GAP's name (one that answers otherwise): made again
    cmd = [sys.executable, os.path.join(HERE, "toy.py"), "--quick", "--full", "--out", str(out), "--resume"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert re.findall(r"^== train (\S+):", proc.stdout, re.M) == ["dense_s1"]
    again = json.loads((out / "results.json").read_text())
    for path, text in answers.items():
        if not path.name.startswith(gap1.name):
            assert path.read_text() == text, path  # reused, or made again alike (dense_s1: retrained alike)
    for split in ("test", "test_seen"):
        gap, hid = [_read(out / "eval" / split / f"{n.name}.jsonl") for n in (gap1, hid1)]
        assert [r["response"] for r in gap] == [r["response"] for r in hid]
        variants, before = again["splits"][split]["variants"], res["splits"][split]["variants"]
        assert variants["GAP"]["seeds"]["1"] == before["hidden"]["seeds"]["1"]
        assert variants["dense caption"] == before["dense caption"] and variants["hidden"] == before["hidden"]
    fixed = [k for k in res["norms"] if k != "fed_back"]  # fed_back: GAP seed 1's latents are another model's now
    assert [again["norms"][k] for k in fixed] == [res["norms"][k] for k in fixed]  # not rescaled twice
    assert again["difficulty"] == res["difficulty"]
    assert again["selection_on_val"] == res["selection_on_val"] and again["world"] == res["world"]
    proc = subprocess.run(cmd + ["--pca_var", "0.9"], capture_output=True, text=True, timeout=600, env=env, cwd=HERE)
    assert proc.returncode != 0 and "settings.pca_var" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]


def test_summaries_and_paired_comparisons():
    """summarize / compare / follows on hand-made evaluation results (the --quick models answer nothing
    right, so the grid test alone could not tell a and b apart)."""
    def res(correct, fam="total"):
        return [dict(id=f"x{i}", family=fam if i % 2 else "compare", answer=str(i), pred=str(i) if c else "9",
                     correct=bool(c), latent=i < 2, answered=True) for i, c in enumerate(correct)]

    a = {0: res([1, 1, 1, 0, 1, 0]), 1: res([1, 1, 0, 0, 1, 1])}
    b = {0: res([0, 1, 0, 0, 1, 1]), 1: res([0, 0, 0, 1, 1, 1])}
    s = toy_report.summarize(a[0])
    assert s["accuracy"] == pytest.approx(4 / 6) and s["latent_rate"] == pytest.approx(2 / 6)
    assert s["per_family"] == {"compare": pytest.approx(1.0), "total": pytest.approx(1 / 3)}
    c = toy_report.compare({"A": a, "B": b, "base": {"all": res([0] * 6)}}, "A", "B", [0, 1])
    assert [(m["n10"], m["n01"]) for m in c["mcnemar"]] == [(2, 1), (2, 1)]
    assert c["diff"] == pytest.approx((4 - 3 + 4 - 3) / 2 / 6)
    against_base = toy_report.compare({"A": a, "base": {"all": res([1] * 6)}}, "A", "base", [0, 1])
    assert against_base["diff"] == pytest.approx(-2 / 6)
    # x1's donor x2 (answer "2"): x1 answered "1" (its own); x3's donor x4: x3 answered "4" (the donor's)
    shuffled = res([1, 1, 1, 0, 1, 1])
    shuffled[3]["pred"] = "4"
    f = toy_report.follows(shuffled, {"x1": "x2", "x3": "x4"}, {f"x{i}": str(i) for i in range(6)})
    assert f == dict(n=2, other=0.5, own=0.5)
    with pytest.raises(ValueError, match="pairing"):  # b scored on other items, or in another order
        toy_report.compare({"A": a, "B": {0: b[0][::-1], 1: b[1]}}, "A", "B", [0, 1])


def test_donors_share_the_evidence_pool():
    """A neighbor row's donor and placebo ask about the same side (the donor's block then implies the donor's
    answer under the row's question); compare rows draw from compare rows; a pool without two other spans gives
    no donor."""
    side = ["right of", "below"]
    rows = [dict(id=f"n{i}", family="neighbor", question=f"What colour is the cell {side[i % 2]} the black cell?")
            for i in range(10)] + [dict(id=f"c{i}", family="compare", question="Are there more red cells than blue "
                                                                               "cells?") for i in range(4)]
    latents = {r["id"]: None for r in rows if r["id"] != "c3"}  # c3 opened no span: never a donor
    donor, placebo = toy.donors(rows, latents, seed=0)
    by_id = {r["id"]: r for r in rows}
    assert set(donor) == set(placebo) == {r["id"] for r in rows}
    for i in donor:
        assert len({i, donor[i], placebo[i]}) == 3 and "c3" not in (donor[i], placebo[i])
        assert {by_id[donor[i]]["question"], by_id[placebo[i]]["question"]} == {by_id[i]["question"]}
    assert toy.donors(rows[:3], latents, seed=0) == ({}, {})  # n0 and n2 (right of) have one other each; n1 none


def test_stats_copies_out_alone(tmp_path):
    """stats.py runs from an empty directory holding only itself, with nothing of the project importable."""
    import shutil
    shutil.copy(os.path.join(HERE, "stats.py"), tmp_path)
    code = ("import importlib.util; assert importlib.util.find_spec('toy') is None; import stats; "
            "print(stats.mcnemar([1, 1, 0], [0, 1, 0]), stats.paired_bootstrap([[1, 1]], [[0, 1]], n_boot=100)['diff'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)), timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == ["(1,", "0,", "1.0)", "0.5"], proc.stdout + proc.stderr
