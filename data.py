"""GAP data: the JSONL schema, query images through the Qwen2.5-VL image processor, the chat template, latent-span
serialization (<|latent_start|> + K x <|latent_pad|> + <|latent_end|>), label masking, difficulty-aware
stripping, batch collation and packing, and the check of every example before a long job (paper 4.1, 4.3,
appendix F, I). The latent targets the data set reads are targets.py's; nothing here loads a model.

One JSONL line per example (paths relative to the JSONL file):
    {"id", "image", "question", "response" (with any number of "<latent>" placeholders), "aux_image" (one path for
     every span, or a list with one path per placeholder, in order), "answer", "accuracy"}

Not run alone: `python targets.py` extracts the latent targets, `python train.py --check_only` checks every example
as training will see it.
"""
import dataclasses
import hashlib
import json
import os
import re

import numpy as np
import torch
from PIL import Image, ImageOps

from common import BadExamples, DataError, user_file
from losses import IGNORE

PLACEHOLDER = "<latent>"
# a response may also carry an already serialized span; it must hold exactly K pads
SPAN = re.compile(r"<\|latent_start\|>((?:<\|latent_pad\|>)*)<\|latent_end\|>")
SYSTEM = "You are a helpful assistant."


# ----------------------------------------------------------------------------------------------------------
# reading and checking the JSONL

REQUIRED = {"id": (str, int), "image": (str,), "question": (str,), "response": (str,)}
OPTIONAL = {"aux_image": (str, list), "answer": (str, int, float), "accuracy": (int, float)}


def read_jsonl(path, skip_bad=False, need_response=True, need_answer=False):
    """Parse and check every line. Returns (rows, n_skipped); each row gets `_line` (1-based), `_file` and
    `_raw` (the line's own object, as written). A malformed line raises DataError naming file, line and
    field, unless skip_bad (then it is counted). A file that is not JSONL text (a directory, an image), or that
    leaves no example, is one DataError naming it."""
    user_file(path, "data file")
    rows, seen, bad, n_lines = [], {}, BadExamples(skip_bad), 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                if line_no == 1:  # not one bad line: the file is of another kind
                    raise DataError(f"{path}: not a JSONL data file (line 1 is not UTF-8 text: an image, or another "
                                    f"binary file?)") from None
                line = None
            if line is None or line.strip():
                n_lines += 1
                with bad.guard():
                    if line is None:
                        raise DataError(path, line_no, "<json>", "not UTF-8 text")
                    rows.append(check_row(path, line_no, line, seen, need_response, need_answer))
    if not rows:
        raise DataError(f"{path}: no examples: " + (f"all {n_lines} lines are bad (--skip_bad skipped them)" if n_lines
                                                    else "the file holds only blank lines"))
    return rows, bad.count


