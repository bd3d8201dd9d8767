"""Tests of difficulty.py: answer extraction and matching (also used by infer.py for evaluation), then the
scorer on a tiny random Qwen2.5-VL built here (no download): shared-prefill sampling, the CLI's output, a real
kill and resume, bad input, and two torchrun ranks against one process.

    python -m pytest -q test_difficulty.py
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from data import DataError, DataSpec, collate, encode_prompt, open_image, read_jsonl
from difficulty import (DifficultyConfig, answers_match, extract_answer, load_scorer, main, normalize_answer,
                        parse_options)
from model import load_backbone, parse_config
from tiny import build_tiny, write_sample_data

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=HERE)

# ----------------------------------------------------------------------------------------------------
# extract_answer

EXTRACT_CASES = [
    ("tag", "<think>The tallest bar is 2020.</think><answer>B</answer>", "B"),
    ("last_tag_wins", "<answer>A</answer> wait, recheck... <answer>12</answer>", "12"),
    ("truncated_tag", "Counting the apples.\n<answer> 42 cm", "42 cm"),
    ("tag_multiline", "<answer>\nB\n</answer>", "B"),
    ("phrase_inside_tag", "<answer>The answer is C.</answer>", "C"),
    ("boxed_inside_tag", "<answer>so \\boxed{7}</answer>", "7"),
    ("boxed_nested", "Thus the ratio is \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),
    ("boxed_nested_deep", "We get \\boxed{a^{2}+b^{2}} as claimed.", "a^{2}+b^{2}"),
    ("last_boxed_wins", "First \\boxed{5}, corrected: \\boxed{6}", "6"),
    ("boxed_text", "\\boxed{\\text{Paris}}.", "Paris"),
    ("boxed_over_phrase", "The answer is 5? No: \\boxed{6}", "6"),
    ("answer_is", "The triangle is isosceles, so the answer is 12.", "12"),
    ("answer_is_decimal_kept", "The answer is 3.14 meters. Done.", "3.14 meters"),
    ("last_answer_is_wins", "I think the answer is B. Checking again, the answer is C.", "C"),
    ("final_answer_colon", "Step 1: ...\nFinal Answer: (B)", "(B)"),
    ("markdown_bold", "Reasoning...\n**Final Answer:** 3.5 cm", "3.5 cm"),
    ("answer_on_next_line", "The answer is\n15", "15"),
    ("dollar_wrapped", "The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("currency_kept", "the answer is $3.50. That's the price", "$3.50"),
    ("text_wrapper", "$\\text{yes}$", "yes"),
    ("last_line", "Step 1: count rows.\nStep 2: multiply.\n\n15\n\n", "15"),
    ("empty", "", ""),
]


@pytest.mark.parametrize("response,expected", [c[1:] for c in EXTRACT_CASES],
                         ids=[c[0] for c in EXTRACT_CASES])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


# ----------------------------------------------------------------------------------------------------
# answers_match(extract_answer(response), truth, question)

Q_BARS = ("Which year has the tallest bar?\nA. 2019\nB. 2020\nC. 2021\nD. 2022\n"
          "Answer with the option's letter from the given choices directly.")
Q_ANGLE = ("In the figure, angle ABC = 40°. What is angle ACB? "
           "Choices: A: 30°, B: 50°, C: 60°, D: 70°")
Q_RECT = "What is the perimeter of the rectangle?\n(A) 12 cm\n(B) 15 cm\n(C) 18 cm\n(D) 24 cm"
Q_APPLES = "How many apples are in the picture? A. 12 B. 15 C. 18 D. 21"
Q_YESNO = "Question: Is Navy Blue the minimum?\nChoices:\n(A) yes\n(B) no"

MATCH_CASES = [
    # multiple choice, letter vs letter
    ("mc_letter", "B", "B", Q_BARS, True),
    ("mc_paren", "(B)", "B", Q_BARS, True),
    ("mc_period", "B.", "B", Q_BARS, True),
    ("mc_letter_with_text", "B) 2020", "B", Q_BARS, True),
    ("mc_option_word", "Option B", "B", Q_BARS, True),
    ("mc_answer_is", "Looking at the bars, the answer is B.", "B", Q_BARS, True),
    ("mc_tag_lowercase", "<answer>b</answer>", "B", None, True),
    ("mc_wrong_letter", "C", "B", Q_BARS, False),
    ("mc_letter_wins_over_text", "A) 2020", "B", Q_BARS, False),
    ("mc_wrong_letter_no_question", "The answer is A", "B", None, False),
    # multiple choice, letter vs option text (needs the question)
    ("mc_text_pred_letter_truth", "2020", "B", Q_BARS, True),
    ("mc_wrong_text_pred", "2021", "B", Q_BARS, False),
    ("mc_letter_pred_text_truth", "C", "60°", Q_ANGLE, True),
    ("mc_wrong_letter_text_truth", "D", "60°", Q_ANGLE, False),
    ("mc_text_units_vs_letter", "60 degrees", "C", Q_ANGLE, True),
    ("mc_paren_options_letter", "(C) 18 cm", "C", Q_RECT, True),
    ("mc_paren_options_text", "18", "C", Q_RECT, True),
    ("mc_inline_options", "B", "15", Q_APPLES, True),
    ("mc_inline_wrong", "C", "15", Q_APPLES, False),
    ("mc_letter_without_options", "B", "15", None, False),
    ("mc_yes_option", "A", "yes", Q_YESNO, True),
    ("mc_no_text_vs_letter", "no", "B", Q_YESNO, True),
    # numbers
    ("num_thousands_pred", "1,234", "1234", None, True),
    ("num_thousands_truth", "There are 1234 people.\nThe answer is 1234", "1,234", None, True),
    ("num_units", "12 cm", "12", None, True),
    ("num_square_units", "The area is 24 cm^2, so the answer is 24 cm^2.", "24", None, True),
    ("num_degrees_latex", "\\boxed{45^\\circ}", "45", None, True),
    ("num_degrees_words", "45 degrees", "45°", None, True),
    ("num_currency", "$3.50", "3.5", None, True),
    ("num_percent_face", "30%", "30", None, True),
    ("num_percent_fraction", "30%", "0.3", None, True),
    ("num_percent_truth", "0.3", "30\\%", None, True),
    ("num_fraction_vs_decimal", "3/4", "0.75", None, True),
    ("num_latex_frac", "\\boxed{\\frac{3}{4}}", "0.75", None, True),
    ("num_decimal_vs_fraction", "0.75", "3/4", None, True),
    ("num_rel_tol", "3.1416", "3.14", None, True),
    ("num_rounds_to_truth", "3.14159", "3.1", None, True),
    ("num_third", "1/3", "0.33", None, True),
    ("num_int_float", "12.0", "12", None, True),
    ("num_variable_prefix", "x = 5", "5", None, True),
    ("num_unicode_minus", "−3", "-3", None, True),
    ("num_off_by_one", "13", "12", None, False),
    ("num_extra_digit", "120", "12", None, False),
    ("num_int_exact", "12.5", "12", None, False),
    ("num_outside_tol", "3.2", "3.14", None, False),
    ("num_no_percent_no_scale", "30", "0.3", None, False),
    ("num_two_numbers", "12 or 13", "12", None, False),
    ("num_decimal_not_thousands", "1,234", "1.234", None, False),
    ("num_negative", "-5", "5", None, False),
    # yes / no
    ("yn_period", "Yes.", "yes", None, True),
    ("yn_sentence", "yes, it is", "Yes", None, True),
    ("yn_no_sentence", "No, the lines are not parallel.", "no", None, True),
    ("yn_bold", "**Yes**", "yes", None, True),
    ("yn_opposite", "no", "yes", None, False),
    ("yn_opposite_sentence", "Yes, they are parallel.", "no", None, False),
    ("yn_not", "Not sure", "no", None, False),
    # free-form short answers
    ("ff_article_case", "The Eiffel Tower", "eiffel tower", None, True),
    ("ff_quotes", '"Red"', "red", None, True),
    ("ff_whitespace_period", "  Paris.  ", "paris", None, True),
    ("ff_text_wrapper", "\\boxed{\\text{circle}}", "circle", None, True),
    ("ff_superset_pred", "red and blue", "red", None, False),
    ("ff_subset_pred", "red", "red and blue", None, False),
    ("ff_different", "blue", "red", None, False),
    ("ff_empty_pred", "", "red", None, False),
]


@pytest.mark.parametrize("response,truth,question,expected", [c[1:] for c in MATCH_CASES],
                         ids=[c[0] for c in MATCH_CASES])
def test_match_table(response, truth, question, expected):
    assert answers_match(extract_answer(response), truth, question) is expected


def test_match_table_has_enough_negatives():
    assert len(MATCH_CASES) >= 40 and sum(not c[-1] for c in MATCH_CASES) >= 12


@pytest.mark.parametrize("question,expected", [
    (Q_BARS, {"a": "2019", "b": "2020", "c": "2021", "d": "2022"}),
    (Q_ANGLE, {"a": "30°", "b": "50°", "c": "60°", "d": "70°"}),
    (Q_RECT, {"a": "12 cm", "b": "15 cm", "c": "18 cm", "d": "24 cm"}),
    (Q_APPLES, {"a": "12", "b": "15", "c": "18", "d": "21"}),
    ("What is the length of side BC. Use point C. as given.", {}),
], ids=["lines", "choices_colon", "paren_lines", "inline", "no_options"])
def test_match_parse_options(question, expected):
    assert parse_options(question) == expected


def test_match_normalize_answer():
    assert normalize_answer('  "($\\text{Red}$)".  ') == "red"
    assert normalize_answer("The  Red   Square") == "red square"
    assert normalize_answer("A") == "a"  # a lone choice letter is not an article


# ----------------------------------------------------------------------------------------------------
# the scorer: N samples of the base model per example

N = 8
# long enough answers that a kill lands mid-run; chunks of 3 so that 8 examples make uneven chunks
SLOW = ["--samples", str(N), "--batch_size", "3", "--max_new_tokens", "128", "--temperature", "1.0"]


def run(cmd):
    """Run a project command in a subprocess; fail with its output if it fails."""
    p = subprocess.run(cmd, cwd=HERE, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


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


def test_scorer_is_the_base_model(tiny, scorer):
    """Adding the latent ids resizes nothing, and every step's logits (but the 3 banned latent ids) are the
    stock model's, fresh from disk, teacher-forced on the generated tokens."""
    g, tokenizer, _ = scorer
    stock, _, _ = load_backbone(tiny["model"], "cpu")
    assert g.backbone.get_input_embeddings().weight.shape == stock.get_input_embeddings().weight.shape
    args = batch_of(tiny, scorer, [0])
    out = g.generate(*args, max_new_tokens=6, trace=True)
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
    shared = g.generate(*batch_of(tiny, scorer, [0, 3]), max_new_tokens=10, num_samples=3)["tokens"]
    for b, i in enumerate([0, 3]):
        alone = g.generate(*batch_of(tiny, scorer, [i]), max_new_tokens=10)["tokens"]
        assert torch.equal(shared[3 * b:3 * b + 3], alone.expand(3, -1))


