"""Tests of difficulty.py's scorer on a tiny random Qwen2.5-VL built here (no download): shared-prefill sampling,
the CLI's output, a real kill and resume, bad input, and two torchrun ranks against one process. (Answer
extraction and matching: test_answers.py.)

    python -m pytest -q test_difficulty.py
"""
import json
import os
import sys

import pytest
import torch

import latent_loop
from answers import answers_match, normalize_answer
from common import parse_config
from conftest import kill_after_first_result, run
from data import DataError, DataSpec, collate, encode_prompt, open_image, read_jsonl
from difficulty import DifficultyConfig, load_scorer, main
from model import load_backbone
from tiny import build_tiny, write_sample_data

# ----------------------------------------------------------------------------------------------------
# the scorer: N samples of the base model per example

N = 8
# long enough answers that a kill lands mid-run; chunks of 3 so that 8 examples make uneven chunks; the default
# (continuous) schedule, where a sample that stops early (p ~ 2/600 per step) hands its row to the next one
SLOW = ["--samples", str(N), "--batch_size", "3", "--max_new_tokens", "128", "--temperature", "1.0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("difficulty")
    return dict(root=root, model=build_tiny(str(root / "tiny")), data=write_sample_data(str(root / "data"), 8, seed=1))


@pytest.fixture(scope="module")
def scorer(tiny):
    return load_scorer(tiny["model"], "cpu")


def cli(tiny, out, *flags, data=None):
    return ["difficulty.py", "--model", tiny["model"], "--data", data or tiny["data"], "--out", str(out), *flags]


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(tiny):
    """One uninterrupted CLI run in a subprocess: what the killed-and-resumed and the torchrun runs must equal."""
    out = tiny["root"] / "reference" / "scored.jsonl"
    out.parent.mkdir()
    run([sys.executable, *cli(tiny, out, *SLOW)])
    return out


def batch_of(tiny, scorer, indices):
    g, tokenizer, image_processor = scorer
    rows, _ = read_jsonl(tiny["data"], need_response=False, need_answer=True)
    items = [encode_prompt(tokenizer, image_processor, open_image(rows[i], "image"), rows[i]["question"],
                           DataSpec(latent_tokens=0), rows[i]["id"]) for i in indices]
    b = collate(items, tokenizer.pad_token_id, left=True)
    return (b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"])


def traced(g, args, **kw):
    """Tokens (R, S) and the logits (R, S, V) each was chosen from, read from latent_loop.latent_steps."""
    steps = list(latent_loop.latent_steps(g.backbone, g.head, g.latent_ids, g.latent_tokens, *args, logits=True,
                                          **kw))
    return dict(tokens=torch.stack([s.token for s in steps], 1), logits=torch.stack([s.logits for s in steps], 1))


def test_scorer_is_the_base_model(tiny, scorer):
    """Adding the latent ids resizes nothing, and every step's logits (but the 3 banned latent ids) are the
    stock model's, fresh from disk, teacher-forced on the generated tokens."""
    g, tokenizer, _ = scorer
    stock, _, _ = load_backbone(tiny["model"], "cpu")
    assert g.backbone.get_input_embeddings().weight.shape == stock.get_input_embeddings().weight.shape
    args = batch_of(tiny, scorer, [0])
    out = traced(g, args, max_new_tokens=6)
    with torch.no_grad():
        ids = torch.cat([args[0], out["tokens"][:, :-1]], 1)
        ref = stock(input_ids=ids, pixel_values=args[2], image_grid_thw=args[3],
                    mm_token_type_ids=(ids == g.image_token_id).int()).logits[:, args[0].shape[1] - 1:]
    keep = torch.ones(ref.shape[-1], dtype=torch.bool)
    keep[[g.start_id, g.pad_id, g.end_id]] = False
    torch.testing.assert_close(out["logits"][..., keep], ref[..., keep].float(), atol=1e-4, rtol=1e-4)


def test_shared_prefill_greedy_equals_separate_calls(tiny, scorer):
    """Greedy: the N rows of one call with 2 left-padded prompts x num_samples=N are the batch-1 calls' tokens."""
    g = scorer[0]
    shared = g.generate(*batch_of(tiny, scorer, [0, 3]), max_new_tokens=10, num_samples=3)
    for b, i in enumerate([0, 3]):
        alone = g.generate(*batch_of(tiny, scorer, [i]), max_new_tokens=10)
        assert torch.equal(shared[3 * b:3 * b + 3], alone.expand(3, -1))


def test_shared_prefill_samples_are_independent_model_samples(tiny, scorer):
    """Sampling: the rows of one prompt differ, and each row's every step used exactly the distribution a
    separate, uncached, batch-1 forward over the prompt and that row's own tokens gives (so the cache repeat
    leaks nothing between rows)."""
    g = scorer[0]
    args = batch_of(tiny, scorer, [1, 2])
    out = traced(g, args, max_new_tokens=8, num_samples=4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    tokens = out["tokens"]  # (2*4, 8)
    for b in range(2):
        assert len({tuple(t.tolist()) for t in tokens[4 * b:4 * b + 4]}) == 4, "the N samples of a prompt differ"
    keep = torch.isfinite(out["logits"][0, 0])
    for row in range(8):
        b = row // 4
        prompt = args[0][b][args[1][b].bool()][None]  # without the left padding
        ids = torch.cat([prompt, tokens[row:row + 1, :-1]], 1)
        patches = args[2].shape[0] // 2  # both query images have the same size
        with torch.no_grad():
            g.backbone.model.rope_deltas = None
            ref = g.backbone(input_ids=ids, pixel_values=args[2][b * patches:(b + 1) * patches],
                             image_grid_thw=args[3][b:b + 1], mm_token_type_ids=(ids == g.image_token_id).int()
                             ).logits[0, prompt.shape[1] - 1:]
        torch.testing.assert_close(out["logits"][row][:, keep], ref[:, keep].float(), atol=1e-4, rtol=1e-4)


def test_cli_scores_every_example_in_input_order(tiny, tmp_path):
    """Every example, in input order, with its own fields, N answers and accuracy = the fraction of answers
    that match. The tiny model is random, so the truths are set to one of its own answers: the samples do not
    depend on `answer` (it is not in the prompt), so the second run samples the same answers and scores them."""
    quick = ["--samples", str(N), "--batch_size", "3", "--max_new_tokens", "12"]
    first = main(parse_config(DifficultyConfig, cli(tiny, tmp_path / "a.jsonl", *quick)[1:]))
    inputs = read_lines(tiny["data"])
    a = read_lines(tmp_path / "a.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in inputs] and first["examples"] == len(inputs)
    relabeled = os.path.join(os.path.dirname(tiny["data"]), "relabeled.jsonl")  # beside the images it names
    with open(relabeled, "w") as f:
        for i, (r, s) in enumerate(zip(inputs, a)):
            truth = next((x for x in s["answers"][i % N:] + s["answers"] if normalize_answer(x)), r["answer"])
            f.write(json.dumps(dict(r, answer=truth)) + "\n")
    summary = main(parse_config(DifficultyConfig, cli(tiny, tmp_path / "b.jsonl", *quick, "--tau", "0.25",
                                                      data=relabeled)[1:]))
    b = read_lines(tmp_path / "b.jsonl")
    questions = {r["id"]: r["question"] for r in inputs}
    for r, s, t in zip(read_lines(relabeled), a, b):
        assert {k: t[k] for k in r if k != "accuracy"} == {k: r[k] for k in r if k != "accuracy"}
        assert t["answers"] == s["answers"] and len(t["answers"]) == N
        correct = sum(answers_match(x, r["answer"], questions[r["id"]]) for x in t["answers"])
        assert t["accuracy"] == correct / N and t["accuracy"] >= 1 / N
    accs = [t["accuracy"] for t in b]
    assert summary["mean_accuracy"] == pytest.approx(sum(accs) / len(accs))
    assert summary["accuracy_le_tau"] == sum(x <= 0.25 for x in accs)
    assert summary["latent_supervised"] == summary["accuracy_le_tau"]  # every sample response has a <latent>
    with open(str(tmp_path / "b.summary.json")) as f:
        assert json.load(f) == summary


@pytest.mark.parametrize("schedule", ["continuous", "static"])
def test_kill_and_resume_equals_uninterrupted(tiny, reference, tmp_path, schedule):
    """SIGKILL a run after its first result is written (continuous: one example; static: a chunk), keep its first
    line and a torn second, as a kill mid-write would leave them, restart: the restart skips the done id and the
    output is byte-identical to the uninterrupted run's, made with the continuous schedule whichever schedule
    this run uses (each sample draws from its own generator)."""
    out = tmp_path / "scored.jsonl"
    part = tmp_path / "scored.rank0.jsonl"
    flags = [*SLOW, "--schedule", schedule]
    n_done = kill_after_first_result(cli(tiny, out, *flags), part)
    assert 1 <= n_done < 8 and not out.exists()
    # as if killed after the first line, mid-way through the second: the rest of its chunk is not done
    part.write_text(part.read_text().splitlines(keepends=True)[0] + '{"id": "s7", "image": "img/q7.p')
    resumed = run([sys.executable, *cli(tiny, out, *flags)])
    assert "8 examples, 1 already done" in resumed.stdout
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["schedule"] == schedule
    assert out.read_bytes() == reference.read_bytes()
    ids = [r["id"] for r in read_lines(part)]
    assert len(ids) == len(set(ids)) == 8


def test_bad_lines_are_reported_or_skipped_and_counted(tiny, tmp_path):
    """A malformed line stops the run naming its line (--no-skip_bad); with --skip_bad the run completes and
    the summary counts it, and an unreadable image found while scoring, as well."""
    lines = open(tiny["data"]).read().splitlines()
    lines.insert(2, '{"id": "broken", "image": ')  # line 3
    lines[5] = json.dumps(dict(json.loads(lines[5]), image="img/missing.png"))  # line 6
    bad = os.path.join(os.path.dirname(tiny["data"]), "bad.jsonl")
    with open(bad, "w") as f:
        f.write("\n".join(lines) + "\n")
    quick = ["--samples", "2", "--batch_size", "4", "--max_new_tokens", "4"]
    argv = cli(tiny, tmp_path / "bad.scored.jsonl", *quick, data=bad)[1:]
    with pytest.raises(DataError, match=r"bad\.jsonl:3: field '<json>': malformed JSON"):
        main(parse_config(DifficultyConfig, argv))
    summary = main(parse_config(DifficultyConfig, argv + ["--skip_bad"]))
    assert summary["skipped"] == 2 and summary["examples"] == 7
    scored = read_lines(tmp_path / "bad.scored.jsonl")
    assert [r["id"] for r in scored] == [json.loads(x)["id"] for i, x in enumerate(lines) if i not in (2, 5)]


def test_torchrun_two_ranks_equal_one_process(tiny, reference, tmp_path):
    """Two gloo ranks each score a slice of chunks; the merged output is the one-process output, byte for byte."""
    out = tmp_path / "scored.jsonl"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *cli(tiny, out, *SLOW)])
    assert (tmp_path / "scored.rank0.jsonl").exists() and (tmp_path / "scored.rank1.jsonl").exists()
    assert out.read_bytes() == reference.read_bytes()
