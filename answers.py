"""Answer extraction and matching (paper section 4.3): the final answer of a sampled response and whether it
equals the ground truth. Difficulty estimation (difficulty.py) and evaluation (infer.py, toy.py) both score
with these functions, so difficulty scores and benchmark accuracy come from one and the same matcher.
Stdlib only: it runs, and its tests run, without torch.

    python -m pytest -q test_answers.py

extract_answer(response): text of the last <answer> opening (up to </answer>, the next tag or the end), else
the last \\boxed{}, else the last "the answer is X" / "Answer: X", else the last non-empty line after </think>.
tagged_answer(response): the same inside an <answer> tag, "" without one (what harness.py gives the harnesses).
well_formed(response): whether the response writes <answer>...</answer> (training's validation counts it).
answers_match(pred, truth, question): choice letters (also inside a sentence when the question lists
options), yes/no by first word, numbers by value (number words, scientific notation, fractions, percent,
units ignored; a decimal must round to the truth as written, as MathVista's scorer rounds), else the
normalized strings.
"""
import re

# ----------------------------------------------------------------------------------------------------
# Extraction: response text -> final answer string

_OPEN = re.compile(r"<answer>", re.I)
_ANY_TAG = re.compile(r"</?[a-z_|][^<>\s]*>", re.I)  # </answer>, </think>, <parser>, <|im_end|>, ...
_THINK_END = re.compile(r"</think>", re.I)
# "this answer is helpful" is chatter after the answer, not a new answer
_PHRASE = re.compile(r"(?<!this )(?<!that )(?<!your )\banswer\**\s*"
                     r"(?:(?:is|would be|should be|must be|will be)\b|=|:)\**\s*:?\**[ \t]*", re.I)
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


def _final_text(response: str) -> tuple[str, bool]:
    """(where the answer is, whether it came from an <answer> tag). A sampled response may open <answer>,
    never close it, and open another (`<answer>A</think><answer>B`): the last opening decides, and its text
    ends at the first tag after it. Without a tag, the text after the last </think> (the model's reply
    proper) if any, else the whole response; tags become line breaks so they never glue onto an answer."""
    opens = list(_OPEN.finditer(response))
    if opens:
        rest = response[opens[-1].end():]
        end = _ANY_TAG.search(rest)
        return (rest[:end.start()] if end else rest), True
    tail = _THINK_END.split(response)[-1]
    return _ANY_TAG.sub("\n", tail if tail.strip() else response), False


def extract_answer(response: str) -> str:
    """Final answer of a response: last <answer> tag, else last \\boxed{}, else "the answer is X" /
    "final answer: X", else the last non-empty line. The later rules also run inside the tag, so
    `<answer>The answer is \\boxed{7}.</answer>` gives "7"."""
    text, tagged = _final_text(response)
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


def tagged_answer(response: str) -> str:
    """The answer inside the response's last <answer> tag (extract_answer's rules run inside it); "" when the
    response has no <answer> tag (reasoning cut at max_new_tokens, say): what the evaluation harnesses get, so
    that no lenient matcher scores a line of reasoning as the answer."""
    return extract_answer(response) if _OPEN.search(response) else ""


def well_formed(response: str) -> bool:
    """Whether a response closes its answer in the trained format, <answer>...</answer> (training's validation
    counts these; a response cut at max_new_tokens or rambling on has none)."""
    return re.search(r"<answer>.*?</answer>", response, re.S | re.I) is not None


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
# Numbers

_SMALL = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
          "sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
# `\b` after each word, so "seventeen" is not "seven" and "sixty" is not "six"
_NUMBER_WORD = re.compile(rf"(?:({'|'.join(_TENS)})(?:[\s-]+({'|'.join(_SMALL[1:10])}))?|({'|'.join(_SMALL)}))\b")
_NUMBER = re.compile(r"(?:[a-z]\s*=\s*)?([-+]?)\s*[$€£¥]?\s*"                     # "x = ", sign, currency
                     r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"          # 1,234.5 | 12 | .5
                     r"(?:e([-+]?\d+)|\s*(?:x|×|\*|·|\\times|\\cdot)\s*10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?)?"  # 1.2e3
                     r"(?:\s*/\s*(\d+(?:\.\d+)?))?"                                 # 3/4
                     r"\s*(%|percent\b)?(.*)")                                      # percent, then units


def _words_to_digits(s: str) -> str:
    """A leading number word as digits: "twelve apples" -> "12 apples", "forty-two" -> "42". Only at the
    start, as a digit would have to be, so a word inside a phrase does not turn it into a number."""
    m = _NUMBER_WORD.match(s)
    if not m:
        return s
    tens, unit, small = m.groups()
    value = _SMALL.index(small) if small else 20 + 10 * _TENS.index(tens) + (_SMALL.index(unit) if unit else 0)
    return f"{value}{s[m.end():]}"


