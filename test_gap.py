"""Tests of the GAP implementation on a tiny random Qwen2.5-VL with an offline tokenizer (built here, no download).

    python -m pytest -q test_gap.py

Anchors first: parity with the stock model, position equivalence between teacher forcing and generation,
the cached latent loop against a full uncached recompute, and the losses sitting on the right tokens.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import pca as pca_lib
from data import (DataError, DataSpec, GAPDataset, TargetCache, TargetsConfig, collate, encode_prompt, extract_targets,
                  open_image, read_jsonl)
from latent_head import LatentHead
from model import GAP, IGNORE, add_latent_tokens, load_backbone
from tiny import build_tiny, write_sample_data

HERE = os.path.dirname(os.path.abspath(__file__))
K = 4  # latent tokens in these tests: a 2x2 grid keeps sequences short
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=HERE)


def run(cmd, **kw):
    """Run a project command in a subprocess; fail with its output if it fails."""
    p = subprocess.run(cmd, cwd=HERE, env=ENV, capture_output=True, text=True, timeout=600, **kw)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny model directory, sample data (uneven answer lengths), its latent targets and a PCA basis."""
    root = tmp_path_factory.mktemp("gap")
    model_dir = build_tiny(str(root / "tiny"))
    data = write_sample_data(str(root / "data"), 12, seed=1)
    extract_targets(TargetsConfig(model=model_dir, data=data, latent_tokens=K, cache_dir=str(root / "cache")),
                    *load_backbone(model_dir, "cpu")[::2])
    cache = TargetCache(str(root / "cache"), K)
    stats = pca_lib.PCAStats()
    for key in cache.where:
        stats.update(cache.get(key))
    return dict(root=root, model=model_dir, data=data, cache=cache, basis=pca_lib.fit(stats, 0.95))


def make_gap(world, kind="pca", k=K):
    torch.manual_seed(0)
    backbone, tokenizer, image_processor = load_backbone(world["model"], "cpu", torch.float32)
    ids = add_latent_tokens(backbone, tokenizer)
    head = LatentHead(kind, backbone.config.text_config.hidden_size, basis=world["basis"], adapter_dim=16)
    with torch.no_grad():  # move the adapter off its zero init so the head is not a plain projection
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return GAP(backbone, head, ids, k).eval(), tokenizer, image_processor


@pytest.fixture(scope="session")
def gap(world):
    return make_gap(world)


def prompts(world, tokenizer, image_processor, questions, end_with_start=()):
    """Left-padded generation batch; rows listed in end_with_start have the prompt end in <|latent_start|>."""
    rows, _ = read_jsonl(world["data"])
    items = []
    for b, q in enumerate(questions):
        it = encode_prompt(tokenizer, image_processor, open_image(rows[b], "image"), q, DataSpec(latent_tokens=K))
        if b in end_with_start:
            it["input_ids"] = torch.cat([it["input_ids"], torch.tensor([tokenizer.convert_tokens_to_ids(
                "<|latent_start|>")])])
        items.append(it)
    return collate(items, tokenizer.pad_token_id, left=True)


class BiasedHead(torch.nn.Module):
    """LM head plus a fixed logit bias: makes the random model emit <|latent_start|> now and then."""

    def __init__(self, lm_head, bias):
        super().__init__()
        self.lm_head, self.bias = lm_head, bias

    def forward(self, h):
        return self.lm_head(h) + self.bias


@pytest.fixture(scope="session")
def generated(world, gap):
    """One traced sampling run with latent spans in both rows (row 0 starts inside one)."""
    g, tokenizer, image_processor = gap
    batch = prompts(world, tokenizer, image_processor, ["How many red circles are there?", "How many?"], (0,))
    bias = torch.zeros(g.backbone.lm_head.out_features)
    bias[g.start_id] = 5.0
    orig = g.backbone.lm_head
    g.backbone.lm_head = BiasedHead(orig, bias)
    try:
        out = g.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"],
                         max_new_tokens=32, temperature=1.0, generator=torch.Generator().manual_seed(3), trace=True)
        # the uncached recompute below must see the same biased head
        out["full_logits_fn"] = lambda h: g.backbone.lm_head(h)
        full = recompute(g, out, batch)
    finally:
        g.backbone.lm_head = orig
    return dict(batch=batch, out=out, full=full)


