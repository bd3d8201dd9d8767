"""The toy world of toy.py: three task families on 4 x 4 grids of flat-colour cells, written in the GAP data
format (README "Data format"), where the auxiliary image is the evidence the answer needs and not the answer.

    from toy_world import write_world
    paths = write_world("out/world", dict(pretrain=1500, train=1500, val=300, test=600), seed=0)

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
FAMILIES = ("compare", "total", "neighbor")
INK = COLORS | {"black": (0, 0, 0)}
GRID = 4  # every image is GRID x GRID flat-colour cells; at 112 px a cell is one merged vision token (2 x 2 patches)
SPLITS = ("pretrain", "train", "val", "test")


# ----------------------------------------------------------------------------------------------------------
# the world. No space before <latent> (with "up. <latent>" a lone " " token precedes the span, and with the
# span banned, latent_mode zero, the student looped on spaces); "up.<latent>" leaves the text path reachable.

def _canvas(size):
    return Image.new("RGB", (size, size), "white")


def _paint(img, cells, cell):
    """cells: {(row, col): colour name}; each a flat cell x cell square."""
    d = ImageDraw.Draw(img)
    for (r, c), name in cells.items():
        d.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], fill=INK[name])
    return img


def _tallies(rng, size):
    """A query with na cells of colour a, nb of colour b (1..4 each, na != nb) and 2-5 cells of other colours;
    the aux image: a's cells lined up in row 1, b's in row 3."""
    g, cell = GRID, size // GRID
    a, b, *others = rng.sample(sorted(COLORS), 5)
    na, nb = rng.sample(range(1, 5), 2)
    where = rng.sample([(r, c) for r in range(g) for c in range(g)], na + nb + rng.randint(2, 5))
    cells = {p: a for p in where[:na]} | {p: b for p in where[na:na + nb]}
    cells |= {p: rng.choice(others) for p in where[na + nb:]}
    aux = _paint(_canvas(size), {(0, i): a for i in range(na)} | {(2, i): b for i in range(nb)}, cell)
    return a, b, na, nb, _paint(_canvas(size), cells, cell), aux


def make_compare(rng, size):
    a, b, na, nb, query, aux = _tallies(rng, size)
    answer = "yes" if na > nb else "no"
    return dict(question=f"Are there more {a} cells than {b} cells?", answer=answer,
                response=f"<think>Keep only the {a} and the {b} cells and line them up.<latent> <parser>{na} {a} "
                         f"and {nb} {b}.</parser> Compare the two rows.</think><answer>{answer}</answer>"), query, aux


def make_total(rng, size):
    a, b, na, nb, query, aux = _tallies(rng, size)
    return dict(question=f"How many {a} and {b} cells are there together?", answer=str(na + nb),
                response=f"<think>Keep only the {a} and the {b} cells and line them up.<latent> <parser>{na} {a} "
                         f"and {nb} {b}.</parser> Add the two rows.</think><answer>{na + nb}</answer>"), query, aux


def make_neighbor(rng, size):
    """Coloured cells and one black cell (not in the last row or column); name the colour of the cell right of /
    below it. Aux: the 2 x 2 block with the black cell at its top left, each cell zoomed to a quarter."""
    g = GRID
    side = rng.choice(["right of", "below"])
    r, c = rng.randrange(g - 1), rng.randrange(g - 1)
    cells = {p: rng.choice(sorted(COLORS)) for p in rng.sample([(i, j) for i in range(g) for j in range(g)],
                                                              rng.randint(6, 10))}
    nb = (r, c + 1) if side == "right of" else (r + 1, c)
    cells[nb] = answer = rng.choice(sorted(COLORS))
    cells[(r, c)] = "black"
    block = {(i, j): cells[(r + i, c + j)] for i in (0, 1) for j in (0, 1) if (r + i, c + j) in cells}
    aux = _paint(_canvas(size), block, cell=size // 2)
    return dict(question=f"What colour is the cell {side} the black cell?", answer=answer,
                response=f"<think>Find the black cell and zoom in on the cells around it.<latent> <parser>the black "
                         f"cell and its neighbours, zoomed in.</parser> Read the cell {side} it.</think>"
                         f"<answer>{answer}</answer>"), _paint(_canvas(size), cells, size // GRID), aux


MAKERS = dict(compare=make_compare, total=make_total, neighbor=make_neighbor)


def image_key(img):
    return hashlib.sha1(img.tobytes()).hexdigest()


def parser_text(response):
    return response[response.index("<parser>") + len("<parser>"):response.index("</parser>")]


def write_world(out_dir, sizes, seed=0, size=112, families=FAMILIES):
    """Write {split}.jsonl + img/ under out_dir for sizes {split: n}. Examples cycle through the families; an
    (image, question) pair seen before is redrawn, so none repeats within or across splits. The pretrain split's
    responses answer directly (the base answers without reasoning). Returns {split: jsonl path}."""
    from tqdm import tqdm
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "img"), exist_ok=True)
    seen, paths, i = set(), {}, 0
    bar = tqdm(total=sum(sizes.values()), desc="world", unit="ex")
    for split, n in sizes.items():
        rows = []
        while len(rows) < n:
            fam = families[i % len(families)]
            ex, query, aux = MAKERS[fam](rng, size)
            key = (image_key(query), ex["question"])
            if key in seen:
                continue
            seen.add(key)
            ex_id = f"{fam}-{i:06d}"
            query.save(os.path.join(out_dir, "img", f"{ex_id}.png"))
            aux.save(os.path.join(out_dir, "img", f"{ex_id}_aux.png"))
            response = f"<answer>{ex['answer']}</answer>" if split == "pretrain" else ex["response"]
            rows.append(dict(id=ex_id, image=f"img/{ex_id}.png", question=ex["question"], response=response,
                             aux_image=f"img/{ex_id}_aux.png", answer=ex["answer"], family=fam))
            i += 1
            bar.update(1)
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        with open(paths[split], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    bar.close()
    return paths


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
