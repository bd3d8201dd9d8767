"""Difficulty-aware latent assignment (paper section 4.3): N sampled answers of the base model per
example, matched against `answer`, written as `accuracy`.

    python difficulty.py --model BASE --data train.jsonl --out train.scored.jsonl --samples 8
    torchrun --nproc_per_node 8 difficulty.py --model Qwen/Qwen2.5-VL-7B-Instruct --data train.jsonl \
        --out train.scored.jsonl --samples 8 --temperature 1.0 --top_p 1.0 --tau 0.0

For every JSONL example the base model answers from image + question alone, N times with sampling; the
final answer of each sample is extracted, compared with the ground-truth `answer`, and `accuracy` is the
fraction correct (GAP_SPEC "Difficulty estimation"). OUT gets every input line, in input order, with its
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

extract_answer / answers_match / normalize_answer are plain stdlib functions that infer.py reuses for
evaluation, so difficulty scores and benchmark accuracy come from one and the same matcher.
"""
import dataclasses
import datetime
import hashlib
import json
import os
import re
from dataclasses import field

import torch
import torch.distributed as dist

from data import PLACEHOLDER, DataError, DataSpec, collate, encode_prompt, open_image, read_jsonl
from latent_head import LatentHead
from model import GAP, add_latent_tokens, atomic_write_text, load_backbone, parse_config
from train import setup_distributed

# ----------------------------------------------------------------------------------------------------
# Extraction: response text -> final answer string

_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S | re.I)  # `$`: truncated before the close tag
_PHRASE = re.compile(r"\banswer\**\s*(?:is\b|:)\**\s*:?\**[ \t]*", re.I)
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, scanning braces so nested {} (\\frac{a}{b}) stay inside."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return text[i:]  # generation stopped inside the box: keep what was written


def _strip_wrappers(s: str) -> str:
    """Whitespace, markdown bold, \\text{}, surrounding $...$ and a trailing period, until stable."""
    prev = None
    while s != prev:
        prev = s
        s = _TEXT_CMD.sub(r"\1", s.strip().strip("*").strip())
        if len(s) >= 2 and s[0] == s[-1] == "$":
            s = s[1:-1]
        s = s.removesuffix(".")
    return s


def extract_answer(response: str) -> str:
    """Final answer of a response: last <answer> tag, else last \\boxed{}, else "the answer is X" /
    "final answer: X", else the last non-empty line. The later rules also run inside the tag, so
    `<answer>The answer is \\boxed{7}.</answer>` gives "7"."""
    tagged = _TAG.findall(response)
    text = tagged[-1] if tagged else response
    boxed = _last_boxed(text)
    # Sentence end is ". " or "." at the end, so decimals like 3.5 are not cut.
    rests = [text[m.end():].split("\n")[0] for m in _PHRASE.finditer(text)]  # one line after each
    phrases = [re.split(r"\.(?:\s|$)", r)[0].strip() for r in rests]
    phrases = [p for p in phrases if p]  # "The answer is" at a line end carries nothing
    if boxed is not None:
        answer = boxed
    elif phrases:
        answer = phrases[-1]
    elif tagged:
        answer = text  # the tag content is the answer, even across lines
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        answer = lines[-1] if lines else ""
    return _strip_wrappers(answer)


# ----------------------------------------------------------------------------------------------------
# Normalization

_PAIRS = {'""', "''", "``", "“”", "‘’", "()", "[]", "{}"}


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def _clean(s: str) -> str:
    """normalize_answer without article removal: choice parsing must still see the "a" in "option a"."""
    s = _strip_wrappers(s).replace("\\%", "%").replace("−", "-")
    s = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|\\circ|°|\\left|\\right", "", s)  # 45^\circ == 45°  == 45
    s = " ".join(s.lower().split())
    prev = None
    while s != prev:  # '"(b)."' needs several passes
        prev = s
        s = _strip_wrappers(s).rstrip(".,;:?").strip()
        if len(s) >= 2 and s[0] + s[-1] in _PAIRS and _balanced(s[1:-1]):  # not "(a) + (b)"
            s = s[1:-1].strip()
    return s


