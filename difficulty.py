"""Difficulty-aware latent assignment (paper section 4.3): N sampled answers of the base model per
example, matched against `answer`, written as `accuracy`.

    python difficulty.py --model BASE --data train.jsonl --out train.scored.jsonl --samples 8
    torchrun --nproc_per_node 8 difficulty.py --model Qwen/Qwen2.5-VL-7B-Instruct --data train.jsonl \
        --out train.scored.jsonl --samples 8 --temperature 1.0 --top_p 1.0 --tau 0.0

For every JSONL example the base model answers from image + question alone, N times with sampling; the
final answer of each sample is extracted, compared with the ground-truth `answer`, and `accuracy` is the
fraction correct (paper section 4.3, eq. 4). OUT gets every input line, in input order, with its
fields unchanged plus `accuracy` and `answers` (the N extracted answers; `responses` with --responses).

Sampling: each prompt is prefilled once and decoded in N rows, and sample j of an example draws from its own
generator, seeded from (--seed, its id, j). The examples are cut into fixed chunks of --batch_size and rank r
takes chunks r, r + world, ...; two schedules decode them:
  continuous (default)  --batch_size x N decode rows; when a sample ends its row takes the next one (the N
                        samples of a prompt share its one prefill: latent_loop.continuous_steps num_samples), so
                        a long answer holds one row, not a whole batch; an example's line is written when its N
                        samples have ended.
  static                one generate call per chunk (GAP.generate num_samples = N); its lines are written when its
                        longest sample ends.
So the output is a function of the data, the model and the sampling flags, and is the same for either
schedule, any number of ranks and whether or not the run was interrupted (on one kind of device and thread
count; up to float rounding, which differs between padded batches and single prompts).

Resumable: each rank appends finished examples to OUT-stem.rankR.jsonl (flushed and fsynced); a
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

import sharded
from answers import answers_match, extract_answer
from common import (DataError, atomic_write_text, check_files, chunk_seed, file_hash, parse_config, run_main,
                    setup_distributed, short)
from data import PLACEHOLDER, DataSpec, collate, encode_row, query_tokens, read_jsonl
from latent_head import LatentHead
from latent_loop import Sampling
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
    batch_size: int = field(default=8, metadata={"help": "prompts decoded at once, each in N rows"})
    schedule: str = field(default="continuous", metadata={"help": "continuous (a finished sample's row takes the "
                                                                  "next one) | static (fixed chunks); the same "
                                                                  "output, continuous is faster on long tails",
                                                          "choices": ["continuous", "static"]})
    sync_every: int = field(default=8, metadata={"help": "decode steps between two reads of the rows' state (stop "
                                                         "checks; sampling reads every step); the output does not "
                                                         "depend on it", "range": (1, None)})
    seed: int = field(default=0, metadata={"help": "sampling seed; sample j of an example draws from (seed, id, j)"})
    tau: float = field(default=0.0, metadata={"help": "summary: accuracy <= tau gets latent supervision (eq. 4)"})
    image_min_pixels: int = field(default=0, metadata={"help": "query-image min pixels (0: processor's)"})
    image_max_pixels: int = field(default=0, metadata={"help": "query-image max pixels (0: processor's)"})
    responses: bool = field(default=False, metadata={"help": "also write the N decoded responses"})
    skip_bad: bool = field(default=False, metadata={"help": "skip and count bad examples instead of stopping"})


# the flags a resumed run must keep: those that change what is sampled, and the batching (--batch_size,
# --schedule), which changes only float rounding (padded batches or single prompts)
SAMPLING_KEYS = ("model", "data", "samples", "temperature", "top_p", "max_new_tokens", "batch_size", "schedule",
                 "seed", "image_min_pixels", "image_max_pixels", "responses")


def load_scorer(path, device=None):
    """The base model as a GAP with no latents: K = 0 and a parameter-free head, so generate() is plain
    sampling with <|latent_start|> banned. The latent ids are added only so that they exist; with room in the
    vocab (Qwen2.5-VL has) nothing is resized and every other token's logit is the base model's."""
    backbone, tokenizer, image_processor = load_backbone(path, device)
    ids = add_latent_tokens(backbone, tokenizer)
    head = LatentHead("hidden", backbone.config.text_config.hidden_size).to(backbone.device)
    return GAP(backbone, head, ids, latent_tokens=0).eval(), tokenizer, image_processor


def sample_generators(cfg: DifficultyConfig, rows, device):
    """One generator per sample, in row order (row b*N + j is sample j of rows[b]), seeded from (--seed, id, j):
    what a sample draws depends on nothing else. None when greedy (nothing is drawn)."""
    if cfg.temperature <= 0:
        return None
    return [torch.Generator(device).manual_seed(chunk_seed(cfg.seed, f"{r['id']}/{j}"))
            for r in rows for j in range(cfg.samples)]


def result_line(gap, tokenizer, r, tokens, cfg: DifficultyConfig):
    """The output line of example r from its N samples' tokens."""
    responses = [gap.decode(tokenizer, t) for t in tokens]
    answers = [extract_answer(s) for s in responses]
    correct = sum(answers_match(a, str(r["answer"]), r["question"]) for a in answers)
    result = dict(r["_raw"], accuracy=correct / len(answers), answers=answers)
    if cfg.responses:
        result["responses"] = responses
    return json.dumps(result) + "\n"


