"""GAP checkpoints in the field's evaluation harnesses: VLMEvalKit (the paper's, section 5 and appendix G; on PyPI
as ms-vlmeval) and lmms-eval. Both adapters are thin: each turns the harness's request (image + prompt text it
built) into infer.Runner calls, the project's one inference path, and returns the text the harness scores.

    torchrun --nproc_per_node 8 harness.py vlmeval --config gap_eval.json --work-dir out/vlmeval    # its run.py
    torchrun --nproc_per_node 8 harness.py lmms_eval --model gap --model_args ckpt=out/gap \\
        --tasks mmstar --batch_size 8 --output_path out/lmms_eval --log_samples                   # its CLI

The arguments after `vlmeval` / `lmms_eval` are the harness's own CLI; this file only registers the model
first (VLMEvalKit: `GAP` in vlmeval.config.supported_VLM, built from the `model.GAP` entry of --config; lmms-eval:
model `gap`, `--model_args` the same keywords). The keywords are infer.InferConfig's evaluation settings
(HARNESS_KEYS: latent mode, generation budget, the query image's min/max pixels, max_len; docs/REPRODUCING.md
gives the ones that match the baseline's resolution) plus `output` and `latency_log`. One process or
`torchrun` (or `accelerate launch`): each rank loads the checkpoint on GPU LOCAL_RANK and answers its share of the
rows, as the harness shards them. Exit code 1 when the harness logged an evaluation as failed (both log it and go
on, exit 0). Tested on CPU by test_harness.py with requirements-eval.txt, in one process and in two.

What the harness gets: output="answer" (default): the text inside the response's last <answer> tag
(answers.tagged_answer), "" when there is none (reasoning cut at max_new_tokens, say): scored as wrong, never a line
of reasoning a lenient matcher could take for the answer. output="response": the whole response. A request GAP
cannot serve (not one image, an image the processor refuses, a prompt over max_len) gets "" too, and costs only
its own row: it is logged and counted at the end. Generation settings (max_new_tokens, temperature, latent mode,
norm calibration) are the adapter's, not a task's generation kwargs: those are sized for direct answers and would
cut GAP's reasoning and latent span.

Latent modes (the `latent_mode` keyword): model, zero and noise as in infer.py; shuffled answers each request twice,
first in model mode (its first-span latents join this rank's bank), then fed the latents of a donor drawn with
`seed` from the bank without itself (GAPModel.shuffled): a benchmark's rows carry no ids to pair with a first pass
of infer.py. oracle is refused: a benchmark's rows carry no aux image (run infer.py --data on a JSONL with them).

Latency (paper table 9: wall-clock seconds per sample inside the VLMEvalKit wrapper): `latency_log=PATH` appends,
from every rank, one JSON line per row: {"dataset", "seconds", "batch", "image_tokens", "rank"} (lmms-eval: and
"doc_id"), or {"dataset", "error", "rank"} for a row not answered; rank 0 first appends the settings it runs
with ({"rank", "settings"}). Each call is timed from the harness's image and text to the returned strings; a batch
of B rows (lmms-eval --batch_size) counts its time / B for each.
"""
import dataclasses
import functools
import json
import logging
import os
import random
import sys
import time

import torch
from PIL import Image

import infer
from answers import tagged_answer
from common import DataError
from data import n_image_tokens, read_image, to_rgb

# the keyword arguments both adapters take from infer.InferConfig (besides output, latency_log, device)
HARNESS_KEYS = ("ckpt", "latent_mode", "norm_calib", "ema_beta", "max_new_tokens", "temperature", "top_p", "seed",
                *infer.EVAL_KEYS)
UNANSWERED = []  # this process's requests GAP could not serve (their rows were scored as wrong), as messages


def infer_config(kwargs):
    """infer.InferConfig from an adapter's keyword arguments (lmms-eval passes them as parsed strings)."""
    fields = {f.name: f for f in dataclasses.fields(infer.InferConfig) if f.name in HARNESS_KEYS}
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise DataError(f"GAP adapter: unknown keyword(s) {unknown}; it takes {', '.join(HARNESS_KEYS)}, output, "
                        "latency_log")
    if "ckpt" not in kwargs:
        raise DataError("GAP adapter: no ckpt (the checkpoint directory from train.py)")
    values = {}
    for k, v in kwargs.items():
        cast = fields[k].type  # int, float or str
        try:
            values[k] = cast(v)
        except ValueError:
            raise DataError(f"GAP adapter: {k}={v!r} is not of type {cast.__name__}") from None
    return infer.InferConfig(**values)