def normalize_answer(s: str) -> str:
    """Lowercase, collapsed spaces, no wrappers/quotes/brackets/trailing punctuation, no articles."""
    s = _clean(s)
    words = [w for w in s.split() if w not in ("a", "an", "the")]
    return " ".join(words) if words else s  # a lone "a" is a choice letter, keep it


# ----------------------------------------------------------------------------------------------------
# Matching

# A choice letter must be followed by ")", ".", ":" or the end, so "a dog" or "I think" are not letters.
_LETTER = re.compile(r"(?:(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is\b)?\s*:?\s*)?"
                     r"\(?([a-j])(?:\)|\.|:|(?=\s*$))\s*(.*)")
_OPTION_MARK = re.compile(r"(?:^|(?<=[\s,;:]))(?:\(([A-J])\)|([A-J])[.):](?=\s))")
_NUMBER = re.compile(r"(?:[a-z]\s*=\s*)?([-+]?)\s*[$€£¥]?\s*"      # "x = ", sign, currency
                     r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"  # 1,234.5 | 12 | .5
                     r"(?:\s*/\s*(\d+(?:\.\d+)?))?"                  # 3/4
                     r"\s*(%|percent\b)?(.*)")                       # percent, then units
_YES_NO = {"yes", "no", "true", "false"}


def parse_options(question: str) -> dict[str, str]:
    """{"a": "12", "b": "15", ...} from "A. 12\\nB. 15", "(A) 12 (B) 15" or "Choices: A: 12, B: 15".
    Only a run A, B, C, ... of at least two markers counts, so a stray "point C." is not an option."""
    runs, run = [], []
    for m in _OPTION_MARK.finditer(question):
        letter = m.group(1) or m.group(2)
        if letter == "A":
            run = [m]
            runs.append(run)
        elif run and ord(letter) == ord(run[-1].group(1) or run[-1].group(2)) + 1:
            run.append(m)
    best = max(reversed(runs), key=len, default=[])  # longest run; the last one on ties
    if len(best) < 2:
        return {}
    options = {}
    for m, nxt in zip(best, best[1:] + [None]):
        text = question[m.end():nxt.start() if nxt else len(question)]
        options[(m.group(1) or m.group(2)).lower()] = text.split("\n")[0].strip().rstrip(",;").strip()
    return options


def _as_letter(s: str) -> tuple[str | None, str]:
    """("b", "12") for "B) 12", ("b", "") for "(B)" / "Option B"; (None, "") when not a choice letter."""
    m = _LETTER.fullmatch(_clean(s))
    return (m.group(1), m.group(2)) if m else (None, "")


def _parse_number(s: str) -> list[tuple[float, int | None]] | None:
    """Candidate (value, decimals written) pairs, or None when s is not one number plus units.
    decimals=None marks a fraction (compared with tolerance). A percent gives two candidates, the face
    value and value/100, so "30%" equals both "30" and "0.3" (but "30" does not equal "0.3")."""
    m = _NUMBER.fullmatch(s)
    if not m:
        return None
    sign, num, den, percent, rest = m.groups()
    rest = re.sub(r"\^\{?\d+\}?", "", rest)  # cm^2 is a unit, not a second number
    if re.search(r"[\d+\-*/=^]", rest):  # "12 and 13", "2x+1": not a single number
        return None
    value = float(num.replace(",", "")) * (-1 if sign == "-" else 1)
    decimals = len(num.partition(".")[2])
    if den is not None:
        if float(den) == 0:
            return None
        value, decimals = value / float(den), None
    if not percent:
        return [(value, decimals)]
    return [(value, decimals), (value / 100, None if decimals is None else decimals + 2)]


def _close(pred: float, truth: float, decimals: int | None) -> bool:
    """Integers exactly; decimals if pred rounds to the truth as written (3.14159 -> 3.1) or is within
    1% relative (3.1416 vs 3.14); fractions within 1% relative (0.33 vs 1/3)."""
    if decimals == 0:
        return abs(pred - truth) <= 1e-9 * max(1.0, abs(truth))  # "12" never matches "12.4" or "120"
    if decimals is not None and abs(round(pred, decimals) - truth) <= 1e-9 * max(1.0, abs(truth)):
        return True
    return abs(pred - truth) <= 1e-2 * abs(truth) + 1e-9