def _parse_number(s: str) -> list[tuple[float, int | None]] | None:
    """Candidate (value, decimal places written) pairs, or None when s is not one number plus units.
    places=None marks a fraction. A percent gives two candidates, the face value and value/100, so "30%"
    equals both "30" and "0.3" (but "30" does not equal "0.3")."""
    m = _NUMBER.fullmatch(_words_to_digits(s))
    if not m:
        return None
    sign, num, exp_e, exp_10, den, percent, rest = m.groups()
    rest = re.sub(r"(?<=[a-z])\^\{?\d+\}?", "", rest)  # cm^2 is a unit; 10^3 is not "10 with units ^3"
    if re.search(r"[\d+\-*/=^]", rest):  # "12 and 13", "2x+1": not a single number
        return None
    exp = int(exp_e or exp_10 or 0)
    value = float(f"{num.replace(',', '')}e{exp}") * (-1 if sign == "-" else 1)
    # 1.25e-3 is written to 5 places; 1.2e3 is an integer, compared exactly (never rounded to hundreds)
    places = max(0, len(num.partition(".")[2]) - exp)
    if den is not None:
        if float(den) == 0:
            return None
        value, places = value / float(den), None
    if not percent:
        return [(value, places)]
    return [(value, places), (value / 100, None if places is None else places + 2)]


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))  # float noise only


def _close(pred: float, pred_places: int | None, truth: float, truth_places: int | None) -> bool:
    """Equal values; else a truth written to k places matches a pred that rounds to it at k places
    (3.14159 and 3.1449 match 3.14, 3.146 does not: Python's round(), as MathVista's scorer). An integer
    truth (k=0) matches only exactly. A fraction truth (1/3) matches a decimal of 2+ places that it rounds
    to (0.33, 0.333), not 0.3 or 0."""
    if _same(pred, truth):
        return True
    if truth_places is not None:
        return truth_places > 0 and _same(round(pred, truth_places), truth)
    return pred_places is not None and pred_places >= 2 and _same(round(truth, pred_places), pred)


# ----------------------------------------------------------------------------------------------------
# Choice letters

# A choice letter must be followed by ")", ".", ":" or the end, so "a dog" or "I think" are not letters.
_LETTER = re.compile(r"(?:(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is\b)?\s*:?\s*)?"
                     r"\(?([a-j])(?:\)|\.|:|(?=\s*$))\s*(.*)")
_OPTION_MARK = re.compile(r"(?:^|(?<=[\s,;:]))(?:\(([A-J])\)|([A-J])[.):](?=\s))")
# In a sentence: a capital letter after "answer/option/choice", optionally "... is/be/:" between
# ("the correct option is (C)", "the answer must be C"). Case-sensitive letter: "a" and "i" are words.
_CUE_LETTER = re.compile(r"(?i:\b(?:answer|option|choice))s?\b(?:(?P<verb>[^.\n()]{0,30}?(?i:\bis|\bbe)\b|:))?"
                         r"\s*\(?(?P<letter>[A-J])\)?(?![\w'’])")
_LEAD_LETTER = re.compile(r"\s*\(?([A-J])\)?(?:[,;]|\s+(?:because|since|as)\b)")  # "C, since ..."


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


def _letter_in_sentence(s: str, options: dict[str, str]) -> str | None:
    """The choice a sentence names, among the listed options: the last "answer/option ... is X" (so "is (C),
    not option A" gives C), else the last bare "option X", else a leading "X, since"/"X because", else the
    one letter written as "(X)". None when nothing or two different "(X)" are named."""
    cues = [m for m in _CUE_LETTER.finditer(s) if m.group("letter").lower() in options]
    for with_verb in (True, False):
        named = [m.group("letter") for m in cues if bool(m.group("verb")) == with_verb]
        if named:
            return named[-1].lower()
    lead = _LEAD_LETTER.match(s)
    if lead and lead.group(1).lower() in options:
        return lead.group(1).lower()
    parens = {x.lower() for x in re.findall(r"\(([A-J])\)", s)} & options.keys()
    return parens.pop() if len(parens) == 1 else None


# ----------------------------------------------------------------------------------------------------
# Matching

_YES_NO = {"yes", "no", "true", "false"}


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
        return any(_close(pv, pp, tv, tp) for pv, pp in p_num for tv, tp in t_num)
    return False  # exact string match only: "red" must not match "red and blue"


def answers_match(pred: str, truth: str, question: str | None = None) -> bool:
    """Whether an extracted answer `pred` equals ground truth `truth`.

    Choice letters ("B", "(B)", "B) 12", "Option B") compare as letters. With `question` listing
    options, a letter on one side is replaced by its option text to compare with text on the other, and
    a sentence that names a choice ("the correct option is (C) because ...") counts as that letter;
    when a pred gives both a letter and text ("B) 12"), the letter wins. Otherwise: yes/no by first word,
    numbers by value (see _parse_number / _close), else normalized exact string match."""
    if normalize_answer(pred) == normalize_answer(truth) != "":
        return True
    options = parse_options(question) if question else {}
    p_letter, p_rest = _as_letter(pred)
    if p_letter is None and options:
        p_letter = _letter_in_sentence(pred, options)
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
