"""GAP inference (paper eq. 1, appendix F; the interventions of section 5.4 / table 6): load a checkpoint
written by train.py and answer with latent reasoning through the batched KV-cached latent loop.

    python infer.py image.png "How many red circles are there?" --ckpt out/gap
    python infer.py --ckpt out/gap --data test.jsonl --latent_mode noise     # batch mode: accuracy vs `answer`

Batch mode appends one result line per example to --out as it goes (flushed), resumes from the ids already
there, and writes a summary JSON atomically at the end.
"""
import dataclasses
import json
import os
from dataclasses import field

import torch

from answers import answers_match, extract_answer
from common import BadExamples, atomic_write_text, parse_config, run_main
from data import DataSpec, collate, encode_prompt, open_image, read_jsonl
from model import load_checkpoint


@dataclasses.dataclass
class InferConfig:
    """Answer questions about images with a GAP checkpoint."""
    image: str = field(default="", metadata={"help": "query image (single mode)", "positional": True})
    question: str = field(default="", metadata={"help": "question (single mode)", "positional": True})
    ckpt: str = field(default="out/gap", metadata={"help": "checkpoint directory from train.py"})
    data: str = field(default="", metadata={"help": "batch mode: JSONL with id, image, question, answer"})
    out: str = field(default="", metadata={"help": "batch mode results JSONL (default: CKPT/results_MODE.jsonl)"})
    latent_mode: str = field(default="model", metadata={"help": "latents fed back: model | zero | noise",
                                                        "choices": ["model", "zero", "noise"]})
    norm_calib: str = field(default="none", metadata={"help": "EMA norm calibration of latents (paper table 1)",
                                                      "choices": ["none", "ema"]})
    ema_beta: float = field(default=0.0, metadata={"help": "norm_calib ema: 0 = mean norm of the whole query image; "
                                                          "else an EMA in raster order with this beta",
                                                  "range": (0.0, 0.999999)})
    max_new_tokens: int = field(default=1024, metadata={"help": "generated tokens per answer, latents included"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generation batch (batch mode)"})
    seed: int = field(default=0, metadata={"help": "sampling seed (noise latents, temperature > 0)"})
    skip_bad: bool = field(default=False, metadata={"help": "batch mode: skip and count bad examples"})


class Runner:
    """A loaded checkpoint plus the settings to generate with."""

    def __init__(self, cfg: InferConfig):
        self.cfg = cfg
        self.gap, self.tokenizer, self.image_processor, config = load_checkpoint(cfg.ckpt)
        self.spec = DataSpec(**{f.name: config[f.name] for f in dataclasses.fields(DataSpec) if f.name in config})
        device = self.gap.backbone.device
        self.generator = torch.Generator(device).manual_seed(cfg.seed)
        self.stop_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]

    def answer(self, items):
        """Responses (latent spans shown as <latent>) for a list of encode_prompt() items."""
        batch = collate(items, self.tokenizer.pad_token_id, left=True)
        dev = self.gap.backbone.device
        tokens = self.gap.generate(batch["input_ids"].to(dev), batch["attention_mask"].to(dev),
                                   batch["pixel_values"].to(dev), batch["image_grid_thw"].to(dev),
                                   max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                   top_p=self.cfg.top_p, latent_mode=self.cfg.latent_mode,
                                   norm_calib=self.cfg.norm_calib, ema_beta=self.cfg.ema_beta, stop_ids=self.stop_ids,
                                   generator=self.generator)
        return [self.gap.decode(self.tokenizer, row) for row in tokens.cpu()]

    def encode(self, image, question, id="0"):
        return encode_prompt(self.tokenizer, self.image_processor, image, question, self.spec, id)


def run_batch(cfg: InferConfig, runner: Runner):
    """Evaluate on a JSONL; resumable (ids already in the results file are skipped)."""
    from tqdm import tqdm
    out = cfg.out or os.path.join(cfg.ckpt, f"results_{cfg.latent_mode}.jsonl")
    rows, bad_lines = read_jsonl(cfg.data, cfg.skip_bad, need_response=False)
    bad = BadExamples(cfg.skip_bad)
    done = {}
    if os.path.exists(out):
        with open(out) as f:
            for line in f:
                try:
                    r = json.loads(line)
                    done[r["id"]] = r
                except (json.JSONDecodeError, KeyError):
                    break  # a line cut by a crash: everything after it is redone
        with open(out, "w") as f:  # drop a partial last line, keep the complete ones
            f.writelines(json.dumps(r) + "\n" for r in done.values())
    todo = [r for r in rows if r["id"] not in done]
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "a") as f:
        for i in tqdm(range(0, len(todo), cfg.batch_size), desc=f"infer[{cfg.latent_mode}]", unit="batch"):
            items, batch_rows = [], []
            for r in todo[i:i + cfg.batch_size]:
                with bad.guard():
                    items.append(runner.encode(open_image(r, "image"), r["question"], r["id"]))
                    batch_rows.append(r)
            if not items:
                continue
            for r, response in zip(batch_rows, runner.answer(items)):
                pred = extract_answer(response)
                truth = str(r.get("answer", ""))
                result = dict(id=r["id"], response=response, pred=pred, answer=truth,
                              correct=answers_match(pred, truth, r["question"]) if truth else None)
                done[r["id"]] = result
                f.write(json.dumps(result) + "\n")
            f.flush()
            os.fsync(f.fileno())
    skipped = bad_lines + bad.count
    scored = [r for r in done.values() if r["correct"] is not None]
    acc = sum(r["correct"] for r in scored) / max(len(scored), 1)
    summary = dict(ckpt=cfg.ckpt, data=cfg.data, latent_mode=cfg.latent_mode, norm_calib=cfg.norm_calib,
                   n=len(scored), accuracy=acc, stderr=(acc * (1 - acc) / max(len(scored), 1)) ** 0.5,
                   skipped=skipped)
    atomic_write_text(out.rsplit(".jsonl", 1)[0] + ".summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"accuracy {acc:.4f} +- {summary['stderr']:.4f} on {len(scored)} examples "
          f"({skipped} skipped) -> {out}")
    return summary


def main(cfg: InferConfig):
    if not cfg.data and not (cfg.image and cfg.question):
        raise SystemExit("give an image and a question, or --data a JSONL (see --help)")
    runner = Runner(cfg)
    if cfg.data:
        return run_batch(cfg, runner)
    row = dict(image=os.path.abspath(cfg.image), _file="<command line>", _line=0)
    response = runner.answer([runner.encode(open_image(row, "image"), cfg.question)])[0]
    print(response)
    print(f"answer: {extract_answer(response)}")


if __name__ == "__main__":
    run_main(main, parse_config(InferConfig))
