"""GAP inference (paper eq. 1, appendix F; the interventions of section 5.4 / table 6; the latency of table 9):
load a checkpoint written by train.py and answer with latent reasoning through the batched KV-cached latent loop.

    python infer.py image.png "How many red circles are there?" --ckpt out/gap
    python infer.py --ckpt out/gap --data test.jsonl --latent_mode noise     # batch mode: accuracy vs `answer`
    torchrun --nproc_per_node 8 infer.py --ckpt out/gap --data test.jsonl --batch_size 1   # sharded, table 9
    # the content controls (controls.py): a first pass that keeps its latents, each row then fed a donor's
    # (--latent_mode oracle: its aux image's targets), and the paired tests of two results files
    python infer.py --ckpt out/gap --data test.jsonl --out out/t/model.jsonl --save_latents
    python infer.py --ckpt out/gap --data test.jsonl --out out/t/shuffled.jsonl --latent_mode shuffled \
        --donors out/t/model.jsonl --donor_group category
    python compare.py out/t/model.jsonl out/t/shuffled.jsonl

The query image's pixel budget and the longest prompt are the checkpoint's (as trained) unless --image_min_pixels,
--image_max_pixels or --max_len say otherwise (the baseline's resolution: README "Reproducing the paper"); a prompt
over max_len is refused, naming the budget that fits, never cut. harness.py's adapters take the same settings.

Batch mode: the examples are cut into fixed chunks of --batch_size and rank r of a torchrun run takes chunks
r, r + world, ... Each example samples (temperature > 0, noise latents) from its own generator, seeded from
(--seed, its id), so its result depends neither on the examples decoded beside it nor on the schedule, the
number of ranks or an interruption. Two schedules, the same results (greedy: the same tokens; sampled: the same
draws, up to float rounding that differs between padded batches and single prompts):
  continuous (default)  --batch_size decode rows; a row whose answer ends takes the rank's next example
                        (latent_loop.continuous_steps), so a long answer holds one row, not a whole batch; each
                        result is written as its example finishes. Faster on long-tailed answer lengths (README
                        "Inference speed").
  static                one generate call per chunk; the chunk's results are written when its longest answer ends.
Each rank appends results to OUT-stem.rankR.jsonl (flushed and fsynced); a restart skips the ids already there
and fails if the flags that change results (the schedule included: it changes what latency_s means), or the
checkpoint's gap.json and latent head, differ from OUT-stem.config.json. Rank 0 merges the parts into OUT in
input order and writes OUT-stem.summary.json: accuracy +- standard error and the latency per example (mean,
P50, P90). An example's `latency_s`: static, its chunk's wall time (prompt encoding, generation, decoding)
divided by the chunk's size; continuous, its own prompt encoding and text decoding plus the wall time from the
end of the step before its prefill to the step that chose its last token (the time it held a row, without the
wait for one; the rows share each step, so these times overlap and add up to more than the run). With
--batch_size 1 both are the per-sample wall time of table 9. Start afresh with another --out, or delete OUT
and the files beside it.
"""
import dataclasses
import json
import os
import time
from dataclasses import field

import torch
import torch.distributed as dist
from PIL import Image

import sharded
import controls
from answers import answers_match, extract_answer, tagged_answer
from checkpoint import checkpoint_stamp, load_checkpoint
from common import (DataError, atomic_write_text, chunk_seed, file_hash, parse_config, reading, run_main,
                    setup_distributed, user_file)
from data import (DataSpec, collate, encode_prompt, encode_row, n_image_tokens, open_image, prompt_text,
                  query_tokens, read_jsonl, to_rgb, too_long)
from latent_loop import Sampling
from stats import percentile

# the latent modes of infer.py: the loop's own, and the content controls that feed it given latents (controls.py)
MODES = ("model", "zero", "noise", "shuffled", "oracle")
GIVEN = ("shuffled", "oracle")


