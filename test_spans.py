"""Several latent spans per response: the data format (aux_image as a list or one path for every span), the target
cache (one (S*K, d) tensor per example, spans in order), the losses on every slot of every span, difficulty
stripping of all spans, and the anchors (positions, cached loop == uncached recompute, teacher-forced latents ==
generated ones) with two and three spans per row.

    python -m pytest -q test_spans.py
"""
import json
import os

import pytest
import torch

import latent_loop
from conftest import K, prompts, sampled_and_recomputed, write_jsonl
from data import PLACEHOLDER, DataError, DataSpec, GAPDataset, aux_hash, collate, open_image, read_jsonl
from losses import IGNORE
from targets import TargetCache, TargetsConfig, aux_targets, extract_targets

STEP = " I look again. <latent> <parser>still the same.</parser>"


@pytest.fixture(scope="module")
def spans(world, gap, tmp_path_factory):
    """A JSONL of 2-span rows (aux_image a list of two images) and 3-span rows (one aux image for all three),
    and its target cache."""
    g, tokenizer, image_processor = gap
    tmp = tmp_path_factory.mktemp("spans")
    os.symlink(os.path.join(os.path.dirname(world["data"]), "img"), tmp / "img")
    rows = [json.loads(line) for line in open(world["data"])][:4]
    two = [dict(r, id=f"two{i}", response=r["response"].replace("</think>", STEP + "</think>"),
                aux_image=[r["aux_image"], rows[(i + 1) % 4]["image"]]) for i, r in enumerate(rows[:2])]
    three = [dict(r, id=f"three{i}", response=r["response"].replace("</think>", STEP * 2 + "</think>"))
             for i, r in enumerate(rows[2:])]
    path = write_jsonl(tmp / "spans.jsonl", two + three)
    extract_targets(TargetsConfig(data=path, latent_tokens=K, cache_dir=str(tmp / "cache"), batch_size=3),
                    g.backbone, image_processor)
    return dict(tmp=tmp, path=path, rows=two + three, cache=TargetCache(str(tmp / "cache"), K))


def dataset(gap, spans, **spec):
    g, tokenizer, image_processor = gap
    return GAPDataset(spans["path"], tokenizer, image_processor, g.latent_ids, DataSpec(latent_tokens=K, **spec),
                      spans["cache"])


def test_targets_are_each_spans_aux_image_in_order(gap, spans):
    """The cache holds (S*K, d) per example: the K targets of span 1's aux image, then span 2's, ...; one path
    is used for every span."""
    g, _, image_processor = gap
    read, _ = read_jsonl(spans["path"])
    for row in read:
        n = row["response"].count(PLACEHOLDER)
        paths = row["aux_image"] if isinstance(row["aux_image"], list) else [row["aux_image"]] * n
        images = [open_image(dict(row, aux_image=p), "aux_image") for p in paths]
        expected = aux_targets(g.backbone, image_processor, images, K).flatten(0, 1)  # (S*K, d)
        got = spans["cache"].get(row["id"], aux_hash(row))
        assert got.shape[0] == n * K
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    first = spans["cache"].get("two0", aux_hash(read[0]))
    assert (first[:K] - first[K:]).abs().max() > 1e-4, "two different aux images must give different targets"


