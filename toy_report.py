"""The toy experiment's numbers and reports: toy.py runs the grid, this file turns its per-example answers into
results -- per-variant accuracy over seeds, the paired comparisons (an exact McNemar test per seed, a paired
bootstrap over items and seeds; stats.py), the shuffled control's "follows the donor" rates, and results.md /
results.png.
"""
import os

from PIL import Image, ImageDraw

# (a, b): a - b is tested, paired on the same test items
COMPARISONS = [("GAP", "GAP zero"), ("GAP", "GAP shuffled"), ("GAP", "GAP noise"), ("GAP oracle", "GAP"),
               ("GAP", "dense caption"), ("GAP", "hidden"), ("hidden + EMA", "hidden"), ("GAP", "hidden + EMA"),
               ("GAP zero", "dense caption"), ("GAP", "base"),
               ("dense caption", "base"), ("GAP", "full head"), ("GAP", "GAP no DA"), ("GAP", "GAP K=1"),
               ("GAP", "GAP K=16"), ("VaLR", "GAP"), ("VaLR", "hidden")]


# (a, b) tested within each family too: difficulty-aware assignment should matter where the base already answers
FAMILY_COMPARISONS = [("GAP", "GAP no DA")]


def summarize(res):
    n = len(res)
    fams = sorted({r["family"] for r in res})
    return dict(accuracy=sum(r["correct"] for r in res) / n, latent_rate=sum(r["latent"] for r in res) / n,
                answer_rate=sum(r["answered"] for r in res) / n,
                per_family={f: sum(r["correct"] for r in res if r["family"] == f) /
                            sum(r["family"] == f for r in res) for f in fams})


def compare(evals, a, b, seeds, family=None):
    """Paired statistics of variant a vs b on the test items (or those of one family): per seed an exact McNemar
    test; over all seeds a paired bootstrap that resamples the items and the seeds (its interval and p include
    the seed spread)."""
    import stats
    if a not in evals or b not in evals:
        return None

    def per_item(label, s):
        res = evals[label][s if s in evals[label] else "all"]  # the base: one run, the same for every seed
        ids = [r["id"] for r in res]
        if ids != [r["id"] for r in evals[a][next(iter(evals[a]))]]:
            raise ValueError(f"{label} (seed {s}) is not scored on {a}'s items in {a}'s order: no pairing")
        return [r["correct"] for r in res if family in (None, r["family"])]

    mc = [dict(seed=s, **dict(zip(("n10", "n01", "p"), stats.mcnemar(per_item(a, s), per_item(b, s)))))
          for s in seeds]
    boot = stats.paired_bootstrap(*[[per_item(x, s) for s in seeds] for x in (a, b)])
    return dict(a=a, b=b, diff=boot["diff"], lo=boot["lo"], hi=boot["hi"], p_bootstrap=boot["p"], mcnemar=mc,
                **({"family": family} if family else {}))


def follows(res, other_of, answer_of):
    """Shuffled control: of the items whose other row (donor or placebo) has another answer, the share answered
    with the other row's answer and the share answered correctly. dict(n, other, own)."""
    from answers import answers_match
    items = [r for r in res if r["id"] in other_of and answer_of[other_of[r["id"]]] != r["answer"]]
    other = sum(bool(answers_match(r["pred"], answer_of[other_of[r["id"]]], "")) for r in items)
    return dict(n=len(items), other=other / max(1, len(items)), own=sum(r["correct"] for r in items) / max(1, len(items)))