@dataclasses.dataclass
class InferConfig:
    """Answer questions about images with a GAP checkpoint."""
    image: str = field(default="", metadata={"help": "query image (single mode)", "positional": True})
    question: str = field(default="", metadata={"help": "question (single mode)", "positional": True})
    ckpt: str = field(default="out/gap", metadata={"help": "checkpoint directory from train.py"})
    data: str = field(default="", metadata={"help": "batch mode: JSONL with id, image, question, answer"})
    out: str = field(default="", metadata={"help": "batch mode results JSONL (default: CKPT/results_MODE.jsonl)"})
    latent_mode: str = field(default="model", metadata={"help": "latents fed back: model | zero | noise | shuffled "
                                                                "(another row's, --donors) | oracle (the aux "
                                                                "image's targets); controls.py",
                                                        "choices": list(MODES)})
    save_latents: bool = field(default=False, metadata={"help": "batch mode, latent_mode model: keep each row's "
                                                               "first-span latents (OUT-stem.latents/), the donors "
                                                               "of a shuffled run"})
    donors: str = field(default="", metadata={"help": "latent_mode shuffled: results JSONL of a --latent_mode model "
                                                      "--save_latents run on the same checkpoint and data"})
    donor_group: str = field(default="", metadata={"help": "latent_mode shuffled: draw each row's donor among the "
                                                           "rows with its value of this field (e.g. category); "
                                                           "'': any row"})
    target_cache: str = field(default="", metadata={"help": "latent_mode oracle: a targets.py cache of the data's "
                                                            "aux images ('': computed by the checkpoint's vision "
                                                            "tower)"})
    norm_calib: str = field(default="none", metadata={"help": "EMA norm calibration of latents (paper table 1)",
                                                      "choices": ["none", "ema"]})
    ema_beta: float = field(default=0.0, metadata={"help": "norm_calib ema: 0 = mean norm of the whole query image; "
                                                          "else an EMA in raster order with this beta",
                                                  "range": (0.0, 0.999999)})
    max_new_tokens: int = field(default=1024, metadata={"help": "generated tokens per answer, latents included"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})
    batch_size: int = field(default=8, metadata={"help": "batch mode: decode rows (continuous) or prompts per "
                                                          "generate call (static); 1 for per-sample latency as in "
                                                          "paper table 9"})
    schedule: str = field(default="continuous", metadata={"help": "batch mode: continuous (a finished row takes "
                                                                  "the next example) | static (fixed chunks); the "
                                                                  "same results, continuous is faster on long tails",
                                                          "choices": ["continuous", "static"]})
    sync_every: int = field(default=8, metadata={"help": "decode steps between two reads of the rows' state (stop "
                                                         "checks); the results do not depend on it (README "
                                                         "\"Inference speed\")", "range": (1, None)})
    seed: int = field(default=0, metadata={"help": "sampling seed (noise latents, temperature > 0); batch mode: "
                                                    "each example's generator is (seed, its id)"})
    skip_bad: bool = field(default=False, metadata={"help": "batch mode: skip and count bad examples"})
    image_min_pixels: int = field(default=0, metadata={"help": "query-image min pixels (0: the checkpoint's, as "
                                                                "trained); evaluation settings in README",
                                                        "range": (0, None)})
    image_max_pixels: int = field(default=0, metadata={"help": "query-image max pixels (0: the checkpoint's, as "
                                                                "trained)", "range": (0, None)})
    max_len: int = field(default=0, metadata={"help": "longest prompt in tokens (0: the checkpoint's training "
                                                       "max_len); a longer one is refused, naming the pixel budget "
                                                       "that fits", "range": (0, None)})


# the settings an evaluation may set over the checkpoint's own (0: the checkpoint's)
EVAL_KEYS = ("image_min_pixels", "image_max_pixels", "max_len")


