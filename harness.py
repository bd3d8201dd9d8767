"""GAP checkpoints in the field's evaluation harnesses: VLMEvalKit (the paper's, section 5 and appendix G; on PyPI
as ms-vlmeval) and lmms-eval. Both adapters are thin: each turns the harness's request (image + prompt text it
built) into infer.Runner calls, the project's one inference path, and returns the text the harness scores.

    python harness.py vlmeval --config gap_eval.json --work-dir out/vlmeval       # VLMEvalKit's run.py
    python harness.py lmms_eval --model gap --model_args ckpt=out/gap,latent_mode=model \
        --tasks mmstar --batch_size 8 --output_path out/lmms_eval --log_samples          # lmms-eval's CLI

The arguments after `vlmeval` / `lmms_eval` are the harness's own CLI; this file only registers the model
first (VLMEvalKit: `GAP` in vlmeval.config.supported_VLM, built from the `model.GAP` entry of --config with
the keyword arguments of GAPModel; lmms-eval: model `gap`, `--model_args` the same keywords). Multi-GPU runs go
through each harness's own launcher (`torchrun --nproc_per_node 8 harness.py vlmeval ...`; not tested here).
Tested end to end on CPU by test_harness.py with requirements-eval.txt.

Generation settings (max_new_tokens, temperature, latent mode, norm calibration) come from the adapter's
arguments, not from a task's generation kwargs: those are sized for direct answers and would cut GAP's
reasoning and latent span. By default the harness gets the text inside
<answer>...</answer> (answers.extract_answer); output="response" gives it the whole response instead.

Latency (paper table 9: wall-clock seconds per sample inside the VLMEvalKit wrapper): each call is timed, from
the harness's image and text to the returned string; `latency_log=PATH` appends one JSON line per sample
({"dataset", "seconds", "batch"}); a batch of B samples (lmms-eval --batch_size) counts its time / B each.
"""
import functools
import json
import sys
import time

from PIL import Image

from answers import extract_answer
import infer


class GAPModel:
    """What both adapters share: a loaded checkpoint, answers for lists of (image, text), timed."""

    def __init__(self, ckpt, latent_mode="model", norm_calib="none", ema_beta=0.0, max_new_tokens=1024,
                 temperature=0.0, top_p=1.0, seed=0, output="answer", latency_log="", device=None):
        if output not in ("answer", "response"):
            raise ValueError(f"output must be 'answer' or 'response', got {output!r}")
        cfg = infer.InferConfig(ckpt=ckpt, latent_mode=latent_mode, norm_calib=norm_calib, ema_beta=float(ema_beta),
                                max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                top_p=float(top_p), seed=int(seed))
        self.runner = infer.Runner(cfg, device)
        self.output, self.latency_log = output, latency_log
        self.latencies = []  # seconds per sample, in call order

    def respond(self, images, texts, dataset=""):
        """Strings for the harness, one per (PIL image, prompt text)."""
        t0 = time.perf_counter()
        items = [self.runner.encode(im.convert("RGB"), text) for im, text in zip(images, texts)]
        responses = self.runner.answer(items)
        seconds = (time.perf_counter() - t0) / len(items)
        self.latencies += [seconds] * len(items)
        if self.latency_log:
            with open(self.latency_log, "a") as f:
                f.writelines(json.dumps(dict(dataset=dataset, seconds=seconds, batch=len(items))) + "\n"
                             for _ in items)
        return [extract_answer(r) if self.output == "answer" else r for r in responses]


def one_image(images, where):
    """GAP's prompt holds one query image (data.encode_prompt); a request with another count is an error."""
    if len(images) != 1:
        raise ValueError(f"{where}: {len(images)} images in one request; GAP answers about exactly one image")
    return images[0]


