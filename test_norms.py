"""Tests of the layer-wise norm diagnostic (norms.py, paper Figure 2) on a tiny random Qwen2.5-VL: the hooks read
the input embeddings, each decoder layer's pre-norm output and the final normalized state at real tokens only; a
function-preserving rescaling of the final norm against the LM head moves only the final-state numbers; the CLI
on a plain model and on a GAP checkpoint; a missing image.

    python -m pytest -q test_norms.py
"""
import copy
import json
import os

import pytest
import torch

import latent_loop
import norms
from common import DataError, parse_config
from conftest import make_gap, prompts, run, write_jsonl
from data import DataSpec, collate, encode_row, read_jsonl
from checkpoint import load_checkpoint, save_checkpoint
from model import load_backbone
from tiny import write_sample_data

# uneven questions (and image widths): the batch is left-padded
QUESTIONS = ["How many red circles are there?", "Count?", "How many of the blue circles are there in the image?"]


@pytest.fixture(scope="module")
def tiny(world, tmp_path_factory):
    """(model directory, model, tokenizer, image processor, a left-padded batch). The tiny model with a final norm
    weight that is not all ones, as a trained model's is not: with ones every final state has norm sqrt(d), and a
    test of which final states are averaged could not fail."""
    model, tokenizer, image_processor = load_backbone(world["model"], "cpu", torch.float32)
    with torch.no_grad():
        w = model.model.language_model.norm.weight
        w.copy_(0.1 + 2 * torch.rand(w.shape, generator=torch.Generator().manual_seed(0)))
    path = str(tmp_path_factory.mktemp("norms_model"))
    for part in (model, tokenizer, image_processor):
        part.save_pretrained(path)
    batch = prompts(world, tokenizer, image_processor, QUESTIONS)
    assert not bool(batch["attention_mask"].all()), "the test needs left padding"
    return path, model.eval(), tokenizer, image_processor, batch