class Runner:
    """A loaded checkpoint plus the settings to generate with (latent_loop.Sampling from the config's flags)."""

    def __init__(self, cfg: InferConfig, device=None, flag="--ckpt"):
        self.cfg = cfg
        self.gap, self.tokenizer, self.image_processor, config = load_checkpoint(cfg.ckpt, device, flag=flag)
        spec = DataSpec(**{f.name: config[f.name] for f in dataclasses.fields(DataSpec) if f.name in config})
        # the pixel budget and the length limit are the checkpoint's (as trained) unless the config sets them
        self.spec = dataclasses.replace(spec, **{k: getattr(cfg, k) for k in EVAL_KEYS if getattr(cfg, k)})
        size = self.image_processor.size
        # (min, max) pixels a query image is resized to fit, as the processor applies them
        self.pixels = (self.spec.image_min_pixels or size["shortest_edge"],
                       self.spec.image_max_pixels or size["longest_edge"])
        if self.pixels[0] > self.pixels[1]:
            raise DataError(f"image_min_pixels {self.pixels[0]} > image_max_pixels {self.pixels[1]} ({cfg.ckpt})")
        self.generator = torch.Generator(self.gap.backbone.device).manual_seed(cfg.seed)
        # shuffled and oracle feed the loop given latents (its latent_mode "given")
        loop_cfg = dataclasses.replace(cfg, latent_mode="given") if cfg.latent_mode in GIVEN else cfg
        self.sampling = Sampling.of(loop_cfg, stop_ids=[self.tokenizer.convert_tokens_to_ids(t)
                                                        for t in ("<|im_end|>", "<|endoftext|>")])

    def answer(self, items, generators=None, given=None, latents=None, sampling=None):
        """Responses (latent spans shown as <latent>) for a list of encode_prompt() items, in one generate call;
        generators: one per item (else the runner's one); given: (B, K, D) latents fed in every span of each item
        (latent_mode shuffled / oracle). latents: a list that gets, per item, the (K, D) latents fed in its first
        span (None without one). sampling: the runner's settings unless given."""
        batch = collate(items, self.tokenizer.pad_token_id, left=True)
        dev = self.gap.backbone.device
        steps = self.gap.steps(*(batch[k].to(dev) for k in ("input_ids", "attention_mask", "pixel_values",
                                                            "image_grid_thw")),
                               sampling or self.sampling, generator=generators or self.generator, given=given)
        if latents is None:
            tokens = torch.stack([step.token for step in steps], 1)
        else:  # reading the span's slots costs a host sync per step: only when asked
            kept = [[] for _ in items]
            tokens = torch.stack([self.keep_span(step, range(len(items)), kept) for step in steps], 1)
            latents.extend(self.first_span(k) for k in kept)
        return [self.gap.decode(self.tokenizer, row) for row in tokens.cpu()]

    def keep_span(self, step, jobs, kept):
        """Add what each row fed in its first span this step to kept[job] (rows of job < 0 are idle); returns
        the step's tokens."""
        K = self.gap.latent_tokens
        if K and step.fed is not None:
            for r in ((step.slot >= 0) & (step.slot < K)).nonzero()[:, 0].tolist():
                if jobs[r] >= 0 and len(kept[jobs[r]]) < K:
                    kept[jobs[r]].append(step.fed[r].float().cpu())
        return step.token

    def first_span(self, fed):
        return torch.stack(fed) if fed and len(fed) == self.gap.latent_tokens else None

    def answer_continuous(self, items, generators=None):
        """Yield (index, response, seconds, latents) for each of a list of encode_prompt() items as it finishes,
        decoded by continuous batching in --batch_size rows; generators: one per item (else the runner's one).
        seconds: from the end of the step before its prefill to the step after which the loop saw it finish (a stop
        id is seen at the next read of the rows' state: up to --sync_every - 1 steps later), plus decoding its text;
        latents: the (K, D) latents fed in its first span (None without one)."""
        # on the CPU until a row takes them (continuous_steps moves each prompt to the device at its prefill)
        prompts = [{k: it[k] for k in ("input_ids", "pixel_values", "image_grid_thw")} for it in items]
        steps = self.gap.continuous_steps(prompts, min(self.cfg.batch_size, len(items)), self.sampling,
                                          generator=generators or self.generator)
        # row -> its item; item -> the (R,) tokens of each step it held its row, the time its prefill began
        holding, tokens, began = {}, {}, {}
        kept = [[] for _ in items]  # item -> the latents fed in its first span

        def finished(r, i, end):  # an item's tokens are read once, as it finishes (decode stops at the first DONE)
            t0 = time.perf_counter()
            response = self.gap.decode(self.tokenizer, torch.stack(tokens.pop(i))[:, r].cpu())
            return i, response, end - began.pop(i) + time.perf_counter() - t0, self.first_span(kept[i])

        before = time.perf_counter()  # the end of the step before (here: before the first prefill)
        for step, job in steps:
            now = time.perf_counter()
            if self.cfg.save_latents:
                self.keep_span(step, job.tolist(), kept)
            for r, i in enumerate(job.tolist()):  # job is on the CPU
                if holding.get(r, -1) not in (-1, i):  # the row moved on: its item's last token was chosen before
                    yield finished(r, holding[r], before)
                holding[r] = i
                if i >= 0:
                    began.setdefault(i, before)
                    tokens.setdefault(i, []).append(step.token)
            before = now
        for r, i in holding.items():
            if i in tokens:
                yield finished(r, i, before)

    @torch.no_grad()
    def aux_targets(self, image):
        """The (K, D) vision targets of an aux image by the checkpoint's own vision tower (targets.aux_targets: the
        resize and tower of target extraction)."""
        from targets import aux_targets
        return aux_targets(self.gap.backbone, self.image_processor, [image], self.gap.latent_tokens)[0].float().cpu()

    def encode(self, image, question, id="0"):
        """One prompt (an RGB image, data.to_rgb, and the question) as a collate()-able item; a DataError when the
        image processor refuses the image or the prompt is over max_len."""
        try:
            item = encode_prompt(self.tokenizer, self.image_processor, image, question, self.spec, id)
        except ValueError as e:  # the processor's refusals (an aspect ratio over 200:1)
            raise DataError(f"{e} ({image.width}x{image.height} image)") from None
        if msg := self.too_long(len(item["input_ids"]), n_image_tokens(item["image_grid_thw"])):
            raise DataError(msg)
        return item

    def encode_row(self, row):
        """A JSONL row's prompt (data.encode_row); over max_len, a DataError naming the row."""
        item = encode_row(self.tokenizer, self.image_processor, row, self.spec)
        if msg := self.too_long(len(item["input_ids"]), n_image_tokens(item["image_grid_thw"])):
            raise DataError(row["_file"], row["_line"], "image", msg)
        return item

    def check_row(self, row):
        """What encode_row() refuses, from the image's size alone (the check of every row before a batch run)."""
        n_image = query_tokens(row, self.image_processor, self.spec)
        n = len(self.tokenizer(prompt_text(row["question"], n_image), add_special_tokens=False)["input_ids"])
        if msg := self.too_long(n, n_image):
            raise DataError(row["_file"], row["_line"], "image", msg)

    def too_long(self, n, n_image):
        """None, or the message for a prompt of n tokens (n_image of them the image's) over max_len: a prompt longer
        than training saw is a choice (raise max_len, or lower image_max_pixels to the budget named), never a
        silent truncation."""
        return too_long(n, n_image, self.spec, self.image_processor) if n > self.spec.max_len else None