def check_row(path, line_no, line, seen, need_response=True, need_answer=False):
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(path, line_no, "<json>", f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise DataError(path, line_no, "<json>", f"expected an object, got {type(row).__name__}")
    if need_answer and not str(row.get("answer", "")).strip():
        raise DataError(path, line_no, "answer", "missing or empty: scoring needs the ground truth")
    raw = dict(row)
    required = REQUIRED if need_response else {k: v for k, v in REQUIRED.items() if k != "response"}
    for key, types in list(required.items()) + list(OPTIONAL.items()):
        if key not in row:
            if key in required:
                raise DataError(path, line_no, key, "missing")
        elif not isinstance(row[key], types) or isinstance(row[key], bool):
            raise DataError(path, line_no, key, f"expected {'/'.join(t.__name__ for t in types)}, "
                                                f"got {type(row[key]).__name__}")
    row["id"] = str(row["id"])
    if "response" in row and SPAN.search(row["response"]):
        row["_span_pads"] = [m.group(1).count("<|latent_pad|>") for m in SPAN.finditer(row["response"])]
        row["response"] = SPAN.sub(PLACEHOLDER, row["response"])
    if row["id"] in seen:
        raise DataError(path, line_no, "id", f"duplicate id {row['id']!r} (first on line {seen[row['id']]})")
    seen[row["id"]] = line_no
    n_placeholders = row.get("response", "").count(PLACEHOLDER)
    if n_placeholders and "aux_image" not in row:
        raise DataError(path, line_no, "aux_image", f"missing, but the response has a '{PLACEHOLDER}' placeholder")
    aux = row.get("aux_image")
    if isinstance(aux, list):
        if not all(isinstance(a, str) for a in aux):
            raise DataError(path, line_no, "aux_image", "a list must hold image paths (strings)")
        if "response" in row and len(aux) != n_placeholders:
            raise DataError(path, line_no, "aux_image", f"{len(aux)} images for {n_placeholders} '{PLACEHOLDER}' "
                                                        f"placeholders (give one per placeholder, or one string)")
    row["_line"], row["_file"], row["_raw"] = line_no, path, raw
    return row


def resolve(row, key):
    """Absolute path of an image field (paths are relative to the JSONL file); DataError if it is missing or a
    directory."""
    path = os.path.join(os.path.dirname(os.path.abspath(row["_file"])), row[key])
    if not os.path.exists(path):
        raise DataError(row["_file"], row["_line"], key, f"image file not found: {path}")
    if os.path.isdir(path):
        raise DataError(row["_file"], row["_line"], key, f"a directory, not an image file: {path}")
    return path


def image_bytes(row, key):
    """The bytes of an image field's file (for content hashes); DataError naming the row if it cannot be read."""
    path = resolve(row, key)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(row["_file"], row["_line"], key, f"cannot read image {path}: {e.strerror}") from None


def open_image(row, key):
    """A row's image as Qwen2.5-VL's preprocessing sees it (to_rgb); DataError naming the row if it cannot be read."""
    path = resolve(row, key)
    try:
        return read_image(path)
    except ValueError as e:
        raise DataError(row["_file"], row["_line"], key, str(e)) from None


def read_image(path):
    """An image file as Qwen2.5-VL's preprocessing sees it (to_rgb); ValueError naming the file if it cannot be read.
    The one way images are read: JSONL rows (open_image) and the evaluation harnesses' files (harness.py)."""
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except Exception as e:  # PIL raises several types for corrupt files
        raise ValueError(f"cannot read image {path}: {e}") from None


def to_rgb(im):
    """8-bit RGB as qwen-vl-utils makes it: EXIF orientation applied; transparency composited on white (PIL's
    convert("RGB") drops alpha, so black strokes on a transparent diagram vanish into a black background);
    16/32-bit integer images scaled from 0..65535 and float images from 0..1 (convert("RGB") clips them, turning
    a mid-gray 16-bit image white)."""
    if im.getexif().get(0x0112, 1) != 1:  # (exif_transpose copies the image even when there is nothing to do)
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        a = a * 255 if im.mode == "F" else a / 257
        im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    if im.mode == "RGB":
        im.load()  # decoded now (a truncated file fails here), while the file is open
        return im
    return im.convert("RGB")


def aux_fields(row):
    """(row, field) of the auxiliary image of each latent span of a row, in order: `aux_image` is one path for
    every span or a list with one per span, whose entries are named as fields 'aux_image[i]' in errors."""
    n, aux = row["response"].count(PLACEHOLDER), row["aux_image"]
    if isinstance(aux, str):
        return [(row, "aux_image")] * n
    return [(dict(row, **{f"aux_image[{i}]": a}), f"aux_image[{i}]") for i, a in enumerate(aux)]


def aux_images(row):
    """The auxiliary image of each latent span of a row, in order."""
    return [open_image(r, key) for r, key in aux_fields(row)]


def aux_hash(row):
    """Content hash of a row's auxiliary images, one per span: its latent targets are valid only for these bytes
    (and this number of spans)."""
    h = hashlib.sha256()
    for r, key in aux_fields(row):
        h.update(hashlib.sha256(image_bytes(r, key)).digest())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# images, prompts and responses as token ids

def process_image(image_processor, image, min_pixels=0, max_pixels=0):
    """pixel_values (N_patches, C*T*P*P) and image_grid_thw (1, 3); min/max pixels override the processor's."""
    kw = {}
    if min_pixels or max_pixels:
        size = dict(image_processor.size)
        size.update({k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v})
        kw["size"] = size
    out = image_processor(images=[image], return_tensors="pt", **kw)
    return out["pixel_values"], out["image_grid_thw"]


try:  # the processor's own resize rule (where transformers keeps it varies by version)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
except ImportError:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize


def query_tokens(row, image_processor, spec):
    """The number of image tokens query_pixels() gives a row's image, from its size alone: the processor's own
    smart_resize, with the same pixel budget and the same refusals."""
    image = open_image(row, "image")
    factor = image_processor.patch_size * image_processor.merge_size
    lo = spec.image_min_pixels or image_processor.size["shortest_edge"]
    hi = spec.image_max_pixels or image_processor.size["longest_edge"]
    try:
        h, w = smart_resize(image.height, image.width, factor, lo, hi)
    except ValueError as e:
        raise DataError(row["_file"], row["_line"], "image", f"{e} ({image.width}x{image.height} image)") from None
    return (h // factor) * (w // factor)


def query_pixels(row, image_processor, spec):
    """A row's query image through the image processor; the processor's own refusals (an aspect ratio over 200:1)
    become a DataError naming the row, so --skip_bad can skip it like any other bad image."""
    image = open_image(row, "image")
    try:
        return process_image(image_processor, image, spec.image_min_pixels, spec.image_max_pixels)
    except ValueError as e:
        raise DataError(row["_file"], row["_line"], "image", f"{e} ({image.width}x{image.height} image)") from None


def prompt_text(question, n_image_tokens):
    """Qwen2.5-VL's chat template for one image + one question, ending at the assistant turn."""
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            f"{'<|image_pad|>' * n_image_tokens}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n")


def n_image_tokens(image_grid_thw, merge_size=2):
    return int(image_grid_thw.prod()) // merge_size ** 2


def response_ids(tokenizer, response, latent_ids, latent_tokens, keep_latent):
    """Token ids and labels of the assistant response. Each placeholder becomes <|latent_start|> K x
    <|latent_pad|> <|latent_end|> when keep_latent, else every one is removed (text-only / K=0: the parser
    text stays). Labels: every response token and <|im_end|>, except <|latent_pad|> and <|latent_end|>, which the
    loop writes rather than samples; <|latent_start|> IS a target (the model decides when to enter)."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    parts = response.split(PLACEHOLDER)  # text before, between and after the spans
    if len(parts) > 1 and keep_latent and latent_tokens > 0:
        span = [latent_ids["start"]] + [latent_ids["pad"]] * latent_tokens + [latent_ids["end"]]
        ids = enc(parts[0])
        for part in parts[1:]:
            ids += span + enc(part)
        ids += [end_of_turn]
    else:  # the spaces around each placeholder become one
        trimmed = [p.rstrip(" ") if i == 0 else p.lstrip(" ") if i == len(parts) - 1 else p.strip(" ")
                   for i, p in enumerate(parts)]
        ids = enc(" ".join(p for p in trimmed if p)) + [end_of_turn]
    labels = [IGNORE if t in (latent_ids["pad"], latent_ids["end"]) else t for t in ids]
    return ids, labels


# ----------------------------------------------------------------------------------------------------------
# the training data set

@dataclasses.dataclass
class DataSpec:
    """How examples become tensors (shared by train.py and infer.py)."""
    latent_tokens: int = 36
    difficulty_tau: float = 0.0
    max_len: int = 8192
    image_min_pixels: int = 0
    image_max_pixels: int = 0
    latent_targets: bool = True  # False: the latent slots get no aux-image targets (VaLR feeds pad / its own)


class GAPDataset(torch.utils.data.Dataset):
    """Training examples: prompt + serialized response, labels, query-image pixels and latent targets."""

    def __init__(self, path, tokenizer, image_processor, latent_ids, spec: DataSpec, target_cache=None,
                 skip_bad=False, return_errors=False, lines=None):
        # lines: read_jsonl(path, skip_bad) when the caller has read it already (train.py reads it before the model)
        self.rows, self.skipped = lines or read_jsonl(path, skip_bad)
        # True: a bad example comes back as {"id", "error"} instead of raising, so that a DataLoader worker
        # hands it to the training process, which stops with the one-line message or skips and counts it
        self.return_errors = return_errors
        self.tokenizer, self.image_processor, self.latent_ids, self.spec = tokenizer, image_processor, latent_ids, spec
        self.targets = target_cache
        self.merge = 2
        if spec.latent_tokens and spec.latent_targets and any(self.keeps_latent(r) for r in self.rows):
            if target_cache is None:
                raise DataError(f"{path}: examples keep latent spans (K={spec.latent_tokens}) but no target cache given")
            if target_cache.info is None:
                parent = os.path.dirname(target_cache.dir)
                there = sorted(n for n in os.listdir(parent) if re.fullmatch(r"K\d+", n)) if os.path.isdir(parent) else []
                raise DataError(f"{target_cache.dir}: no latent targets for K={spec.latent_tokens} (the cache holds "
                                f"{', '.join(there) or 'nothing'}): run targets.py --latent_tokens {spec.latent_tokens}")

    def __len__(self):
        return len(self.rows)

    def keeps_latent(self, row):
        """Difficulty-aware assignment (eq. 4): latent supervision only where accuracy <= tau."""
        return (self.spec.latent_tokens > 0 and PLACEHOLDER in row["response"]
                and float(row.get("accuracy", 0.0)) <= self.spec.difficulty_tau)

    def __getitem__(self, i):
        try:
            return self.example(self.rows[i])
        except DataError as e:
            if not self.return_errors:
                raise
            return dict(id=self.rows[i]["id"], error=str(e))

    def check(self, row):
        """Everything example() checks (image readable and within the processor's limits, length, targets), for
        the check before training; the processor's pixel work, 95% of the time, is skipped."""
        self.example(row, pixels=False)

    def example(self, row, pixels=True):
        spec = self.spec
        for n in row.get("_span_pads", []):
            if n != spec.latent_tokens:
                raise DataError(row["_file"], row["_line"], "response",
                                f"latent span has {n} <|latent_pad|> tokens but K={spec.latent_tokens}")
        if pixels:
            pixel_values, grid = query_pixels(row, self.image_processor, spec)
            n_image = n_image_tokens(grid, self.merge)
        else:
            pixel_values, grid, n_image = None, None, query_tokens(row, self.image_processor, spec)
        prompt = self.tokenizer(prompt_text(row["question"], n_image), add_special_tokens=False)["input_ids"]
        keep = self.keeps_latent(row)
        ids, labels = response_ids(self.tokenizer, row["response"], self.latent_ids, spec.latent_tokens, keep)
        input_ids, labels = prompt + ids, [IGNORE] * len(prompt) + labels
        if len(input_ids) > spec.max_len:
            raise DataError(row["_file"], row["_line"], "response", too_long(len(input_ids), n_image, spec,
                                                                             self.image_processor))
        targets = None
        if keep and spec.latent_targets:
            try:
                targets = self.targets.get(row["id"], aux_hash(row))
            except KeyError as e:
                raise DataError(row["_file"], row["_line"], "aux_image", e.args[0]) from None
            n_spans = row["response"].count(PLACEHOLDER)
            if targets.shape[0] != n_spans * spec.latent_tokens:
                raise DataError(row["_file"], row["_line"], "aux_image",
                                f"cached target has {targets.shape[0]} latent vectors but K={spec.latent_tokens}"
                                + ("" if n_spans == 1 else f" x {n_spans} spans"))
        return dict(id=row["id"], input_ids=torch.tensor(input_ids), labels=torch.tensor(labels),
                    pixel_values=pixel_values, image_grid_thw=grid, latent_targets=targets)


def too_long(n, n_image, spec, image_processor):
    """The message for a sequence over max_len, with the pixel budget that would make it fit."""
    msg = f"sequence of {n} tokens exceeds max_len={spec.max_len} ({n_image} of them for the query image)"
    room = spec.max_len - (n - n_image)  # image tokens that would fit
    if room <= 0:
        return msg + "; the text alone is too long: raise --max_len"
    factor = image_processor.patch_size * image_processor.merge_size  # one image token per factor x factor pixels
    return msg + f": pass --image_max_pixels {room * factor * factor} or less, or raise --max_len"


def collate(items, pad_id, left=False):
    """Pad a list of examples into a batch: right padding for training, left padding for generation (so every
    row's next token is at the same column). Latent targets are concatenated in row-major slot order."""
    T = max(len(it["input_ids"]) for it in items)
    B = len(items)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        cols = slice(T - n, T) if left else slice(0, n)
        input_ids[b, cols], attention_mask[b, cols] = it["input_ids"], 1
        if "labels" in it:
            labels[b, cols] = it["labels"]
    return dict(ids=[it["id"] for it in items], input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                pixel_values=torch.cat([it["pixel_values"] for it in items]),
                image_grid_thw=torch.cat([it["image_grid_thw"] for it in items]), **slot_targets(items))


def slot_targets(items):
    """latent_targets (and align_targets, when the items carry them) of a batch: the items' tensors one after
    the other, in row-major slot order; None where no item has any."""
    out = {}
    for key in ("latent_targets", "align_targets"):
        if key == "latent_targets" or any(key in it for it in items):
            parts = [it[key] for it in items if it.get(key) is not None]
            out[key] = torch.cat(parts) if parts else None
    return out


def pack(items, budget):
    """Group examples into rows of at most `budget` tokens (first-fit, longest first). Returns lists of items."""
    rows, room = [], []
    for it in sorted(items, key=lambda it: -len(it["input_ids"])):
        n = len(it["input_ids"])
        if n > budget:
            raise ValueError(f"example {it['id']}: {n} tokens do not fit the packing budget of {budget}")
        j = next((j for j, r in enumerate(room) if r >= n), None)
        if j is None:
            rows.append([]), room.append(budget)
            j = len(rows) - 1
        rows[j].append(it)
        room[j] -= n
    return rows


def collate_packed(items):
    """Examples back to back in one row (1, T) with no padding; seq_lens tells GAP.forward where each example
    starts, so each gets its own position ids and no attention crosses examples (attention_mask is None).
    The first token of each example gets no label: nothing before it may predict it."""
    labels = []
    for it in items:
        lab = it["labels"].clone()
        lab[0] = IGNORE
        labels.append(lab)
    return dict(ids=[it["id"] for it in items], input_ids=torch.cat([it["input_ids"] for it in items])[None],
                attention_mask=None, labels=torch.cat(labels)[None], seq_lens=[len(it["input_ids"]) for it in items],
                pixel_values=torch.cat([it["pixel_values"] for it in items]),
                image_grid_thw=torch.cat([it["image_grid_thw"] for it in items]), **slot_targets(items))


class StepCollate:
    """collate_fn of the training DataLoader: one step's examples of a rank -> (micro-batches, error messages).
    Padded micro-batches of `micro_batch` examples, or with pack_len > 0 packed rows of at most pack_len tokens.
    Runs in the loader's worker processes, so collation overlaps the training step."""

    def __init__(self, pad_id, micro_batch=1, pack_len=0):
        self.pad_id, self.micro_batch, self.pack_len = pad_id, micro_batch, pack_len

    def __call__(self, items):
        errors = [it["error"] for it in items if "error" in it]
        good = [it for it in items if "error" not in it]
        if self.pack_len:
            return [collate_packed(row) for row in pack(good, self.pack_len)], errors
        return [collate(good[j:j + self.micro_batch], self.pad_id)
                for j in range(0, len(good), self.micro_batch)], errors


def encode_row(tokenizer, image_processor, row, spec: DataSpec):
    """A JSONL row's generation prompt; its image's problems are DataErrors naming the row."""
    pixel_values, grid = query_pixels(row, image_processor, spec)
    ids = tokenizer(prompt_text(row["question"], n_image_tokens(grid)), add_special_tokens=False)["input_ids"]
    return dict(id=row["id"], input_ids=torch.tensor(ids), pixel_values=pixel_values, image_grid_thw=grid)


def encode_prompt(tokenizer, image_processor, image, question, spec: DataSpec, id="0"):
    """One generation prompt (image + question) as a collate()-able item."""
    pixel_values, grid = process_image(image_processor, image, spec.image_min_pixels, spec.image_max_pixels)
    ids = tokenizer(prompt_text(question, n_image_tokens(grid)), add_special_tokens=False)["input_ids"]
    return dict(id=id, input_ids=torch.tensor(ids), pixel_values=pixel_values, image_grid_thw=grid)


# ----------------------------------------------------------------------------------------------------------
# checking every example before a long job starts

def validate(rows, check, rank=0, world=1):
    """Run check(row) (which raises DataError) on rank's share of the rows; every rank gets every rank's
    problems, as (row index, field, message) in input order."""
    mine = []
    for i in range(rank, len(rows), world):
        try:
            check(rows[i])
        except DataError as e:
            mine.append((i, e.field or "?", str(e)))
    if world > 1:
        import torch.distributed as dist
        every = [None] * world
        dist.all_gather_object(every, mine)
        mine = [p for part in every for p in part]
    return sorted(mine)


def report(problems, n, what):
    """All problems at once, then one line that counts them by field."""
    for _, _, message in problems:
        print(f"bad example: {message}", flush=True)
    kinds = {}
    for _, field, _ in problems:
        kinds[field] = kinds.get(field, 0) + 1
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))
    return f"{len(problems)} of {n} examples are bad ({counts}), found before {what}; the first: {problems[0][2]}"


def check_rows(rows, check, what, rank=0, world=1, skip_bad=False):
    """validate(), then, unless skip_bad, a DataError that lists every problem (on rank 0; the other ranks name
    it) before `what` starts. Returns the problems (row index, field, message) that skip_bad leaves out."""
    problems = validate(rows, check, rank, world)
    if problems and not skip_bad:
        raise DataError(report(problems, len(rows), what) if rank == 0 else "bad examples (rank 0 lists them)")
    return problems