def reference_norms(model, batch):
    """Norms read without norms.py's hooks: embed_inputs' output, the input of the final norm (a pre-hook: the last
    decoder layer's output), output_hidden_states' first layer output and the stock last_hidden_state."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        embeds = latent_loop.embed_inputs(model, ids, batch["pixel_values"], batch["image_grid_thw"])
        pos = latent_loop.rope_positions(model, ids, mask, batch["image_grid_thw"])
        seen = []
        hook = model.model.language_model.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            out = model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False,
                              output_hidden_states=True)
        finally:
            hook.remove()
    L = len(model.model.language_model.layers)
    states = {0: embeds, 1: out.hidden_states[1], L: seen[0]}
    return {l: h.norm(dim=-1) for l, h in states.items()}, out.last_hidden_state.norm(dim=-1)


def close(a, b, tol=1e-5):
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


def test_hooks_read_the_right_tensors_at_real_tokens(tiny):
    _, model, _, _, batch = tiny
    result = norms.profile(model, batch)
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    vision = real & (ids == model.config.image_token_id)
    masks = dict(text=real & ~vision, vision=vision)
    layers, final = reference_norms(model, batch)
    assert final[real].std() > 0.1  # final states differ in norm, so which ones are averaged matters
    assert len(result["layers"]) == len(model.model.language_model.layers) + 1
    for l, n in layers.items():
        for kind, m in masks.items():
            x, got = n[m].double(), result["layers"][l][kind]
            assert close(got["mean"], x.mean()), (l, kind, got["mean"], x.mean().item())
            assert close(got["log_mean"], x.log().mean()), (l, kind)
            assert close(got["log_std"], x.log().std(correction=0)), (l, kind)
    assert close(result["vision_embed"], layers[0][vision].mean())
    assert close(result["text_embed"], layers[0][masks["text"]].mean())
    assert close(result["final"]["text"], final[masks["text"]].mean())
    assert close(result["final"]["last"], final[:, -1].mean())
    assert close(result["ratio"], final[:, -1].mean() / layers[0][vision].mean())


def test_final_norm_rescaling_moves_only_the_final_state(tiny):
    """final norm weight x c, LM head weight / c: the same logits, the same layer profile, final and ratio x c."""
    _, model, _, _, batch = tiny
    c = 8.6
    scaled = copy.deepcopy(model)
    assert scaled.lm_head.weight.data_ptr() != scaled.get_input_embeddings().weight.data_ptr()  # untied
    with torch.no_grad():
        scaled.model.language_model.norm.weight.mul_(c)
        scaled.lm_head.weight.div_(c)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
        torch.testing.assert_close(scaled(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-5)
    before, after = norms.profile(model, batch), norms.profile(scaled, batch)
    for l, (a, b) in enumerate(zip(before["layers"], after["layers"])):
        for kind in ("text", "vision"):
            for stat in ("log_mean", "log_std", "mean"):
                assert close(b[kind][stat], a[kind][stat]), (l, kind, stat)
    assert close(after["vision_embed"], before["vision_embed"])
    for key in ("text", "last"):
        assert close(after["final"][key], c * before["final"][key]), key
    assert close(after["ratio"], c * before["ratio"])


@pytest.fixture(scope="module")
def rows5(tmp_path_factory):
    return write_sample_data(str(tmp_path_factory.mktemp("norms_data")), 5, seed=2)


def batch_of(path, tokenizer, image_processor):
    """All rows of a JSONL in one left-padded batch (the CLI takes them --batch_size at a time)."""
    rows = read_jsonl(path, need_response=False)[0]
    return collate([encode_row(tokenizer, image_processor, r, DataSpec()) for r in rows],
                   tokenizer.pad_token_id, left=True)


def test_cli_on_a_plain_model_writes_png_and_json(tiny, rows5, tmp_path):
    path, model, tokenizer, image_processor, _ = tiny
    out = tmp_path / "fig" / "norms.png"
    p = run(["norms.py", "--model", path, "--data", rows5, "--batch_size", "2", "--out", out], timeout=120)
    assert "final/vision ratio" in p.stdout and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "fig" / "norms.json").read_text())
    assert saved["n"] == 5 and saved["model"] == path and "reconstruction" not in saved
    ref = norms.profile(model, batch_of(rows5, tokenizer, image_processor))  # one batch: other padding, same numbers
    assert close(saved["ratio"], ref["ratio"])
    for a, b in zip(saved["layers"], ref["layers"]):
        assert close(a["text"]["log_mean"], b["text"]["log_mean"]) and close(a["vision"]["mean"], b["vision"]["mean"])
    assert sorted(os.listdir(tmp_path / "fig")) == ["norms.json", "norms.png"]  # no temporary file left


def test_cli_on_a_gap_checkpoint_measures_the_reconstruction(world, rows5, tmp_path):
    ckpt = str(tmp_path / "gap")
    gap, tokenizer, image_processor = make_gap(world)
    save_checkpoint(gap, tokenizer, image_processor, ckpt, {}, basis=world["basis"])
    out = tmp_path / "norms.png"
    result = norms.main(parse_config(norms.NormsConfig, ["--model", ckpt, "--data", rows5, "--batch_size", "3",
                                                         "--out", str(out)]))
    saved = json.loads((tmp_path / "norms.json").read_text())
    assert out.stat().st_size > 1000 and saved["reconstruction"] == result["reconstruction"]
    loaded = load_checkpoint(ckpt, "cpu", torch.float32)[0]
    b = batch_of(rows5, tokenizer, image_processor)
    ref = norms.profile(loaded.backbone, b, loaded.head)
    assert close(saved["reconstruction"], ref["reconstruction"]) and close(saved["ratio"], ref["ratio"])
    with torch.no_grad():  # the head on the state at each row's last position, through GAP's own forward
        h = loaded.states(loaded.embed(b["input_ids"], b["pixel_values"], b["image_grid_thw"]), b["attention_mask"],
                          loaded.position_ids(b["input_ids"], b["attention_mask"], b["image_grid_thw"]))
        assert close(ref["reconstruction"], loaded.head(h[:, -1]).norm(dim=-1).mean())
    # the head's output differs from the state it reads (a pca head maps it into the vision subspace)
    assert not close(saved["reconstruction"], saved["final"]["last"], 1e-3)


def test_missing_image_is_one_line_before_the_model_loads(world, rows5, tmp_path, monkeypatch):
    lines = open(rows5).read().splitlines()
    lines[2] = json.dumps(dict(json.loads(lines[2]), image="img/gone.png"))  # line 3
    bad = write_jsonl(os.path.join(os.path.dirname(rows5), "bad.jsonl"), lines)  # images are relative to the JSONL
    p = run(["norms.py", "--model", world["model"], "--data", bad, "--out", tmp_path / "n.png"], expect_ok=False,
            timeout=120)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:3: field 'image'" in err[0] and "gone.png" in err[0], p.stderr
    assert not (tmp_path / "n.png").exists()

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the data was checked")
    monkeypatch.setattr(norms, "load_backbone", no_model)
    with pytest.raises(DataError, match=r"bad\.jsonl:3: field 'image'"):
        norms.main(parse_config(norms.NormsConfig, ["--model", world["model"], "--data", bad]))