# the flags that change results: a resumed run must use the same ones (and the same checkpoint contents);
# --batch_size and --schedule change only float rounding, and what latency_s means
RESULT_KEYS = ("ckpt", "data", "latent_mode", "norm_calib", "ema_beta", "max_new_tokens", "temperature", "top_p",
               "batch_size", "schedule", "seed", "image_min_pixels", "image_max_pixels", "max_len", "save_latents",
               "donors", "donor_group", "target_cache")


def example_generators(cfg: InferConfig, rows, device):
    """One generator per example, seeded from (--seed, its id), so that what it samples depends on nothing else;
    None when nothing is sampled (greedy, latent_mode model or zero: the loop draws nothing)."""
    if cfg.temperature <= 0 and cfg.latent_mode != "noise":  # shuffled / oracle draw nothing either
        return None
    return [torch.Generator(device).manual_seed(chunk_seed(cfg.seed, r["id"])) for r in rows]


def result_line(r, response, seconds, extra=None):
    """A row's result: the response, its answer scored against `answer`, whether it opened a latent span and
    whether its answer is well formed (inside an <answer> tag), its latency, and `extra` (the controls' fields)."""
    pred, truth = extract_answer(response), str(r.get("answer", ""))
    return json.dumps(dict(id=r["id"], response=response, pred=pred, answer=truth,
                           correct=answers_match(pred, truth, r["question"]) if truth else None,
                           span="<latent>" in response, well_formed=tagged_answer(response) != "",
                           latency_s=round(seconds, 6), **(extra or {}))) + "\n"


