"""End-to-end tests of harness.py: a tiny GAP checkpoint evaluated by VLMEvalKit's and lmms-eval's own prompt
building and scoring on fixtures in the benchmarks' public formats, each score checked against an independent
count. Needs requirements-eval.txt (installed with --no-deps; see .ci/run).

    python -m pytest -q test_harness.py

The checkpoint answers one letter: its LM head keeps only the rows of A, B, C and D (scaled up), so greedy
decoding with max_new_tokens=1 gives a letter that depends on the image and on the prompt text. The test asks
the project's own Runner, in this process, for each example's letter on the prompt the harness documents, and
writes the fixture's answer column from those letters: the even rows right, the odd rows wrong. A harness that
scores the adapter's answers must then report exactly 1/2; one that got another prompt, another image, or
another example's answer reports something else. Both harnesses run in subprocesses: VLMEvalKit changes global
state at import (grad mode, seeds, SSL checks) and torchvision, which it imports, has no CPU wheel here, so the
run gets a stand-in module whose attributes fail when used (transformers is told first that torchvision is
absent, so its image processors do not pick the torchvision path).
"""
import base64
import glob
import importlib.util
import io
import json
import os
import sys

import pytest
import torch

from conftest import ENV, HERE, K, make_gap, run
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


def letter_checkpoint(world, path, images, prompts):
    """A tiny GAP checkpoint that answers A, B, C or D, by example: the LM head keeps four rows, +-v1 and +-v2, the
    two main directions in which these prompts' last hidden states differ (made orthogonal to their mean, so
    no letter wins everywhere); every other row is zero."""
    gap, tokenizer, image_processor = make_gap(world)
    last = []
    hook = gap.backbone.lm_head.register_forward_hook(lambda m, inputs, out: last.append(inputs[0][0, -1]))
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            it = encode_prompt(tokenizer, image_processor, image, prompt, DataSpec(latent_tokens=K))
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
    runner = infer.Runner(infer.InferConfig(ckpt=ckpt, max_new_tokens=1), "cpu")
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

# tells transformers that torchvision is absent (a cached check) before the stand-in is importable
VLMEVAL_RUNNER = '''import sys
from transformers.utils import is_torchvision_available
assert not is_torchvision_available()
sys.path.insert(0, {stand_in!r})
import harness
harness.main(["vlmeval", *sys.argv[1:]])
'''


def write_stand_in(root):
    for sub in ("torchvision", "torchvision/transforms"):
        os.makedirs(root / sub, exist_ok=True)
    for name in ("torchvision/__init__.py", "torchvision/transforms/__init__.py",
                 "torchvision/transforms/functional.py"):
        (root / name).write_text(TORCHVISION_STAND_IN)


