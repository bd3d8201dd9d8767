"""The toy world of toy.py: four task families on 4 x 4 grids of flat-colour cells, written in the GAP data
format (README "Data format"), where the auxiliary image is the evidence the answer needs and not the answer.

    from toy_world import write_world
    paths, drawn = write_world("out/world", dict(pretrain=1500, train=1500, val=300, test=600, test_seen=300))

toy.py's docstring describes the families; test_toy.py checks their invariants (the aux image is the evidence,
it varies within an answer class, the parser text never states the answer, no (image, question) pair repeats).
"""
import hashlib
import json
import os
import random

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (225, 195, 20),
          "purple": (150, 50, 190)}
FAMILIES = ("compare", "total", "neighbor", "majority")
GRID = 4  # every image is GRID x GRID flat-colour cells; at 112 px a cell is one merged vision token (2 x 2 patches)
SPLITS = ("pretrain", "train", "val", "test", "test_seen")
# every colour comes in SHADES flat shades (a nuisance the answer never depends on): they give the evidence room
# enough that a test example's aux image is, with few exceptions, one the training split never showed
SHADES = 6
STEP = 14  # RGB step between two shades of a colour (shade s: the colour + (s - 2.5) * STEP on each channel)


def shade(name, s):
    """The RGB of shade s (0 .. SHADES - 1) of a colour; black and white have one shade."""
    if name == "black":
        return (0, 0, 0)
    return tuple(min(255, max(0, round(v + (s - (SHADES - 1) / 2) * STEP))) for v in COLORS[name])


# RGB -> colour name of every shade (the tests read images back with it)
NAME_OF = {shade(n, s): n for n in COLORS for s in range(SHADES)} | {(0, 0, 0): "black"}


# ----------------------------------------------------------------------------------------------------------
# the world. No space before <latent> (with "up. <latent>" a lone " " token precedes the span, and with the
# span banned, latent_mode zero, the student looped on spaces); "up.<latent>" leaves the text path reachable.
# A maker draws its example's evidence (what the aux image shows), or takes the evidence of another example
# (the test_seen split: the evidence of a training example under a new query image), and returns it too.

def _canvas(size):
    return Image.new("RGB", (size, size), "white")


def _paint(img, cells, cell):
    """cells: {(row, col): (colour name, shade)}; each a flat cell x cell square."""
    d = ImageDraw.Draw(img)
    for (r, c), (name, s) in cells.items():
        d.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], fill=shade(name, s))
    return img


