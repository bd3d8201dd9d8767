"""GAP inference (paper eq. 1, appendix F; the interventions of section 5.4 / table 6; the latency of table 9):
load a checkpoint written by train.py and answer with latent reasoning through the batched KV-cached latent loop.

    python infer.py image.png "How many red circles are there?" --ckpt out/gap
    python infer.py --ckpt out/gap --data test.jsonl --latent_mode noise     # batch mode: accuracy vs `answer`
    torchrun --nproc_per_node 8 infer.py --ckpt out/gap --data test.jsonl --batch_size 1   # sharded, table 9

Batch mode: the examples are cut into fixed chunks of --batch_size and rank r of a torchrun run takes chunks
r, r + world, ...; each chunk's generator is seeded from (--seed, its first id), so the results are the same
for any number of ranks and whether or not the run was interrupted. Each rank appends finished chunks to
OUT-stem.rankR.jsonl (flushed and fsynced); a restart skips the ids already there and fails if the flags that
change results, or the checkpoint's gap.json and latent head, differ from OUT-stem.config.json. Rank 0 merges
the parts into OUT in input order and writes OUT-stem.summary.json: accuracy +- standard error and the latency per example (mean, P50, P90). An example's
`latency_s` is its chunk's wall time (prompt encoding, generation, decoding) divided by the chunk's size, so
with --batch_size 1 it is the per-sample wall time of table 9. Start afresh with another --out, or delete OUT
and the files beside it.
"""
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import field

import torch
import torch.distributed as dist

from answers import answers_match, extract_answer
from common import (BadExamples, DataError, atomic_write_text, chunk_seed, file_hash, merge_parts, output_paths,
                    parse_config, rank_barrier, resume_parts, run_main, setup_distributed)
from data import DataSpec, collate, encode_prompt, encode_row, query_tokens, read_jsonl, report, validate
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
    batch_size: int = field(default=8, metadata={"help": "prompts per generation batch (batch mode); 1 for "
                                                          "per-sample latency as in paper table 9"})
    seed: int = field(default=0, metadata={"help": "sampling seed (noise latents, temperature > 0); batch mode: "
                                                    "each chunk's generator is (seed, first id)"})
    skip_bad: bool = field(default=False, metadata={"help": "batch mode: skip and count bad examples"})


class Runner:
    """A loaded checkpoint plus the settings to generate with."""

    def __init__(self, cfg: InferConfig, device=None):
        self.cfg = cfg
        self.gap, self.tokenizer, self.image_processor, config = load_checkpoint(cfg.ckpt, device)
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


# the flags that change results: a resumed run must use the same ones (and the same checkpoint contents)
RESULT_KEYS = ("ckpt", "data", "latent_mode", "norm_calib", "ema_beta", "max_new_tokens", "temperature", "top_p",
               "batch_size", "seed")