def test_vlmeval_mcq_exact_matching_scores_the_adapters_answers(world, examples, tmp_path):
    import csv
    name = "GAPTinyMCQ"
    # VLMEvalKit's ImageMCQDataset.build_prompt, as its source writes it
    prompts = ["Question: " + q + "\nOptions:\n" + "".join(f"{c}. {o}\n" for c, o in zip(LETTERS, OPTIONS))
               + "Please select the correct answer from the options above. \n" for _, q in examples]
    images = [im for im, _ in examples]
    letter_ckpt = letter_checkpoint(world, str(tmp_path / "gap"), images, prompts)
    letters = letters_for(letter_ckpt, images, prompts)
    key = answer_key(letters)
    os.makedirs(tmp_path / "LMUData")
    with open(tmp_path / "LMUData" / f"{name}.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "image", "question", *LETTERS, "answer", "category", "l2-category"])
        for i, ((im, q), a) in enumerate(zip(examples, key)):
            w.writerow([i, png_base64(im), q, *OPTIONS, a, "colour", "colour"])
    config = dict(model=dict(GAP=dict(ckpt=letter_ckpt, max_new_tokens=1,
                                      latency_log=str(tmp_path / "latency.jsonl"))),
                  data={name: {"class": "CustomMCQDataset", "dataset": name}})
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_stand_in(tmp_path / "stand_in")
    (tmp_path / "run_vlmeval.py").write_text(VLMEVAL_RUNNER.format(stand_in=str(tmp_path / "stand_in")))
    run([sys.executable, str(tmp_path / "run_vlmeval.py"), "--config", str(tmp_path / "config.json"),
         "--work-dir", str(tmp_path / "work"), "--judge", "exact_matching"], cwd=str(tmp_path),
        env=harness_env(tmp_path))

    # the harness's prediction file: one answer per index, the adapter's (Runner's) letter
    [pred_file] = glob.glob(str(tmp_path / "work" / "GAP" / "**" / f"GAP_{name}.tsv"), recursive=True)
    with open(pred_file) as f:
        preds = {int(r["index"]): r["prediction"] for r in csv.DictReader(f, delimiter="\t")}
    assert [preds[i] for i in range(N)] == letters
    # the harness's score: its own exact matching, against the independent count
    [acc_file] = glob.glob(str(tmp_path / "work" / "GAP" / "**" / f"GAP_{name}_acc.csv"), recursive=True)
    with open(acc_file) as f:
        [acc] = list(csv.DictReader(f))
    expected = sum(p == a for p, a in zip(letters, key)) / N
    assert expected == 0.5 and float(acc["Overall"]) == pytest.approx(expected), acc
    latency = [json.loads(line) for line in open(tmp_path / "latency.jsonl")]
    assert len(latency) == N and all(r["seconds"] > 0 and r["dataset"] == name for r in latency)


# ----------------------------------------------------------------------------------------------------------
# lmms-eval: a local task in MMStar's format (parquet with an image column) through its MMStar prompt and scoring

MMSTAR_TASK = """task: gap_mmstar_tiny
dataset_path: parquet
dataset_kwargs:
  data_files:
    val: {parquet}
test_split: val
output_type: generate_until
doc_to_visual: !function utils.mmstar_doc_to_visual
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


def test_lmms_eval_mmstar_task_scores_the_adapters_answers(world, examples, tmp_path):
    import datasets
    questions = [q + "\nOptions: " + ", ".join(f"{c}: {o}" for c, o in zip(LETTERS, OPTIONS)) for _, q in examples]
    # lmms-eval's MMStar doc_to_text with the task's default post_prompt
    prompts = [q + "\nAnswer with the option's letter from the given choices directly" for q in questions]
    images = [im for im, _ in examples]
    letter_ckpt = letter_checkpoint(world, str(tmp_path / "gap"), images, prompts)
    letters = letters_for(letter_ckpt, images, prompts)
    key = answer_key(letters)
    features = datasets.Features(dict(index=datasets.Value("int64"), question=datasets.Value("string"),
                                      image=datasets.Image(), answer=datasets.Value("string"),
                                      category=datasets.Value("string"), l2_category=datasets.Value("string")))
    datasets.Dataset.from_dict(dict(index=list(range(N)), question=questions, image=[im for im, _ in examples],
                                    answer=key, category=["coarse perception"] * N, l2_category=["colour"] * N),
                               features=features).to_parquet(str(tmp_path / "mmstar_tiny.parquet"))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "gap_mmstar_tiny.yaml").write_text(MMSTAR_TASK.format(parquet=tmp_path / "mmstar_tiny.parquet"))
    (task_dir / "utils.py").write_text("from lmms_eval.tasks.mmstar.utils import *  # noqa: F401,F403\n")
    run(["harness.py", "lmms_eval", "--model", "gap",
         "--model_args", f"ckpt={letter_ckpt},max_new_tokens=1,latency_log={tmp_path / 'latency.jsonl'}",
         "--tasks", "gap_mmstar_tiny", "--include_path", str(task_dir), "--batch_size", "3",
         "--output_path", str(tmp_path / "out"), "--log_samples"], env=harness_env(tmp_path))

    [samples_file] = glob.glob(str(tmp_path / "out" / "**" / "*samples_gap_mmstar_tiny*.jsonl"), recursive=True)
    samples = sorted((json.loads(line) for line in open(samples_file)), key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in samples] == letters
    [results_file] = glob.glob(str(tmp_path / "out" / "**" / "*_results.json"), recursive=True)
    score = json.load(open(results_file))["results"]["gap_mmstar_tiny"]["average,none"]
    expected = sum(p == a for p, a in zip(letters, key)) / N
    assert expected == 0.5 and score == pytest.approx(expected)
    latency = [json.loads(line) for line in open(tmp_path / "latency.jsonl")]
    assert [r["batch"] for r in latency] == [3] * 6 + [2] * 2  # --batch_size 3 over 8 requests


def test_lmms_eval_failure_exits_nonzero(world, tmp_path):
    """lmms-eval logs an evaluation that raised and exits 0; harness.py must exit 1 naming the error."""
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "gap_mmstar_tiny.yaml").write_text(MMSTAR_TASK.format(parquet=tmp_path / "missing.parquet"))
    (task_dir / "utils.py").write_text("from lmms_eval.tasks.mmstar.utils import *  # noqa: F401,F403\n")
    p = run(["harness.py", "lmms_eval", "--model", "gap", "--model_args", f"ckpt={world['model']}",
             "--tasks", "gap_mmstar_tiny", "--include_path", str(task_dir), "--output_path", str(tmp_path / "out")],
            env=harness_env(tmp_path), expect_ok=False)
    assert p.returncode == 1 and "harness.py lmms_eval: 1 evaluation(s) failed" in p.stderr, p.stderr[-3000:]