class Answers(sharded.Producer):
    """What an example produces in batch mode: the checkpoint's answer, scored against `answer`, timed; with
    --save_latents its first-span latents written beside the results (before its result line); shuffled and
    oracle: the row's given latents fed (controls.py) and named in its result line."""

    def __init__(self, runner: Runner, out, given=None):
        self.runner = runner
        self.given = given  # shuffled / oracle: row -> ((K, D) latents, the fields its result line gets)
        self.folder = controls.latents_dir(out) if runner.cfg.save_latents else None

    def encode(self, row):
        return self.runner.encode_row(row)

    def generators(self, rows):
        return example_generators(self.runner.cfg, rows, self.runner.gap.backbone.device)

    def line(self, r, response, seconds, latents, extra=None):
        if self.folder:
            if latents is not None:
                controls.save_latents(self.folder, r["id"], latents)
            extra = dict(extra or {}, span_latents=latents is not None)
        return result_line(r, response, seconds, extra)

    def static(self, items, rows, seconds):
        """One generate call; an example's latency is the chunk's wall time (encoding included) / its size."""
        t0 = time.perf_counter()
        given = [self.given(r) for r in rows] if self.given else None
        fed = torch.stack([g[0] for g in given]) if given else None
        latents = [] if self.folder else None
        responses = self.runner.answer(items, self.generators(rows), given=fed, latents=latents)
        each = (sum(seconds) + time.perf_counter() - t0) / len(items)
        return [self.line(r, response, each, latents[n] if latents else None, given[n][1] if given else None)
                for n, (r, response) in enumerate(zip(rows, responses))]

    def continuous(self, items, rows, seconds):
        for i, response, s, latents in self.runner.answer_continuous(items, self.generators(rows)):
            yield self.line(rows[i], response, seconds[i] + s, latents)