def test_losses_sit_on_every_span(gap, spans):
    """Two spans per row: L_latent is head(h[t - 1]) against the t-th target on every slot of both spans, in
    order (a hand computation); each span's start is an LM target, its pads and end are not."""
    g, tokenizer, _ = gap
    ds = dataset(gap, spans)
    b = collate([ds[0], ds[1]], tokenizer.pad_token_id)
    ids, labels = b["input_ids"], b["labels"]
    assert b["latent_targets"].shape[0] == 2 * 2 * K
    with torch.no_grad():
        out = g(ids, b["attention_mask"], labels, b["pixel_values"], b["image_grid_thw"], b["latent_targets"])
        embeds = g.embed(ids, b["pixel_values"], b["image_grid_thw"], b["latent_targets"])
        h = g.states(embeds, b["attention_mask"], g.position_ids(ids, b["attention_mask"], b["image_grid_thw"]))
    for row_ids, row_labels in zip(ids, labels):
        assert (row_labels == g.start_id).sum() == 2 and (row_ids == g.pad_id).sum() == 2 * K
        assert not ((row_labels == g.pad_id) | (row_labels == g.end_id)).any()
    slots = (ids == g.pad_id).nonzero().tolist()  # row-major: row 0's span 1, span 2, then row 1's
    v = torch.stack([g.head(h[r, t - 1]) for r, t in slots]).detach()
    expected = float((v - b["latent_targets"]).pow(2).mean(-1).sum())
    assert int(out["n_latent"]) == 4 * K
    assert abs(float(out["latent_sum"]) - expected) < 1e-5
    swapped = torch.cat([b["latent_targets"][K:2 * K], b["latent_targets"][:K], b["latent_targets"][2 * K:]])
    assert abs(float((v - swapped).pow(2).mean(-1).sum()) - expected) > 1e-4, "span order must matter"


def test_stripping_removes_every_span(gap, spans):
    """accuracy > tau: all spans go, with their targets; the text of every step stays."""
    g, tokenizer, image_processor = gap
    easy = [dict(r, accuracy=1.0) for r in spans["rows"]]
    path = write_jsonl(spans["tmp"] / "easy.jsonl", easy)
    ds = GAPDataset(path, tokenizer, image_processor, g.latent_ids, DataSpec(latent_tokens=K), spans["cache"])
    for i in (0, 2):
        it = ds[i]
        assert it["latent_targets"] is None
        assert not torch.isin(it["input_ids"], torch.tensor([g.start_id, g.pad_id, g.end_id])).any()
        text = tokenizer.decode(it["input_ids"])
        assert text.count("still the same.") == easy[i]["response"].count(PLACEHOLDER) - 1 and PLACEHOLDER not in text
        assert "I look again. <parser>" in text, "the spaces around a removed span become one"


@pytest.mark.parametrize("aux,message", [
    (["img/a0.png"], r"x\.jsonl:1: field 'aux_image': 1 images for 2 '<latent>' placeholders"),
    (["img/a0.png", "img/a1.png", "img/a2.png"], r"x\.jsonl:1: field 'aux_image': 3 images for 2 '<latent>'"),
    (["img/a0.png", 3], r"x\.jsonl:1: field 'aux_image': a list must hold image paths"),
])
def test_aux_image_list_must_match_the_placeholders(world, spans, aux, message):
    row = dict(spans["rows"][0], aux_image=aux)
    with pytest.raises(DataError, match=message):
        read_jsonl(write_jsonl(spans["tmp"] / "x.jsonl", [row]))


def test_missing_image_in_the_list_is_named_by_index(gap, spans):
    g, _, image_processor = gap
    row = dict(spans["rows"][0], id="gone", aux_image=["img/a0.png", "img/gone.png"])
    path = write_jsonl(spans["tmp"] / "g.jsonl", [row])
    with pytest.raises(DataError, match=r"g\.jsonl:1: field 'aux_image\[1\]': image file not found"):
        extract_targets(TargetsConfig(data=path, latent_tokens=K, cache_dir=str(spans["tmp"] / "c2")),
                        g.backbone, image_processor)


# ----------------------------------------------------------------------------------------------------------
# the anchors with two and three spans per row

@pytest.fixture(scope="module")
def generated(world, gap):
    """A sampling run in which row 0 opens and closes two spans and row 1 three, with text between them, and an
    uncached recompute of prompt + every fed step."""
    g, tokenizer, image_processor = gap
    batch = prompts(world, tokenizer, image_processor, ["How many red circles are there?", "How many?"])
    return sampled_and_recomputed(g, batch, bias=3.0, seed=8)