def test_shared_prefill_samples_are_independent_model_samples(tiny, scorer):
    """Sampling: the rows of one prompt differ, and each row's every step used exactly the distribution a
    separate, uncached, batch-1 forward over the prompt and that row's own tokens gives (so the cache repeat
    leaks nothing between rows)."""
    g = scorer[0]
    args = batch_of(tiny, scorer, [1, 2])
    out = g.generate(*args, max_new_tokens=8, num_samples=4, temperature=1.0, trace=True,
                     generator=torch.Generator().manual_seed(0))
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


def test_kill_and_resume_equals_uninterrupted(tiny, reference, tmp_path):
    """SIGKILL a run after its first chunk is written, tear its last line as a kill mid-write would, restart:
    the restart skips the done ids and the output is byte-identical to the uninterrupted run's."""
    out = tmp_path / "scored.jsonl"
    part = tmp_path / "scored.rank0.jsonl"
    p = subprocess.Popen([sys.executable, *cli(tiny, out, *SLOW)], cwd=HERE, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (part.exists() and part.read_text().count("\n") >= 1):
            assert p.poll() is None, f"the run ended before it could be killed:\n{p.stderr.read()[-3000:]}"
            assert time.time() < deadline, "no result line after 120 s"
            time.sleep(0.02)
        assert p.poll() is None, "the run finished before the kill: make it slower"
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    n_done = part.read_text().count("\n")
    assert 1 <= n_done < 8 and not out.exists()
    with open(part, "a") as f:
        f.write('{"id": "s7", "image": "img/q7.p')  # torn mid-line
    resumed = run([sys.executable, *cli(tiny, out, *SLOW)])
    assert f"8 examples, {n_done} already done" in resumed.stdout
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