def _lined_up(cells, size):
    """The aux image of a tally: cells [(name, shade)] lined up in raster order, GRID to a row."""
    return _paint(_canvas(size), {(i // GRID, i % GRID): c for i, c in enumerate(cells)}, size // GRID)


def _place(rng, shaded, free):
    """Put the shaded cells [(name, shade)] at random free positions, in raster order (so the aux image, which
    lines them up in raster order, is a function of the query image). Returns {position: cell}."""
    where = sorted(rng.sample(free, len(shaded)))
    return dict(zip(where, shaded))


def _tallies(rng, size, evidence=None):
    """A query with na cells of colour a, nb of colour b (1..4 each, na != nb), each of a random shade, and 2-5
    cells of other colours; the aux image: a's cells lined up in row 1, b's in row 3 (their shades kept)."""
    g = GRID
    if evidence is None:
        a, b = rng.sample(sorted(COLORS), 2)
        na, nb = rng.sample(range(1, 5), 2)
        evidence = (a, b, tuple(rng.randrange(SHADES) for _ in range(na)), tuple(rng.randrange(SHADES) for _ in range(nb)))
    a, b, sa, sb = evidence
    others = [c for c in sorted(COLORS) if c not in (a, b)]
    free = [(r, c) for r in range(g) for c in range(g)]
    cells = _place(rng, [(a, s) for s in sa], free)
    cells |= _place(rng, [(b, s) for s in sb], [p for p in free if p not in cells])
    rest = [p for p in free if p not in cells]
    cells |= {p: (rng.choice(others), rng.randrange(SHADES)) for p in rng.sample(rest, rng.randint(2, 5))}
    aux = _paint(_canvas(size), {(0, i): (a, s) for i, s in enumerate(sa)} | {(2, i): (b, s) for i, s in enumerate(sb)},
                 size // g)
    return evidence, _paint(_canvas(size), cells, size // g), aux


def make_compare(rng, size, evidence=None):
    evidence, query, aux = _tallies(rng, size, evidence)
    a, b, na, nb = evidence[0], evidence[1], len(evidence[2]), len(evidence[3])
    answer = "yes" if na > nb else "no"
    return dict(question=f"Are there more {a} cells than {b} cells?", answer=answer,
                response=f"<think>Keep only the {a} and the {b} cells and line them up.<latent> <parser>{na} {a} "
                         f"and {nb} {b}.</parser> Compare the two rows.</think><answer>{answer}</answer>"), query, aux, evidence


def make_total(rng, size, evidence=None):
    evidence, query, aux = _tallies(rng, size, evidence)
    a, b, na, nb = evidence[0], evidence[1], len(evidence[2]), len(evidence[3])
    return dict(question=f"How many {a} and {b} cells are there together?", answer=str(na + nb),
                response=f"<think>Keep only the {a} and the {b} cells and line them up.<latent> <parser>{na} {a} "
                         f"and {nb} {b}.</parser> Add the two rows.</think><answer>{na + nb}</answer>"), query, aux, evidence


def make_neighbor(rng, size, evidence=None):
    """Coloured cells and one black cell (not in the last row or column); name the colour of the cell right of /
    below it. Aux: the 2 x 2 block with the black cell at its top left, each cell zoomed to a quarter. Evidence:
    (side, the block's three other cells, None where empty)."""
    g = GRID
    if evidence is None:
        side = rng.choice(["right of", "below"])
        block = [(rng.choice(sorted(COLORS)), rng.randrange(SHADES)) if rng.random() < 0.55 else None
                 for _ in range(3)]  # (0, 1), (1, 0), (1, 1)
        block[0 if side == "right of" else 1] = (rng.choice(sorted(COLORS)), rng.randrange(SHADES))
        evidence = (side, tuple(block))
    side, block = evidence
    r, c = rng.randrange(g - 1), rng.randrange(g - 1)
    near = {(r, c), (r, c + 1), (r + 1, c), (r + 1, c + 1)}
    cells = {p: (rng.choice(sorted(COLORS)), rng.randrange(SHADES))
             for p in rng.sample([(i, j) for i in range(g) for j in range(g) if (i, j) not in near], rng.randint(3, 7))}
    cells[(r, c)] = ("black", 0)
    cells |= {(r + i, c + j): x for (i, j), x in zip([(0, 1), (1, 0), (1, 1)], block) if x is not None}
    answer = block[0 if side == "right of" else 1][0]
    aux = _paint(_canvas(size), {(0, 0): ("black", 0)} | {p: x for p, x in zip([(0, 1), (1, 0), (1, 1)], block) if x},
                 cell=size // 2)
    return dict(question=f"What colour is the cell {side} the black cell?", answer=answer,
                response=f"<think>Find the black cell and zoom in on the cells around it.<latent> <parser>the black "
                         f"cell and its neighbours, zoomed in.</parser> Read the cell {side} it.</think>"
                         f"<answer>{answer}</answer>"), _paint(_canvas(size), cells, size // GRID), aux, evidence


def make_majority(rng, size, evidence=None):
    """The easy family (the base answers it without reasoning): one colour covers 9-12 of the 16 cells, the rest
    are other colours; name it. Aux: its cells lined up in raster order (their shades kept). Evidence: (colour,
    shades)."""
    g = GRID
    if evidence is None:
        m = rng.choice(sorted(COLORS))
        evidence = (m, tuple(rng.randrange(SHADES) for _ in range(rng.randint(9, 12))))
    m, shades = evidence
    free = [(r, c) for r in range(g) for c in range(g)]
    cells = _place(rng, [(m, s) for s in shades], free)
    others = [c for c in sorted(COLORS) if c != m]
    cells |= {p: (rng.choice(others), rng.randrange(SHADES)) for p in free if p not in cells}
    return dict(question="Which colour covers most of the grid?", answer=m,
                response="<think>Keep only the cells of the commonest colour and line them up.<latent> <parser>"
                         f"{len(shades)} cells of one colour.</parser> Name their colour.</think><answer>{m}</answer>"), \
        _paint(_canvas(size), cells, size // g), _lined_up([(m, s) for s in shades], size), evidence


MAKERS = dict(compare=make_compare, total=make_total, neighbor=make_neighbor, majority=make_majority)


def image_key(img):
    return hashlib.sha1(img.tobytes()).hexdigest()


def parser_text(response):
    return response[response.index("<parser>") + len("<parser>"):response.index("</parser>")]


def write_world(out_dir, sizes, seed=0, size=112, families=FAMILIES):
    """Write {split}.jsonl + img/ under out_dir for sizes {split: n}. Examples cycle through the families; an
    (image, question) pair seen before is redrawn, so none repeats within or across splits. The pretrain split's
    responses answer directly (the base answers without reasoning). After `train`, the evidence splits: `test`
    keeps only examples whose aux image the train split never showed (unseen evidence; the draws it rejects are
    counted), `test_seen` gives each example the evidence of a random train example of its family under a new
    query image (seen evidence); `val` is drawn as it comes. Returns ({split: jsonl path}, {split: the share of
    its draws whose aux image occurs in train}) -- for val and test, the share of a plain draw."""
    from tqdm import tqdm
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "img"), exist_ok=True)
    seen, paths, i = set(), {}, 0
    train_aux, train_evidence, drawn = set(), {}, {}
    bar = tqdm(total=sum(sizes.values()), desc="world", unit="ex")
    for split, n in sizes.items():
        rows, draws, in_train = [], 0, 0
        while len(rows) < n:
            fam = families[i % len(families)]
            evidence = rng.choice(train_evidence[fam]) if split == "test_seen" else None
            ex, query, aux, evidence = MAKERS[fam](rng, size, evidence)
            key, aux_key = (image_key(query), ex["question"]), image_key(aux)
            if key in seen:
                continue
            draws, in_train = draws + 1, in_train + (aux_key in train_aux)
            if split == "test" and aux_key in train_aux:
                continue  # unseen evidence only
            seen.add(key)
            if split == "train":
                train_aux.add(aux_key)
                train_evidence.setdefault(fam, []).append(evidence)
            ex_id = f"{fam}-{i:06d}"
            query.save(os.path.join(out_dir, "img", f"{ex_id}.png"))
            aux.save(os.path.join(out_dir, "img", f"{ex_id}_aux.png"))
            response = f"<answer>{ex['answer']}</answer>" if split == "pretrain" else ex["response"]
            rows.append(dict(id=ex_id, image=f"img/{ex_id}.png", question=ex["question"], response=response,
                             aux_image=f"img/{ex_id}_aux.png", answer=ex["answer"], family=fam))
            i += 1
            bar.update(1)
        drawn[split] = in_train / max(draws, 1)
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        with open(paths[split], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    bar.close()
    return paths, drawn


def check_world(paths):
    """No (query image, question) pair in two splits; every image exists. Raises with what repeats."""
    owner = {}
    for split, path in paths.items():
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                base = os.path.dirname(os.path.abspath(path))
                for key in ("image", "aux_image"):
                    if not os.path.exists(os.path.join(base, r[key])):
                        raise FileNotFoundError(f"{path}: {r['id']}: {key} {r[key]} missing")
                with Image.open(os.path.join(base, r["image"])) as im:
                    key = (image_key(im.convert("RGB")), r["question"])
                if key in owner:
                    raise ValueError(f"{split}/{r['id']} repeats {owner[key]} (same image and question)")
                owner[key] = f"{split}/{r['id']}"
    return len(owner)


def aux_keys(path):
    """[(row, pixel hash of its aux image)] of a split's JSONL."""
    base, out = os.path.dirname(os.path.abspath(path)), []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            with Image.open(os.path.join(base, r["aux_image"])) as im:
                out.append((r, image_key(im.convert("RGB"))))
    return out


def world_stats(path):
    """Per family: examples, answer classes, distinct aux images, and the fewest distinct aux images of any
    answer class (> 1: the aux image is not a code for the answer)."""
    per = {}
    for r, key in aux_keys(path):
        per.setdefault(r["family"], {}).setdefault(r["answer"], set()).add(key)
    return {fam: dict(answers=len(by), aux_images=len(set().union(*by.values())),
                      min_aux_per_answer=min(len(s) for s in by.values())) for fam, by in per.items()}


def shared_aux(path, seen_path):
    """The share of path's rows whose aux image (its pixels) also occurs in seen_path's rows."""
    seen = {key for _, key in aux_keys(seen_path)}
    rows = aux_keys(path)
    return sum(key in seen for _, key in rows) / len(rows)


def corpus(paths):
    """Texts the offline tokenizer is trained on: every question and response of the world, the chat scaffold."""
    import tiny
    texts = []
    for path in paths.values():
        with open(path) as f:
            texts += [t for line in f for t in (json.loads(line)["question"], json.loads(line)["response"])]
    return texts + tiny.corpus_texts()