def test_rows_hold_two_and_three_spans(generated, gap):
    """Row 0: two complete spans, row 1: three, each exactly K pads then an end (one span follows another
    directly, one after text), and the state goes back to TEXT after each span; decode shows each span as <latent>."""
    g, tokenizer, _ = gap
    toks, slots = generated["out"]["tokens"], generated["out"]["slots"]
    gaps = []  # text tokens between one span's end and the next start
    for row, row_slots, n in zip(toks.tolist(), slots.tolist(), (2, 3)):
        starts = [i for i, t in enumerate(row) if t == g.start_id]
        assert len(starts) == n and starts[-1] + K + 1 < len(row), f"row must hold {n} complete spans"
        gaps += [b - (a + K + 2) for a, b in zip(starts, starts[1:])]
        for i in starts:
            assert row[i + 1:i + K + 2] == [g.pad_id] * K + [g.end_id]
            assert row_slots[i:i + K + 3] == [latent_loop.TEXT] + list(range(K + 1)) + [latent_loop.TEXT]
        assert g.decode(tokenizer, row).count("<latent>") == n
    assert min(gaps) == 0 and max(gaps) > 0, "spans back to back and spans with text between them"


def test_positions_teacher_forced_equal_generation(generated, gap):
    """The training path's M-RoPE ids of prompt + generated tokens (right-padded) == the loop's, every step."""
    g, tokenizer, _ = gap
    b, out = generated["batch"], generated["out"]
    S = out["positions"].shape[2]
    items = [dict(id=str(i), input_ids=torch.cat([b["input_ids"][i][b["attention_mask"][i].bool()],
                                                  out["tokens"][i, :S]]),
                  pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"][i:i + 1]) for i in range(2)]
    tf = collate(items, tokenizer.pad_token_id)
    pos = g.position_ids(tf["input_ids"], tf["attention_mask"], b["image_grid_thw"])
    for i in range(2):
        n = int(tf["attention_mask"][i].sum())
        assert torch.equal(pos[:, i, n - S:n], out["positions"][:, i]), f"row {i}"


def test_cached_loop_equals_uncached_recompute(generated, gap):
    """Logits at every text step and every latent of every span: the KV-cached loop == one uncached forward."""
    g = gap[0]
    out, full = generated["out"], generated["full"]
    T, S = full["T"], out["logits"].shape[1]
    finite = torch.isfinite(out["logits"])
    torch.testing.assert_close(out["logits"][finite], full["logits"][:, T - 1:T - 1 + S][finite], atol=1e-5, rtol=1e-5)
    fed = out["embeds"]
    latent = out["tokens"][:, :fed.shape[1]] == g.pad_id
    assert latent.sum(1).tolist() == [2 * K, 3 * K]
    with torch.no_grad():
        v_hat = g.head(full["h"][:, T - 1:T - 1 + fed.shape[1]])
    torch.testing.assert_close(fed[latent], v_hat[latent].to(fed.dtype), atol=1e-5, rtol=1e-5)


def test_teacher_forced_latents_equal_generated(generated, gap):
    """The generated latents of all spans, given as targets in order, are what the training forward predicts at
    every slot: L_latent ~ 0 (a target of the wrong span would not be)."""
    g = gap[0]
    b, out = generated["batch"], generated["out"]
    S = out["embeds"].shape[1]
    ids = torch.cat([b["input_ids"], out["tokens"][:, :S]], 1)
    mask = torch.cat([b["attention_mask"], torch.ones(2, S, dtype=torch.long)], 1)
    latent = out["tokens"][:, :S] == g.pad_id
    targets = out["embeds"][latent]
    with torch.no_grad():
        res = g(ids, mask, torch.full_like(ids, IGNORE), b["pixel_values"], b["image_grid_thw"], latent_targets=targets)
        swapped = g(ids, mask, torch.full_like(ids, IGNORE), b["pixel_values"], b["image_grid_thw"],
                    latent_targets=torch.cat([targets[K:2 * K], targets[:K], targets[2 * K:]]))
    assert int(res["n_latent"]) == 5 * K
    assert float(res["latent_sum"]) / int(res["n_latent"]) < 1e-10
    assert float(swapped["latent_sum"]) > 1e-4
