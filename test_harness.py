"""End-to-end tests of harness.py: a tiny GAP checkpoint evaluated by VLMEvalKit's and lmms-eval's own prompt
building and scoring on fixtures in the benchmarks' public formats, in one process and under torchrun with two
(gloo on the CPU), each score checked against an independent count; plus the adapter's own rules in this process.
Needs requirements-eval.txt (installed with --no-deps; see .ci/run).

    python -m pytest -q test_harness.py

The checkpoint answers one letter: its LM head keeps only the rows of A, B, C and D (scaled up), so greedy
decoding with max_new_tokens=1 gives a letter that depends on the image and on the prompt text. The test asks
the project's own Runner, in this process, for each example's letter on the prompt the harness documents, and
writes the fixture's answer column from those letters: the even rows right, the odd rows wrong. A harness that
scores the adapter's answers must then report exactly 1/2; one that got another prompt, another image, or
another example's answer reports something else; one process and two must report the same, each row answered
(and logged) once. Every run sets image_max_pixels, so that each logged vision-token count can be checked
against the resize rule worked by hand. Both harnesses run in subprocesses: VLMEvalKit changes global
state at import (grad mode, seeds, SSL checks) and torchvision, which it imports, has no CPU wheel here, so the
run gets a stand-in module whose attributes fail when used (transformers is told first that torchvision is
absent, so its image processors do not pick the torchvision path).
"""
import base64
import collections
import csv
import glob
import importlib.util
import io
import json
import os

import pytest
import torch
from PIL import Image, ImageDraw

from conftest import ENV, HERE, K, make_gap, run, torchrun
from data import DataSpec, encode_prompt, open_image, read_jsonl
from checkpoint import save_checkpoint


@pytest.fixture(scope="module", autouse=True)
def harnesses_installed():
    """Not imported here (VLMEvalKit's import has side effects); missing is a failure, not a skip."""
    missing = [m for m in ("vlmeval", "lmms_eval") if importlib.util.find_spec(m) is None]
    assert not missing, f"{missing} not installed: pip install --no-deps -r requirements-eval.txt (see .ci/run)"

N = 8
LETTERS = "ABCD"
OPTIONS = ["red", "blue", "green", "yellow"]
# image_max_pixels of every run: a 112x56 sample image then shrinks to 84x28 (Qwen2.5-VL's resize rule: both sides
# scaled by sqrt(6272 / 4704) and floored to multiples of 28), 3 vision tokens instead of 8; the 56x56 and 84x56
# images stay (4 and 6). 3136 is the tiny processor's own min_pixels.
PIXELS = 84 * 56
TOKENS = {56: 4, 84: 6, 112: 3}  # vision tokens by image width (all are 56 high), worked by hand as above


def letter_checkpoint(world, path, images, prompts):
    """A tiny GAP checkpoint that answers A, B, C or D, by example: the LM head keeps four rows, +-v1 and +-v2, the
    two main directions in which these prompts' last hidden states differ (made orthogonal to their mean, so
    no letter wins everywhere); every other row is zero."""
    gap, tokenizer, image_processor = make_gap(world)
    last = []
    hook = gap.backbone.lm_head.register_forward_hook(lambda m, inputs, out: last.append(inputs[0][0, -1]))
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            it = encode_prompt(tokenizer, image_processor, image, prompt,
                               DataSpec(latent_tokens=K, image_max_pixels=PIXELS))
            gap.backbone(input_ids=it["input_ids"][None], pixel_values=it["pixel_values"],
                         image_grid_thw=it["image_grid_thw"])
        hook.remove()
        h = torch.stack(last)  # (N, D) what the LM head reads at the first generated position
        mean = h.mean(0) / h.mean(0).norm()
        dirs = []
        for v in torch.linalg.svd(h - h.mean(0), full_matrices=False)[2][:2]:
            v = v - (v @ mean) * mean
            dirs += [v / v.norm(), -v / v.norm()]
        w = gap.backbone.lm_head.weight  # (V, D)
        w.zero_()
        w[[tokenizer.convert_tokens_to_ids(c) for c in LETTERS]] = 100 * torch.stack(dirs)
    save_checkpoint(gap, tokenizer, image_processor, path, {}, basis=world["basis"])
    return path


