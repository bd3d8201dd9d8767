"""Tests of the content controls of infer.py (controls.py: --latent_mode shuffled and oracle, --save_latents) and of
compare.py, on a tiny random GAP checkpoint whose LM head is biased towards <|latent_start|> so that some rows open
a span and some do not.

    python -m pytest -q test_controls.py
"""
import json
import os

import pytest
import torch

import stats
from common import DataError, parse_config
from conftest import biased, write_jsonl

# sampled (each row from its own generator) with <|latent_start|>'s logit raised: some rows open a span, some not
# (greedy, the random model's answers barely depend on the image: all rows open one, or none)
BIAS = float(os.environ.get("BIAS", "3.0"))
SAMPLED = ["--max_new_tokens", "24", "--temperature", "1.0"]


@pytest.fixture(scope="module")
def data(world):
    """The sample rows with a `category` (two groups), beside their images."""
    with open(world["data"]) as f:
        rows = [json.loads(line) for line in f]
    return write_jsonl(os.path.join(os.path.dirname(world["data"]), "controls.jsonl"),
                       [dict(r, category=["a", "b"][i % 2]) for i, r in enumerate(rows)])


def infer(ckpt, data, out, *flags):
    """infer.py --data in this process, with the LM head biased towards opening spans; (summary, result lines)."""
    from infer import InferConfig, Runner, run_batch
    cfg = parse_config(InferConfig, ["--ckpt", ckpt, "--data", data, "--out", str(out), *SAMPLED, "--batch_size", "5",
                                     *flags])
    runner = Runner(cfg)
    with biased(runner.gap.backbone, runner.tokenizer.convert_tokens_to_ids("<|latent_start|>"), BIAS):
        summary = run_batch(cfg, runner)
    with open(out) as f:
        return summary, [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def model_run(ckpt, data, tmp_path_factory):
    """The first pass: model mode with --save_latents (static schedule)."""
    return infer(ckpt, data, tmp_path_factory.mktemp("model") / "model.jsonl", "--save_latents", "--schedule",
                 "static")


def test_saved_latents_are_what_was_fed(ckpt, data, model_run, tmp_path, monkeypatch):
    """--save_latents keeps, for each row that opened a span, the K latents its first span was fed (the same in
    both schedules, and the results are those of a run without it); fed back to the row itself as a 'donor', they
    give back model mode's answers."""
    import controls
    summary, model = model_run
    spans = [r["span_latents"] for r in model]
    # some rows fill a span, some do not (a span cut by max_new_tokens keeps no latents)
    assert all(r["span"] for r in model if r["span_latents"]) and 3 <= sum(spans) < len(spans), spans
    assert summary["span_rate"] == sum(r["span"] for r in model) / len(model)
    assert summary["well_formed_rate"] == sum(r["well_formed"] for r in model) / len(model)
    plain = infer(ckpt, data, tmp_path / "plain.jsonl", "--schedule", "static")[1]
    drop = ("latency_s", "span_latents")
    assert [{k: v for k, v in r.items() if k not in drop} for r in model] == \
        [{k: v for k, v in r.items() if k not in drop} for r in plain]
    continuous = infer(ckpt, data, tmp_path / "cont.jsonl", "--save_latents")[1]
    folder, cont_folder = (controls.latents_dir(summary["out"]), controls.latents_dir(str(tmp_path / "cont.jsonl")))
    for r, c in zip(model, continuous):
        assert r["span_latents"] == c["span_latents"]
        if r["span_latents"]:
            torch.testing.assert_close(controls.load_latents(cont_folder, r["id"]),
                                       controls.load_latents(folder, r["id"]))
    # the saved latents are what the loop fed in the first span (slots 0 .. K-1), recomputed for the first chunk
    from data import collate, read_jsonl
    from infer import InferConfig, Runner, example_generators
    cfg = parse_config(InferConfig, ["--ckpt", ckpt, *SAMPLED])
    runner = Runner(cfg)
    K, chunk = runner.gap.latent_tokens, read_jsonl(data)[0][:5]
    batch = collate([runner.encode_row(r) for r in chunk], runner.tokenizer.pad_token_id, left=True)
    with biased(runner.gap.backbone, runner.tokenizer.convert_tokens_to_ids("<|latent_start|>"), BIAS):
        steps = list(runner.gap.steps(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                      batch["image_grid_thw"], runner.sampling,
                                      generator=example_generators(cfg, chunk, "cpu")))
    checked = 0
    for b, r in enumerate(model[:5]):
        fed = [s.fed[b] for s in steps if s.fed is not None and 0 <= int(s.slot[b]) < K][:K]
        if r["span_latents"]:
            torch.testing.assert_close(controls.load_latents(folder, r["id"]), torch.stack(fed))
            checked += 1
    assert checked
    # each row its own donor: model mode's answers again
    monkeypatch.setattr(controls, "assign_donors", lambda rows, eligible, seed, key: (
        {r["id"]: r["id"] for r in rows if r["id"] in eligible}, {}))
    own = infer(ckpt, data, tmp_path / "own.jsonl", "--latent_mode", "shuffled", "--donors", summary["out"])[1]
    for r, o in zip(model, own):
        if r["span_latents"]:
            assert o["response"] == r["response"] and o["donor"] == r["id"]


def test_shuffled_feeds_a_donor_of_the_group(ckpt, data, model_run, tmp_path, monkeypatch):
    """shuffled: each row's donor and placebo are two other rows of its --donor_group whose model run opened a
    span (seeded: the same assignment again); the row is fed its donor's saved latents (so its answer is that of
    latent_steps given them); the summary's follows rates are recomputed here from the lines; a resume with
    another donor file is refused, and a donor file that is not a model run with saved latents is refused."""
    import controls
    from answers import answers_match
    from infer import InferConfig, Runner, example_generators
    from data import read_jsonl
    summary, model = model_run
    eligible = {r["id"] for r in model if r["span_latents"]}
    rows = {r["id"]: r for r in read_jsonl(data)[0]}
    out = tmp_path / "shuffled.jsonl"
    import infer as infer_py
    answer, fed = infer_py.Runner.answer, []

    def recording(self, items, *args, given=None, **kwargs):  # what each static chunk is fed
        fed.append(given)
        return answer(self, items, *args, given=given, **kwargs)
    monkeypatch.setattr(infer_py.Runner, "answer", recording)
    sh, res = infer(ckpt, data, out, "--latent_mode", "shuffled", "--donors", summary["out"], "--donor_group",
                    "category", "--seed", "3")
    monkeypatch.undo()
    fed = torch.cat(fed)
    for n, r in enumerate(res):  # the donor's saved latents, or zeros for a row without a donor
        want = controls.load_latents(controls.latents_dir(summary["out"]), r["donor"]) if r["donor"] else 0 * fed[n]
        assert torch.equal(fed[n], want)
    with_donor = [r for r in res if r["donor"]]
    assert with_donor and sh["shuffled"]["with_donor"] == len(with_donor)
    for r in with_donor:
        assert len({r["id"], r["donor"], r["placebo"]}) == 3 and {r["donor"], r["placebo"]} <= eligible
        assert rows[r["donor"]]["category"] == rows[r["placebo"]]["category"] == rows[r["id"]]["category"]
    again = controls.assign_donors(list(rows.values()), eligible, 3, controls.group_key("category"))
    assert again[0] == {r["id"]: r["donor"] for r in with_donor}
    # the answer of a row with a donor is what the loop answers when fed the donor's latents
    cfg = parse_config(InferConfig, ["--ckpt", ckpt, *SAMPLED, "--latent_mode", "shuffled", "--seed", "3"])
    runner = Runner(cfg)
    chunk = res[:5]  # the first static chunk (--batch_size 5): padded as in the run, so sampling rounds alike
    folder = controls.latents_dir(summary["out"])
    given = torch.stack([controls.load_latents(folder, r["donor"]) if r["donor"] else torch.zeros_like(
        controls.load_latents(folder, with_donor[0]["donor"])) for r in chunk])
    with biased(runner.gap.backbone, runner.tokenizer.convert_tokens_to_ids("<|latent_start|>"), BIAS):
        mine = [rows[r["id"]] for r in chunk]
        responses = runner.answer([runner.encode_row(x) for x in mine], example_generators(cfg, mine, "cpu"),
                                  given=given)
    assert responses == [r["response"] for r in chunk] and any(r["donor"] for r in chunk)
    # follows: of rows whose donor's gold answer differs, the share answered with it; the same for the placebo
    for name in ("donor", "placebo"):
        items = [x for x in with_donor if rows[x[name]]["answer"] != rows[x["id"]]["answer"]]
        hits = sum(answers_match(x["pred"], rows[x[name]]["answer"], rows[x["id"]]["question"]) for x in items)
        assert sh["shuffled"][f"follows_{name}_answer"] == dict(n=len(items), share=hits / len(items) if items else None)
    # a derived file names what it came from; another donor file is not resumed into it
    config = json.load(open(str(out).replace(".jsonl", ".config.json")))
    assert config["donors"] == summary["out"] and config["donors_config"]["latent_mode"] == "model"
    other = tmp_path / "other_model.jsonl"
    infer(ckpt, data, other, "--save_latents", "--seed", "1")
    with pytest.raises(DataError, match="other flags.*donors"):
        infer(ckpt, data, out, "--latent_mode", "shuffled", "--donors", str(other), "--donor_group", "category",
              "--seed", "3")
    zero = tmp_path / "zero.jsonl"
    infer(ckpt, data, zero, "--latent_mode", "zero")
    with pytest.raises(DataError, match="latent_mode is 'zero'"):
        infer(ckpt, data, tmp_path / "s2.jsonl", "--latent_mode", "shuffled", "--donors", str(zero))
    with pytest.raises(DataError, match="field 'group'"):  # no such field in the rows
        infer(ckpt, data, tmp_path / "s3.jsonl", "--latent_mode", "shuffled", "--donors", summary["out"],
              "--donor_group", "group")


def test_oracle_feeds_the_aux_targets(ckpt, data, world, tmp_path, monkeypatch):
    """oracle: every row's spans are fed its aux image's targets -- from the target cache, or computed by the
    checkpoint's (frozen) vision tower: the same latents, the same answers, and those of the loop given the
    cache's targets. A row without aux_image is refused, naming its line and field."""
    import infer as infer_py
    from data import aux_hash, read_jsonl
    from infer import InferConfig, Runner, example_generators
    rows = read_jsonl(data)[0]
    targets = torch.stack([world["cache"].get(r["id"], aux_hash(r)).float() for r in rows])
    answer, fed = infer_py.Runner.answer, []

    def recording(self, items, *args, given=None, **kwargs):  # what each static chunk is fed
        fed.append(given)
        return answer(self, items, *args, given=given, **kwargs)
    monkeypatch.setattr(infer_py.Runner, "answer", recording)
    cached = infer(ckpt, data, tmp_path / "cached.jsonl", "--latent_mode", "oracle", "--target_cache",
                   str(world["root"] / "cache"))[1]
    assert torch.equal(torch.cat(fed), targets)
    fed.clear()
    computed = infer(ckpt, data, tmp_path / "computed.jsonl", "--latent_mode", "oracle")[1]
    torch.testing.assert_close(torch.cat(fed), targets)
    monkeypatch.undo()
    assert [r["response"] for r in cached] == [r["response"] for r in computed]
    cfg = parse_config(InferConfig, ["--ckpt", ckpt, *SAMPLED, "--latent_mode", "oracle"])
    runner = Runner(cfg)
    given = torch.stack([world["cache"].get(r["id"], aux_hash(r)).float() for r in rows[:5]])
    with biased(runner.gap.backbone, runner.tokenizer.convert_tokens_to_ids("<|latent_start|>"), BIAS):
        responses = runner.answer([runner.encode_row(r) for r in rows[:5]], example_generators(cfg, rows[:5], "cpu"),
                                  given=given)
    assert responses == [r["response"] for r in cached[:5]]
    assert any(r["span"] for r in cached[:5])
    with open(data) as f:
        lines = f.read().splitlines()
    row = json.loads(lines[3])
    del row["aux_image"], row["response"]
    bad = write_jsonl(os.path.join(os.path.dirname(data), "no_aux.jsonl"), lines[:3] + [json.dumps(row)])
    with pytest.raises(DataError, match=r"no_aux.jsonl:4: field 'aux_image'"):
        infer(ckpt, bad, tmp_path / "bad.jsonl", "--latent_mode", "oracle")


def test_compare_pairs_rows_by_id(tmp_path):
    """compare.py: the paired tests of stats.py over rows paired by id (b's file in another order gives the same
    numbers); other rows, or an unscored row, are a one-line error naming the file."""
    import compare
    a = [1, 1, 1, 0, 1, 0, 1, 1, 0, 1]
    b = [0, 1, 0, 0, 1, 1, 0, 1, 0, 0]
    pa = write_jsonl(tmp_path / "a.jsonl", [dict(id=f"x{i}", correct=bool(v)) for i, v in enumerate(a)])
    pb = write_jsonl(tmp_path / "b.jsonl", [dict(id=f"x{i}", correct=bool(v)) for i, v in reversed(list(enumerate(b)))])
    c = compare.main(parse_config(compare.CompareConfig, [pa, pb, "--n_boot", "2000"]))
    n10, n01, p = stats.mcnemar(a, b)
    boot = stats.paired_bootstrap([a], [b], n_boot=2000)
    assert (c["n10"], c["n01"], c["p_mcnemar"]) == (n10, n01, p) == (4, 1, pytest.approx(0.375))
    assert (c["diff"], c["lo"], c["hi"], c["p_bootstrap"]) == (boot["diff"], boot["lo"], boot["hi"], boot["p"])
    assert c["acc_a"] == 0.7 and c["acc_b"] == 0.4 and c["n"] == 10
    short = write_jsonl(tmp_path / "short.jsonl", [dict(id=f"x{i}", correct=True) for i in range(9)])
    with pytest.raises(DataError, match="id 'x9' is only in .*a.jsonl"):
        compare.main(parse_config(compare.CompareConfig, [pa, short]))
    unscored = write_jsonl(tmp_path / "u.jsonl", [dict(id="x0", correct=None)])
    with pytest.raises(DataError, match=r"u.jsonl:1: field 'correct'"):
        compare.main(parse_config(compare.CompareConfig, [unscored, pa]))


def test_harness_shuffled_feeds_a_banked_donor(ckpt, world):
    """The adapter's latent_mode shuffled: a request is answered with the model-mode latents of another request
    (this call's or an earlier one's) drawn with the seeded generator, the answer the loop gives when fed them;
    oracle is refused (a benchmark's rows carry no aux image)."""
    import random
    import harness
    from data import open_image, read_jsonl
    rows = read_jsonl(world["data"])[0][:6]
    requests = [dict(images=[open_image(r, "image")], text=r["question"], dataset="toy") for r in rows]
    adapter = harness.GAPModel(ckpt=ckpt, latent_mode="shuffled", max_new_tokens=32, seed=5, output="response")
    runner = adapter.runner
    start = runner.tokenizer.convert_tokens_to_ids("<|latent_start|>")
    model = harness.GAPModel(ckpt=ckpt, max_new_tokens=32, output="response").runner
    with biased(runner.gap.backbone, start, 0.45), biased(model.gap.backbone, start, 0.45):  # greedy: one span, then text
        got = adapter.respond(requests[:4]) + adapter.respond(requests[4:])
        items = [model.encode(open_image(r, "image"), r["question"]) for r in rows]
        latents = []
        plain = model.answer(items[:4], latents=latents) + model.answer(items[4:], latents=latents)
        assert all(x is not None for x in latents)
        rng = random.Random("shuffle-5-0")
        given = [latents[rng.choice([i for i in range(4) if i != n])] for n in range(4)]
        given += [latents[rng.choice([i for i in range(6) if i != n])] for n in (4, 5)]
        want = model.answer(items[:4], given=torch.stack(given[:4]), sampling=runner.sampling) + \
            model.answer(items[4:], given=torch.stack(given[4:]), sampling=runner.sampling)
    assert got == want and got != plain
    with pytest.raises(DataError, match="oracle"):
        harness.GAPModel(ckpt=ckpt, latent_mode="oracle")