def checkpoint_stamp(ckpt):
    """A hash of the checkpoint's gap.json and latent head (small files, and a retrained checkpoint changes the
    head), so that parts answered by an older checkpoint at the same path are not resumed as this one's."""
    if not os.path.exists(ckpt) and os.path.exists(ckpt.rstrip("/") + ".old"):
        ckpt = ckpt.rstrip("/") + ".old"  # as load_checkpoint: a crash between the renames of a save
    h = hashlib.sha256()
    for name in ("gap.json", "latent_head.safetensors"):
        with open(os.path.join(ckpt, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def answer_chunk(runner: Runner, chunk, bad: BadExamples):
    """Result lines (JSON + newline) of one chunk, in chunk order; a bad image is an error, or with skip_bad a
    `_skipped` line that the merge counts and leaves out (so a resume does not try it again)."""
    t0 = time.perf_counter()
    items, lines = [], {}
    for r in chunk:
        try:
            items.append(encode_row(runner.tokenizer, runner.image_processor, r, runner.spec))
        except DataError as e:
            bad.add(str(e))  # raises unless --skip_bad
            lines[r["id"]] = json.dumps({"id": r["id"], "_skipped": str(e)}) + "\n"
    if items:
        runner.generator.manual_seed(chunk_seed(runner.cfg.seed, chunk[0]["id"]))
        responses = runner.answer(items)
        seconds = (time.perf_counter() - t0) / len(items)
        for r, response in zip([r for r in chunk if r["id"] not in lines], responses):
            pred, truth = extract_answer(response), str(r.get("answer", ""))
            lines[r["id"]] = json.dumps(dict(id=r["id"], response=response, pred=pred, answer=truth,
                                             correct=answers_match(pred, truth, r["question"]) if truth else None,
                                             latency_s=round(seconds, 6))) + "\n"
    return [lines[r["id"]] for r in chunk]


def percentile(xs, q):
    """The q-quantile (0..1) of xs with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_batch(cfg: InferConfig, runner: Runner, rank=0, world=1, barrier=lambda: None):
    """Evaluate on a JSONL: this rank's chunks, resumable; rank 0 merges and returns the summary (else None)."""
    from tqdm import tqdm
    if cfg.batch_size < 1:
        raise DataError(f"--batch_size must be >= 1, got {cfg.batch_size}")
    out = cfg.out or os.path.join(cfg.ckpt, f"results_{cfg.latent_mode}.jsonl")
    rows, bad_lines = read_jsonl(cfg.data, cfg.skip_bad, need_response=False)
    if not cfg.skip_bad:  # every query image opened and processed first: no bad one stops the run late
        problems = validate(rows, lambda r: query_tokens(r, runner.image_processor, runner.spec), rank, world)
        if problems:
            raise DataError(report(problems, len(rows), "answering") if rank == 0 else "bad examples (rank 0 lists them)")
    # what the results depend on: the flags, the checkpoint's contents and the data's (an edited file is not resumed)
    run_config = dict({k: getattr(cfg, k) for k in RESULT_KEYS}, ckpt_stamp=checkpoint_stamp(cfg.ckpt),
                      data_sha256=file_hash(cfg.data))
    done, mine = resume_parts(out, run_config, rank, barrier)
    chunks = [rows[i:i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)][rank::world]
    todo = [c for c in chunks if any(r["id"] not in done for r in c)]
    print(f"rank {rank}/{world}: {sum(len(c) for c in chunks)} examples, "
          f"{sum(r['id'] in done for c in chunks for r in c)} already done")
    bad = BadExamples(cfg.skip_bad)
    with open(mine, "a") as f:
        for chunk in tqdm(todo, desc=f"infer[{cfg.latent_mode}]", unit="batch", disable=rank != 0):
            lines = answer_chunk(runner, chunk, bad)
            # a chunk cut by a kill is answered again whole (same generator), only its missing lines written
            f.write("".join(line for r, line in zip(chunk, lines) if r["id"] not in done))
            f.flush()
            os.fsync(f.fileno())
    barrier()
    if rank != 0:
        return None
    lines = merge_parts(out, [r["id"] for r in rows])
    results = [json.loads(line) for line in lines]
    atomic_write_text(out, "".join(line for line, r in zip(lines, results) if "_skipped" not in r))
    results = [r for r in results if "_skipped" not in r]
    scored = [r for r in results if r["correct"] is not None]
    acc = sum(r["correct"] for r in scored) / max(len(scored), 1)
    latency = [r["latency_s"] for r in results]
    summary = dict(ckpt=cfg.ckpt, data=cfg.data, out=out, latent_mode=cfg.latent_mode, norm_calib=cfg.norm_calib,
                   ema_beta=cfg.ema_beta,
                   n=len(scored), accuracy=acc, stderr=(acc * (1 - acc) / max(len(scored), 1)) ** 0.5,
                   skipped=bad_lines + len(rows) - len(results), batch_size=cfg.batch_size, ranks=world,
                   latency_s=dict(mean=sum(latency) / max(len(latency), 1), p50=percentile(latency, 0.5),
                                  p90=percentile(latency, 0.9)))
    atomic_write_text(output_paths(out)[2], json.dumps(summary, indent=2) + "\n")
    lat = summary["latency_s"]
    print(f"accuracy {acc:.4f} +- {summary['stderr']:.4f} on {len(scored)} examples ({summary['skipped']} skipped); "
          f"latency per example mean {lat['mean']:.3f} s, P50 {lat['p50']:.3f} s, P90 {lat['p90']:.3f} s -> {out}")
    return summary


def main(cfg: InferConfig):
    if not cfg.data and not (cfg.image and cfg.question):
        raise DataError("give an image and a question, or --data a JSONL (see --help)")
    if cfg.data:
        rank, world, _ = setup_distributed()  # load_checkpoint puts each rank on its own device
        try:
            return run_batch(cfg, Runner(cfg), rank, world, rank_barrier(world))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    runner = Runner(cfg)
    row = dict(id="0", image=os.path.abspath(cfg.image), question=cfg.question, _file="<command line>", _line=0)
    response = runner.answer([encode_row(runner.tokenizer, runner.image_processor, row, runner.spec)])[0]
    print(response)
    print(f"answer: {extract_answer(response)}")


if __name__ == "__main__":
    run_main(main, parse_config(InferConfig))