def control_inputs(cfg, runner, rows, run_config):
    """shuffled / oracle: (given(row) -> ((K, D) latents, result fields), row check, the donors) -- the latents
    each row's spans are fed; other modes: (None, None, None). Adds to run_config what the results then depend
    on (the donor file's contents and run config)."""
    K = runner.gap.latent_tokens
    if cfg.latent_mode not in GIVEN:
        return None, None, None
    if not K:
        raise DataError(f"{cfg.ckpt}: K=0 (no latent spans): latent_mode {cfg.latent_mode} has nothing to feed")
    if cfg.latent_mode == "shuffled":
        if not cfg.donors:
            raise DataError("latent_mode shuffled needs --donors: the results of infer.py --latent_mode model "
                            "--save_latents on the same --ckpt and --data (controls.py)")
        donors = controls.Donors(cfg.donors, run_config["ckpt_stamp"], run_config["data_sha256"])
        run_config.update(donors_sha256=donors.sha256, donors_config=donors.config)
        donor_of, placebo_of = controls.assign_donors(rows, donors.eligible(), cfg.seed,
                                                      controls.group_key(cfg.donor_group))
        zeros = torch.zeros(K, runner.gap.backbone.get_input_embeddings().embedding_dim)

        def given(r):  # a row whose group has no two other spans is fed zeros, and counted apart
            d = donor_of.get(r["id"])
            return (donors.latents(d) if d else zeros), dict(donor=d, placebo=placebo_of.get(r["id"]))
        return given, None, donors
    cached, info = controls.oracle_source(cfg.target_cache, K)
    if cached:
        run_config.update(target_cache_info=info)  # what made the targets (the vision tower's fingerprint, K)

    def check(r):
        if not r.get("aux_image"):
            raise DataError(r["_file"], r["_line"], "aux_image", "latent_mode oracle needs each row's aux_image")

    def given(r):
        if cached:
            return cached(r)[:K].float(), {}
        aux = r["aux_image"] if isinstance(r["aux_image"], str) else r["aux_image"][0]  # the first span's image
        return runner.aux_targets(open_image(dict(r, aux_image=aux), "aux_image")), {}
    return given, check, None


def run_batch(cfg: InferConfig, runner: Runner):
    """Evaluate on a JSONL: this rank's chunks, resumable (sharded.run); rank 0 returns the summary (else None)."""
    out = cfg.out or os.path.join(cfg.ckpt, f"results_{cfg.latent_mode}.jsonl")
    rows, bad_lines = read_jsonl(cfg.data, cfg.skip_bad, need_response=False)
    if cfg.save_latents and cfg.latent_mode != "model":
        raise DataError(f"--save_latents keeps the latents the checkpoint generates: latent_mode model, not "
                        f"{cfg.latent_mode}")
    if cfg.latent_mode in GIVEN and cfg.schedule != "static":
        # the loop feeds given latents in static batches only (latent_loop.latent_steps' `given`)
        print(f"latent_mode {cfg.latent_mode}: --schedule static (given latents are fed in static batches)")
        cfg = dataclasses.replace(cfg, schedule="static")
    # what the results depend on: the flags, the checkpoint's contents and the data's (an edited file is not resumed)
    run_config = dict({k: getattr(cfg, k) for k in RESULT_KEYS}, ckpt_stamp=checkpoint_stamp(cfg.ckpt),
                      data_sha256=file_hash(cfg.data))
    given, check, donors = control_inputs(cfg, runner, rows, run_config)

    def check_row(r):
        runner.check_row(r)
        if check:
            check(r)
    results = sharded.run(rows, out, run_config, check_row, lambda: Answers(runner, out, given), cfg.batch_size,
                          cfg.schedule, cfg.skip_bad, what="answering", desc=f"infer[{cfg.latent_mode}]")
    if results is None:
        return None
    scored = [r for r in results if r["correct"] is not None]
    acc = sum(r["correct"] for r in scored) / max(len(scored), 1)
    latency = [r["latency_s"] for r in results]
    summary = dict(ckpt=cfg.ckpt, data=cfg.data, out=out, latent_mode=cfg.latent_mode, norm_calib=cfg.norm_calib,
                   ema_beta=cfg.ema_beta, image_min_pixels=runner.pixels[0], image_max_pixels=runner.pixels[1],
                   max_len=runner.spec.max_len,
                   n=len(scored), accuracy=acc, stderr=(acc * (1 - acc) / max(len(scored), 1)) ** 0.5,
                   span_rate=rate(results, "span"), well_formed_rate=rate(results, "well_formed"),
                   skipped=bad_lines + len(rows) - len(results), batch_size=cfg.batch_size, schedule=cfg.schedule,
                   ranks=dist.get_world_size() if dist.is_initialized() else 1,
                   latency_s=dict(mean=sum(latency) / max(len(latency), 1), p50=percentile(latency, 0.5),
                                  p90=percentile(latency, 0.9)))
    if donors:
        summary["shuffled"] = shuffled_summary(results, rows, donors, cfg)
    atomic_write_text(sharded.output_paths(out)[2], json.dumps(summary, indent=2) + "\n")
    lat = summary["latency_s"]
    print(f"accuracy {acc:.4f} +- {summary['stderr']:.4f} on {len(scored)} examples ({summary['skipped']} skipped); "
          f"opens a span {summary['span_rate']:.3f}, well-formed answer {summary['well_formed_rate']:.3f}; "
          f"latency per example mean {lat['mean']:.3f} s, P50 {lat['p50']:.3f} s, P90 {lat['p90']:.3f} s -> {out}")
    if donors:
        sh = summary["shuffled"]
        for what in ("answer", "pred"):
            d, p = sh[f"follows_donor_{what}"], sh[f"follows_placebo_{what}"]
            print(f"follows the donor's {'gold answer' if what == 'answer' else 'own-run answer'}: "
                  f"{fmt(d['share'])} of {d['n']} rows whose donor's differs; the placebo's (chance): "
                  f"{fmt(p['share'])} of {p['n']}")
    return summary


