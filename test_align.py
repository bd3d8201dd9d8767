"""Tests of VaLR's REPA alignment and feeding (align.py: Aligner, VaLR) on the tiny random Qwen2.5-VL, with
tiny random instances of two stock transformers vision encoders (Dinov2Model, SiglipVisionModel) saved to a
temporary directory: pooled features and the REPA loss against independent computations, no gradient into the
frozen encoders, self-fed training latents equal to the generation loop's, the gradients of 2 torchrun ranks
(DDP, FSDP2) equal those of 1 process with the projectors, and stage 1 -> stage 2 -> infer.py.

    python -m pytest -q test_align.py
"""
import json
import os

import pytest
import torch

import align
import latent_loop
from conftest import K, SAVE_FIRST_GRADS, biased, make_gap, prompts, run, torchrun, write_jsonl
from common import DataError, file_hash
from data import DataSpec, GAPDataset, collate, open_image, read_jsonl, resolve
from losses import IGNORE


def tiny_encoders(root):
    """A Dinov2Model (CLS + 4x4 patches) and a SiglipVisionModel (4x4 patches, no prefix) on 56x56 images."""
    from transformers import (BitImageProcessorPil, Dinov2Config, Dinov2Model, SiglipImageProcessorPil,
                              SiglipVisionConfig, SiglipVisionModel)
    torch.manual_seed(1)
    small = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=14, image_size=56)
    dino, siglip = os.path.join(root, "dinov2"), os.path.join(root, "siglip")
    Dinov2Model(Dinov2Config(hidden_size=16, **small)).save_pretrained(dino)
    BitImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(dino)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=24, **small)).save_pretrained(siglip)
    SiglipImageProcessorPil(size={"height": 56, "width": 56}).save_pretrained(siglip)
    return [dino, siglip]


@pytest.fixture(scope="module")
def enc(world, tmp_path_factory):
    """The two encoders, a 2-span copy of the sample data, and both data sets' features cached by align.py."""
    root = tmp_path_factory.mktemp("align")
    encoders = tiny_encoders(str(root))
    os.symlink(os.path.join(os.path.dirname(world["data"]), "img"), root / "img")
    rows = [json.loads(line) for line in open(world["data"])][:4]
    two = write_jsonl(root / "two.jsonl", [dict(r, response=r["response"].replace(
        "</think>", " Now the next step. <latent> Still the same.</think>")) for r in rows])
    # rows with 1, 2, 3 and 1 spans: two ranks run different numbers of self-feeding passes per micro-step
    mixed = write_jsonl(root / "mixed.jsonl", [dict(r, response=r["response"].replace(
        "</think>", " Now the next step. <latent> Still the same." * n + "</think>")) for r, n in zip(rows, (0, 1, 2, 0))])
    for data in (world["data"], two):
        run(["align.py", "--encoders", ",".join(encoders), "--data", data, "--latent_tokens", K,
             "--cache_dir", root / "cache", "--batch_size", 3])
    return dict(root=root, encoders=encoders, two=two, mixed=mixed, cache=str(root / "cache"))


def manual_pool(states, side):
    """(gh, gw, C) -> (side*side, C) by averaging equal blocks, row-major."""
    gh, gw, C = states.shape
    bh, bw = gh // side, gw // side
    return torch.stack([states[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw].reshape(-1, C).mean(0)
                        for i in range(side) for j in range(side)])