def rank_device():
    """This process's device: GPU LOCAL_RANK, as lmms-eval's own Qwen2.5-VL places each rank (VLMEvalKit's run.py
    leaves each rank only its own GPUs visible: the index wraps onto those), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def load_image(visual):
    """A harness's image (a PIL image, or a file path: VLMEvalKit) as infer.py reads its own: data.to_rgb (EXIF
    orientation; transparency on white, where PIL's convert("RGB") turns it black)."""
    if isinstance(visual, Image.Image):
        return to_rgb(visual)
    if isinstance(visual, (str, os.PathLike)):
        try:
            return read_image(visual)
        except ValueError as e:
            raise DataError(str(e)) from None
    raise DataError(f"a {type(visual).__name__}, not an image")


def one_image(images):
    """GAP's prompt holds one query image (data.encode_prompt); a request with another count cannot be served."""
    if len(images) != 1:
        raise DataError(f"{len(images)} images in one request; GAP answers about exactly one image")
    return images[0]


def append_lines(path, records):
    """One JSON line per record, each in one write to a file opened for appending: the lines of ranks appending to one
    file interleave whole (POSIX append semantics; a network file system may not keep them)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for r in records:
            os.write(fd, (json.dumps(r) + "\n").encode())
    finally:
        os.close(fd)


class GAPModel:
    """What both adapters share: a loaded checkpoint, and the harness's strings for a list of requests, timed."""

    def __init__(self, output="answer", latency_log="", device=None, **settings):
        if output not in ("answer", "response"):
            raise DataError(f"output must be 'answer' or 'response', got {output!r}")
        cfg = infer_config(settings)
        if cfg.latent_mode == "oracle":
            raise DataError("GAP adapter: latent_mode oracle feeds each row's aux_image targets, which a benchmark's "
                            "rows do not carry: run infer.py --data on a JSONL with aux_image (controls.py)")
        self.runner = infer.Runner(cfg, device or rank_device(), flag="the adapter's ckpt")
        # latent_mode shuffled: the first-span latents of the requests answered so far (model mode), the donors
        self.bank, self.donor_rng = [], random.Random(f"shuffle-{cfg.seed}-{os.environ.get('RANK', 0)}")
        self.output, self.latency_log = output, latency_log
        self.global_rank = int(os.environ.get("RANK", 0))  # (lmms has a read-only `rank`)
        cfg, runner = self.runner.cfg, self.runner
        self.settings = dict({k: getattr(cfg, k) for k in HARNESS_KEYS}, output=output,
                             image_min_pixels=runner.pixels[0], image_max_pixels=runner.pixels[1],
                             max_len=runner.spec.max_len)  # the pixel budget and max_len in force, not the 0s
        if self.global_rank == 0:
            print(f"GAP adapter settings: {json.dumps(self.settings)}", flush=True)
            if latency_log:
                append_lines(latency_log, [dict(rank=self.global_rank, settings=self.settings)])

    def respond(self, requests):
        """The harness's strings, one per request: a dict of `images` (PIL images or file paths), `text` (the prompt
        the harness built), `dataset` (its name) and any other keys to log with it (doc_id)."""
        t0 = time.perf_counter()
        items, logs = [], []
        for r in requests:
            log = dict({k: v for k, v in r.items() if k not in ("images", "text")}, rank=self.global_rank)
            try:
                items.append(self.runner.encode(load_image(one_image(r["images"])), r["text"]))
            except DataError as e:  # the row is lost, not the benchmark
                where = " ".join(f"{v}" if k == "dataset" else f"{k} {v}" for k, v in log.items() if k != "rank")
                log["error"] = f"{where}: {e}"
                items.append(None)
                UNANSWERED.append(log["error"])
                print(f"GAP: not answered, scored as wrong: {log['error']}", file=sys.stderr, flush=True)
            logs.append(log)
        answered = [it for it in items if it is not None]
        answer = self.shuffled if self.runner.cfg.latent_mode == "shuffled" else self.runner.answer
        responses = iter(answer(answered) if answered else [])
        seconds = (time.perf_counter() - t0) / max(len(answered), 1)
        out = []
        for it, log in zip(items, logs):
            if it is None:
                out.append("")
                continue
            response = next(responses)
            out.append(tagged_answer(response) if self.output == "answer" else response)
            log.update(seconds=seconds, batch=len(answered), image_tokens=n_image_tokens(it["image_grid_thw"]))
        if self.latency_log:
            append_lines(self.latency_log, logs)
        return out

    def shuffled(self, items):
        """latent_mode shuffled inside a harness, whose rows carry no ids to pair with a first pass: each request
        is answered twice, first in model mode (its first-span latents join this rank's bank), then fed the
        latents of a donor drawn (seeded by --seed and the rank) from the bank without itself: any earlier request
        of this rank, or another of this call; zeros while there is none. The harness scores the second answers."""
        latents = []
        self.runner.answer(items, latents=latents, sampling=dataclasses.replace(self.runner.sampling,
                                                                                latent_mode="model"))
        first = len(self.bank)
        self.bank += latents
        width = self.runner.gap.backbone.get_input_embeddings().embedding_dim
        zeros = torch.zeros(self.runner.gap.latent_tokens, width)
        given = []
        for n in range(len(items)):
            others = [i for i, x in enumerate(self.bank) if x is not None and i != first + n]
            given.append(self.bank[self.donor_rng.choice(others)] if others else zeros)
        return self.runner.answer(items, given=torch.stack(given))