@pytest.fixture(scope="module")
def examples(world):
    """N (image, question) pairs; the questions differ so that the letters do."""
    rows, _ = read_jsonl(world["data"])
    return [(open_image(r, "image"), f"Which colour is shape {i}?") for i, r in enumerate(rows[:N])]


def letters_for(ckpt, images, prompts):
    """The checkpoint's answer for each (image, prompt), from infer.Runner directly (one prompt per call)."""
    import infer
    runner = infer.Runner(infer.InferConfig(ckpt=ckpt, max_new_tokens=1, image_max_pixels=PIXELS), "cpu")
    out = [runner.answer([runner.encode(im, p)])[0] for im, p in zip(images, prompts)]
    assert all(a in LETTERS for a in out), out
    assert len(set(out)) > 1, f"every example answers {out[0]}: the test could not tell examples apart"
    return out


def answer_key(letters):
    """Even rows right, odd rows wrong (the next letter)."""
    return [a if i % 2 == 0 else LETTERS[(LETTERS.index(a) + 1) % 4] for i, a in enumerate(letters)]


def png_base64(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def harness_env(tmp_path):
    env = dict(ENV, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               LMUData=str(tmp_path / "LMUData"), PRED_FORMAT="tsv", HOME=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    return env


def latency_log(path):
    """(the settings lines, the row lines) of a latency log."""
    lines = [json.loads(line) for line in open(path)]
    return [r for r in lines if "settings" in r], [r for r in lines if "settings" not in r]


def settings_recorded(settings):
    """One process records the settings it runs with: the pixel budget and max_len in force."""
    assert len(settings) == 1 and settings[0]["rank"] == 0, settings
    s = settings[0]["settings"]
    assert (s["image_min_pixels"], s["image_max_pixels"], s["max_len"]) == (3136, PIXELS, 8192), s


def ranks_split(lines, nproc):
    """Rows are shared round robin over the ranks (VLMEvalKit: rows r, r + world, ...; lmms-eval: docs likewise)."""
    n = len(lines)
    assert collections.Counter(r["rank"] for r in lines) == {r: len(range(r, n, nproc)) for r in range(nproc)}


# ----------------------------------------------------------------------------------------------------------
# VLMEvalKit: a custom MCQ benchmark (its TSV format, base64 images) scored by its own exact matching

TORCHVISION_STAND_IN = '''"""torchvision stand-in for a machine without a CPU wheel: every name is a placeholder that fails when used."""


class Missing:
    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: {self.name} is not available")

    def __getattr__(self, name):
        return Missing(f"{self.name}.{name}")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return Missing(f"{__name__}.{name}")
'''

# tells transformers that torchvision is absent (a cached check) before the stand-in is importable; VLMEvalKit's
# run.py initializes NCCL for several processes, which a CPU build of torch lacks: on the CPU it gets gloo
VLMEVAL_RUNNER = '''import sys
from transformers.utils import is_torchvision_available
assert not is_torchvision_available()
sys.path.insert(0, {stand_in!r})
import torch
import torch.distributed as dist
if not torch.cuda.is_available():
    init = dist.init_process_group
    dist.init_process_group = lambda backend=None, **kwargs: init("gloo", **kwargs)
import harness
harness.main(["vlmeval", *sys.argv[1:]])
'''


def write_stand_in(root):
    for sub in ("torchvision", "torchvision/transforms"):
        os.makedirs(root / sub, exist_ok=True)
    for name in ("torchvision/__init__.py", "torchvision/transforms/__init__.py",
                 "torchvision/transforms/functional.py"):
        (root / name).write_text(TORCHVISION_STAND_IN)


@pytest.fixture(scope="module")
def vlmeval_case(world, examples, tmp_path_factory):
    """GAPTinyMCQ: the N examples, then one row with two images (row 0's question, its answer the letter that the
    first image alone gets); GAPTinyBroken: two rows and no answer column, so its evaluation raises."""
    root = tmp_path_factory.mktemp("vlmeval")
    # VLMEvalKit's ImageMCQDataset.build_prompt, as its source writes it
    prompts = ["Question: " + q + "\nOptions:\n" + "".join(f"{c}. {o}\n" for c, o in zip(LETTERS, OPTIONS))
               + "Please select the correct answer from the options above. \n" for _, q in examples]
    images = [im for im, _ in examples]
    ckpt = letter_checkpoint(world, str(root / "gap"), images, prompts)
    letters = letters_for(ckpt, images, prompts)
    key = answer_key(letters) + [letters[0]]
    rows = [[i, png_base64(im), q, *OPTIONS] for i, (im, q) in enumerate(examples)]
    rows.append([N, str([png_base64(images[0]), png_base64(images[1])]), examples[0][1], *OPTIONS])
    os.makedirs(root / "LMUData")
    for name, keep in (("GAPTinyMCQ", len(rows)), ("GAPTinyBroken", 2)):
        with open(root / "LMUData" / f"{name}.tsv", "w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            answer = ["answer"] if name == "GAPTinyMCQ" else []
            w.writerow(["index", "image", "question", *LETTERS, *answer, "category", "l2-category"])
            for row, a in list(zip(rows, key))[:keep]:
                w.writerow([*row, *([a] if answer else []), "colour", "colour"])
    write_stand_in(root / "stand_in")
    (root / "run_vlmeval.py").write_text(VLMEVAL_RUNNER.format(stand_in=str(root / "stand_in")))
    return dict(root=root, ckpt=ckpt, letters=letters, key=key, widths=[im.width for im in images])


@pytest.mark.parametrize("nproc", [1, 2])
def test_vlmeval_scores_each_row_once(vlmeval_case, nproc, tmp_path):
    """VLMEvalKit in one process and two: the adapter's letters, exact matching's score of them, each row inferred
    and logged once (VLMEvalKit drops WORLD_SIZE while it builds GAP: unrestored, rank 1 infers rows 1..N too),
    the row with two images lost alone, and exit code 1 for the dataset whose evaluation failed."""
    case, root = vlmeval_case, vlmeval_case["root"]
    log = tmp_path / "latency.jsonl"
    config = dict(model=dict(GAP=dict(ckpt=case["ckpt"], max_new_tokens=1, output="response",
                                      image_max_pixels=PIXELS, latency_log=str(log))),
                  data={name: {"class": "CustomMCQDataset", "dataset": name}
                        for name in ("GAPTinyMCQ", "GAPTinyBroken")})
    (tmp_path / "config.json").write_text(json.dumps(config))
    env = dict(harness_env(tmp_path), LMUData=str(root / "LMUData"))
    p = torchrun([root / "run_vlmeval.py", "--config", tmp_path / "config.json", "--work-dir", tmp_path / "work",
                  "--judge", "exact_matching"], nproc=nproc, expect_ok=False, env=env)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    assert "1 evaluation(s) failed, first: Model GAP x Dataset GAPTinyBroken" in p.stderr, p.stderr[-3000:]

    # the harness's prediction file: one answer per index, the adapter's (Runner's) letter; nothing for two images
    [pred_file] = glob.glob(str(tmp_path / "work" / "GAP" / "**" / "GAP_GAPTinyMCQ.tsv"), recursive=True)
    with open(pred_file) as f:
        preds = {int(r["index"]): r["prediction"] for r in csv.DictReader(f, delimiter="\t")}
    assert [preds[i] for i in range(N + 1)] == case["letters"] + [""]
    # the harness's score: its own exact matching, against the independent count
    [acc_file] = glob.glob(str(tmp_path / "work" / "GAP" / "**" / "GAP_GAPTinyMCQ_acc.csv"), recursive=True)
    with open(acc_file) as f:
        [acc] = list(csv.DictReader(f))
    expected = sum(p == a for p, a in zip(case["letters"], case["key"])) / (N + 1)
    assert expected == 4 / 9 and float(acc["Overall"]) == pytest.approx(expected), acc

    settings, lines = latency_log(log)
    settings_recorded(settings)
    lines = [r for r in lines if r["dataset"] == "GAPTinyMCQ"]
    assert len(lines) == N + 1, lines  # each row once: N answered, one not
    [lost] = [r for r in lines if "error" in r]
    assert "2 images in one request" in lost["error"] and "not answered" in p.stderr
    ranks_split(lines, nproc)
    answered = [r for r in lines if "error" not in r]
    assert all(r["seconds"] > 0 and r["batch"] == 1 for r in answered)
    # VLMEvalKit does not tell the adapter the row: the counts by width, as the resize rule gives them
    assert sorted(r["image_tokens"] for r in answered) == sorted(TOKENS[w] for w in case["widths"])


# ----------------------------------------------------------------------------------------------------------
# lmms-eval: local tasks in MMStar's format (parquet with an image column) through its MMStar prompt and scoring

MMSTAR_TASK = """task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    val: {parquet}
test_split: val
output_type: generate_until
doc_to_visual: !function utils.{visual}
doc_to_text: !function utils.mmstar_doc_to_text
doc_to_target: "answer"
process_results: !function utils.mmstar_process_results
metric_list:
  - metric: coarse perception
    aggregation: !function utils.mmstar_aggregate_results
    higher_is_better: true
  - metric: average
    aggregation: !function utils.mmstar_aggregate_results
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer with the option's letter from the given choices directly"
"""

# the second task's doc 2 comes with its image twice (an even doc: its answer is the letter of one image)
TASK_UTILS = """from lmms_eval.tasks.mmstar.utils import *  # noqa: F401,F403


def twice_for_doc_2(doc):
    images = mmstar_doc_to_visual(doc)  # noqa: F405
    return images * 2 if doc["index"] == 2 else images
"""


def write_task(task_dir, name, parquet, visual="mmstar_doc_to_visual"):
    task_dir.mkdir(exist_ok=True)
    (task_dir / f"{name}.yaml").write_text(MMSTAR_TASK.format(name=name, parquet=parquet, visual=visual))
    (task_dir / "utils.py").write_text(TASK_UTILS)


@pytest.fixture(scope="module")
def lmms_case(world, examples, tmp_path_factory):
    """Task gap_mmstar_tiny: the N examples; gap_mmstar_tiny_b: the first N - 1 (an odd count: with two ranks lmms-eval
    pads one rank with a copy), its doc 2 with two images."""
    import datasets
    root = tmp_path_factory.mktemp("lmms_eval")
    questions = [q + "\nOptions: " + ", ".join(f"{c}: {o}" for c, o in zip(LETTERS, OPTIONS)) for _, q in examples]
    # lmms-eval's MMStar doc_to_text with the task's default post_prompt
    prompts = [q + "\nAnswer with the option's letter from the given choices directly" for q in questions]
    images = [im for im, _ in examples]
    ckpt = letter_checkpoint(world, str(root / "gap"), images, prompts)
    letters = letters_for(ckpt, images, prompts)
    key = answer_key(letters)
    features = datasets.Features(dict(index=datasets.Value("int64"), question=datasets.Value("string"),
                                      image=datasets.Image(), answer=datasets.Value("string"),
                                      category=datasets.Value("string"), l2_category=datasets.Value("string")))
    for name, n, visual in (("gap_mmstar_tiny", N, "mmstar_doc_to_visual"), ("gap_mmstar_tiny_b", N - 1,
                                                                             "twice_for_doc_2")):
        datasets.Dataset.from_dict(dict(index=list(range(n)), question=questions[:n], image=images[:n], answer=key[:n],
                                        category=["coarse perception"] * n, l2_category=["colour"] * n),
                                   features=features).to_parquet(str(root / f"{name}.parquet"))
        write_task(root / "tasks", name, root / f"{name}.parquet", visual)
    return dict(root=root, ckpt=ckpt, letters=letters, key=key, widths=[im.width for im in images])


@pytest.mark.parametrize("nproc", [1, 2])
def test_lmms_eval_scores_each_row_once(lmms_case, nproc, tmp_path):
    """lmms-eval in one process and two (rank, world size, device and accelerator from the adapter), two tasks at
    --batch_size auto (--max_batch_size 3): the adapter's letters, MMStar's score of them, one log line per request
    labelled with its own task (a batch holds both tasks), none for lmms-eval's padding copies, the request with
    two images lost alone."""
    case, root = lmms_case, lmms_case["root"]
    log = tmp_path / "latency.jsonl"
    tasks = {"gap_mmstar_tiny": N, "gap_mmstar_tiny_b": N - 1}
    p = torchrun(["harness.py", "lmms_eval", "--model", "gap",
                  "--model_args", f"ckpt={case['ckpt']},max_new_tokens=1,output=response,image_max_pixels={PIXELS},"
                                  f"latency_log={log}",
                  "--tasks", ",".join(tasks), "--include_path", root / "tasks", "--batch_size", "auto",
                  "--max_batch_size", "3", "--output_path", tmp_path / "out", "--log_samples"],
                 nproc=nproc, env=harness_env(tmp_path))

    [results_file] = glob.glob(str(tmp_path / "out" / "**" / "*_results.json"), recursive=True)
    results = json.load(open(results_file))["results"]
    for task, n in tasks.items():
        [samples_file] = glob.glob(str(tmp_path / "out" / "**" / f"*samples_{task}.jsonl"), recursive=True)
        samples = sorted((json.loads(line) for line in open(samples_file)), key=lambda s: s["doc_id"])
        lost = 2 if task == "gap_mmstar_tiny_b" else None
        letters = ["" if i == lost else a for i, a in enumerate(case["letters"][:n])]
        assert [s["filtered_resps"] for s in samples] == letters  # (lmms-eval 0.7.3 keeps one string)
        expected = sum(p == a for p, a in zip(letters, case["key"])) / n
        assert expected == (4 / 8 if lost is None else 3 / 7), expected
        assert results[task]["average,none"] == pytest.approx(expected)

    settings, lines = latency_log(log)
    settings_recorded(settings)
    # one line per request, with its own task, none for a padding copy
    assert sorted((r["dataset"], r["doc_id"]) for r in lines) == [(t, i) for t, n in tasks.items() for i in range(n)]
    [lost] = [r for r in lines if "error" in r]
    assert (lost["dataset"], lost["doc_id"]) == ("gap_mmstar_tiny_b", 2) and "2 images" in lost["error"]
    assert "1 request(s) not answered" in p.stderr
    answered = [r for r in lines if "error" not in r]
    assert all(r["image_tokens"] == TOKENS[case["widths"][r["doc_id"]]] for r in answered)
    assert max(r["batch"] for r in answered) == 3  # auto: --max_batch_size, no memory ran out
    for task in tasks:
        ranks_split([r for r in lines if r["dataset"] == task], nproc)
        assert all(r["rank"] == r["doc_id"] % nproc for r in lines)


def test_lmms_eval_failure_exits_nonzero(world, tmp_path):
    """lmms-eval logs an evaluation that raised and exits 0; harness.py must exit 1 naming the error (here: a model
    directory that is no GAP checkpoint, which fails at once)."""
    write_task(tmp_path / "tasks", "gap_mmstar_tiny", tmp_path / "missing.parquet")
    p = run(["harness.py", "lmms_eval", "--model", "gap", "--model_args", f"ckpt={world['model']}",
             "--tasks", "gap_mmstar_tiny", "--include_path", str(tmp_path / "tasks"), "--output_path",
             str(tmp_path / "out")], env=harness_env(tmp_path), expect_ok=False)
    assert p.returncode == 1 and "harness.py lmms_eval: 1 evaluation(s) failed" in p.stderr, p.stderr[-3000:]
    assert "not a GAP checkpoint" in p.stderr.split("evaluation(s) failed")[-1], p.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------
# the adapter's own rules, in this process (no harness imported)

@pytest.fixture(scope="module")
def adapter(world, tmp_path_factory):
    import harness
    path = str(tmp_path_factory.mktemp("adapter") / "gap")
    gap, tokenizer, image_processor = make_gap(world)
    save_checkpoint(gap, tokenizer, image_processor, path, {}, basis=world["basis"])
    return harness.GAPModel(ckpt=path, max_new_tokens=1, output="response")


def test_transparent_image_reaches_gap_as_infer_py_reads_it(adapter, tmp_path, monkeypatch):
    """A transparent PNG (black strokes), as a file (VLMEvalKit) or a PIL image (lmms-eval), gives GAP the pixels that
    infer.py --data gives it for the same file: composited on white, not turned black by convert("RGB")."""
    im = Image.new("RGBA", (84, 56), (0, 0, 0, 0))
    ImageDraw.Draw(im).rectangle([20, 10, 60, 40], outline=(0, 0, 0, 255), width=4)
    im.save(tmp_path / "diagram.png")
    seen, answer = [], adapter.runner.answer
    monkeypatch.setattr(adapter.runner, "answer", lambda items, *a, **kw: seen.extend(items) or answer(items, *a, **kw))
    with Image.open(tmp_path / "diagram.png") as pil:
        adapter.respond([dict(images=[str(tmp_path / "diagram.png")], text="What is drawn?", dataset="files"),
                         dict(images=[pil], text="What is drawn?", dataset="pil")])
    row = dict(id="0", image="diagram.png", question="What is drawn?", _file=str(tmp_path / "rows.jsonl"), _line=1)
    reference = adapter.runner.encode_row(row)["pixel_values"]  # what infer.py --data answers from
    black = adapter.runner.encode(Image.open(tmp_path / "diagram.png").convert("RGB"), "What is drawn?")
    assert not torch.equal(black["pixel_values"], reference)  # the test can tell the two apart
    assert len(seen) == 2 and all(torch.equal(it["pixel_values"], reference) for it in seen)


UNTAGGED = [  # (response, what the harness gets with output="answer")
    ("<think>Counting the circles: 1, 2, 3, so the count is", ""),   # cut at max_new_tokens mid-reasoning
    ("<think>The options: A is red.\nA", ""),                       # its last line is a letter, but no tag
    ("<think>Two bars.</think>\nB", ""),                             # an answer outside the tag is not the answer
    ("<think>Two bars.</think><answer>B</answer>", "B"),
    ("<answer>The answer is \\boxed{7}.</answer>", "7"),             # extract_answer's rules inside the tag
    ("<think>Checked.</think><answer>C", "C"),                       # cut inside the tag
]


def test_untagged_response_reaches_the_harness_as_nothing(adapter, examples, monkeypatch):
    """With output="answer" the harness gets the tag's content, and "" for a response without one: a lenient
    matcher must not find a letter or a number in the reasoning."""
    monkeypatch.setattr(adapter, "output", "answer")
    monkeypatch.setattr(adapter.runner, "answer", lambda items, *a, **kw: [r for r, _ in UNTAGGED])
    image = examples[0][0]
    got = adapter.respond([dict(images=[image], text="Which?", dataset="d") for _ in UNTAGGED])
    assert got == [expected for _, expected in UNTAGGED]


def test_requests_gap_cannot_serve_cost_their_row(adapter, examples, tmp_path, monkeypatch):
    """Two images, no image, and a prompt over max_len each give "" and a logged error; the request beside them is
    answered and logged with its vision tokens."""
    import harness
    image = examples[0][0]
    monkeypatch.setattr(adapter, "latency_log", str(tmp_path / "latency.jsonl"))
    requests = [dict(images=[image, image], text="Which?", dataset="d", doc_id=0),
                dict(images=[], text="Which?", dataset="d", doc_id=1),
                dict(images=[image], text="Which? " * 5000, dataset="d", doc_id=2),
                dict(images=[image], text="Which?", dataset="d", doc_id=3)]
    before = len(harness.UNANSWERED)
    got = adapter.respond(requests)
    assert got[:3] == ["", "", ""] and got[3] != ""
    _, lines = latency_log(tmp_path / "latency.jsonl")
    assert [r["doc_id"] for r in lines] == [0, 1, 2, 3]
    assert "2 images" in lines[0]["error"] and "0 images" in lines[1]["error"]
    assert "exceeds max_len=8192" in lines[2]["error"] and "raise --max_len" in lines[2]["error"]
    assert "error" not in lines[3] and lines[3]["batch"] == 1 and lines[3]["image_tokens"] == TOKENS[image.width]
    assert len(harness.UNANSWERED) == before + 3


def test_batch_size_auto_halves_on_out_of_memory():
    """--batch_size auto starts at --max_batch_size and halves a batch that runs out of GPU memory, keeping the
    smaller size; a fixed --batch_size lets the error through; anything else is a one-line error."""
    import harness
    from common import DataError
    calls = []

    def answer(batch):
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (planted)")
        return [10 * x for x in batch]

    assert harness.in_batches(answer, list(range(7)), 8, shrink=True) == ([10 * x for x in range(7)], 2)
    assert calls == [7, 4, 2, 2, 2, 1]
    with pytest.raises(torch.OutOfMemoryError):
        harness.in_batches(answer, list(range(7)), 4)
    assert harness.batch_size_of("auto", None) == (64, True) and harness.batch_size_of("auto:4", 3) == (3, True)
    assert harness.batch_size_of(8, None) == (8, False)
    for bad in ("0", "eight", "-1"):
        with pytest.raises(DataError, match="give a number >= 1, or auto"):
            harness.batch_size_of(bad, None)
