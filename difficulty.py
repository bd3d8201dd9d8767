"""Difficulty-aware latent assignment (paper section 4.3): N sampled answers of the base model per
example, matched against `answer`, written as `accuracy`.

    python difficulty.py --model BASE --data train.jsonl --out train.scored.jsonl --samples 8
    torchrun --nproc_per_node 8 difficulty.py --model Qwen/Qwen2.5-VL-7B-Instruct --data train.jsonl \
        --out train.scored.jsonl --samples 8 --temperature 1.0 --top_p 1.0 --tau 0.0

For every JSONL example the base model answers from image + question alone, N times with sampling; the
final answer of each sample is extracted, compared with the ground-truth `answer`, and `accuracy` is the
fraction correct (paper section 4.3, eq. 4). OUT gets every input line, in input order, with its
fields unchanged plus `accuracy` and `answers` (the N extracted answers; `responses` with --responses).

Sampling: one generate call per batch of --batch_size prompts, each prompt prefilled once and its KV cache
repeated into N decode rows (GAP.generate num_samples). Batches are fixed chunks of the input and rank r
takes chunks r, r + world, ...; each chunk's generator is seeded from (--seed, its first id). So the output
is a function of the data, the model and the sampling flags (--batch_size included), and is the same for
any number of ranks and whether or not the run was interrupted (on one kind of device and thread count;
a different --batch_size draws different, equally valid, samples).

Resumable: each rank appends finished chunks to OUT-stem.rankR.jsonl (flushed and fsynced per chunk); a
restart reads every part file, drops a line torn by a kill, and skips the ids already there. The flags that
change samples are kept in OUT-stem.config.json and a restart with other ones fails. Rank 0 merges the parts
into OUT (atomically) and writes OUT-stem.summary.json; the part files stay, so a re-run only re-merges.

Answers are extracted and matched by answers.py, the same matcher infer.py evaluates with.
"""
import dataclasses
import json
import os
from dataclasses import field

import torch
import torch.distributed as dist

from answers import answers_match, extract_answer
from common import (BadExamples, DataError, atomic_write_text, chunk_seed, file_hash, merge_parts, output_paths,
                    parse_config, rank_barrier, resume_parts, run_main, setup_distributed)
from data import PLACEHOLDER, DataSpec, collate, encode_row, query_tokens, read_jsonl, report, validate
from latent_head import LatentHead
from model import GAP, add_latent_tokens, load_backbone

# ----------------------------------------------------------------------------------------------------
# Scoring: N samples of the base model per example