# ----------------------------------------------------------------------------------------------------------
# VLMEvalKit: a BaseModel whose generate_inner(message, dataset) gets VLMEvalKit's interleaved list of
# {"type": "image" | "text", "value": path | text}. VLMEvalKit calls it once per sample (no batching for local
# models); under torchrun rank r infers rows r, r + world, ... Built on first use: importing vlmeval changes global
# state (grad mode, seeds, SSL checks).

@functools.cache
def vlmeval_model_class():
    from vlmeval.vlm.base import BaseModel

    class GAPVLMEvalKit(GAPModel, BaseModel):
        INTERLEAVE = False
        allowed_types = ["text", "image"]

        def __init__(self, **kwargs):
            BaseModel.__init__(self)
            GAPModel.__init__(self, **kwargs)

        def generate_inner(self, message, dataset=None):
            images = [m["value"] for m in message if m["type"] == "image"]
            text = "\n".join(m["value"] for m in message if m["type"] == "text")
            return self.respond([dict(images=images, text=text, dataset=dataset or "")])[0]

    return GAPVLMEvalKit


def register_vlmeval(name="GAP"):
    """Make `name` a VLMEvalKit model: supported_VLM[name](**kwargs) builds the adapter (what run.py does with
    the `model` entries of --config)."""
    from vlmeval.config import supported_VLM
    supported_VLM[name] = vlmeval_model_class()


class FailureLog(logging.Handler):
    """The errors a logger records: VLMEvalKit's run.py logs a dataset that failed (and one it skipped) and goes on."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run_vlmeval():
    """VLMEvalKit's run.py with GAP registered; returns the evaluations it logged as failed."""
    from vlmeval import run  # first: on a GPU node its import leaves each rank only its own GPUs visible
    register_vlmeval()
    world, build = os.environ.get("WORLD_SIZE"), run.build_model_from_config

    def build_keeping_world_size(*args, **kwargs):
        # VLMEvalKit 0.0.20 removes WORLD_SIZE while it builds a model from --config and, for an entry without
        # `class` (GAP's), never puts it back: every rank would then take itself for the only one and infer rows
        # r..N-1 (inference.infer_data shards by it), each row once per rank before it
        try:
            return build(*args, **kwargs)
        finally:
            if world is not None:
                os.environ["WORLD_SIZE"] = world

    run.build_model_from_config = build_keeping_world_size
    failed = FailureLog()
    run.logger.addHandler(failed)
    run.main()
    return failed.messages


# ----------------------------------------------------------------------------------------------------------
# lmms-eval: an `lmms` model; generate_until gets Instances whose args are (context, gen_kwargs, doc_to_visual,
# doc_id, task, split), this rank's share, answered --batch_size at a time. lmms-eval reads the model's rank,
# world_size, device and accelerator, as its own Qwen2.5-VL sets them.

def batch_size_of(batch_size, max_batch_size):
    """(rows per generate call, whether to halve it on running out of GPU memory) from lmms-eval's --batch_size:
    N, or auto / auto:N (lm-eval's spelling): --max_batch_size (64 when not given), halved until a batch fits."""
    text = str(batch_size)
    if text.startswith("auto"):
        return int(max_batch_size or 64), True
    if not text.isdigit() or int(text) < 1:
        raise DataError(f"--batch_size {text!r}: give a number >= 1, or auto")
    return int(text), False


def in_batches(answer, items, size, shrink=False):
    """answer(batch) -> one result per item, over consecutive batches of `size`. shrink: a batch that runs out of
    GPU memory is answered again at half the size, which the batches after it keep. Returns (results, size)."""
    out = []
    while len(out) < len(items):
        batch = items[len(out):len(out) + size]
        try:
            out += answer(batch)
        except torch.OutOfMemoryError:
            if not shrink or size == 1:
                raise
            size //= 2
            torch.cuda.empty_cache()
    return out, size