class Scores(sharded.Producer):
    """What an example produces: N sampled answers of the base model, matched against `answer` (its line)."""

    def __init__(self, cfg: DifficultyConfig, device):
        self.cfg = cfg
        self.gap, self.tokenizer, self.image_processor = load_scorer(cfg.model, device)
        self.spec = DataSpec(latent_tokens=0, image_min_pixels=cfg.image_min_pixels,
                             image_max_pixels=cfg.image_max_pixels)
        self.sampling = Sampling.of(cfg, num_samples=cfg.samples, stop_ids=[
            self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")])

    def encode(self, row):
        return encode_row(self.tokenizer, self.image_processor, row, self.spec)

    def static(self, items, rows, seconds):
        """One generate call in which each prompt is prefilled once and decoded in N rows."""
        dev, n = self.gap.backbone.device, self.cfg.samples
        batch = collate(items, self.tokenizer.pad_token_id, left=True)
        tokens = self.gap.generate(*(batch[k].to(dev) for k in ("input_ids", "attention_mask", "pixel_values",
                                                                "image_grid_thw")),
                                   self.sampling, generator=sample_generators(self.cfg, rows, dev)).cpu()  # (B*N, S)
        return [result_line(self.gap, self.tokenizer, r, tokens[b * n:(b + 1) * n], self.cfg)
                for b, r in enumerate(rows)]

    def continuous(self, items, rows, seconds):
        """An example's line as its N samples have ended (the N samples of a prompt share its one prefill)."""
        dev, n = self.gap.backbone.device, self.cfg.samples
        # on the CPU until a row takes them (continuous_steps moves each prompt to the device at its prefill)
        prompts = [{k: it[k] for k in ("input_ids", "pixel_values", "image_grid_thw")} for it in items]
        samples = {}  # example -> {j: tokens}
        for job, tokens in self.gap.generate_continuous(prompts, min(self.cfg.batch_size, len(items)) * n,
                                                        self.sampling,
                                                        generator=sample_generators(self.cfg, rows, dev)):
            b, j = divmod(job, n)
            samples.setdefault(b, {})[j] = tokens
            if len(samples[b]) == n:
                ended = samples.pop(b)
                yield result_line(self.gap, self.tokenizer, rows[b], [ended[j] for j in range(n)], self.cfg)


def summarize(cfg: DifficultyConfig, rows, results, bad_lines, world):
    """Rank 0, after the merge: OUT-stem.summary.json and its line."""
    accs = [s["accuracy"] for s in results]
    by_id = {r["id"]: r for r in rows}
    hard = [by_id[s["id"]] for s in results if s["accuracy"] <= cfg.tau]
    summary = dict(data=cfg.data, out=cfg.out, examples=len(results), skipped=bad_lines + len(rows) - len(results),
                   mean_accuracy=sum(accs) / max(len(accs), 1), tau=cfg.tau, accuracy_le_tau=len(hard),
                   latent_supervised=sum(PLACEHOLDER in r.get("response", "") for r in hard),
                   accuracy_counts={str(a): accs.count(a) for a in sorted(set(accs))},
                   **{k: getattr(cfg, k) for k in SAMPLING_KEYS if k not in ("data",)}, ranks=world)
    atomic_write_text(sharded.output_paths(cfg.out)[2], json.dumps(summary, indent=2) + "\n")
    print(f"scored {summary['examples']} examples ({summary['skipped']} skipped), mean accuracy "
          f"{summary['mean_accuracy']:.4f}; {len(hard)} with accuracy <= tau={cfg.tau}, of which "
          f"{summary['latent_supervised']} have a {PLACEHOLDER} span and get latent supervision -> {cfg.out}")
    return summary


def main(cfg: DifficultyConfig):
    if not (cfg.model and cfg.data and cfg.out):
        raise DataError("give --model, --data and --out (see --help)")
    if cfg.samples < 1 or cfg.batch_size < 1:
        raise DataError(f"--samples and --batch_size must be >= 1, got {cfg.samples} and {cfg.batch_size}")
    rank, world, device = setup_distributed()
    rows, bad_lines = read_jsonl(cfg.data, cfg.skip_bad, need_response=False, need_answer=True)
    from transformers import Qwen2VLImageProcessorPil
    if os.path.isdir(cfg.model):
        check_files(cfg.model)  # a truncated config or weights file named now, not after the model is loaded
    try:  # the image processor alone checks every query image before the model is loaded
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(cfg.model)
    except (OSError, ValueError) as e:
        raise DataError(f"--model {cfg.model}: cannot load: {short(e)}") from None
    spec = DataSpec(latent_tokens=0, image_min_pixels=cfg.image_min_pixels, image_max_pixels=cfg.image_max_pixels)
    # the results depend on the data's content too: an edited file must not resume the old file's answers
    run_config = dict({k: getattr(cfg, k) for k in SAMPLING_KEYS}, data_sha256=file_hash(cfg.data))
    results = sharded.run(rows, cfg.out, run_config, lambda r: query_tokens(r, image_processor, spec),
                          lambda: Scores(cfg, device), cfg.batch_size, cfg.schedule, cfg.skip_bad, what="scoring",
                          desc="difficulty")
    summary = summarize(cfg, rows, results, bad_lines, world) if results is not None else None
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    run_main(main, parse_config(DifficultyConfig))
