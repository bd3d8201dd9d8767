"""The content controls of the latent channel for any checkpoint and data set (infer.py --latent_mode shuffled |
oracle): does the answer depend on what the latent span carries? zero (span banned) and noise (Gaussian PCA
latents) need nothing more; these two feed each row's spans given latents (latent_loop's `given`):

  shuffled  the latents the checkpoint generated for a donor row: another row of the same --donor_group value
            (e.g. a benchmark's category field; "" any row), drawn with --seed among the rows whose model run
            opened a span. Two passes: the first is `infer.py --latent_mode model --save_latents`, which keeps
            each row's first-span latents beside its results (OUT-stem.latents/, one file per row, written before
            the row's result line, so a resumed run has the latents of every row it has a result for); the
            second reads them (--donors that results file). Each row also gets a placebo: a second row drawn
            the same way whose latents are fed to nobody; how often a row answers with its placebo's answer is
            the chance level of "follows the donor".
  oracle    the vision targets of the row's own `aux_image` (what training regresses the latents onto): read from
            a targets.py cache (--target_cache), or computed with the checkpoint's vision tower (the cache's
            numbers when the tower was frozen in training, train.py's default).

    donor_of, placebo_of = assign_donors(rows, eligible_ids, seed, key=lambda r: r.get("category"))
    follows(results, donor_of, answer_of)   # of the rows whose donor answers otherwise: share answered as the donor
"""
import hashlib
import json
import os
import random

from common import DataError, file_hash, read_json, user_file


def latents_dir(out):
    """The folder of the per-row latents beside a results file OUT (OUT-stem.latents)."""
    return (out[:-len(".jsonl")] if out.endswith(".jsonl") else out) + ".latents"


def latent_path(folder, row_id):
    """A row's latents file: named by a hash of its id (ids may hold any character)."""
    return os.path.join(folder, hashlib.sha1(str(row_id).encode()).hexdigest()[:24] + ".safetensors")


def save_latents(folder, row_id, latents):
    """The (K, D) latents of a row's first span, written whole (tmp + rename) before its result line is."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    path = latent_path(folder, row_id)
    save_file({"latents": latents.detach().cpu().contiguous()}, path + ".tmp", metadata={"id": str(row_id)})
    os.replace(path + ".tmp", path)


def load_latents(folder, row_id):
    from safetensors import safe_open
    path = latent_path(folder, row_id)
    with safe_open(path, "pt") as f:
        if f.metadata().get("id") != str(row_id):
            raise DataError(f"{path}: holds the latents of id {f.metadata().get('id')!r}, not {row_id!r}")
        return f.get_tensor("latents")


def assign_donors(rows, eligible, seed, key):
    """For each row a donor and a placebo: two other rows of its group (key(row)) among the `eligible` ids (whose
    model run opened a span), drawn with a generator seeded by `seed` in input order, so the assignment depends
    on nothing else. A row whose group has fewer than two other eligible rows gets none. ({id: donor id},
    {id: placebo id})."""
    rng, pool = random.Random(f"shuffle-{seed}"), {}
    for r in rows:
        if r["id"] in eligible:
            pool.setdefault(key(r), []).append(r["id"])
    donor, placebo = {}, {}
    for r in rows:
        others = [i for i in pool.get(key(r), []) if i != r["id"]]
        if len(others) >= 2:
            donor[r["id"]], placebo[r["id"]] = rng.sample(others, 2)
    return donor, placebo


def group_key(field):
    """key(row) of --donor_group: the row's value of that field (a row without it is a DataError naming it), or
    one group for every row."""
    if not field:
        return lambda r: None

    def key(r):
        if field not in r:
            raise DataError(r["_file"], r["_line"], field, f"no {field!r} field, the --donor_group")
        return json.dumps(r[field], sort_keys=True)  # any JSON value names a group
    return key


def follows(results, other_of, answer_of, matches):
    """Of the results whose other row (donor or placebo) has another answer than their own, the share answered
    with the other row's answer (matches(pred, answer, question)). dict(n, share)."""
    items = [r for r in results if r["id"] in other_of and answer_of[other_of[r["id"]]] != answer_of[r["id"]]]
    hits = sum(bool(matches(r["pred"], answer_of[other_of[r["id"]]], r["question"])) for r in items)
    return dict(n=len(items), share=hits / len(items) if items else None)


def result_lines(path):
    """(line number, result) of each line of an infer.py results file; a DataError naming the file and line of a
    line that is not one."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                r = json.loads(line)
            except ValueError:
                raise DataError(path, n, "line", "not a JSON result line") from None
            if not isinstance(r, dict) or "id" not in r:
                raise DataError(path, n, "id", "missing: not an infer.py result line")
            yield n, r


class Donors:
    """The first pass of the shuffled control: a model-mode results file whose run kept its latents
    (--save_latents), checked to be of this checkpoint and data. `config` (its run config) and `sha256` go into the
    shuffled run's own config, so a derived results file names what it came from."""

    def __init__(self, path, ckpt_stamp, data_sha256):
        import sharded
        hint = "; it must be the results of infer.py --latent_mode model --save_latents on the same --ckpt and --data"
        user_file(path, "donor results", hint)
        config_path = sharded.output_paths(path)[1]
        self.config = read_json(config_path, "donor results config", hint)
        for k, want in (("latent_mode", "model"), ("save_latents", True), ("ckpt_stamp", ckpt_stamp),
                        ("data_sha256", data_sha256)):
            if self.config.get(k) != want:
                raise DataError(f"{config_path}: {k} is {self.config.get(k)!r}, this run's is {want!r}{hint}")
        self.path, self.sha256, self.folder = path, file_hash(path), latents_dir(path)
        self.results = {r["id"]: r for _, r in result_lines(path)}

    def eligible(self):
        """The ids whose model run opened a span (and so kept latents)."""
        return {i for i, r in self.results.items() if r.get("span_latents")}

    def latents(self, row_id):
        return load_latents(self.folder, row_id)


def oracle_source(target_cache, latent_tokens):
    """oracle mode: (get(row) -> its (K, D) targets from a targets.py cache, the cache's cache.json); (None, None)
    without a cache: the targets are computed by the checkpoint's tower."""
    if not target_cache:
        return None, None
    from data import aux_hash
    from targets import TargetCache
    cache = TargetCache(target_cache, latent_tokens)
    if cache.info is None:
        raise DataError(f"{target_cache}: no targets for K={latent_tokens} (targets.py --latent_tokens "
                        f"{latent_tokens} --data DATA --cache_dir {target_cache} writes them)")

    def get(row):
        h = aux_hash(row)
        if not cache.has(row["id"], h):
            raise DataError(row["_file"], row["_line"], "aux_image", f"no target in {target_cache} for this id and "
                            f"aux image (targets.py --data on this file extracts it)")
        return cache.get(row["id"], h)
    return get, cache.info