@functools.cache
def lmms_eval_model_class():
    from accelerate import Accelerator
    from lmms_eval.api.model import lmms

    class GAPLmmsEval(GAPModel, lmms):
        def __init__(self, batch_size=1, max_batch_size=None, device=None, **kwargs):
            lmms.__init__(self)
            self.accelerator = Accelerator()  # lmms-eval gathers and waits through it under `accelerate launch`
            self._rank, self._world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
            # one GPU per rank under a launcher (--device would put every rank on the same one), as lmms-eval's own
            self._device = rank_device() if device is None or self._world_size > 1 else torch.device(device)
            self.batch_size, self.shrink = batch_size_of(batch_size, max_batch_size)
            GAPModel.__init__(self, device=self._device, **kwargs)

        @property
        def device(self):
            return self._device

        def generate_until(self, requests):
            # lmms-eval pads a rank's requests with copies of its last one so that every rank makes as many calls,
            # and drops their answers: they are not generated (nor logged)
            real = [r for r in requests if not r.metadata.get("__padding_only__")]
            answers, self.batch_size = in_batches(self.answer, real, self.batch_size, self.shrink)
            answers = iter(answers)
            return ["" if r.metadata.get("__padding_only__") else next(answers) for r in requests]

        def answer(self, batch):
            """One generate call for a batch of Instances, each logged with its own task and doc_id."""
            return self.respond([dict(images=visual(self.task_dict[task][split][doc_id]), text=context,
                                      dataset=task, doc_id=doc_id)
                                 for context, _, visual, doc_id, task, split in (r.args for r in batch)])

        def loglikelihood(self, requests):
            raise NotImplementedError("GAP is evaluated by generation (generate_until tasks), not loglikelihood")

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("GAP answers single-turn requests")

    return GAPLmmsEval


def lmms_eval_manifest():
    """lmms-eval's record of the model `gap`: what a package's entry point in the group `lmms_eval.models` returns."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id="gap", simple_class_path="harness.GAPLmmsEval")


def register_lmms_eval():
    # lmms-eval 0.7.3 loads plugins from the entry points of installed packages; these files are no package, so the
    # manifest such an entry point returns is registered as lmms-eval registers one it loaded
    from lmms_eval.models import MODEL_REGISTRY_V2
    MODEL_REGISTRY_V2.register_manifest(lmms_eval_manifest(), overwrite=True)


def run_lmms_eval():
    """lmms-eval's CLI with GAP registered; returns the evaluations that raised (it logs them and exits 0)."""
    register_lmms_eval()
    import lmms_eval.__main__ as cli
    failed, evaluate_one = [], cli.cli_evaluate_single

    def checked(args):
        try:
            return evaluate_one(args)
        except Exception as e:
            failed.append(repr(e))
            raise

    cli.cli_evaluate_single = checked
    cli.cli_evaluate()
    return failed


def __getattr__(name):
    """harness.GAPLmmsEval / harness.GAPVLMEvalKit: the classes, built when a harness imports them by path."""
    builders = dict(GAPLmmsEval=lmms_eval_model_class, GAPVLMEvalKit=vlmeval_model_class)
    if name in builders:
        return builders[name]()
    raise AttributeError(f"module 'harness' has no attribute {name!r}")


def main(argv):
    harnesses = dict(vlmeval=run_vlmeval, lmms_eval=run_lmms_eval)
    if not argv or argv[0] not in harnesses:
        raise SystemExit(f"usage: python harness.py {{{' | '.join(harnesses)}}} [the harness's own arguments]\n"
                         + __doc__)
    sys.argv = [f"harness.py {argv[0]}", *argv[1:]]
    failed = harnesses[argv[0]]()
    where = f"harness.py {argv[0]}" + (f" (rank {os.environ['RANK']})" if "RANK" in os.environ else "")
    if UNANSWERED:
        print(f"{where}: {len(UNANSWERED)} request(s) not answered, scored as wrong; the first: {UNANSWERED[0]}",
              file=sys.stderr, flush=True)
    if failed:
        raise SystemExit(f"{where}: {len(failed)} evaluation(s) failed, first: {failed[0]} (logged above)")


if __name__ == "__main__":
    sys.modules.setdefault("harness", sys.modules["__main__"])  # one module, whether run or imported by path
    main(sys.argv[1:])