def recompute(g, out, batch):
    """Uncached forward over prompt + every fed step at once, with the loop's own positions."""
    S = out["embeds"].shape[1]
    embeds = torch.cat([out["prompt_embeds"], out["embeds"]], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones(len(embeds), S, dtype=torch.long)], 1)
    pos = torch.cat([out["prompt_positions"], out["positions"]], 2)
    with torch.no_grad():
        h, _ = g.states(embeds, mask, pos)
        logits = g.backbone.lm_head(h).float()
    return dict(h=h, logits=logits)


# ----------------------------------------------------------------------------------------------------------
# anchors

def test_parity_with_stock_model(world, gap):
    """No latent span: our embedding + explicit positions + decoder gives the stock model's logits, on a
    padded batch of 2 with images (right and left padding)."""
    g, tokenizer, image_processor = gap
    for left in (False, True):
        b = prompts(world, tokenizer, image_processor, ["How many blue circles are there?", "Count them."])
        if not left:  # re-pad to the right
            items = [dict(id=str(i), input_ids=b["input_ids"][i][b["attention_mask"][i].bool()],
                          pixel_values=None, image_grid_thw=None) for i in range(2)]
            r = collate([dict(it, pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"][:1])
                         for it in items], tokenizer.pad_token_id)
            b = dict(b, input_ids=r["input_ids"], attention_mask=r["attention_mask"])
        with torch.no_grad():
            embeds = g.embed(b["input_ids"], b["pixel_values"], b["image_grid_thw"])
            h, _ = g.states(embeds, b["attention_mask"], g.position_ids(b["input_ids"], b["attention_mask"],
                                                                        b["image_grid_thw"]))
            ours = g.backbone.lm_head(h)
            g.backbone.model.rope_deltas = None
            stock = g.backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                               pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                               mm_token_type_ids=(b["input_ids"] == g.image_token_id).int()).logits
        real = b["attention_mask"].bool()
        assert real.sum() < real.numel(), "the batch must contain padding"
        torch.testing.assert_close(ours[real], stock[real], atol=1e-5, rtol=1e-5)


def test_generation_emits_latent_spans(generated, gap):
    g, tokenizer, _ = gap
    toks = generated["out"]["tokens"]
    assert toks[0, :K + 1].tolist() == [g.pad_id] * K + [g.end_id], "a prompt ending in <|latent_start|> " \
                                                                       "starts in latent mode"
    for row in toks.tolist():
        starts = [i for i, t in enumerate(row) if t == g.start_id and i + K + 1 < len(row)]
        assert starts, "each row must hold a complete latent span for the equivalence tests to mean something"
        for i in starts:
            assert row[i + 1:i + K + 2] == [g.pad_id] * K + [g.end_id], "exactly K pads, then a forced end"
        text = g.decode(tokenizer, row)
        assert "<latent>" in text and "<|latent_pad|>" not in text and "<|latent_end|>" not in text


def test_positions_teacher_forced_equal_generation(generated, gap):
    """Positions the loop used == positions the training path computes from the full (right-padded) token
    sequence prompt + generated tokens, token by token, per row."""
    g, tokenizer, _ = gap
    b, out = generated["batch"], generated["out"]
    S = out["positions"].shape[2]
    items = []
    for i in range(2):
        ids = torch.cat([b["input_ids"][i][b["attention_mask"][i].bool()], out["tokens"][i, :S]])
        items.append(dict(id=str(i), input_ids=ids, pixel_values=b["pixel_values"],
                          image_grid_thw=b["image_grid_thw"][i:i + 1]))
    tf = collate(items, tokenizer.pad_token_id)  # right padding, as in training
    pos = g.position_ids(tf["input_ids"], tf["attention_mask"], b["image_grid_thw"])
    for i in range(2):
        n = int(tf["attention_mask"][i].sum())
        assert torch.equal(pos[:, i, n - S:n], out["positions"][:, i]), f"row {i}"
        lat = out["tokens"][i, :S] == g.pad_id
        assert torch.equal(pos[0, i, n - S:n][lat], pos[2, i, n - S:n][lat]), "latent slots: same id on 3 axes"


