"""Tests of the GAP implementation on a tiny random Qwen2.5-VL with an offline tokenizer (built here, no download).

    python -m pytest -q test_gap.py

Anchors first: parity with the stock model, position equivalence between teacher forcing and generation,
the cached latent loop against a full uncached recompute, and the losses sitting on the right tokens.
"""
import json
import os
import shutil

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import latent_loop
from conftest import ENV, HERE, K, biased, prompts, run, sampled_and_recomputed, write_jsonl
from checkpoint import load_checkpoint, save_checkpoint
from data import DataError, DataSpec, GAPDataset, collate, read_jsonl
from losses import IGNORE
from model import add_latent_tokens, load_backbone
from targets import TargetsConfig, extract_targets


def loop_args(g, batch):
    return (g.backbone, g.head, g.latent_ids, g.latent_tokens, batch["input_ids"], batch["attention_mask"],
            batch["pixel_values"], batch["image_grid_thw"])


@pytest.fixture(scope="session")
def generated(world, gap):
    """One sampling run with latent spans in both rows (row 0's prompt ends in <|latent_start|>), its steps
    read from latent_steps, and an uncached recompute of the whole sequence for comparison."""
    g, tokenizer, image_processor = gap
    batch = prompts(world, tokenizer, image_processor, ["How many red circles are there?", "How many?"], (0,))
    return sampled_and_recomputed(g, batch, bias=5.0, seed=3)


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
            h = g.states(embeds, b["attention_mask"], g.position_ids(b["input_ids"], b["attention_mask"],
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
    """Every span is exactly K pads then a forced end; the named row state follows it; the decoded text shows
    each span as <latent>, also the one begun in the prompt (row 0), never raw latent ids."""
    g, tokenizer, _ = gap
    toks, slots = generated["out"]["tokens"], generated["out"]["slots"]
    assert toks[0, :K + 1].tolist() == [g.pad_id] * K + [g.end_id], "a prompt ending in <|latent_start|> " \
                                                                       "starts in latent mode"
    assert slots[0, :K + 2].tolist() == list(range(K + 1)) + [latent_loop.TEXT]
    for row, row_slots in zip(toks.tolist(), slots.tolist()):
        starts = [i for i, t in enumerate(row) if t == g.start_id and i + K + 1 < len(row)]
        assert starts, "each row must hold a complete latent span for the equivalence tests to mean something"
        for i in starts:
            assert row[i + 1:i + K + 2] == [g.pad_id] * K + [g.end_id], "exactly K pads, then a forced end"
            assert row_slots[i:i + K + 2] == [latent_loop.TEXT] + list(range(K + 1))
    texts = [g.decode(tokenizer, row) for row in toks]
    assert texts[0].startswith("<latent>"), texts[0]
    for row, text in zip(toks.tolist(), texts):
        n_spans = sum(t == g.start_id for t in row) + (row[0] == g.pad_id)
        assert text.count("<latent>") == n_spans and "<|latent_pad|>" not in text and "<|latent_end|>" not in text


def test_positions_teacher_forced_equal_generation(generated, gap):
    """Positions the loop used == positions the training path computes from the full (right-padded) token
    sequence prompt + generated tokens, token by token, per row."""
    g, tokenizer, _ = gap
    b, out = generated["batch"], generated["out"]
    S = out["positions"].shape[2]  # steps that fed a token (the last step feeds nothing)
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
    T, S = full["T"], out["logits"].shape[1]
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
        h = g.states(embeds, b["attention_mask"], g.position_ids(ids, b["attention_mask"], b["image_grid_thw"]))
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
    ce = lambda r, t: float(torch.nn.functional.cross_entropy(logits[r, t], ids[r, t + 1]).detach())  # noqa: E731
    sup = [(r, t) for r in range(2) for t in range(ids.shape[1] - 1) if labels[r, t + 1] != IGNORE]
    assert abs(float(out["lm_sum"]) - sum(ce(r, t) for r, t in sup)) < 1e-3
    assert int(out["n_lm"]) == len(sup)
    nxt = {int(ids[r, t + 1]) for r, t in sup}
    assert g.start_id in nxt and g.pad_id not in nxt and g.end_id not in nxt


# ----------------------------------------------------------------------------------------------------------
# generation features

def test_shared_prefill_equals_separate_rows(world, gap):
    """num_samples = N decodes each prompt in N rows from one prefill: greedy, row b*N + j equals the single run."""
    g, tokenizer, image_processor = gap
    b = prompts(world, tokenizer, image_processor, ["How many red circles are there?", "How many?"], (0, 1))
    args = (b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"])
    greedy = g.generate(*args, max_new_tokens=K + 4)
    assert (greedy[:, :K] == g.pad_id).all() and (greedy[:, K] == g.end_id).all()
    assert torch.equal(g.generate(*args, max_new_tokens=K + 4, num_samples=3), greedy.repeat_interleave(3, 0))


def fed_latents(g, batch, **kw):
    """(B, K, D): the vectors the loop feeds in the span each prompt ends in (every prompt ends in a start)."""
    steps = list(latent_loop.latent_steps(*loop_args(g, batch), max_new_tokens=K + 1, **kw))
    assert all(bool((s.slot == j).all()) for j, s in enumerate(steps[:K]))
    return torch.stack([s.fed for s in steps[:K]], 1)


def test_noise_latents_are_the_heads_gaussian_draws(world, gap):
    """latent_mode=noise feeds head.noise's draws from the loop's generator (N(0, eigenvalues) coefficients in
    the PCA basis), in step order, instead of the head's predictions."""
    g, tokenizer, image_processor = gap
    b = prompts(world, tokenizer, image_processor, ["How many red circles are there?", "How many?"], (0, 1))
    fed = fed_latents(g, b, latent_mode="noise", generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    expected = torch.stack([g.head.noise(2, generator=gen) for _ in range(K)], 1)  # greedy: only noise draws
    torch.testing.assert_close(fed, expected)
    assert not torch.allclose(fed, fed_latents(g, b), atol=1e-3)


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_ema_calibration_rescales_to_the_image_norm(world, gap, beta):
    """norm_calib=ema: the first latent keeps the head's direction, and all take the norm computed here independently from
    the stock vision tower's embeddings of the row's image: their mean (beta 0), or a hand-written EMA."""
    g, tokenizer, image_processor = gap
    b = prompts(world, tokenizer, image_processor, ["How many red circles are there?", "How many?"], (0, 1))
    plain = fed_latents(g, b)
    calibrated = fed_latents(g, b, norm_calib="ema", ema_beta=beta)
    with torch.no_grad():
        feats = g.backbone.model.get_image_features(b["pixel_values"], b["image_grid_thw"]).pooler_output
    for row, f in enumerate(feats):  # the images are in the batch's row order
        norms = f.double().norm(dim=-1).tolist()
        mean, ema = sum(norms) / len(norms), norms[0]
        for n in norms[1:]:
            ema = 0.9 * ema + 0.1 * n
        assert abs(mean - ema) > 1e-3 * mean, "the image must tell the mean from the EMA for this test to mean anything"
        want = ema if beta else mean
        torch.testing.assert_close(calibrated[row].norm(dim=-1), torch.full((K,), want, dtype=torch.float32))
        # the first latent comes from the same state in both runs (later ones follow the rescaled inputs)
        torch.testing.assert_close(calibrated[row, 0] / calibrated[row, 0].norm(), plain[row, 0] / plain[row, 0].norm())


def test_zero_mode_never_opens_a_span(world, gap):
    """latent_mode=zero: <|latent_start|> is never sampled, even when it is by far the likeliest token."""
    g, tokenizer, image_processor = gap
    b = prompts(world, tokenizer, image_processor, ["How many?"])
    args = (b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"])
    with biased(g.backbone, g.start_id, 100.0):
        assert (g.generate(*args, max_new_tokens=6) == g.start_id).any()
        assert not (g.generate(*args, max_new_tokens=6, latent_mode="zero") == g.start_id).any()


def test_right_padded_prompts_are_refused(world, gap):
    g, tokenizer, image_processor = gap
    b = prompts(world, tokenizer, image_processor, ["How many red circles are there?", "How many?"])
    right = collate([dict(id=str(i), input_ids=b["input_ids"][i][b["attention_mask"][i].bool()],
                          pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"]) for i in range(2)],
                    tokenizer.pad_token_id)
    assert not right["attention_mask"][:, -1].all(), "the batch must be right-padded for this test"
    with pytest.raises(ValueError, match="left-padded"):
        g.generate(right["input_ids"], right["attention_mask"], b["pixel_values"], b["image_grid_thw"])


def test_stop_at_end_of_turn(world, gap):
    g, tokenizer, image_processor = gap
    b = prompts(world, tokenizer, image_processor, ["How many?", "How many red circles are there?"])
    args = (b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"])
    free = g.generate(*args, max_new_tokens=8)
    stop = int(free[0, 2])  # pretend row 0's third token ends the turn
    assert stop not in free[0, :2].tolist()
    out = g.generate(*args, max_new_tokens=8, stop_ids=[stop])
    row0 = out[0].tolist()
    assert row0[:3] == free[0, :3].tolist() and all(t == latent_loop.DONE for t in row0[3:])


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


def test_training_lowers_both_losses(world, tmp_path):
    """train.main on 4 examples, one step of all 4 per epoch: both losses fall by 10% or more in 8 steps."""
    import train
    data = write_jsonl(tmp_path / "four.jsonl", [json.loads(line) for line in open(world["data"])][:4])
    os.symlink(os.path.join(os.path.dirname(world["data"]), "img"), tmp_path / "img")
    losses = train.main(train.TrainConfig(
        model=world["model"], data=data, target_cache=str(world["root"] / "cache"), latent_tokens=K, lr=3e-3,
        head_lr=3e-3, adapter_dim=16, global_batch=4, micro_batch=2, epochs=8, warmup_ratio=0.0, num_workers=0,
        out_dir=str(tmp_path / "gap")))["losses"]
    assert len(losses) == 8
    (lm0, lat0), (lm, lat) = losses[0], losses[-1]
    assert lm < 0.9 * lm0 and lat < 0.9 * lat0, losses


def test_round_trip_train_save_infer(world, tmp_path):
    """train.py -> checkpoint -> infer.py CLI: single mode prints the checkpoint's greedy response (decoded here
    in-process), batch mode scores every example with the answers.py matcher; the backbone loads in the stock
    class with the same weights."""
    from answers import answers_match, extract_answer
    ckpt = str(tmp_path / "gap")
    run(["train.py", "--model", world["model"], "--data", world["data"], "--target_cache",
         str(world["root"] / "cache"), "--latent_tokens", str(K), "--global_batch", "4", "--max_steps", "2",
         "--lr", "1e-3", "--head_lr", "1e-3", "--adapter_dim", "16", "--out_dir", ckpt, "--num_workers", "2"])
    g, tokenizer, image_processor, _ = load_checkpoint(ckpt, "cpu")
    rows, _ = read_jsonl(world["data"])
    question = "How many red circles are there?"
    p = run(["infer.py", str(world["root"] / "data" / rows[0]["image"]), question, "--ckpt", ckpt,
             "--max_new_tokens", "12"])
    b = prompts(world, tokenizer, image_processor, [question])
    stop = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    expected = g.decode(tokenizer, g.generate(b["input_ids"], b["attention_mask"], b["pixel_values"],
                                              b["image_grid_thw"], max_new_tokens=12, stop_ids=stop)[0])
    assert p.stdout.splitlines()[-2:] == [expected, f"answer: {extract_answer(expected)}"], p.stdout
    run(["infer.py", "--ckpt", ckpt, "--data", world["data"], "--max_new_tokens", "12", "--latent_mode", "noise"])
    results = [json.loads(line) for line in open(os.path.join(ckpt, "results_noise.jsonl"))]
    assert sorted(r["id"] for r in results) == sorted(r["id"] for r in rows)
    by_id = {r["id"]: r for r in rows}
    correct = [answers_match(extract_answer(r["response"]), by_id[r["id"]]["answer"], by_id[r["id"]]["question"])
               for r in results]
    assert [r["correct"] for r in results] == correct
    summary = json.load(open(os.path.join(ckpt, "results_noise.summary.json")))
    assert summary["n"] == 12 and summary["accuracy"] == sum(correct) / 12
    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt)
    config = json.load(open(os.path.join(ckpt, "config.json")))
    assert config["latent_token_ids"] == json.load(open(os.path.join(ckpt, "gap.json")))["latent_token_ids"]
    for (n1, p1), (n2, p2) in zip(stock.named_parameters(), g.backbone.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_checkpoint_of_any_caller_loads(world, gap, tmp_path):
    """save_checkpoint records the head's own configuration (adapter width included), so a checkpoint written
    outside train.py loads back with the same head."""
    g, tokenizer, image_processor = gap
    save_checkpoint(g, tokenizer, image_processor, str(tmp_path / "ckpt"), {}, basis=world["basis"])
    g2, _, _, config = load_checkpoint(str(tmp_path / "ckpt"), "cpu")
    assert config["head_config"] == dict(kind="pca", d=g.head.d, adapter_dim=16)
    a, b = g.head.state_dict(), g2.head.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a gap.json from before head_config: the adapter width is read from the saved weights
    path = tmp_path / "ckpt" / "gap.json"
    old = {k: v for k, v in json.load(open(path)).items() if k not in ("head_config", "layout")}
    path.write_text(json.dumps(dict(old, latent_head="pca")))
    assert load_checkpoint(str(tmp_path / "ckpt"), "cpu")[0].head.adapter_dim == 16


COPY_OUT = {
    "latent_loop": """
import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from latent_loop import generate, decode
from latent_head import LatentHead
model = Qwen2_5_VLForConditionalGeneration.from_pretrained(MODEL).eval()
tok = AutoTokenizer.from_pretrained(MODEL)
tok.add_tokens(["<|latent_start|>", "<|latent_pad|>", "<|latent_end|>"], special_tokens=True)
ids = dict(zip(("start", "pad", "end"), tok.convert_tokens_to_ids(["<|latent_start|>", "<|latent_pad|>", "<|latent_end|>"])))
head = LatentHead("hidden", model.config.text_config.hidden_size)
prompt = torch.tensor([tok("<|im_start|>user\\nHow many?<|im_end|>\\n<|im_start|>assistant\\n")["input_ids"] + [ids["start"]]])
tokens = generate(model, head, ids, 4, prompt, torch.ones_like(prompt), max_new_tokens=8)
assert tokens[0, :5].tolist() == [ids["pad"]] * 4 + [ids["end"]], tokens
print("generated:", decode(tok, tokens[0], ids))
""",
    "losses": """
import torch
from losses import gap_losses, total_loss
torch.manual_seed(0)
h = torch.randn(1, 6, 8, requires_grad=True)
ids = torch.tensor([[5, 1, 2, 2, 3, 7]])  # text, start, pad, pad, end, text
labels = torch.tensor([[-100, 1, -100, -100, -100, 7]])
sums = gap_losses(h, labels, ids, dict(start=1, pad=2, end=3), lambda x: 2 * x, torch.nn.Linear(8, 10),
                  torch.randn(2, 8))
total_loss(sums, sums["n_lm"], sums["n_latent"]).backward()
assert int(sums["n_latent"]) == 2 and int(sums["n_lm"]) == 2 and h.grad[0, 1:3].abs().sum() > 0
print("losses:", float(sums["lm_sum"]), float(sums["latent_sum"]))
""",
}


@pytest.mark.parametrize("piece", sorted(COPY_OUT))
def test_copy_out_alone(world, tmp_path, piece):
    """The loop (with latent_head.py) and the losses run from an empty directory holding only their files, on
    a stock Qwen2.5-VL: nothing else of the project is importable there."""
    for name in [piece] + (["latent_head"] if piece == "latent_loop" else []):
        shutil.copy(os.path.join(HERE, f"{name}.py"), tmp_path)
    guard = "import importlib.util\nassert importlib.util.find_spec('model') is None, 'the project is importable'\n"
    (tmp_path / "use.py").write_text(guard + f"MODEL = {world['model']!r}\n" + COPY_OUT[piece])
    p = run(["use.py"], cwd=tmp_path, env=dict(ENV, PYTHONPATH=str(tmp_path)))
    assert ("generated:" if piece == "latent_loop" else "losses:") in p.stdout


# ----------------------------------------------------------------------------------------------------------
# bad input: errors name the file, line and field

SPAN_5 = "<|latent_start|>" + "<|latent_pad|>" * (K + 1) + "<|latent_end|>"
# (id, how line 2 of a 3-line file is broken, where the error shows: read | item, expected message)
BAD_LINES = [
    ("malformed_json", "{not json", "read", r"d\.jsonl:2: field '<json>': malformed JSON"),
    ("not_an_object", "[1, 2]", "read", r"d\.jsonl:2: field '<json>': expected an object, got list"),
    ("missing_question", dict(question=None), "read", r"d\.jsonl:2: field 'question': missing"),
    ("wrong_type", dict(image=3), "read", r"d\.jsonl:2: field 'image': expected str, got int"),
    ("missing_aux_image", dict(aux_image=None), "read", r"d\.jsonl:2: field 'aux_image': missing, but the response"),
    ("aux_list_length", dict(response="<latent> and <latent>", aux_image=["img/a1.png"]), "read",
     r"d\.jsonl:2: field 'aux_image': 1 images for 2 '<latent>' placeholders"),
    ("duplicate_id", dict(id="s0"), "read", r"d\.jsonl:2: field 'id': duplicate id 's0' \(first on line 1\)"),
    ("corrupt_image", dict(image="broken.png"), "item", r"d\.jsonl:2: field 'image': cannot read image .*broken\.png"),
    ("missing_image", dict(image="img/nope.png"), "item", r"d\.jsonl:2: field 'image': image file not found"),
    ("span_size_not_k", "SPAN_5", "item", rf"d\.jsonl:2: field 'response': latent span has {K + 1} <\|latent_pad\|> "
                                         rf"tokens but K={K}"),
    ("not_in_cache", dict(id="not-in-cache"), "item", r"d\.jsonl:2: field 'aux_image': .*no latent targets for it"),
]


@pytest.mark.parametrize("broken,where,message", [c[1:] for c in BAD_LINES], ids=[c[0] for c in BAD_LINES])
def test_bad_line_is_named_or_skipped_and_counted(world, gap, tmp_path, broken, where, message):
    """A bad line stops reading (or loading the example) with file:line: field; --skip_bad skips and counts it."""
    g, tokenizer, image_processor = gap
    good = [json.loads(line) for line in open(world["data"])][:3]
    os.symlink(os.path.join(os.path.dirname(world["data"]), "img"), tmp_path / "img")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    if broken == "SPAN_5":
        line = dict(good[1], response=good[1]["response"].replace("<latent>", SPAN_5))
    elif isinstance(broken, dict):
        line = {k: v for k, v in dict(good[1], **broken).items() if v is not None}
    else:
        line = broken
    path = write_jsonl(tmp_path / "d.jsonl", [good[0], line, good[2]])

    def dataset(skip_bad=False):
        return GAPDataset(path, tokenizer, image_processor, g.latent_ids, DataSpec(latent_tokens=K), world["cache"],
                          skip_bad)

    if where == "read":
        with pytest.raises(DataError, match=message):
            dataset()
        assert len(dataset(skip_bad=True)) == 2 and dataset(skip_bad=True).skipped == 1
    else:
        ds = dataset()
        ds[0], ds[2]
        with pytest.raises(DataError, match=message):
            ds[1]
        ds.return_errors = True  # what the training DataLoader's workers hand back
        assert ds[1]["error"].startswith(f"{path}:2: field ")


def test_long_sequence_and_other_k_are_named(world, gap, tmp_path):
    """A sequence over max_len, and targets cached for another K, name line and field."""
    g, tokenizer, image_processor = gap
    ds = GAPDataset(world["data"], tokenizer, image_processor, g.latent_ids, DataSpec(latent_tokens=K, max_len=20),
                    world["cache"])
    with pytest.raises(DataError, match=r"train\.jsonl:1: field 'response': sequence of \d+ tokens exceeds max_len=20"):
        ds[0]
    ds = GAPDataset(world["data"], tokenizer, image_processor, g.latent_ids, DataSpec(latent_tokens=K), world["cache"])
    ds.spec = DataSpec(latent_tokens=9)
    with pytest.raises(DataError, match=r"train\.jsonl:1: field 'aux_image': cached target has 4 latent vectors but K=9"):
        ds[0]
    good = json.loads(open(world["data"]).readline())
    os.symlink(os.path.join(os.path.dirname(world["data"]), "img"), tmp_path / "img")
    path = write_jsonl(tmp_path / "e.jsonl", [dict(good, id="x1", aux_image="img/gone.png")])
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
        return g.head(g.states(embeds, b["attention_mask"], pos)[:, :-1][slot_next])

    with torch.no_grad():
        tf = g(*args, latent_targets=b["latent_targets"])
        ss = g(*args, latent_targets=b["latent_targets"], scheduled_sampling=True)
        v2 = predictions(predictions(b["latent_targets"]))
    expected = float((v2 - b["latent_targets"]).pow(2).mean(-1).sum())
    assert abs(float(ss["latent_sum"]) - expected) < 1e-5
    assert abs(float(ss["latent_sum"]) - float(tf["latent_sum"])) > 1e-4