def rate(results, key):
    return sum(bool(r[key]) for r in results) / max(len(results), 1)


def fmt(x):
    return "n/a" if x is None else f"{x:.3f}"


def shuffled_summary(results, rows, donors, cfg):
    """How often a row answers with its donor's answer, against its placebo's (fed to nobody: chance), of the
    rows whose donor's (placebo's) answer differs from their own: by the gold `answer`, and by the answer each
    row got in the donors' model run (`pred`)."""
    question = {r["id"]: r["question"] for r in rows}
    res = [dict(r, question=question[r["id"]]) for r in results]
    donor_of = {r["id"]: r["donor"] for r in results if r.get("donor")}
    placebo_of = {r["id"]: r["placebo"] for r in results if r.get("placebo")}
    out = dict(donors=cfg.donors, donor_group=cfg.donor_group, seed=cfg.seed, with_donor=len(donor_of))
    gold = {r["id"]: str(r.get("answer", "")) for r in rows}
    pred = {i: d.get("pred", "") for i, d in donors.results.items()}
    for what, answer_of in (("answer", gold), ("pred", pred)):
        for name, other in (("donor", donor_of), ("placebo", placebo_of)):
            keep = {i: o for i, o in other.items() if i in answer_of and o in answer_of}
            out[f"follows_{name}_{what}"] = controls.follows(res, keep, answer_of, answers_match)
    return out


def main(cfg: InferConfig):
    if not cfg.data and not (cfg.image and cfg.question):
        raise DataError("give an image and a question, or --data a JSONL (see --help)")
    if cfg.latent_mode in GIVEN and not cfg.data:
        raise DataError(f"latent_mode {cfg.latent_mode} is a control over a data set: give --data (controls.py)")
    if cfg.data:
        setup_distributed()  # load_checkpoint puts each rank on its own device
        try:
            return run_batch(cfg, Runner(cfg))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    with reading(user_file(cfg.image, "query image"), "query image"), Image.open(cfg.image) as im:
        to_rgb(im)  # decoded once before the checkpoint is loaded: a bad image is named in a second
    runner = Runner(cfg)
    row = dict(id="0", image=os.path.abspath(cfg.image), question=cfg.question, _file="<command line>", _line=0)
    try:
        encoded = runner.encode_row(row)
    except DataError as e:  # one image, not an example of a file: --skip_bad has nothing to skip
        raise DataError(str(e), example=False) from None
    response = runner.answer([encoded])[0]
    print(response)
    print(f"answer: {extract_answer(response)}")


if __name__ == "__main__":
    run_main(main, parse_config(InferConfig))