@dataclasses.dataclass
class DifficultyConfig:
    """Score every example by the accuracy of N sampled answers of the base model (paper section 4.3)."""
    model: str = field(default="", metadata={"help": "base Qwen2.5-VL directory or hub id (no GAP checkpoint)"})
    data: str = field(default="", metadata={"help": "JSONL with id, image, question, answer"})
    out: str = field(default="", metadata={"help": "scored JSONL: every input line + accuracy + answers"})
    samples: int = field(default=8, metadata={"help": "N sampled answers per example (paper: 8)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0: greedy, N equal answers)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})
    max_new_tokens: int = field(default=1024, metadata={"help": "tokens per sampled answer"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generate call; each decodes N rows"})
    seed: int = field(default=0, metadata={"help": "sampling seed; each chunk's generator is (seed, first id)"})
    tau: float = field(default=0.0, metadata={"help": "summary: accuracy <= tau gets latent supervision (eq. 4)"})
    image_min_pixels: int = field(default=0, metadata={"help": "query-image min pixels (0: processor's)"})
    image_max_pixels: int = field(default=0, metadata={"help": "query-image max pixels (0: processor's)"})
    responses: bool = field(default=False, metadata={"help": "also write the N decoded responses"})
    skip_bad: bool = field(default=False, metadata={"help": "skip and count bad examples instead of stopping"})


# the flags that change what is sampled: a resumed run must use the same ones
SAMPLING_KEYS = ("model", "data", "samples", "temperature", "top_p", "max_new_tokens", "batch_size", "seed",
                 "image_min_pixels", "image_max_pixels", "responses")


def load_scorer(path, device=None):
    """The base model as a GAP with no latents: K = 0 and a parameter-free head, so generate() is plain
    sampling with <|latent_start|> banned. The latent ids are added only so that they exist; with room in the
    vocab (Qwen2.5-VL has) nothing is resized and every other token's logit is the base model's."""
    backbone, tokenizer, image_processor = load_backbone(path, device)
    ids = add_latent_tokens(backbone, tokenizer)
    head = LatentHead("hidden", backbone.config.text_config.hidden_size).to(backbone.device)
    return GAP(backbone, head, ids, latent_tokens=0).eval(), tokenizer, image_processor


def score_chunk(gap, tokenizer, image_processor, chunk, cfg: DifficultyConfig):
    """Result lines (JSON + newline) of one chunk of examples, from one generate call in which each prompt
    is prefilled once and decoded in N rows (row b*N + j is sample j of prompt b). A bad image is an error,
    or with skip_bad a `_skipped` line that the merge counts and leaves out."""
    spec = DataSpec(latent_tokens=0, image_min_pixels=cfg.image_min_pixels, image_max_pixels=cfg.image_max_pixels)
    items, lines = [], {}
    bad = BadExamples(cfg.skip_bad)
    for r in chunk:
        try:
            items.append(encode_row(tokenizer, image_processor, r, spec))
        except DataError as e:  # not bad.guard(): a skipped example also gets a line, so a resume skips it too
            bad.add(str(e))  # raises unless --skip_bad
            lines[r["id"]] = json.dumps({"id": r["id"], "_skipped": str(e)}) + "\n"
    if items:
        dev, n = gap.backbone.device, cfg.samples
        batch = collate(items, tokenizer.pad_token_id, left=True)
        stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        tokens = gap.generate(batch["input_ids"].to(dev), batch["attention_mask"].to(dev),
                              batch["pixel_values"].to(dev), batch["image_grid_thw"].to(dev),
                              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              num_samples=n, stop_ids=stop_ids,
                              generator=torch.Generator(dev).manual_seed(chunk_seed(cfg.seed, chunk[0]["id"])))
        tokens = tokens.cpu()  # (B*N, S)
        for b, r in enumerate([r for r in chunk if r["id"] not in lines]):  # the rows that got a prompt
            responses = [gap.decode(tokenizer, t) for t in tokens[b * n:(b + 1) * n]]
            answers = [extract_answer(s) for s in responses]
            correct = sum(answers_match(a, str(r["answer"]), r["question"]) for a in answers)
            result = dict(r["_raw"], accuracy=correct / n, answers=answers)
            if cfg.responses:
                result["responses"] = responses
            lines[r["id"]] = json.dumps(result) + "\n"
    return [lines[r["id"]] for r in chunk]


def merge(cfg: DifficultyConfig, rows, bad_lines, summary_path, world):
    """Rank 0, after every rank is done: the parts -> OUT in input order, and the summary."""
    lines = merge_parts(cfg.out, [r["id"] for r in rows])
    parsed = [json.loads(line) for line in lines]
    atomic_write_text(cfg.out, "".join(line for line, s in zip(lines, parsed) if "_skipped" not in s))
    scored = [(r, s) for r, s in zip(rows, parsed) if "_skipped" not in s]
    accs = [s["accuracy"] for _, s in scored]
    hard = [r for r, s in scored if s["accuracy"] <= cfg.tau]
    summary = dict(data=cfg.data, out=cfg.out, examples=len(scored), skipped=bad_lines + len(rows) - len(scored),
                   mean_accuracy=sum(accs) / max(len(accs), 1), tau=cfg.tau, accuracy_le_tau=len(hard),
                   latent_supervised=sum(PLACEHOLDER in r.get("response", "") for r in hard),
                   accuracy_counts={str(a): accs.count(a) for a in sorted(set(accs))},
                   **{k: getattr(cfg, k) for k in SAMPLING_KEYS if k not in ("data",)}, ranks=world)
    atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
    print(f"scored {summary['examples']} examples ({summary['skipped']} skipped), mean accuracy "
          f"{summary['mean_accuracy']:.4f}; {len(hard)} with accuracy <= tau={cfg.tau}, of which "
          f"{summary['latent_supervised']} have a {PLACEHOLDER} span and get latent supervision -> {cfg.out}")
    return summary


def main(cfg: DifficultyConfig):
    from tqdm import tqdm
    if not (cfg.model and cfg.data and cfg.out):
        raise DataError("give --model, --data and --out (see --help)")
    if cfg.samples < 1 or cfg.batch_size < 1:
        raise DataError(f"--samples and --batch_size must be >= 1, got {cfg.samples} and {cfg.batch_size}")
    rank, world, device = setup_distributed()
    barrier = rank_barrier(world)
    rows, bad_lines = read_jsonl(cfg.data, cfg.skip_bad, need_response=False, need_answer=True)
    if not cfg.skip_bad:  # every query image opened and processed first: no bad one stops the run hours in
        from transformers import Qwen2VLImageProcessorPil
        try:
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(cfg.model)
        except OSError as e:
            raise DataError(f"--model {cfg.model}: cannot load: {str(e).strip().splitlines()[0]}") from None
        spec = DataSpec(latent_tokens=0, image_min_pixels=cfg.image_min_pixels, image_max_pixels=cfg.image_max_pixels)
        problems = validate(rows, lambda r: query_tokens(r, image_processor, spec), rank, world)
        if problems:
            raise DataError(report(problems, len(rows), "scoring") if rank == 0 else "bad examples (rank 0 lists them)")
    # the results depend on the data's content too: an edited file must not resume the old file's answers
    run_config = dict({k: getattr(cfg, k) for k in SAMPLING_KEYS}, data_sha256=file_hash(cfg.data))
    done, mine = resume_parts(cfg.out, run_config, rank, barrier)

    chunks = [rows[i:i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)][rank::world]
    todo = [c for c in chunks if any(r["id"] not in done for r in c)]
    print(f"rank {rank}/{world}: {sum(len(c) for c in chunks)} examples, "
          f"{sum(r['id'] in done for c in chunks for r in c)} already done, {bad_lines} bad lines skipped")
    gap, tokenizer, image_processor = load_scorer(cfg.model, device) if todo else (None, None, None)
    with open(mine, "a") as f:
        for chunk in tqdm(todo, desc="difficulty", unit="batch", disable=rank != 0):
            lines = score_chunk(gap, tokenizer, image_processor, chunk, cfg)
            # a chunk cut by a kill is sampled again whole (same generator), only its missing lines written
            f.write("".join(line for r, line in zip(chunk, lines) if r["id"] not in done))
            f.flush()
            os.fsync(f.fileno())
    barrier()
    summary = merge(cfg, rows, bad_lines, output_paths(cfg.out)[2], world) if rank == 0 else None
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    run_main(main, parse_config(DifficultyConfig))