def _values_match(pred: str, truth: str) -> bool:
    p, t = normalize_answer(pred), normalize_answer(truth)
    if not p or not t:
        return False
    if p == t:
        return True
    if t in _YES_NO:  # "yes, it is" answers "yes"; the first word decides
        first = re.match(r"[a-z]+", p)
        return bool(first) and first.group(0) == t
    t_num = _parse_number(t)
    p_num = _parse_number(p) if t_num else None
    if p_num:
        return any(_close(pv, tv, td) for pv, _ in p_num for tv, td in t_num)
    return False  # exact string match only: "red" must not match "red and blue"


def answers_match(pred: str, truth: str, question: str | None = None) -> bool:
    """Whether an extracted answer `pred` equals ground truth `truth`.

    Choice letters ("B", "(B)", "B) 12", "Option B") compare as letters. With `question` listing
    options, a letter on one side is replaced by its option text to compare with text on the other;
    when a pred gives both a letter and text ("B) 12"), the letter wins. Otherwise: yes/no by first word,
    numbers by value (units ignored, see _parse_number / _close), else normalized exact string match."""
    if normalize_answer(pred) == normalize_answer(truth) != "":
        return True
    options = parse_options(question) if question else {}
    p_letter, p_rest = _as_letter(pred)
    t_letter, t_rest = _as_letter(truth)
    if t_letter:
        if p_letter:
            return p_letter == t_letter
        if t_letter in options:
            return _values_match(pred, options[t_letter])
        return bool(t_rest) and _values_match(pred, t_rest)
    if p_letter and p_letter in options:
        return _values_match(options[p_letter], truth)
    if p_letter and p_rest:
        return _values_match(p_rest, truth)
    return _values_match(pred, truth)


# ----------------------------------------------------------------------------------------------------
# Scoring: N samples of the base model per example

@dataclasses.dataclass
class DifficultyConfig:
    """Score every example by the accuracy of N sampled answers of the base model (GAP_SPEC 'Difficulty')."""
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


