"""Chain-of-thought data -> VaLR's format (VaLR paper: a latent span before each reasoning step): a `<latent>`
placeholder is put before every step of each response's reasoning.

The reasoning is the text inside <think>...</think>, or, without those tags, everything before <answer> (or the
whole response); the answer is left as it is. Steps are split by the first rule that gives more than one step:
  1. paragraphs (a blank line between them),
  2. lines,
  3. sentences (., ! or ? followed by white space),
else the reasoning is one step. Leading "Step 3:"-style labels stay in their step's text. A response that
already holds a latent placeholder is an error (naming its line); --max_spans merges the last steps so a response
gets at most that many spans. aux_image becomes the query image (one path for every span): VaLR does not read it
(train.py --latent_feed pad|self), and it keeps the rows valid for GAP's reader. Image paths are rewritten
relative to the output file.

    python convert.py --data cot.jsonl --out valr.jsonl
"""
import dataclasses
import json
import os
import re

from common import DataError, atomic_write_text, parse_config
from data import PLACEHOLDER, read_jsonl

THINK = re.compile(r"(<think>)(.*?)(</think>)", re.S)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_steps(reasoning):
    """The steps of a reasoning text (module docstring), each without its surrounding white space."""
    for pattern in (r"\n\s*\n", r"\n", SENTENCE_END):
        steps = [s.strip() for s in re.split(pattern, reasoning) if s.strip()]
        if len(steps) > 1:
            return steps
    return [reasoning.strip()] if reasoning.strip() else []


def with_latents(response, max_spans=0):
    """The response with "<latent> " before each reasoning step; steps joined by one space (a line break where
    the steps were lines or paragraphs)."""
    match = THINK.search(response)
    if match:
        head, reasoning, tail = response[:match.start(2)], match.group(2), response[match.end(2):]
    else:
        cut = response.find("<answer>")
        cut = len(response) if cut < 0 else cut
        head, reasoning, tail = "", response[:cut], response[cut:]
    steps = split_steps(reasoning)
    if max_spans and len(steps) > max_spans:
        steps = steps[:max_spans - 1] + [" ".join(steps[max_spans - 1:])]
    sep = "\n" if "\n" in reasoning.strip() else " "
    return head + sep.join(f"{PLACEHOLDER} {s}" for s in steps) + tail


@dataclasses.dataclass
class ConvertConfig:
    """Put a <latent> placeholder before each chain-of-thought step (VaLR's data format)."""
    data: str = dataclasses.field(default="", metadata={"help": "JSONL with chain-of-thought responses"})
    out: str = dataclasses.field(default="", metadata={"help": "VaLR JSONL to write"})
    max_spans: int = dataclasses.field(default=0, metadata={"help": "at most this many spans per response (0: one per "
                                                                    "step)", "range": (0, None)})


def convert(cfg: ConvertConfig):
    rows, _ = read_jsonl(cfg.data)
    src, dst = os.path.dirname(os.path.abspath(cfg.data)), os.path.dirname(os.path.abspath(cfg.out))
    lines = []
    for row in rows:
        out = dict(row["_raw"])
        if PLACEHOLDER in row["response"]:
            raise DataError(cfg.data, row["_line"], "response", f"already holds a {PLACEHOLDER} span")
        out["response"] = with_latents(row["response"], cfg.max_spans)
        out["image"] = os.path.relpath(os.path.join(src, row["image"]), dst)
        out["aux_image"] = out["image"]
        lines.append(json.dumps(out) + "\n")
    atomic_write_text(cfg.out, "".join(lines))
    print(f"convert: {len(rows)} responses, {sum(line.count(PLACEHOLDER) for line in lines)} latent spans -> {cfg.out}")
    return len(rows)


if __name__ == "__main__":
    from common import run_main
    run_main(convert, parse_config(ConvertConfig))
