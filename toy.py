"""The toy world: a seeded synthetic visual task in the GAP data format where the auxiliary image is evidence,
not the answer, and one command that runs the whole GAP pipeline on a CPU with the controls that say what the
latents carry (paper sections 3-5: the norm gap of Fig. 2 / Table 1, the variants of Tables 2-6, K of Fig. 4).

    python toy.py            # quick start: one seed, the core variants and controls (README "Quick start")
    python toy.py --full     # the whole grid: 3 seeds, K in {1,4,16}, every variant, tau chosen on validation
                             # (the sweep, 1.0 = no DA included, reported per family)
    python toy.py --quick    # the quick start at smoke-test size (test_toy.py runs it)

Task families (toy_world.py). Query images are 4 x 4 grids of flat-colour 28 px cells (one merged vision token
each); every colour comes in 6 shades, a nuisance that gives the evidence room (a test aux image is rarely one
training showed). The auxiliary image is never shown to the student, only its frozen-tower embeddings (the latent
targets); it differs between examples that share an answer, and the <parser> text describes it without stating
the answer:
  compare  "Are there more red cells than blue cells?"  -> yes/no     aux: the red cells lined up in row 1, the
           blue ones in row 3, shades kept (two tallies; the answer needs a comparison after them)
  total    "How many red and blue cells are there together?" -> 3..7  aux: the same two tallies (the answer
           needs an addition after them; the parser names the two counts, never their sum)
  neighbor "What colour is the cell right of the black cell?" -> colour   aux: the 2 x 2 block with the black
           cell at its top left, zoomed in (the answer is one of its four cells; the parser names none)
  majority "Which colour covers most of the grid?" -> colour   aux: the 9-12 cells of that colour lined up. The
           easy family: the base answers it without reasoning, so difficulty-aware assignment has examples to
           leave without a span (the paper's claim is about those)

Splits: `pretrain` (the base is trained on it, answering directly: the stand-in for a pretrained VLM, so that
difficulty is measured on examples the base never saw), `train` (difficulty, every fine-tuned variant), `val`
(the only split settings are chosen on; drawn as it comes), `test` (unseen evidence: only examples whose aux image
the train split never showed) and `test_seen` (seen evidence: each example the evidence of a train example of its
family under a new query image); every variant and control is evaluated once on each of the two test splits.

The 7B norm regime (--norm_ratio 8.6): the base's vision tower output is scaled x40 (vision embeddings tens of
times the text-embedding norm, 7B: ~50x), and after the base stage its final norm weight is multiplied by c and its LM head
divided by c (logits unchanged), with c set so the final normalized state is --norm_ratio x the query-image
embedding norm, as in Qwen2.5-VL-7B (paper Fig. 2b). norms.py draws the toy's Fig. 2 (out/toy/norms.png).

Variants, all from the one base on the one data set: base; dense caption (K=0); GAP (pca head, difficulty-aware,
K=4; --full also K=1 and K=16); full head (LH ablation); hidden (output-as-input) and hidden + EMA calibration;
GAP without DA (--full; also compared within each family). Controls at evaluation of GAP, on each test split:
zero (span banned), noise (Gaussian PCA latents), shuffled (the latents GAP generated for another example of the
same family fed instead; how often the answer follows the donor's is reported, against a placebo), oracle (the
example's true aux-image targets fed: the channel's ceiling). infer.py runs the same controls on any checkpoint
and data (controls.py).
"""
import dataclasses
import json
import os
import shutil
import time
from dataclasses import field

from toy_report import follows, markdown, plot, report, summarize
from toy_world import SPLITS, check_world, corpus, shared_aux, world_stats, write_world


