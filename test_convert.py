"""Tests of convert.py: a <latent> span before each chain-of-thought step, by the documented splitting rule, and the
converted file read as training data.

    python -m pytest -q test_convert.py
"""
import json
import os

import pytest

import convert
from conftest import K, write_jsonl
from data import DataError, DataSpec, GAPDataset

CASES = [  # (id, response, expected)
    ("paragraphs", "<think>First look.\nStill looking.\n\nThen count.\n\nSo 3.</think><answer>3</answer>",
     "<think><latent> First look.\nStill looking.\n<latent> Then count.\n<latent> So 3.</think><answer>3</answer>"),
    ("lines", "<think>Step 1: find red.\nStep 2: count. It is 2.</think><answer>2</answer>",
     "<think><latent> Step 1: find red.\n<latent> Step 2: count. It is 2.</think><answer>2</answer>"),
    ("sentences", "<think>I find the red ones. There are 2! Done?</think> <answer>2</answer>",
     "<think><latent> I find the red ones. <latent> There are 2! <latent> Done?</think> <answer>2</answer>"),
    ("one_step", "<think>Just 4</think><answer>4</answer>", "<think><latent> Just 4</think><answer>4</answer>"),
    ("no_think", "Red ones first. Then 5. <answer>5. Yes.</answer>",
     "<latent> Red ones first. <latent> Then 5.<answer>5. Yes.</answer>"),
]


@pytest.mark.parametrize("response,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_span_before_each_step(response, expected):
    assert convert.with_latents(response) == expected


def test_max_spans_merges_the_last_steps():
    out = convert.with_latents("<think>A one. B two. C three. D four.</think>", max_spans=2)
    assert out == "<think><latent> A one. <latent> B two. C three. D four.</think>"


def test_converted_file_trains(world, gap, tmp_path):
    """The output is valid training data (paths relative to it, aux_image the query image): one span per step,
    with the text of every step in order; a response that already has a span names its line."""
    g, tokenizer, image_processor = gap
    rows = [json.loads(line) for line in open(world["data"])][:2]
    cot = [dict(r, response="<think>I count the circles. There are 2. So it is 2.</think><answer>2</answer>")
           for r in rows]
    src = write_jsonl(tmp_path / "cot.jsonl", [{k: v for k, v in r.items() if k != "aux_image"} for r in cot])
    os.symlink(os.path.join(os.path.dirname(world["data"]), "img"), tmp_path / "img")
    os.makedirs(tmp_path / "out")
    out = str(tmp_path / "out" / "valr.jsonl")
    assert convert.convert(convert.ConvertConfig(data=src, out=out)) == 2
    ds = GAPDataset(out, tokenizer, image_processor, g.latent_ids, DataSpec(latent_tokens=K, latent_targets=False))
    it = ds[1]
    assert int((it["input_ids"] == g.start_id).sum()) == 3 and int((it["input_ids"] == g.pad_id).sum()) == 3 * K
    text = tokenizer.decode(it["input_ids"][it["input_ids"] != g.pad_id])
    assert text.index("I count") < text.index("There are 2") < text.index("So it is 2")
    assert json.loads(open(out).readline())["aux_image"] == "../img/q0.png"
    bad = write_jsonl(tmp_path / "bad.jsonl", [dict(cot[0], response="<think><latent> done</think>")])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'response': already holds a <latent> span"):
        convert.convert(convert.ConvertConfig(data=bad, out=str(tmp_path / "x.jsonl")))
    assert not os.path.exists(tmp_path / "x.jsonl")
