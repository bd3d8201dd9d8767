"""Difficulty-aware latent assignment (paper section 4.3): N sampled answers of the base model per
example, matched against `answer`, written as `accuracy`.

    python difficulty.py --model BASE --data train.jsonl --out train.scored.jsonl --samples 8

For every JSONL example the base model answers from image + question alone, N times with sampling; the
final answer of each sample is extracted, compared with the ground-truth `answer`, and `accuracy` is the
fraction correct (GAP_SPEC "Difficulty estimation").

extract_answer / answers_match / normalize_answer are plain stdlib functions that infer.py reuses for
evaluation, so difficulty scores and benchmark accuracy come from one and the same matcher.
"""
import re

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