def report(evals, seeds, n, shuffled):
    """One split's numbers: per variant accuracy (mean +- s.d. over seeds, per family, span and answer rates);
    the paired comparisons, over all items and (FAMILY_COMPARISONS) per family; the shuffled control."""
    import stats
    variants = {}
    for label, by_seed in evals.items():
        runs = {s: summarize(res) for s, res in by_seed.items()}
        accs = [x["accuracy"] for x in runs.values()]
        mean, sd = stats.mean_sd(accs)
        fams = next(iter(runs.values()))["per_family"]
        variants[label] = dict(mean=mean, sd=sd, seeds={str(s): a for s, a in zip(runs, accs)},
                               per_family={f: stats.mean_sd([x["per_family"][f] for x in runs.values()])[0]
                                           for f in fams},
                               latent_rate=stats.mean_sd([x["latent_rate"] for x in runs.values()])[0],
                               answer_rate=stats.mean_sd([x["answer_rate"] for x in runs.values()])[0])
    comparisons = [c for a, b in COMPARISONS if (c := compare(evals, a, b, seeds))]
    fams = sorted({r["family"] for r in evals["base"]["all"]})
    comparisons += [c for a, b in FAMILY_COMPARISONS for f in fams if (c := compare(evals, a, b, seeds, f))]
    return dict(n=n, variants=variants, comparisons=comparisons, shuffled=shuffled)


SPLIT_TITLES = {"test": "unseen evidence (test: no aux image occurs in train)",
                "test_seen": "seen evidence (test_seen: each aux image is a train example's, under a new query "
                             "image)", "val": "the validation split"}


def markdown(res):
    """The results as Markdown: per evaluated split, the variants (mean +- s.d. over seeds, per family, span and
    answer rates), paired comparisons and the shuffled control; the tau sweep; the norm regime, the world and
    difficulty."""
    n_seeds = len(res["seeds"])
    out = [f"{n_seeds} training seed(s) {res['seeds']}; tau = {res['tau']}"
           + (" (chosen on val)" if res["selection_on_val"] else " (the default)")]
    for sp in res["eval_splits"]:
        out += ["", f"### {SPLIT_TITLES[sp]}: n = {res['splits'][sp]['n']}", ""] + split_markdown(res["splits"][sp])
    if res["selection_on_val"]:
        fams = sorted(next(iter(res["selection_on_val_per_family"].values())))
        out += ["", "### tau on the validation split (GAP, first seed; each tau a training run)", "",
                "| tau | train examples kept latent | val accuracy | " + " | ".join(fams) + " |",
                "|---|---|---|" + "---|" * len(fams)]
        for t, acc in res["selection_on_val"].items():
            fam = res["selection_on_val_per_family"][t]
            out.append(f"| {t} | {res['difficulty']['kept_latent'].get(t, '')} | {acc:.3f} | "
                       + " | ".join(f"{fam[f]:.3f}" for f in fams) + " |")
    n = res["norms"]
    out.append(f"\nNorms (the base on validation prompts): vision embedding {n['vision_embed']:.2f}, final state {n['final']['last']:.2f}"
               f" ({n['ratio']:.2f}x; the base as trained: {n['ratio_trained'] or n['ratio']:.2f}x, final norm x "
               f"{n['c']:.2f}); fed back per variant: " + ", ".join(f"{k} {v:.2f}" for k, v in n["fed_back"].items()))
    w = res["world"]
    out.append("\nWorld (train split): " + "; ".join(f"{f}: {x['aux_images']} distinct aux images over {x['answers']} "
                                                      f"answers (at least {x['min_aux_per_answer']} per answer)"
                                                      for f, x in w["train"].items())
               + "; distinct latent targets over the split: " + ", ".join(
                   f"K={k}: {n}" for k, n in w["train_targets"].items())
               + ". Aux images that occur in the train split too: " + ", ".join(
                   f"{s} {100 * v:.1f}%" for s, v in w["aux_in_train"].items())
               + "; of a plain draw (before test keeps only unseen evidence): " + ", ".join(
                   f"{s} {100 * v:.1f}%" for s, v in w["plain_draw_aux_in_train"].items()))
    d = res["difficulty"]
    out.append(f"\nDifficulty ({d['samples']} base samples per example): kept latent at tau " +
               ", ".join(f"{t}: {k}/{d['n_train']}" for t, k in d["kept_latent"].items()))
    out += ["", "| family | base accuracy on train (mean of samples) | kept latent at tau " +
            ", ".join(d["kept_latent"]) + " |", "|---|---|---|"]
    for f, x in d["per_family"].items():
        kept = ", ".join(f"{k}/{x['n']}" for k in x["kept_latent"].values())
        out.append(f"| {f} | {x['base_accuracy']:.3f} | {kept} |")
    return "\n".join(out) + "\n"