def test_cached_loop_equals_uncached_recompute(generated, gap):
    """KV-cached loop == one uncached forward over the same sequence: logits at every step and every latent
    fed back (head applied to the previous position's state), 1e-5 in fp32."""
    g = gap[0]
    out, full = generated["out"], generated["full"]
    T = out["prompt_embeds"].shape[1]
    S = out["logits"].shape[1]
    step_logits = full["logits"][:, T - 1:T - 1 + S]
    finite = torch.isfinite(out["logits"])
    torch.testing.assert_close(out["logits"][finite], step_logits[finite], atol=1e-5, rtol=1e-5)
    fed = out["embeds"]
    latent = out["tokens"][:, :fed.shape[1]] == g.pad_id
    assert latent.sum() >= 2 * K
    with torch.no_grad():
        v_hat = g.head(full["h"][:, T - 1:T - 1 + fed.shape[1]])
    torch.testing.assert_close(fed[latent], v_hat[latent].to(fed.dtype), atol=1e-5, rtol=1e-5)


def test_teacher_forced_latents_equal_generated(generated, gap):
    """Feeding the generated latents as teacher-forcing targets reproduces them: the training forward and the
    loop predict each latent from the same state, so L_latent is ~0."""
    g, tokenizer, _ = gap
    b, out = generated["batch"], generated["out"]
    S = out["embeds"].shape[1]
    ids = torch.cat([b["input_ids"], out["tokens"][:, :S]], 1)
    mask = torch.cat([b["attention_mask"], torch.ones(2, S, dtype=torch.long)], 1)
    latent = out["tokens"][:, :S] == g.pad_id
    with torch.no_grad():
        res = g(ids, mask, torch.full_like(ids, IGNORE), b["pixel_values"], b["image_grid_thw"],
                latent_targets=out["embeds"][latent])
    assert int(res["n_latent"]) == int(latent.sum())
    assert float(res["latent_sum"]) / int(res["n_latent"]) < 1e-10


def test_losses_sit_on_the_right_tokens(world, gap):
    """L_latent uses head(h_{t-1}) against v_t on exactly the latent slots; L_LM skips targets that are
    <|latent_pad|>/<|latent_end|> and includes <|latent_start|>. Checked against a hand computation, and the
    off-by-one variants give different numbers."""
    g, tokenizer, image_processor = gap
    ds = GAPDataset(world["data"], tokenizer, image_processor,
                    dict(start=g.start_id, pad=g.pad_id, end=g.end_id), DataSpec(latent_tokens=K), world["cache"])
    b = collate([ds[0], ds[1]], tokenizer.pad_token_id)
    ids, labels = b["input_ids"], b["labels"]
    with torch.no_grad():
        out = g(ids, b["attention_mask"], labels, b["pixel_values"], b["image_grid_thw"], b["latent_targets"])
        embeds = g.embed(ids, b["pixel_values"], b["image_grid_thw"], b["latent_targets"])
        h, _ = g.states(embeds, b["attention_mask"], g.position_ids(ids, b["attention_mask"], b["image_grid_thw"]))
    # labels: start is a target, pads and end are not, every other response token is
    for row_ids, row_labels in zip(ids, labels):
        assert (row_labels == g.start_id).sum() == 1
        assert not ((row_labels == g.pad_id) | (row_labels == g.end_id)).any()
        assert (row_ids == g.pad_id).sum() == K
    assert int(out["n_latent"]) == 2 * K
    slots = (ids == g.pad_id).nonzero().tolist()
    targets = b["latent_targets"]

    def latent_loss(shift):
        v = torch.stack([g.head(h[r, t - shift]) for r, t in slots])
        return float((v - targets).pow(2).mean(-1).sum().detach())

    assert abs(float(out["latent_sum"]) - latent_loss(1)) < 1e-5
    assert abs(latent_loss(0) - latent_loss(1)) > 1e-3 and abs(latent_loss(2) - latent_loss(1)) > 1e-3
    logits = g.backbone.lm_head(h).float()
    ce = lambda r, t: float(torch.nn.functional.cross_entropy(logits[r, t], ids[r, t + 1]))  # noqa: E731
    sup = [(r, t) for r in range(2) for t in range(ids.shape[1] - 1) if labels[r, t + 1] != IGNORE]
    assert abs(float(out["lm_sum"]) - sum(ce(r, t) for r, t in sup)) < 1e-3
    assert int(out["n_lm"]) == len(sup)
    nxt = {int(ids[r, t + 1]) for r, t in sup}
    assert g.start_id in nxt and g.pad_id not in nxt and g.end_id not in nxt