@dataclasses.dataclass
class ToyConfig:
    """Generate the toy world and run the GAP pipeline on it with its variants, controls and statistics."""
    out: str = field(default="out/toy", metadata={"help": "output directory (data, checkpoints, results)"})
    quick: bool = field(default=False, metadata={"help": "smoke-test sizes (overrides the size fields below)"})
    full: bool = field(default=False, metadata={"help": "the whole grid: --seeds, --k_sweep, every variant, tau "
                                                        "chosen on the validation split among --taus"})
    seed: int = field(default=0, metadata={"help": "world and base seed"})
    seeds: str = field(default="0,1,2", metadata={"help": "--full: fine-tuning seeds (the quick start: the first)"})
    n_pretrain: int = field(default=3000, metadata={"help": "base-stage examples (disjoint from train)"})
    n_train: int = field(default=3000, metadata={"help": "fine-tuning examples (split evenly over families)"})
    n_val: int = field(default=300, metadata={"help": "validation examples (settings are chosen here only)"})
    n_test: int = field(default=600, metadata={"help": "test examples (unseen evidence: no aux image of train)"})
    n_test_seen: int = field(default=300, metadata={"help": "test_seen examples (the evidence of a train example "
                                                           "under a new query image)"})
    image_size: int = field(default=112, metadata={"help": "image side in px (112: 4x4 cells, one vision token each)"})
    hidden: int = field(default=128, metadata={"help": "decoder width d of the tiny Qwen2.5-VL"})
    layers: int = field(default=4, metadata={"help": "decoder layers of the tiny Qwen2.5-VL"})
    # a random tower's embeddings come out ~1.3x the text-embedding norm; Qwen2.5-VL-7B's are ~50x (paper sec. 3)
    vision_scale: float = field(default=40.0, metadata={"help": "scale of the base vision tower's output"})
    norm_ratio: float = field(default=8.6, metadata={"help": "final-state / vision-embedding norm set after the base "
                                                             "stage (7B: 8.6, paper Fig. 2b); 0: leave as trained"})
    latent_tokens: int = field(default=4, metadata={"help": "K latents per span of GAP (a perfect square)"})
    k_sweep: str = field(default="1,16", metadata={"help": "--full: the other K of GAP"})
    pca_var: float = field(default=0.95, metadata={"help": "explained variance that sets k"})
    base_epochs: int = field(default=6, metadata={"help": "epochs of the base stage"})
    epochs: int = field(default=8, metadata={"help": "epochs of each fine-tuning stage"})
    batch: int = field(default=32, metadata={"help": "global batch (one micro-batch) of every training stage"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate of the base stage"})
    ft_lr: float = field(default=1e-3, metadata={"help": "peak learning rate (backbone and head) of fine-tuning"})
    samples: int = field(default=8, metadata={"help": "N sampled base answers per example (difficulty)"})
    difficulty_temperature: float = field(default=1.0, metadata={"help": "sampling temperature for difficulty"})
    # 0.5: what --full chose on the validation split among 0.25, 0.5, 0.75 (README "Quick start")
    difficulty_tau: float = field(default=0.5, metadata={"help": "quick start: latent supervision where accuracy <= "
                                                                 "tau (--full chooses it on val among --taus)"})
    taus: str = field(default="0.25,0.5,0.75,1.0", metadata={"help": "--full: DA thresholds tried on the validation "
                                                                   "split (1.0: no DA)"})
    max_new_tokens: int = field(default=64, metadata={"help": "generated tokens per answer, latents included"})
    eval_batch: int = field(default=64, metadata={"help": "prompts per generation batch"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default, all cores)"})
    eval_split: str = field(default="test", metadata={"help": "the splits evaluated: test (unseen evidence) and "
                                                                "test_seen, or val while developing the world (so no "
                                                                "design choice sees a test split)",
                                                        "choices": ["test", "val"]})
    valr: bool = field(default=False, metadata={"help": "also train and evaluate VaLR (README 'VaLR') per seed"})
    resume: bool = field(default=False, metadata={"help": "go on from what an interrupted run of the same settings "
                                                           "left in --out (checkpoints, difficulty scores, answers) "
                                                           "instead of starting afresh"})


QUICK = dict(hidden=64, layers=2, n_pretrain=96, n_train=96, n_val=24, n_test=48, n_test_seen=24, base_epochs=2,
             epochs=2, batch=16,
             samples=2, max_new_tokens=48, seeds="0,1", taus="0.5,1.0", k_sweep="1")


# ----------------------------------------------------------------------------------------------------------
# the base and its norm regime

def scale_vision(model_dir, scale):
    """Multiply the output layer of the vision tower's patch merger by `scale` (the embeddings scale exactly),
    so the toy base's vision embeddings sit in a 7B-like norm regime relative to its text embeddings."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    last = model.model.visual.merger.mlp[-1]
    with torch.no_grad():
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    model.save_pretrained(model_dir, safe_serialization=True)


def rescale_final_norm(model_dir, c):
    """The final norm weight x c and the LM head / c in model_dir's model.safetensors: every logit is unchanged
    (lm_head(c g * x / rms(x)) / c), the final normalized state -- what output-as-input latents feed back -- is
    c times larger. Written atomically."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(model_dir, "model.safetensors")
    state = load_file(path)
    # the decoder's final norm: "model.norm.weight" or "model.language_model.norm.weight" by transformers version
    norm = [k for k in state if k.endswith("norm.weight") and ".layers." not in k and "visual" not in k]
    head = [k for k in state if k.endswith("lm_head.weight")]
    if len(norm) != 1 or len(head) != 1:
        raise ValueError(f"{path}: expected one final norm and one lm_head weight, found {norm} and {head}")
    state[norm[0]] = state[norm[0]] * c
    state[head[0]] = state[head[0]] / c
    save_file(state, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)


def prompt_batch(tokenizer, image_processor, rows, spec=None):
    """A left-padded generation batch of rows' (image, question) prompts."""
    from data import DataSpec, collate, encode_prompt, open_image
    spec = spec or DataSpec()
    return collate([encode_prompt(tokenizer, image_processor, open_image(r, "image"), r["question"], spec, r["id"])
                    for r in rows], tokenizer.pad_token_id, left=True)


def norm_profile(model_dir, rows, head=None):
    """norms.profile of a model directory (or a GAP checkpoint's backbone) on rows' prompts."""
    import torch
    import norms
    from model import load_backbone
    backbone, tokenizer, ip = load_backbone(model_dir, "cpu", torch.float32)
    return norms.profile(backbone, prompt_batch(tokenizer, ip, rows), head=head)


def set_norm_regime(base, rows, ratio):
    """Rescale the base's final norm so the final state is `ratio` x the vision-embedding norm on rows (paper
    Fig. 2b: 8.6 in Qwen2.5-VL-7B). Returns (ratio before, c). BASE/norm_regime.json records them (and the weights'
    hash before) ahead of the rescale, so a resumed run neither rescales twice nor loses the ratio as trained."""
    from common import atomic_write_text, file_hash
    record, weights = os.path.join(base, "norm_regime.json"), os.path.join(base, "model.safetensors")
    if os.path.exists(record):  # a resumed run: the rescale was decided, and maybe done
        with open(record) as f:
            done = json.load(f)
        if file_hash(weights) == done["weights_before"]:
            rescale_final_norm(base, done["c"])
        return done["ratio_trained"], done["c"]
    before = norm_profile(base, rows)["ratio"]
    c = ratio / before
    atomic_write_text(record, json.dumps(dict(ratio_trained=before, c=c, weights_before=file_hash(weights))))
    rescale_final_norm(base, c)
    return before, c


# ----------------------------------------------------------------------------------------------------------
# stages, each through the project's own entry points

def train_stage(cfg, name, model, data, seed, **kw):
    import train
    out = os.path.join(cfg.out, "ckpt", name)
    if os.path.exists(os.path.join(out, "gap.json")):  # the same stage (name = its settings) earlier in this run
        return out
    print(f"== train {name}: {kw}")
    train.main(train.TrainConfig(model=model, data=data, out_dir=out, global_batch=cfg.batch, micro_batch=cfg.batch,
                                 seed=seed, **kw))
    return out


def difficulty(cfg, ckpt, data, out_path):
    """difficulty.py on the base checkpoint: accuracy = fraction of N sampled base answers (image + question
    only) that match `answer`. Returns the scored rows."""
    import difficulty as difficulty_py
    from sharded import clear_outputs
    if not cfg.resume:
        clear_outputs(out_path)  # a fresh measurement, not a resume of an older run
    difficulty_py.main(difficulty_py.DifficultyConfig(
        model=ckpt, data=data, out=out_path, samples=cfg.samples, temperature=cfg.difficulty_temperature,
        max_new_tokens=cfg.max_new_tokens, batch_size=max(1, cfg.eval_batch // cfg.samples), seed=cfg.seed))
    with open(out_path) as f:
        return [json.loads(line) for line in f]


def evaluate(cfg, ckpt, rows, path, mode="model", norm_calib="none", given=None, tags=None, seed=None):
    """Greedy answers of a checkpoint on rows through GAP.steps (the loop infer.py runs, with its settings), scored
    with answers.py. mode: model | zero | noise | given (given: {id: (K, D) latents}, fed in every span the row
    opens). seed: of the noise draws (default cfg.seed). Writes one JSON line per row to `path` (with tags[id], if
    given); returns (results, {id: the (K, D) latents of its first span})."""
    import torch
    import infer
    from answers import answers_match, extract_answer
    from common import atomic_write_text
    key = eval_key(cfg, ckpt, rows, mode, norm_calib, given, tags, seed)
    done = path[:-len(".jsonl")] + ".done.pt"  # written before the answers: an answers file without it is torn
    if cfg.resume and os.path.exists(path) and os.path.exists(done):
        saved = torch.load(done)
        if saved["key"] == key:  # the same checkpoint, rows, mode and fed latents as this evaluation
            with open(path) as f:
                return [json.loads(line) for line in f], saved["latents"]
    ic = infer.InferConfig(ckpt=ckpt, latent_mode=mode, norm_calib=norm_calib, max_new_tokens=cfg.max_new_tokens,
                           seed=cfg.seed if seed is None else seed)
    runner = infer.Runner(ic)
    gap, K = runner.gap, runner.gap.latent_tokens
    results, latents = [], {}
    for i in range(0, len(rows), cfg.eval_batch):
        chunk = rows[i:i + cfg.eval_batch]
        batch = prompt_batch(runner.tokenizer, runner.image_processor, chunk, runner.spec)
        fixed = torch.stack([given[r["id"]] for r in chunk]) if given is not None else None
        steps = list(gap.steps(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                               batch["image_grid_thw"], runner.sampling, given=fixed,
                               generator=infer.example_generators(ic, chunk, "cpu")))
        tokens = torch.stack([s.token for s in steps], 1)
        for b, r in enumerate(chunk):
            fed = [s.fed[b] for s in steps if s.fed is not None and 0 <= int(s.slot[b]) < K]
            if K and len(fed) >= K:
                latents[r["id"]] = torch.stack(fed[:K]).float()
            response = gap.decode(runner.tokenizer, tokens[b])
            pred = extract_answer(response)
            results.append(dict(id=r["id"], family=r["family"], answer=r["answer"], pred=pred, response=response,
                                correct=bool(answers_match(pred, r["answer"], r["question"])),
                                latent="<latent>" in response,
                                answered="<answer>" in response and "</answer>" in response,
                                **(tags or {}).get(r["id"], {})))
    torch.save(dict(key=key, latents=latents), done + ".tmp")
    os.replace(done + ".tmp", done)
    atomic_write_text(path, "".join(json.dumps(x) + "\n" for x in results))
    return results, latents


def eval_key(cfg, ckpt, rows, mode, norm_calib, given, tags, seed):
    """What an evaluation's answers derive from: the checkpoint's files, the rows, the mode and its settings and
    the latents it feeds (a hash). A resumed run reuses an answers file only under the same key."""
    import hashlib
    from common import file_hash
    h = hashlib.sha256(json.dumps(dict(
        ckpt=[file_hash(os.path.join(ckpt, n)) for n in ("gap.json", "model.safetensors", "latent_head.safetensors")
              if os.path.exists(os.path.join(ckpt, n))],
        ids=[r["id"] for r in rows], mode=mode, norm_calib=norm_calib, tags=tags, seed=seed,
        max_new_tokens=cfg.max_new_tokens, eval_batch=cfg.eval_batch)).encode())
    for r in rows if given is not None else ():
        h.update(given[r["id"]].float().numpy().tobytes())
    return h.hexdigest()


def evidence_pool(r):
    """Rows whose aux images answer each other's questions alike: one family, and for neighbor one side ("right
    of" / "below"), so that a donor's evidence read under the row's question gives the donor's own answer."""
    return r["family"], r["family"] == "neighbor" and "below" in r["question"]


def donors(rows, latents, seed):
    """Shuffled control: for each row a donor and a placebo, two other rows of its evidence pool whose GAP run
    opened a span (seeded; controls.assign_donors, as infer.py --latent_mode shuffled draws them). The donor's
    latents are fed in the row's place; the placebo is fed nothing: how often the row's answer is the placebo's
    answer is the chance level of "follows the donor". ({id: donor}, {id: placebo})."""
    from controls import assign_donors
    return assign_donors(rows, set(latents), seed, evidence_pool)


def oracle_targets(cfg, base, path, K):
    """{id: (K, D)} the true aux-image targets of the rows of `path`, from the base's frozen vision tower."""
    from data import aux_hash, read_jsonl
    from targets import TargetCache, TargetsConfig, extract_targets
    cache_dir = os.path.join(cfg.out, "cache")
    extract_targets(TargetsConfig(model=base, data=path, latent_tokens=K, cache_dir=cache_dir, batch_size=64))
    cache = TargetCache(cache_dir, K)
    return {r["id"]: cache.get(r["id"], aux_hash(r)).float() for r in read_jsonl(path)[0]}


def distinct_targets(cache, rows):
    """How many distinct (K, d) target tensors the rows have (bitwise: one aux image always gives one target)."""
    from data import aux_hash
    return len({cache.get(r["id"], aux_hash(r)).numpy().tobytes() for r in rows})


# ----------------------------------------------------------------------------------------------------------
# the grid: what is trained, what is evaluated, what is compared

def train_variants(cfg, K, full):
    """{label: train.py settings} of the fine-tuned variants (all from the base, on the scored train split)."""
    v = {"dense caption": dict(latent_tokens=0), "GAP": dict(latent_tokens=K, latent_head="pca"),
         "hidden": dict(latent_tokens=K, latent_head="hidden")}
    if full:
        v["full head"] = dict(latent_tokens=K, latent_head="full")
        v["GAP no DA"] = dict(latent_tokens=K, latent_head="pca", difficulty_tau=1.0)
        v |= {f"GAP K={k}": dict(latent_tokens=k, latent_head="pca") for k in ints(cfg.k_sweep) if k != K}
    return v


def ints(text):
    return [int(x) for x in text.split(",") if x]


def floats(text):
    return [float(x) for x in text.split(",") if x]


def fine_tune(cfg, kw, tau, seed, base, scored, pca_paths):
    """A fine-tuned variant (train.py settings kw) from the base; its directory names its settings, so the same
    one asked for twice in a run (the tau search and the grid) is trained once."""
    kw = dict(kw)
    K, t = kw.pop("latent_tokens"), kw.pop("difficulty_tau", tau)
    name = f"{kw.get('latent_head', 'pca')}_K{K}_tau{t}_s{seed}" if K else f"dense_s{seed}"
    extra = dict(pca_path=pca_paths[K], target_cache=os.path.join(cfg.out, "cache")) if K else {}
    return train_stage(cfg, name, base, scored, seed, latent_tokens=K, epochs=cfg.epochs, lr=cfg.ft_lr,
                       head_lr=cfg.ft_lr, difficulty_tau=t, **extra, **kw)


def eval_path(cfg, split, name):
    """Where a checkpoint's answers on a split are written: OUT/eval/SPLIT/NAME.jsonl (the folder made)."""
    os.makedirs(os.path.join(cfg.out, "eval", split), exist_ok=True)
    return os.path.join(cfg.out, "eval", split, f"{name}.jsonl")


def run(cfg: ToyConfig):
    """The pipeline, stage after stage (one long function on purpose: it is the recipe). Writes results.json,
    results.md, results.png and norms.png under cfg.out and returns the results."""
    import torch
    import pca as pca_lib
    import tiny
    from common import atomic_write_text
    from data import read_jsonl
    from targets import TargetCache, TargetsConfig, extract_targets, fit_basis
    if cfg.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    seeds = ints(cfg.seeds) if cfg.full else ints(cfg.seeds)[:1]
    K = cfg.latent_tokens
    codes = begin(cfg)

    # 1. the world
    sizes = dict(pretrain=cfg.n_pretrain, train=cfg.n_train, val=cfg.n_val, test=cfg.n_test,
                 test_seen=cfg.n_test_seen)
    paths, drawn = write_world(os.path.join(cfg.out, "data"), sizes, cfg.seed, cfg.image_size)
    same_world(cfg, paths)
    print(f"world: {check_world(paths)} unique (image, question) pairs over {', '.join(SPLITS)} -> {cfg.out}/data")
    rows = {s: read_jsonl(p)[0] for s, p in paths.items()}
    # the splits evaluated: unseen evidence (test) and seen evidence (test_seen), or val while developing the world
    splits = ["test", "test_seen"] if cfg.eval_split == "test" else ["val"]
    world = {s: world_stats(paths[s]) for s in ("train", *splits)} | {"train_targets": {}}
    # the share of each split's aux images that train shows (the oracle's evidence seen?), and of a plain draw
    world["aux_in_train"] = {s: shared_aux(paths[s], paths["train"]) for s in ("val", *splits)}
    world["plain_draw_aux_in_train"] = {s: drawn[s] for s in ("val", "test")}

    # 2. the base: a tiny Qwen2.5-VL trained to answer directly on the pretrain split, then the 7B norm regime
    tiny_dir = tiny.build_tiny(os.path.join(cfg.out, "tiny"), cfg.hidden, cfg.layers, seed=cfg.seed,
                               texts=corpus(paths))
    scale_vision(tiny_dir, cfg.vision_scale)
    base = train_stage(cfg, "base", tiny_dir, paths["pretrain"], cfg.seed, latent_tokens=0, epochs=cfg.base_epochs,
                       lr=cfg.lr, head_lr=cfg.lr)
    norms = dict(ratio_trained=None, c=1.0)
    if cfg.norm_ratio:
        norms["ratio_trained"], norms["c"] = set_norm_regime(base, rows["pretrain"][:64], cfg.norm_ratio)
    base_profile = norm_profile(base, rows["val"][:64])
    norms |= dict(ratio=base_profile["ratio"], vision_embed=base_profile["vision_embed"],
                  text_embed=base_profile["text_embed"], final=base_profile["final"])
    print(f"norms: final state / vision embedding = {norms['ratio']:.2f} on validation prompts "
          f"(as trained {norms['ratio_trained'] or norms['ratio']:.2f}, final norm x {norms['c']:.2f})")

    # 3. latent targets (train: every K; test: K for the oracle control) and a PCA basis per K
    Ks = sorted({K} | (set(ints(cfg.k_sweep)) if cfg.full else set()))
    cache_dir, pca_paths, bases = os.path.join(cfg.out, "cache"), {}, {}
    for k in Ks:
        extract_targets(TargetsConfig(model=base, data=paths["train"], latent_tokens=k, cache_dir=cache_dir,
                                      batch_size=64))
        bases[k] = fit_basis(TargetCache(cache_dir, k), rows["train"], cfg.pca_var, 0, 1)
        world["train_targets"][str(k)] = distinct_targets(TargetCache(cache_dir, k), rows["train"])
        pca_paths[k] = os.path.join(cache_dir, f"pca_K{k}.safetensors")
        pca_lib.save(pca_paths[k], bases[k])
        print(f"PCA K={k}: k={bases[k]['k']} of d={bases[k]['P'].shape[0]}, rel_mse={bases[k]['rel_mse']:.4f}")
    oracle = {split: oracle_targets(cfg, base, paths[split], K) for split in splits}

    # 4. difficulty of the train split under the base (which never saw it)
    scored_path = os.path.join(cfg.out, "data", "train.scored.jsonl")
    scored = difficulty(cfg, base, paths["train"], scored_path)
    taus = sorted({0.0, cfg.difficulty_tau, 1.0} | (set(floats(cfg.taus)) if cfg.full else set()))
    kept = {str(t): sum(r["accuracy"] <= t for r in scored) for t in taus}
    fams = sorted({r["family"] for r in scored})
    by_family = {f: dict(base_accuracy=sum(r["accuracy"] for r in scored if r["family"] == f)
                         / sum(r["family"] == f for r in scored),
                         kept_latent={str(t): sum(r["accuracy"] <= t for r in scored if r["family"] == f)
                                      for t in taus},
                         n=sum(r["family"] == f for r in scored)) for f in fams}
    print(f"difficulty: examples kept latent at tau {kept} of {len(scored)}")

    # 5. tau: the quick start's default, or (--full) the best GAP of the first seed on the validation split
    selection, selection_family, tau = {}, {}, cfg.difficulty_tau
    if cfg.full:
        gap_kw = dict(latent_tokens=K, latent_head="pca")
        for t in floats(cfg.taus):
            ckpt = fine_tune(cfg, gap_kw, t, seeds[0], base, scored_path, pca_paths)
            res, _ = evaluate(cfg, ckpt, rows["val"], os.path.join(cfg.out, "eval", f"val_tau{t}.jsonl"))
            selection[str(t)] = summarize(res)["accuracy"]
            selection_family[str(t)] = summarize(res)["per_family"]
        tau = max(floats(cfg.taus), key=lambda t: selection[str(t)])  # ties: the first listed
        print(f"tau on val: {selection} -> {tau}")

    # 6. the variants per seed, evaluated on each split (base: once, it is the same for every seed)
    evals = {sp: {"base": {"all": evaluate(cfg, base, rows[sp], eval_path(cfg, sp, "base"))[0]}} for sp in splits}
    fed_norms, shuffled = {}, {sp: [] for sp in splits}
    for s in seeds:
        for label, kw in train_variants(cfg, K, cfg.full).items():
            ckpt = fine_tune(cfg, kw, tau, s, base, scored_path, pca_paths)
            name = os.path.basename(ckpt)
            for sp in splits:
                test, ev = rows[sp], evals[sp]
                res, lat = evaluate(cfg, ckpt, test, eval_path(cfg, sp, name))
                ev.setdefault(label, {})[s] = res
                if sp == splits[0]:
                    fed_norms.setdefault(label, []).extend(v.norm(dim=-1).mean().item() for v in lat.values())
                if label == "hidden":
                    res, lat = evaluate(cfg, ckpt, test, eval_path(cfg, sp, f"{name}_ema"), norm_calib="ema")
                    ev.setdefault("hidden + EMA", {})[s] = res
                    if sp == splits[0]:
                        fed_norms.setdefault("hidden + EMA", []).extend(v.norm(dim=-1).mean().item()
                                                                        for v in lat.values())
                if label != "GAP":
                    continue
                for mode in ("zero", "noise"):
                    res, _ = evaluate(cfg, ckpt, test, eval_path(cfg, sp, f"{name}_{mode}"), mode,
                                      seed=s)  # noise: each fine-tuning seed its own draws
                    ev.setdefault(f"GAP {mode}", {})[s] = res
                donor_of, placebo_of = donors(test, lat, s)
                zeros = torch.zeros_like(next(iter(oracle[sp].values())))  # a row whose pool has no two other spans
                given = {r["id"]: lat[donor_of[r["id"]]] if r["id"] in donor_of else zeros for r in test}
                res, _ = evaluate(cfg, ckpt, test, eval_path(cfg, sp, f"{name}_shuffled"), "given",
                                  given=given, seed=s, tags={i: dict(donor=d, placebo=placebo_of[i])
                                                             for i, d in donor_of.items()})
                ev.setdefault("GAP shuffled", {})[s] = res
                answer_of = {r["id"]: r["answer"] for r in test}
                for fam in sorted({r["family"] for r in res}):
                    mine = [r for r in res if r["family"] == fam]
                    d, p = follows(mine, donor_of, answer_of), follows(mine, placebo_of, answer_of)
                    shuffled[sp].append(dict(seed=s, family=fam, n=d["n"], donor=d["other"], own=d["own"],
                                             placebo_n=p["n"], placebo=p["other"]))
                res, _ = evaluate(cfg, ckpt, test, eval_path(cfg, sp, f"{name}_oracle"), "given",
                                  given=oracle[sp])
                ev.setdefault("GAP oracle", {})[s] = res
            if cfg.valr:
                ckpt = train_valr(cfg, base, scored_path, pca_paths[K], tau, s)
                for sp in splits:
                    evals[sp].setdefault("VaLR", {})[s] = evaluate(cfg, ckpt, rows[sp],
                                                                   eval_path(cfg, sp, f"valr_s{s}"))[0]

    # 7. Fig. 2 of the first GAP: layer-wise norms, final state vs vision embeddings vs what GAP feeds back
    import norms as norms_py
    from checkpoint import load_checkpoint
    gap0 = fine_tune(cfg, dict(latent_tokens=K, latent_head="pca"), tau, seeds[0], base, scored_path, pca_paths)
    g, tok, ip, _ = load_checkpoint(gap0, "cpu", torch.float32)
    fig2 = norms_py.profile(g.backbone, prompt_batch(tok, ip, rows[splits[0]][:64]), head=g.head)
    norms_py.plot(fig2, os.path.join(cfg.out, "norms.png"))
    norms["gap_checkpoint"] = dict(ratio=fig2["ratio"], reconstruction=fig2.get("reconstruction"),
                                   vision_embed=fig2["vision_embed"])
    norms["fed_back"] = {label: sum(v) / len(v) for label, v in fed_norms.items() if v}

    # 8. statistics and reports, per evaluated split
    results = dict(eval_splits=splits, seeds=seeds, tau=tau, selection_on_val=selection,
                   selection_on_val_per_family=selection_family,
                   splits={sp: report(evals[sp], seeds, len(rows[sp]), shuffled[sp]) for sp in splits},
                   norms=norms, world=world,
                   difficulty=dict(n_train=len(scored), samples=cfg.samples, kept_latent=kept, per_family=by_family),
                   pca={str(k): dict(k=b["k"], rel_mse=b["rel_mse"]) for k, b in bases.items()},
                   config=dataclasses.asdict(cfg), code=codes[-1], wall_s=round(time.time() - t0, 1))
    if len(codes) > 1:
        results["resumed_from_code"] = codes[:-1]  # the interrupted run's parts were made by this code
    atomic_write_text(os.path.join(cfg.out, "results.json"), json.dumps(results, indent=2) + "\n")
    atomic_write_text(os.path.join(cfg.out, "results.md"), markdown(results))
    plot(results, os.path.join(cfg.out, "results.png"))
    print("\n" + markdown(results))
    print(f"{results['wall_s']:.0f} s -> {cfg.out}/results.json, results.md, results.png, norms.png")
    return results


def begin(cfg):
    """Start a run in cfg.out: afresh (what an older run left is removed), or with --resume on what an interrupted
    run of the same settings left, checked against its OUT/run.json (a one-line error names the first setting that
    differs). Returns the code versions that made OUT's files, this one last."""
    from common import DataError, atomic_write_text
    path = os.path.join(cfg.out, "run.json")
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "resume", "threads")}
    codes, old = [code_version()], None
    if cfg.resume and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        for k in sorted(set(settings) | set(old["settings"])):
            if old["settings"].get(k) != settings.get(k):
                raise DataError(f"{path}: settings.{k}: the interrupted run had {old['settings'].get(k)!r}, this "
                                f"one {settings.get(k)!r}: run with its settings, or without --resume to start afresh")
        codes = old["code"] + [c for c in codes if c not in old["code"]]
        print(f"resuming the run in {cfg.out} (its finished stages are kept)")
    elif cfg.resume:
        print(f"nothing to resume in {cfg.out} (no run.json): starting afresh")
    for sub in ("tiny",) if old else ("data", "cache", "eval", "tiny", "ckpt", "encoder"):  # tiny: rebuilt alike
        shutil.rmtree(os.path.join(cfg.out, sub), ignore_errors=True)
    os.makedirs(os.path.join(cfg.out, "eval"), exist_ok=True)
    atomic_write_text(path, json.dumps(dict(settings=settings, code=codes, world=(old or {}).get("world")), indent=1))
    return codes


def same_world(cfg, paths):
    """Record the drawn splits' hashes in OUT/run.json; a resumed run must have drawn the same world (its scores,
    targets and checkpoints were made on it)."""
    from common import DataError, atomic_write_text, file_hash
    path = os.path.join(cfg.out, "run.json")
    with open(path) as f:
        record = json.load(f)
    world = {s: file_hash(p) for s, p in paths.items()}
    if record["world"] not in (None, world):
        raise DataError(f"{path}: world: this run drew other splits than the interrupted one ({world} vs "
                        f"{record['world']}): run without --resume")
    atomic_write_text(path, json.dumps(record | dict(world=world), indent=1))


def code_version():
    """The git commit this file was run from (+ "-dirty" with uncommitted changes), or None outside a checkout."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def toy_encoder(out_dir, image_size, seed):
    """The toy's external vision encoder for REPA: a random stock Dinov2Model (2 layers, width 64, one 14 px
    patch per cell) with its image processor. Nothing pretrained exists for this world; on its flat-colour cells
    random patch features still tell the colours apart (as the frozen random Qwen tower's do)."""
    import torch
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model
    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                             patch_size=14, image_size=image_size)).save_pretrained(out_dir)
    BitImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                         do_center_crop=False, do_resize=False).save_pretrained(out_dir)
    return out_dir


def train_valr(cfg, base, data, pca_path, tau, seed):
    """VaLR on the toy: the encoder's features of the training images, stage 1 (projectors, 2 epochs), then
    stage 2 (everything, self-fed latents, cfg.epochs) from stage 1's checkpoint. Returns the stage-2 checkpoint."""
    import align
    enc = os.path.join(cfg.out, "encoder")
    if not os.path.exists(os.path.join(enc, "config.json")):
        toy_encoder(enc, cfg.image_size, cfg.seed)
    cache = os.path.join(cfg.out, "cache", "align")
    align.extract_features(align.FeaturesConfig(encoders=enc, data=data, latent_tokens=cfg.latent_tokens,
                                                cache_dir=cache, batch_size=64))
    kw = dict(latent_tokens=cfg.latent_tokens, latent_head="hidden", pca_path=pca_path, lambda_latent=0.0,
              align="repa", align_encoders=enc, align_cache=cache, align_dim=128, align_text=True,
              lr=cfg.ft_lr, head_lr=cfg.ft_lr, difficulty_tau=tau)
    stage1 = train_stage(cfg, f"valr_stage1_s{seed}", base, data, seed, stage=1, epochs=2, **kw)
    return train_stage(cfg, f"valr_s{seed}", stage1, data, seed, stage=2, epochs=cfg.epochs, **kw)


if __name__ == "__main__":
    from common import parse_config, run_main
    run_main(run, parse_config(ToyConfig))