def split_markdown(res):
    """One split's tables: variants, paired comparisons, the shuffled control."""
    fams = sorted(next(iter(res["variants"].values()))["per_family"])
    out = ["| variant | accuracy (mean +- s.d.) | per seed | " + " | ".join(fams) + " | opens a span | answers |",
           "|---|---|---|" + "---|" * len(fams) + "---|---|"]
    for label, v in res["variants"].items():
        out.append(f"| {label} | {v['mean']:.3f} +- {v['sd']:.3f} | {', '.join(f'{a:.3f}' for a in v['seeds'].values())} | "
                   + " | ".join(f"{v['per_family'][f]:.3f}" for f in fams)
                   + f" | {100 * v['latent_rate']:.0f}% | {100 * v['answer_rate']:.0f}% |")
    out += ["", "| comparison (paired, same items) | difference | 95% bootstrap CI | bootstrap p | McNemar p per seed "
                "(only a right / only b right) |", "|---|---|---|---|---|"]
    for c in res["comparisons"]:
        mc = ", ".join(f"{m['p']:.2g} ({m['n10']}/{m['n01']})" for m in c["mcnemar"])
        where = f" ({c['family']} only)" if "family" in c else ""
        out.append(f"| {c['a']} - {c['b']}{where} | {c['diff']:+.3f} | [{c['lo']:+.3f}, {c['hi']:+.3f}] | "
                   f"{c['p_bootstrap']:.2g} | {mc} |")
    if res["shuffled"]:
        out += ["", "Shuffled latents, over the seeds: of the items whose donor (or placebo, fed nothing) has another "
                    "answer, the share answered with the donor's (the placebo's) answer, and with their own:", "",
                "| family | items (donor) | donor's answer | items (placebo) | placebo's answer | own answer |",
                "|---|---|---|---|---|---|"]
        for fam in sorted({x["family"] for x in res["shuffled"]}):
            rows = [x for x in res["shuffled"] if x["family"] == fam]
            n, pn = sum(x["n"] for x in rows), sum(x["placebo_n"] for x in rows)

            def pooled(key, k="n"):
                return 100 * sum(x[key] * x[k] for x in rows) / max(1, sum(x[k] for x in rows))
            out.append(f"| {fam} | {n} | {pooled('donor'):.0f}% | {pn} | {pooled('placebo', 'placebo_n'):.0f}% | "
                       f"{pooled('own'):.0f}% |")
    return out


def plot(res, path):
    """Accuracy per variant on the first evaluated split (unseen evidence): a bar at the mean over seeds, a dot per
    seed; a red tick at the mean on the second (seen evidence). PIL only."""
    first, *other = [res["splits"][sp] for sp in res["eval_splits"]]
    labels = list(first["variants"])
    W, row, left, top = 620, 22, 130, 30
    H = top + row * len(labels) + 30
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    seen = f"; red: {res['eval_splits'][1]} mean (n={other[0]['n']})" if other else ""
    d.text((8, 8), f"toy world: {res['eval_splits'][0]} accuracy (n={first['n']}), mean over seeds (bar), each seed "
                   f"(dots){seen}", fill="black")
    pw = W - left - 60
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        x = left + t * pw
        d.line([x, top - 4, x, H - 24], fill=(220, 220, 220))
        d.text((x - 10, H - 20), f"{t:.2f}", fill="black")
    for i, label in enumerate(labels):
        v, y = first["variants"][label], top + i * row
        d.text((6, y + 4), label, fill="black")
        d.rectangle([left, y + 4, left + v["mean"] * pw, y + row - 4], fill=(120, 160, 210))
        for a in v["seeds"].values():
            x = left + a * pw
            d.ellipse([x - 3, y + row / 2 - 3, x + 3, y + row / 2 + 3], fill=(20, 20, 20))
        if other and label in other[0]["variants"]:
            x = left + other[0]["variants"][label]["mean"] * pw
            d.line([x, y + 2, x, y + row - 2], fill=(210, 30, 30), width=3)
        d.text((left + pw + 8, y + 4), f"{v['mean']:.3f}", fill="black")  # right of the axis, clear of the dots
    img.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