# ----------------------------------------------------------------------------------------------------------
# generation features

def test_latent_modes_and_shared_prefill(world, gap):
    g, tokenizer, image_processor = gap
    b = prompts(world, tokenizer, image_processor, ["How many red circles are there?", "How many?"], (0, 1))
    args = (b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"])
    greedy = g.generate(*args, max_new_tokens=K + 4, trace=True)
    assert (greedy["tokens"][:, :K] == g.pad_id).all() and (greedy["tokens"][:, K] == g.end_id).all()
    # num_samples shares one prefill: greedy samples equal the single run, row b*N + j
    shared = g.generate(*args, max_new_tokens=K + 4, num_samples=3)
    assert torch.equal(shared["tokens"], greedy["tokens"].repeat_interleave(3, 0))
    noise = g.generate(*args, max_new_tokens=K + 1, latent_mode="noise", trace=True,
                       generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(noise["embeds"][:, :K], greedy["embeds"][:, :K])
    ema = g.generate(*args, max_new_tokens=K + 1, norm_calib="ema", trace=True)
    norms = ema["embeds"][:, :K].norm(dim=-1)
    assert torch.allclose(norms, norms[:, :1].expand_as(norms), rtol=1e-4)  # one EMA norm per row
    assert not torch.allclose(norms, greedy["embeds"][:, :K].norm(dim=-1), rtol=1e-2)
    # zero: <|latent_start|> is never sampled even when it is by far the likeliest token
    bias = torch.zeros(g.backbone.lm_head.out_features)
    bias[g.start_id] = 100.0
    orig = g.backbone.lm_head
    g.backbone.lm_head = BiasedHead(orig, bias)
    try:
        b2 = prompts(world, tokenizer, image_processor, ["How many?"])
        a2 = (b2["input_ids"], b2["attention_mask"], b2["pixel_values"], b2["image_grid_thw"])
        assert (g.generate(*a2, max_new_tokens=6)["tokens"] == g.start_id).any()
        assert not (g.generate(*a2, max_new_tokens=6, latent_mode="zero")["tokens"] == g.start_id).any()
    finally:
        g.backbone.lm_head = orig


def test_stop_at_end_of_turn(world, gap):
    g, tokenizer, image_processor = gap
    b = prompts(world, tokenizer, image_processor, ["How many?", "How many red circles are there?"])
    args = (b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"])
    free = g.generate(*args, max_new_tokens=8)["tokens"]
    stop = int(free[0, 2])  # pretend row 0's third token ends the turn
    out = g.generate(*args, max_new_tokens=8, stop_ids=[stop])["tokens"]
    row0 = out[0].tolist()
    assert row0[:3] == free[0, :3].tolist() and all(t == IGNORE for t in row0[3:])


# ----------------------------------------------------------------------------------------------------------
# vocabulary, training, checkpoints

def test_latent_tokens_added_with_and_without_room(world):
    backbone, tokenizer, _ = load_backbone(world["model"], "cpu")
    rows = backbone.get_input_embeddings().weight.shape[0]
    ids = add_latent_tokens(backbone, tokenizer)
    assert backbone.get_input_embeddings().weight.shape[0] == rows, "room in the vocab: no resize"
    assert backbone.config.latent_token_ids == ids and len(set(ids.values())) == 3
    assert add_latent_tokens(backbone, tokenizer) == ids, "adding twice is a no-op"
    # a vocab with no room: embeddings grow to the tokenizer
    backbone.resize_token_embeddings(ids["start"])
    _, tok2, _ = load_backbone(world["model"], "cpu")
    ids2 = add_latent_tokens(backbone, tok2)
    assert backbone.get_input_embeddings().weight.shape[0] == len(tok2) > max(ids2.values())
    assert backbone.get_output_embeddings().weight.shape[0] == len(tok2)


def test_training_lowers_both_losses(world):
    from train import TrainConfig, build, optimizer_for, train_step
    cfg = TrainConfig(model=world["model"], data=world["data"], target_cache=str(world["root"] / "cache"),
                      latent_tokens=K, lr=1e-3, head_lr=1e-3, adapter_dim=16)
    g, tokenizer, _, ds, _ = build(cfg, torch.device("cpu"))
    opt = optimizer_for(g, cfg)
    batch = [collate([ds[i] for i in range(4)], tokenizer.pad_token_id)]
    first = None
    for _ in range(8):
        lm, n_lm, lat, n_lat, _ = train_step(g, batch, cfg, torch.device("cpu"), 1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = first or (lm / n_lm, lat / n_lat)
    assert lm / n_lm < 0.9 * first[0] and lat / n_lat < 0.9 * first[1], (first, (lm / n_lm, lat / n_lat))


def test_round_trip_train_save_infer(world, tmp_path):
    """train.py -> checkpoint -> infer.py CLI (single and batch mode); the backbone loads in the stock class."""
    ckpt = str(tmp_path / "gap")
    run([sys.executable, "train.py", "--model", world["model"], "--data", world["data"], "--target_cache",
         str(world["root"] / "cache"), "--latent_tokens", str(K), "--global_batch", "4", "--max_steps", "2",
         "--lr", "1e-3", "--head_lr", "1e-3", "--adapter_dim", "16", "--out_dir", ckpt])
    image = str(world["root"] / "data" / "img" / "q0.png")
    p = run([sys.executable, "infer.py", image, "How many red circles are there?", "--ckpt", ckpt,
             "--max_new_tokens", "12"])
    assert "answer:" in p.stdout
    p = run([sys.executable, "infer.py", "--ckpt", ckpt, "--data", world["data"], "--max_new_tokens", "12",
             "--latent_mode", "noise"])
    summary = json.load(open(os.path.join(ckpt, "results_noise.summary.json")))
    assert summary["n"] == 12 and 0.0 <= summary["accuracy"] <= 1.0
    results = [json.loads(line) for line in open(os.path.join(ckpt, "results_noise.jsonl"))]
    assert len(results) == 12 and len({r["id"] for r in results}) == 12
    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt)
    config = json.load(open(os.path.join(ckpt, "config.json")))
    assert config["latent_token_ids"] == json.load(open(os.path.join(ckpt, "gap.json")))["latent_token_ids"]
    from model import load_checkpoint
    g, _, _, _ = load_checkpoint(ckpt, "cpu")
    for (n1, p1), (n2, p2) in zip(stock.named_parameters(), g.backbone.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


# ----------------------------------------------------------------------------------------------------------
# bad input: errors name the file, line and field

def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


def test_bad_input_errors_name_file_line_field(world, gap, tmp_path):
    g, tokenizer, image_processor = gap
    good = [json.loads(line) for line in open(world["data"])][:3]
    img_dir = os.path.join(os.path.dirname(world["data"]), "img")
    os.symlink(img_dir, tmp_path / "img")
    ids = dict(start=g.start_id, pad=g.pad_id, end=g.end_id)

    def dataset(rows, **kw):
        path = write_jsonl(tmp_path / "d.jsonl", rows)
        return path, GAPDataset(path, tokenizer, image_processor, ids, DataSpec(latent_tokens=K, **kw),
                                world["cache"])

    path = write_jsonl(tmp_path / "d.jsonl", [good[0], "{not json", good[1]])
    with pytest.raises(DataError, match=r"d\.jsonl:2: field '<json>': malformed JSON"):
        read_jsonl(path)
    rows, skipped = read_jsonl(path, skip_bad=True)
    assert len(rows) == 2 and skipped == 1
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'question': missing"):
        read_jsonl(write_jsonl(tmp_path / "d.jsonl", [good[0], {k: v for k, v in good[1].items() if k != "question"}]))
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'aux_image': missing"):
        read_jsonl(write_jsonl(tmp_path / "d.jsonl", [{k: v for k, v in good[0].items() if k != "aux_image"}]))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    _, ds = dataset([good[0], dict(good[1], image="broken.png")])
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'image': cannot read image .*broken\.png"):
        ds[1]
    _, ds = dataset([dict(good[0], image="img/nope.png")])
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'image': image file not found"):
        ds[0]
    span = "<|latent_start|>" + "<|latent_pad|>" * (K + 1) + "<|latent_end|>"
    _, ds = dataset([dict(good[0], response=good[0]["response"].replace("<latent>", span))])
    with pytest.raises(DataError, match=rf"d\.jsonl:1: field 'response': latent span has {K + 1} <\|latent_pad\|> "
                                        rf"tokens but K={K}"):
        ds[0]
    _, ds = dataset([good[0]], max_len=20)
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'response': sequence of \d+ tokens exceeds max_len=20"):
        ds[0]
    _, ds = dataset([dict(good[0], id="not-in-cache")])
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'aux_image': .*no latent targets for id 'not-in-cache'"):
        ds[0]
    # targets cached for another K do not fit a K=4 span
    _, ds16 = dataset([good[0]])
    ds16.targets = TargetCache(str(world["root"] / "cache"), K)
    ds16.spec = DataSpec(latent_tokens=9)
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'aux_image': cached target has 4 latent vectors but K=9"):
        ds16[0]
    # an aux image that is missing on disk when targets are extracted
    path = write_jsonl(tmp_path / "e.jsonl", [dict(good[0], id="x1", aux_image="img/gone.png")])
    with pytest.raises(DataError, match=r"e\.jsonl:1: field 'aux_image': image file not found"):
        extract_targets(TargetsConfig(data=path, latent_tokens=K, cache_dir=str(tmp_path / "c")),
                        g.backbone, image_processor)


def test_difficulty_stripping_and_dense_caption_control(world, gap, tmp_path):
    """accuracy > tau: no latent span, LM loss only (the parser text stays); K = 0: no span anywhere."""
    g, tokenizer, image_processor = gap
    rows = [json.loads(line) for line in open(world["data"])][:2]
    os.symlink(os.path.join(os.path.dirname(world["data"]), "img"), tmp_path / "img")
    path = write_jsonl(tmp_path / "d.jsonl", [dict(rows[0], accuracy=0.0), dict(rows[1], accuracy=0.25)])
    ids = dict(start=g.start_id, pad=g.pad_id, end=g.end_id)
    ds = GAPDataset(path, tokenizer, image_processor, ids, DataSpec(latent_tokens=K), world["cache"])
    hard, easy = ds[0], ds[1]
    assert (hard["input_ids"] == g.pad_id).sum() == K and hard["latent_targets"].shape[0] == K
    assert not torch.isin(easy["input_ids"], torch.tensor([g.start_id, g.pad_id, g.end_id])).any()
    assert easy["latent_targets"] is None and "<parser>" in tokenizer.decode(easy["input_ids"])
    ds_tau = GAPDataset(path, tokenizer, image_processor, ids, DataSpec(latent_tokens=K, difficulty_tau=0.5),
                        world["cache"])
    assert ds_tau[1]["latent_targets"] is not None
    dense = GAPDataset(path, tokenizer, image_processor, ids, DataSpec(latent_tokens=0))
    assert not torch.isin(dense[0]["input_ids"], torch.tensor([g.start_id, g.pad_id, g.end_id])).any()
    text_only = rows[0]["response"].replace(" <latent>", "") + "<|im_end|>"
    assert tokenizer.decode(dense[0]["input_ids"]).endswith(text_only)


def test_scheduled_sampling_feeds_predicted_latents(world, gap):
    """--scheduled_sampling: the trained pass sees the no-grad pass's predictions at the latent slots, and the
    loss still compares against the targets."""
    g, tokenizer, image_processor = gap
    ds = GAPDataset(world["data"], tokenizer, image_processor,
                    dict(start=g.start_id, pad=g.pad_id, end=g.end_id), DataSpec(latent_tokens=K), world["cache"])
    b = collate([ds[2], ds[3]], tokenizer.pad_token_id)
    args = (b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"], b["image_grid_thw"])
    pos = g.position_ids(b["input_ids"], b["attention_mask"], b["image_grid_thw"])
    slot_next = b["input_ids"][:, 1:] == g.pad_id

    def predictions(latent_inputs):
        embeds = g.embed(b["input_ids"], b["pixel_values"], b["image_grid_thw"], latent_inputs)
        return g.head(g.states(embeds, b["attention_mask"], pos)[0][:, :-1][slot_next])

    with torch.no_grad():
        tf = g(*args, latent_targets=b["latent_targets"])
        ss = g(*args, latent_targets=b["latent_targets"], scheduled_sampling=True)
        v2 = predictions(predictions(b["latent_targets"]))
    expected = float((v2 - b["latent_targets"]).pow(2).mean(-1).sum())
    assert abs(float(ss["latent_sum"]) - expected) < 1e-5
    assert abs(float(ss["latent_sum"]) - float(tf["latent_sum"])) > 1e-4