# ----------------------------------------------------------------------------------------------------------
# VLMEvalKit: a BaseModel whose generate_inner(message, dataset) gets VLMEvalKit's interleaved list of
# {"type": "image" | "text", "value": path | text}. VLMEvalKit calls it once per sample (no batching for local
# models). Built on first use: importing vlmeval changes global state (grad mode, seeds, SSL checks).

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
            image = one_image([m["value"] for m in message if m["type"] == "image"], f"VLMEvalKit {dataset}")
            text = "\n".join(m["value"] for m in message if m["type"] == "text")
            with Image.open(image) as im:
                return self.respond([im], [text], dataset or "")[0]

    return GAPVLMEvalKit


def register_vlmeval(name="GAP"):
    """Make `name` a VLMEvalKit model: supported_VLM[name](**kwargs) builds the adapter (what run.py does with
    the `model` entries of --config)."""
    from vlmeval.config import supported_VLM
    supported_VLM[name] = vlmeval_model_class()


# ----------------------------------------------------------------------------------------------------------
# lmms-eval: an `lmms` model; generate_until gets Instances whose args are (context, gen_kwargs, doc_to_visual,
# doc_id, task, split), batched by --batch_size. Registered under `gap` through lmms-eval's model registry.

@functools.cache
def lmms_eval_model_class():
    from lmms_eval.api.model import lmms

    class GAPLmmsEval(GAPModel, lmms):
        def __init__(self, ckpt, batch_size=1, max_batch_size=None, device=None, **kwargs):
            lmms.__init__(self)
            GAPModel.__init__(self, ckpt, device=device, **kwargs)
            self.batch_size = int(batch_size)

        def generate_until(self, requests):
            out = []
            for i in range(0, len(requests), self.batch_size):
                args = [r.args for r in requests[i:i + self.batch_size]]
                images = [one_image(visual(self.task_dict[task][split][doc_id]), f"lmms-eval {task} doc {doc_id}")
                          for _, _, visual, doc_id, task, split in args]
                out += self.respond(images, [a[0] for a in args], args[0][4])
            return out

        def loglikelihood(self, requests):
            raise NotImplementedError("GAP is evaluated by generation (generate_until tasks), not loglikelihood")

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("GAP answers single-turn requests")

    return GAPLmmsEval


def register_lmms_eval(name="gap"):
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest
    MODEL_REGISTRY_V2.register_manifest(ModelManifest(model_id=name, simple_class_path="harness.GAPLmmsEval"),
                                        overwrite=True)


def __getattr__(name):
    """harness.GAPLmmsEval / harness.GAPVLMEvalKit: the classes, built when a harness imports them by path."""
    builders = dict(GAPLmmsEval=lmms_eval_model_class, GAPVLMEvalKit=vlmeval_model_class)
    if name in builders:
        return builders[name]()
    raise AttributeError(f"module 'harness' has no attribute {name!r}")


def main(argv):
    harnesses = ("vlmeval", "lmms_eval")
    if not argv or argv[0] not in harnesses:
        raise SystemExit(f"usage: python harness.py {{{' | '.join(harnesses)}}} [the harness's own arguments]\n"
                         + __doc__)
    sys.argv = [f"harness.py {argv[0]}", *argv[1:]]
    if argv[0] == "vlmeval":
        register_vlmeval()
        from vlmeval.run import main as run
        return run()
    register_lmms_eval()
    import lmms_eval.__main__ as cli
    failed, evaluate_one = [], cli.cli_evaluate_single

    def checked(args):  # lmms-eval logs a failed evaluation and exits 0; remember it and exit 1 instead
        try:
            return evaluate_one(args)
        except Exception as e:
            failed.append(e)
            raise

    cli.cli_evaluate_single = checked
    cli.cli_evaluate()
    if failed:
        raise SystemExit(f"harness.py lmms_eval: {len(failed)} evaluation(s) failed, first: {failed[0]!r} "
                         "(traceback above)")


if __name__ == "__main__":
    sys.modules.setdefault("harness", sys.modules["__main__"])  # one module, whether run or imported by path
    main(sys.argv[1:])