def test_cached_features_are_the_pooled_patch_grid(world, enc):
    """The cache holds each encoder's patch tokens (Dinov2's CLS dropped) averaged over 2x2 blocks of its 4x4
    grid, and records which encoder wrote it; another encoder directory is refused."""
    rows, _ = read_jsonl(world["data"])
    for path, prefix in zip(enc["encoders"], (1, 0)):
        model, processor = align.load_encoder(path)
        meta = json.load(open(os.path.join(enc["cache"], os.path.basename(path), "encoder.json")))
        assert meta["encoder"] == os.path.abspath(path) and meta["latent_tokens"] == K
        caches = align.open_caches(enc["cache"], [path], K)
        for row in rows[:3]:
            pixels = processor(images=[open_image(row, "image")], return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                states = model(pixel_values=pixels).last_hidden_state[0]  # (prefix + 16, C)
            assert states.shape[0] == prefix + 16
            expected = manual_pool(states[prefix:].reshape(4, 4, -1), 2)
            torch.testing.assert_close(caches[os.path.basename(path)][0].get(row["id"], file_hash(resolve(row, "image"))), expected)
    other = enc["root"] / "other" / "dinov2"
    os.makedirs(other.parent)
    os.symlink(enc["encoders"][0], other)
    with pytest.raises(DataError, match="written for .*dinov2 K=4, not for .*other/dinov2"):
        align.open_caches(enc["cache"], [str(other)], K)


def step_text_by_hand(ids, labels, g):
    """Python reference of align.step_text: supervised tokens after a span's end, until the next start."""
    out, spans, n_end = [], [], 0
    for row_ids, row_labels in zip(ids.tolist(), labels.tolist()):
        inside = False
        for t, lab in zip(row_ids, row_labels):
            if t == g.end_id:
                inside, n_end = True, n_end + 1
            elif t == g.start_id or (lab == IGNORE and t != g.pad_id):
                inside = False
            out.append(inside and t not in (g.end_id, g.pad_id))
            spans.append(n_end - 1)
    return torch.tensor(out).reshape(ids.shape), torch.tensor(spans).reshape(ids.shape)


@pytest.mark.parametrize("text", [False, True], ids=["slots", "slots+text"])
def test_repa_loss_equals_an_independent_computation(world, enc, text):
    """Two encoders, two spans per example: align_sum is the mean over encoders of -sum cos(projector(h_l), f)
    over every latent slot (f: the pooled cell of the slot's index) and, with text, every step-text token (f:
    the mean cell), h_l the output of the chosen decoder layer."""
    g, tokenizer, image_processor = make_gap(world, kind="hidden")
    caches = align.open_caches(enc["cache"], enc["encoders"], K)
    widths = {n: w for n, (_, w) in caches.items()}
    g = align.VaLR(g, align.Aligner(64, widths, hidden=32, layer=1, text=text), feed="pad")
    with torch.no_grad():  # no biases and large weights: the projection depends on h, not on its biases alone
        for name, p in g.align.named_parameters():
            p.copy_(torch.randn_like(p) if name.endswith("weight") else torch.zeros_like(p))
    ds = align.AlignedDataset(GAPDataset(enc["two"], tokenizer, image_processor, g.latent_ids, DataSpec(
        latent_tokens=K, latent_targets=False)), caches)
    b = collate([ds[0], ds[1]], tokenizer.pad_token_id)
    with torch.no_grad():
        out = g(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"], b["image_grid_thw"],
                align_targets=b["align_targets"])
        embeds = latent_loop.embed_inputs(g.backbone, b["input_ids"], b["pixel_values"], b["image_grid_thw"])
        pos = g.position_ids(b["input_ids"], b["attention_mask"], b["image_grid_thw"])
        h1 = g.backbone.model.language_model.layers[0]  # the output of decoder layer 1, by a hook
        seen = []
        hook = h1.register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
        g.states(embeds, b["attention_mask"], pos)
        hook.remove()
    h = seen[0]
    ids, rows = b["input_ids"], [read_jsonl(enc["two"])[0][i] for i in (0, 1)]
    per_encoder = []
    for name, (cache, _) in caches.items():
        feats = [cache.get(r["id"], file_hash(resolve(r, "image"))) for r in rows]  # (K, C) per example
        total = 0.0
        for r in range(2):
            slots = (ids[r] == g.pad_id).nonzero()[:, 0].tolist()
            assert len(slots) == 2 * K
            for j, t in enumerate(slots):
                z = g.align.proj[name](h[r, t]).detach()
                total -= float(z @ feats[r][j % K] / (z.norm() * feats[r][j % K].norm()))
        if text:
            mask, _ = step_text_by_hand(ids, b["labels"], g)
            assert mask.sum() > 4
            for r, t in mask.nonzero().tolist():
                z = g.align.proj[name](h[r, t]).detach()
                f = feats[r].mean(0)
                total -= float(z @ f / (z.norm() * f.norm()))
        per_encoder.append(total)
    expected = sum(per_encoder) / 2
    assert abs(float(out["align_sum"]) - expected) < 1e-5 * max(1.0, abs(expected))
    assert int(out["n_align"]) == align.n_positions(ids, b["labels"], g.latent_ids, text)


def test_step_text_matches_the_reference_on_a_packed_row(world, enc):
    """step_text on a packed row of two 2-span examples (the second starts with its prompt, IGNORE labels)."""
    g, tokenizer, image_processor = make_gap(world, kind="hidden")
    ds = GAPDataset(enc["two"], tokenizer, image_processor, g.latent_ids, DataSpec(latent_tokens=K, latent_targets=False))
    ids = torch.cat([ds[0]["input_ids"], ds[1]["input_ids"]])[None]
    labels = torch.cat([ds[0]["labels"], ds[1]["labels"]])[None]
    text, span = align.step_text(ids, labels, g.latent_ids)
    ref_text, ref_span = step_text_by_hand(ids, labels, g)
    assert torch.equal(text, ref_text) and text.sum() > 0
    assert torch.equal(span[text], ref_span[text]) and span[text].max() == 3


def test_no_gradient_reaches_the_frozen_encoders(enc):
    """Features computed with autograd on still carry no graph; the loss's backward leaves every encoder
    parameter without a gradient, and the projectors with one."""
    from PIL import Image
    model, processor = align.load_encoder(enc["encoders"][0])
    with torch.enable_grad():
        feats = align.pooled_features(model, processor, [Image.new("RGB", (56, 56), "red")], K)[0]  # (K, C)
        aligner = align.Aligner(8, {"dinov2": feats.shape[1]}, hidden=8, layer=1)
        ids = torch.tensor([[1, 2, 3, 3, 3, 3, 4]])
        out = aligner(torch.randn(1, 7, 8), ids, ids, dict(start=2, pad=3, end=4), feats)
        out["align_sum"].backward()
    assert feats.grad_fn is None
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(p.grad is not None for p in aligner.parameters())


def test_self_fed_training_latents_equal_the_loops(world, gap):
    """latent_feed self: the latents the training forward puts into the slots of a generated sequence (two
    spans in a row) are the ones the KV-cached loop fed, so training sees what inference does."""
    g, tokenizer, image_processor = make_gap(world, kind="pca")
    batch = prompts(world, tokenizer, image_processor, ["How many red circles are there?"])
    with biased(g.backbone, g.start_id, 3.0):
        steps = list(latent_loop.latent_steps(g.backbone, g.head, g.latent_ids, K, batch["input_ids"],
                                              batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"],
                                              max_new_tokens=24, temperature=1.0,
                                              generator=torch.Generator().manual_seed(8)))
    fed = [s for s in steps if s.fed is not None]
    tokens = torch.stack([s.token for s in fed], 1)  # (1, S)
    assert int((tokens == g.pad_id).sum()) == 2 * K, "two complete spans"
    ids = torch.cat([batch["input_ids"], tokens], 1)
    mask = torch.ones_like(ids)
    v = align.VaLR(g, feed="self", passes=2 * K)  # as many passes as the example's slots: exact
    with torch.no_grad():
        embeds = latent_loop.embed_inputs(g.backbone, ids, batch["pixel_values"], batch["image_grid_thw"])
        pos = g.position_ids(ids, mask, batch["image_grid_thw"])
        filled, _ = v.self_fed(embeds, mask, pos, ids)
        v.passes = 1  # one pass: only the first slot is right
        once, _ = v.self_fed(embeds, mask, pos, ids)
    loop = torch.stack([s.fed[0] for s in fed])[tokens[0] == g.pad_id]
    torch.testing.assert_close(filled[ids == g.pad_id], loop, atol=1e-5, rtol=1e-5)
    assert (once[ids == g.pad_id] - loop).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# torchrun: the gradients with the projectors; stage 1 -> stage 2 -> infer

DRIVER = SAVE_FIRST_GRADS + """
import os, sys
import train
out, argv = sys.argv[1], sys.argv[2:]
rank = int(os.environ.get("RANK", 0))
train.main(train.parse_config(train.TrainConfig, argv), on_grads=first_grads(out, rank))
print(f"driver done on rank {rank}", flush=True)
"""


def valr_flags(world, enc, stage=2):
    return ["--model", world["model"], "--data", enc["mixed"], "--latent_tokens", K, "--latent_head", "pca",
            "--pca_path", enc["root"] / "pca.safetensors", "--adapter_dim", 16, "--lambda_latent", 0,
            "--align", "repa", "--align_encoders", ",".join(enc["encoders"]), "--align_cache", enc["cache"],
            "--align_dim", 16, "--align_text", "--stage", stage, "--lr", "1e-3", "--head_lr", "1e-3",
            "--max_len", 200, "--num_workers", 0]


@pytest.fixture(scope="module")
def grads_one(world, enc):
    import pca as pca_lib
    pca_lib.save(str(enc["root"] / "pca.safetensors"), world["basis"])
    (enc["root"] / "driver.py").write_text(DRIVER)
    out = enc["root"] / "grads_one.pt"
    torchrun([enc["root"] / "driver.py", out, *valr_flags(world, enc), "--global_batch", 4, "--max_steps", 1,
              "--grad_clip", 0, "--micro_batch", 2, "--out_dir", enc["root"] / "one"], nproc=1)
    return torch.load(out)


@pytest.mark.parametrize("flags", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_ranks_give_the_gradients_of_one_process_with_projectors(world, enc, grads_one, flags):
    """VaLR stage 2 (self-fed PCA-head latents, REPA on slots and step text, two encoders; examples with 1 to 3
    spans): 2 ranks x 1 example per micro-step == 1 process x 2, for every parameter, projectors and latent head
    included."""
    name = "_".join(["two", *[f.strip("-") for f in flags]])
    out = enc["root"] / f"grads_{name}.pt"
    torchrun([enc["root"] / "driver.py", out, *valr_flags(world, enc), "--global_batch", 4, "--max_steps", 1,
              "--grad_clip", 0, "--micro_batch", 1, *flags, "--out_dir", enc["root"] / name], nproc=2)
    two = torch.load(out)
    assert two.keys() == grads_one.keys()
    assert {"align.proj.dinov2.0.weight", "align.proj.siglip.4.weight"} <= set(two)
    assert any(k.startswith("head.") for k in two) and any(k.startswith("backbone.") for k in two)
    for n, g in grads_one.items():
        err = float((two[n] - g).norm() / g.norm().clamp(min=1e-12))
        assert err < 1e-4, f"{n}: relative gradient difference {err:.2e}"


def test_stage_one_then_stage_two_then_infer(world, enc, grads_one, tmp_path, monkeypatch):
    """Stage 1 trains the projectors and the head only (the backbone stays the base model's); its checkpoint carries
    the projectors (align.safetensors) and the head, from which stage 2 starts; the stage-2 checkpoint loads in
    infer.py."""
    import train
    from safetensors.torch import load_file
    from checkpoint import load_checkpoint
    from model import add_latent_tokens, load_backbone
    built = []  # the head and projectors of each run as build() hands them to the loop
    real_build = train.build

    def build(*a, **kw):
        out = real_build(*a, **kw)
        built.append({k: v.detach().clone() for k, v in out[0].state_dict().items() if k.startswith(("head.", "align."))})
        return out
    monkeypatch.setattr(train, "build", build)
    cfg = lambda stage, model, out: train.parse_config(train.TrainConfig, list(map(str, valr_flags(  # noqa: E731
        world, enc, stage))) + ["--model", str(model), "--global_batch", "4", "--max_steps", "2", "--out_dir", str(out)])
    one = train.main(cfg(1, world["model"], tmp_path / "s1"))
    assert len(one["losses"][0]) == 3  # (L_LM, L_latent, L_align)
    base, tokenizer, _ = load_backbone(world["model"], "cpu", torch.float32)
    add_latent_tokens(base, tokenizer)
    base = base.state_dict()
    g1 = load_checkpoint(str(tmp_path / "s1"), "cpu")[0]
    for k, v in g1.backbone.state_dict().items():
        assert torch.equal(v, base[k]), f"stage 1 changed the backbone ({k})"
    saved = {"align." + k: v for k, v in load_file(str(tmp_path / "s1" / "align.safetensors")).items()}
    saved.update({"head." + k: v for k, v in g1.head.state_dict().items()})
    assert saved.keys() == built[0].keys()
    for part in ("head.", "align."):
        assert any(not torch.equal(saved[k], built[0][k]) for k in saved if k.startswith(part)), f"{part} not trained"
    train.main(cfg(2, tmp_path / "s1", tmp_path / "s2"))
    assert all(torch.equal(built[1][k], saved[k]) for k in saved), "stage 2 must start from stage 1's head/projectors"
    g2 = load_checkpoint(str(tmp_path / "s2"), "cpu")[0]
    assert g2.head.kind == "pca" and type(g2).__name__ == "GAP"  # at inference VaLR is GAP: no projectors
    assert any(not torch.equal(v, base[k]) for k, v in g2.backbone.state_dict().items()), "stage 2 trains the backbone"
    run(["infer.py", str(world["root"] / "data" / "img" / "q0.png"), "How many?", "--ckpt", tmp_path / "s2",
         "--max_new_tokens", "6"])