def chunk_seed(seed, first_id):
    """A stable 63-bit seed from (seed, id); Python's hash() is salted per process."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{first_id}".encode()).digest()[:8], "little") >> 1


def score_chunk(gap, tokenizer, image_processor, chunk, cfg: DifficultyConfig):
    """Result lines (JSON + newline) of one chunk of examples, from one generate call in which each prompt
    is prefilled once and decoded in N rows (row b*N + j is sample j of prompt b). A bad image is an error,
    or with skip_bad a `_skipped` line that the merge counts and leaves out."""
    spec = DataSpec(latent_tokens=0, image_min_pixels=cfg.image_min_pixels, image_max_pixels=cfg.image_max_pixels)
    items, lines = [], {}
    for r in chunk:
        try:
            items.append(encode_prompt(tokenizer, image_processor, open_image(r, "image"), r["question"], spec,
                                       r["id"]))
        except DataError as e:
            if not cfg.skip_bad:
                raise
            print(f"skipping bad example: {e}")
            lines[r["id"]] = json.dumps({"id": r["id"], "_skipped": str(e)}) + "\n"
    if items:
        dev, n = gap.backbone.device, cfg.samples
        batch = collate(items, tokenizer.pad_token_id, left=True)
        stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        out = gap.generate(batch["input_ids"].to(dev), batch["attention_mask"].to(dev),
                           batch["pixel_values"].to(dev), batch["image_grid_thw"].to(dev),
                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                           num_samples=n, stop_ids=stop_ids,
                           generator=torch.Generator(dev).manual_seed(chunk_seed(cfg.seed, chunk[0]["id"])))
        tokens = out["tokens"].cpu()  # (B*N, S)
        for b, r in enumerate([r for r in chunk if r["id"] not in lines]):  # the rows that got a prompt
            responses = [gap.decode(tokenizer, t) for t in tokens[b * n:(b + 1) * n]]
            answers = [extract_answer(s) for s in responses]
            correct = sum(answers_match(a, str(r["answer"]), r["question"]) for a in answers)
            result = dict(r["_raw"], accuracy=correct / n, answers=answers)
            if cfg.responses:
                result["responses"] = responses
            lines[r["id"]] = json.dumps(result) + "\n"
    return [lines[r["id"]] for r in chunk]


def output_paths(out):
    """(part file pattern with {} for the rank, config sidecar, summary) beside OUT."""
    stem = out[:-len(".jsonl")] if out.endswith(".jsonl") else out
    return stem + ".rank{}.jsonl", stem + ".config.json", stem + ".summary.json"


def part_files(pattern):
    folder, name = os.path.split(pattern)
    prefix, suffix = name.split("{}")
    names = os.listdir(folder or ".")
    return sorted(os.path.join(folder, f) for f in names
                  if f.startswith(prefix) and f.endswith(suffix) and f[len(prefix):-len(suffix)].isdigit())


def read_part(path):
    """({id: line}, n_bytes) of the complete result lines at the start of a part file. A line torn by a kill
    (no newline, or not JSON) and anything after it is not part of them."""
    results, good = {}, 0
    if os.path.exists(path):
        with open(path, "rb") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:  # JSON or UTF-8 cut mid-way
                    break
                if not line.endswith(b"\n") or not isinstance(r, dict) or "id" not in r:
                    break
                results[str(r["id"])] = line.decode()
                good += len(line)
    return results, good


def merge(cfg: DifficultyConfig, rows, bad_lines, pattern, summary_path, world):
    """Rank 0, after every rank is done: the parts -> OUT in input order, and the summary."""
    results = {}
    for path in part_files(pattern):
        results.update(read_part(path)[0])
    missing = [r["id"] for r in rows if r["id"] not in results]
    if missing:
        raise RuntimeError(f"{len(missing)} examples have no result in {pattern.format('*')} "
                           f"(first: {missing[0]!r}); re-run to score them")
    lines = [results[r["id"]] for r in rows]
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
        raise SystemExit("give --model, --data and --out (see --help)")
    if cfg.samples < 1 or cfg.batch_size < 1:
        raise ValueError(f"--samples and --batch_size must be >= 1, got {cfg.samples} and {cfg.batch_size}")
    rank, world, device = setup_distributed()
    # a gloo group with a long timeout for the barriers: ranks may finish hours apart
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7)) if world > 1 else None
    barrier = (lambda: dist.barrier(group=group)) if world > 1 else (lambda: None)  # noqa: E731
    rows, bad_lines = read_jsonl(cfg.data, cfg.skip_bad, need_response=False, need_answer=True)
    pattern, config_path, summary_path = output_paths(cfg.out)
    run_config = {k: getattr(cfg, k) for k in SAMPLING_KEYS}
    if os.path.exists(config_path):
        with open(config_path) as f:
            before = json.load(f)
        if before != run_config:
            changed = {k: (before.get(k), v) for k, v in run_config.items() if before.get(k) != v}
            raise ValueError(f"{config_path}: the parts beside it were sampled with other flags "
                             f"(was, now): {changed}; use those, or another --out")
    done, mine = {}, pattern.format(rank)
    for path in part_files(pattern):  # parts of any rank count: the output does not depend on the rank
        done.update(read_part(path)[0])
    keep = read_part(mine)[1]
    barrier()  # every rank has read the parts before any rank changes them
    if os.path.exists(mine):
        os.truncate(mine, keep)  # drop a line torn by a kill
    if rank == 0 and not os.path.exists(config_path):
        atomic_write_text(config_path, json.dumps(run_config, indent=2) + "\n")

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
    summary = merge(cfg, rows, bad_lines, pattern, summary_path, world) if rank == 0 else None
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    try:
        main(parse_config(DifficultyConfig))
    except DataError as e:
        raise SystemExit(f"error: {e} (--skip_bad skips and counts bad examples)")
