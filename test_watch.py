"""Tests of watching a run (metrics.py, validate.py, curves.py) on the tiny random Qwen2.5-VL: metrics.jsonl holds
the numbers the step computed, the validation loss is an independent teacher-forced computation's, a resumed run
leaves one line per step, TensorBoard and W&B get the same numbers, --log none imports neither, and curves.py
draws every run.

    python -m pytest -q test_watch.py
"""
import dataclasses
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import ENV, HERE, K, biased, make_gap, torchrun, write_jsonl
from data import DataSpec, GAPDataset, collate

MAX_LEN = 200


def config(world, tmp_path, **kw):
    import train
    base = dict(model=world["model"], data=world["data"], target_cache=str(world["root"] / "cache"), latent_tokens=K,
                adapter_dim=16, lr=1e-3, head_lr=2e-3, global_batch=4, micro_batch=2, max_len=MAX_LEN, num_workers=0,
                log_every=1, warmup_ratio=0.3, out_dir=str(tmp_path / "gap"))
    return train.TrainConfig(**dict(base, **kw))


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_metrics_lines_are_the_numbers_the_step_computed(world, tmp_path, capsys):
    """One line per step (in the checkpoint, copied from OUT_DIR.logs) with its losses (the ones main returns), the
    learning rates the step used (warmup, then cosine), the gradient norm before clipping (computed here from the
    gradients themselves), and tokens / latent slots per second that multiply back to the step's own counts; the log
    line prints the same numbers."""
    import train
    from step import lr_factor
    cfg = config(world, tmp_path, max_steps=3, grad_clip=0.5)
    norms = []

    def grad_norm(gap):  # before clipping: the step calls this first
        grads = [p.grad.double() for p in gap.parameters() if p.grad is not None]
        norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads)))
    losses = train.main(cfg, on_grads=grad_norm)["losses"]
    out = capsys.readouterr().out
    recs = lines(tmp_path / "gap" / "metrics.jsonl")
    assert recs == lines(tmp_path / "gap.logs" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3]
    # the examples of each step, as training draws and encodes them: its real tokens and latent slots
    g, tokenizer, image_processor = make_gap(world)
    ds = GAPDataset(world["data"], tokenizer, image_processor, g.latent_ids, DataSpec(K, 0.0, MAX_LEN, 0, 0),
                    world["cache"])
    sampler = train.StepSampler(len(ds), 4, 0, 1, cfg.seed, 0, 3)
    for r, (lm, latent), norm, idx in zip(recs, losses, norms, sampler):
        s = r["step"]
        assert (r["loss_lm"], r["loss_latent"]) == (lm, latent)
        assert r["grad_norm"] == pytest.approx(norm, rel=1e-5) and norm > cfg.grad_clip  # clipping was on
        assert r["lr"] == pytest.approx(cfg.lr * lr_factor(s - 1, 3, cfg.warmup_ratio), rel=1e-12)
        assert r["lr_head"] == pytest.approx(cfg.head_lr * lr_factor(s - 1, 3, cfg.warmup_ratio), rel=1e-12)
        assert r["epoch"] == s / (len(ds) // 4)
        items = [ds[i] for i in idx]
        assert r["tokens_per_s"] * r["step_s"] == pytest.approx(sum(len(it["input_ids"]) for it in items), rel=1e-9)
        assert r["latent_slots_per_s"] * r["step_s"] == pytest.approx(
            sum(int((it["input_ids"] == g.pad_id).sum()) for it in items), rel=1e-9)
        assert r["peak_mem_gib"] > 0 and r["wall_s"] > 0
        assert f"step {s}/3 | loss_lm {lm:.4f} | loss_latent {latent:.4f} | lr {r['lr']:.2e}" in out
    assert recs[0]["wall_s"] < recs[1]["wall_s"] < recs[2]["wall_s"]


def test_validation_equals_an_independent_teacher_forced_computation(world):
    """validate.Validation on 5 examples in padded micro-batches of 2 gives, from sums over the whole set, what
    one example at a time through the stock model's logits and the head gives: the LM and latent losses, the
    cosine and PCA-space RelMSE of the predicted latents, and the latent / vision-embedding norms."""
    from validate import Validation
    g, tokenizer, image_processor = make_gap(world)
    basis = world["basis"]
    ds = GAPDataset(world["data"], tokenizer, image_processor, g.latent_ids, DataSpec(K, 0.0, MAX_LEN, 0, 0),
                    world["cache"])
    ds.rows = ds.rows[:5]
    got = Validation(ds, tokenizer, image_processor, basis, micro_batch=2, n_generate=0)(g, torch.device("cpu"))
    s = dict(lm=0.0, n_lm=0, se=0.0, n_slots=0, cos=0.0, pca_err=0.0, pca_var=0.0, pred=0.0, vision=0.0, n_vision=0)
    P, mu = basis["P"].double(), basis["mu"].double()
    with torch.no_grad():
        for i in range(5):
            b = collate([ds[i]], tokenizer.pad_token_id)
            ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
            embeds = g.embed(ids, b["pixel_values"], b["image_grid_thw"], b["latent_targets"])
            pos = g.position_ids(ids, mask, b["image_grid_thw"])
            out = g.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, output_hidden_states=True)
            nxt = ids[0, 1:]
            lm = (labels[0, 1:] != -100) & (nxt != g.pad_id) & (nxt != g.end_id)  # what the loop writes has no LM loss
            s["lm"] += F.cross_entropy(out.logits[0, :-1][lm].double(), labels[0, 1:][lm], reduction="sum").item()
            s["n_lm"] += int(lm.sum())
            h_bar = out.hidden_states[-1][0, :-1][nxt == g.pad_id]  # the final-norm state before each slot
            v, t = g.head(h_bar).double(), b["latent_targets"].double()
            s["se"] += (v - t).pow(2).mean(-1).sum().item()
            s["n_slots"] += len(t)
            s["cos"] += F.cosine_similarity(v, t, dim=-1).sum().item()
            s["pca_err"] += ((v - t) @ P).pow(2).sum().item()
            s["pca_var"] += ((t - mu) @ P).pow(2).sum().item()
            s["pred"] += v.norm(dim=-1).sum().item()
            vision = embeds[0][ids[0] == g.image_token_id].double()
            s["vision"] += vision.norm(dim=-1).sum().item()
            s["n_vision"] += len(vision)
    want = dict(val_loss_lm=s["lm"] / s["n_lm"], val_loss_latent=s["se"] / s["n_slots"],
                val_latent_cos=s["cos"] / s["n_slots"], val_latent_relmse=s["pca_err"] / s["pca_var"],
                val_latent_norm=s["pred"] / s["n_slots"], val_vision_norm=s["vision"] / s["n_vision"])
    want["val_norm_ratio"] = want["val_latent_norm"] / want["val_vision_norm"]
    for k, v in want.items():  # fp32 sums in another order: ~1e-7 apart
        assert got[k] == pytest.approx(v, rel=1e-6), k


def test_validation_generation_rates(world):
    """The greedy answers' rates: with <|latent_start|> made certain, every answer opens a span (and the random
    model writes no <answer> tag); without the bias, none does."""
    from validate import Validation
    g, tokenizer, image_processor = make_gap(world)
    ds = GAPDataset(world["data"], tokenizer, image_processor, g.latent_ids, DataSpec(K, 0.0, MAX_LEN, 0, 0),
                    world["cache"])
    ds.rows = ds.rows[:3]
    v = Validation(ds, tokenizer, image_processor, None, micro_batch=2, n_generate=3, max_new_tokens=8)
    with biased(g.backbone, g.start_id, 1e4):
        opened = v.generation(g, torch.device("cpu"))
    plain = v.generation(g, torch.device("cpu"))
    assert opened["val_span_open"] == 1.0 and plain["val_span_open"] == 0.0
    assert opened["val_well_formed"] == plain["val_well_formed"] == 0.0 and opened["val_accuracy"] == 0.0


def test_resume_after_a_kill_leaves_one_line_per_step(world, tmp_path):
    """6 steps, state saved every 2, validation at steps 0, 3 and 6; the run dies in step 6 (after step 5's line,
    saved state: step 4) with a line torn mid-write; the same command resumes from step 4: the file then holds
    steps 0..6 once each, step 5's numbers those of the killed run (resuming is exact), and the exported
    checkpoint holds it."""
    import train
    cfg = config(world, tmp_path, epochs=2, save_every=2, eval_data=world["data"], eval_every=3, eval_generate=0)
    path = tmp_path / "gap.logs" / "metrics.jsonl"  # while training (OUT_DIR is replaced whole by the export)
    calls = []

    def die_in_step_6(gap):
        calls.append(1)
        if len(calls) == 6:
            with open(path, "a") as f:
                f.write('{"step": 6, "loss_l')  # a line a kill tore
            raise KeyboardInterrupt("killed")
    with pytest.raises(KeyboardInterrupt):
        train.main(cfg, on_grads=die_in_step_6)
    with open(path) as f:
        killed = [json.loads(line) for line in f.read().splitlines()[:-1]]
    assert [r["step"] for r in killed] == [0, 1, 2, 3, 4, 5] and not (tmp_path / "gap").exists()
    train.main(cfg)
    recs = lines(tmp_path / "gap" / "metrics.jsonl")
    assert recs == lines(path)
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in recs if "val_loss_lm" in r] == [0, 3, 6]
    assert recs[:5] == killed[:5]  # the lines up to the saved state, as they were
    assert (recs[5]["loss_lm"], recs[5]["loss_latent"]) == (killed[5]["loss_lm"], killed[5]["loss_latent"])
    assert recs[5]["wall_s"] > killed[4]["wall_s"]  # the clock goes on from the kept lines


def test_two_ranks_log_the_numbers_of_one_process(world, tmp_path):
    """torchrun, 2 ranks (DDP): rank 0's metrics.jsonl holds the one-process run's numbers -- losses, gradient norm,
    and the validation sharded over the ranks (7 held-out examples: 4 and 3; greedy answers of 3: 2 and 1)."""
    import train
    rows = [json.loads(line) for line in open(world["data"])][:7]
    os.symlink(os.path.join(os.path.dirname(world["data"]), "img"), tmp_path / "img")
    held = write_jsonl(tmp_path / "held.jsonl", rows)
    flags = dict(max_steps=2, micro_batch=1, eval_data=held, eval_every=2, eval_generate=3, eval_max_new_tokens=6)
    train.main(config(world, tmp_path, **flags))
    args = [f"--{k}={v}" for k, v in dataclasses.asdict(config(world, tmp_path, **flags)).items()
            if v != getattr(train.TrainConfig, k) and k != "out_dir"]
    torchrun(["train.py", *args, "--out_dir", tmp_path / "two"])
    one, two = lines(tmp_path / "gap" / "metrics.jsonl"), lines(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [0, 1, 2] == [r["step"] for r in one]
    for a, b in zip(one, two):
        for k in a:
            if k.startswith(("loss_", "grad_norm", "val_")) and k not in ("val_s", "val_share"):
                assert b[k] == pytest.approx(a[k], rel=1e-5), (a["step"], k)
        assert b["val_generated"] == 3 if b["step"] != 1 else "val_loss_lm" not in b


def test_tensorboard_gets_the_same_scalars(world, tmp_path):
    """--log tensorboard: the event files (OUT_DIR.logs/tb, copied into the checkpoint) hold every number of every
    metrics.jsonl line at its step, under the same name."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import train
    train.main(config(world, tmp_path, max_steps=2, log="tensorboard", eval_data=world["data"], eval_every=2,
                      eval_generate=2, eval_max_new_tokens=4))
    recs = lines(tmp_path / "gap" / "metrics.jsonl")
    acc = EventAccumulator(str(tmp_path / "gap" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    events = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    want = {}
    for r in recs:
        for k, v in r.items():
            if k not in ("step", "time"):
                want.setdefault(k, {})[r["step"]] = v
    assert events.keys() == want.keys() and "val_latent_cos" in want
    for k in want:
        assert events[k].keys() == want[k].keys(), k
        for step, v in want[k].items():
            assert events[k][step] == pytest.approx(v, rel=1e-6, abs=1e-30), (k, step)  # stored as float32


def test_wandb_gets_the_same_numbers(world, tmp_path, monkeypatch):
    """--log wandb, through W&B's interface (a recording stand-in for the wandb module): one run in OUT_DIR with
    the run's flags as its config, each metrics.jsonl line logged at its step, finished at the end."""
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()
    fake = types.SimpleNamespace(init=init)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    import train
    train.main(config(world, tmp_path, max_steps=2, log="wandb"))
    recs = lines(tmp_path / "gap" / "metrics.jsonl")
    init_kw = calls[0][1]
    assert calls[0][0] == "init" and init_kw["dir"] == str(tmp_path / "gap.logs") and init_kw["resume"] == "allow"
    assert (tmp_path / "gap" / "wandb" / "run_id").read_text().strip() == init_kw["id"]  # a resumed run takes it
    assert init_kw["config"]["max_steps"] == 2
    assert calls[1:] == [("log", r["step"], {k: v for k, v in r.items() if k not in ("step", "time")})
                         for r in recs] + [("finish",)]


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_a_logger_that_is_not_installed_is_named_before_any_work(monkeypatch, kind):
    import importlib.util
    from common import DataError
    from metrics import require_logger
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.delitem(sys.modules, kind, raising=False)  # an earlier test may have imported it
    with pytest.raises(DataError, match=f"--log {kind}: the {kind} package is not installed"):
        require_logger(kind)
    require_logger("none")


def test_nothing_is_imported_with_log_none(world, tmp_path):
    """A run with the default --log none imports neither TensorBoard nor W&B (nor torch's writer for it)."""
    code = f"""
import sys, train
train.main(train.TrainConfig(model={world['model']!r}, data={world['data']!r},
    target_cache={str(world['root'] / 'cache')!r}, latent_tokens={K}, adapter_dim=16, global_batch=4, max_steps=1,
    num_workers=0, max_len={MAX_LEN}, out_dir={str(tmp_path / 'gap')!r}))
print("imported:", sorted(m for m in sys.modules if m.split(".")[0] in ("tensorboard", "wandb")
                          or m.startswith("torch.utils.tensorboard")))
"""
    env = dict(ENV, PYTHONPATH=os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p))
    p = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "imported: []" in p.stdout, p.stdout[-2000:]


def synthetic(path, n, scale, torn=False):
    """A metrics file of n steps (validation every 5), its last line torn when asked."""
    text = "".join(json.dumps(dict(step=s, loss_lm=scale / s, loss_latent=0.1 * scale / s, lr=1e-3)) + "\n"
                   + (json.dumps(dict(step=s, val_loss_lm=scale / s + 0.1)) + "\n" if s % 5 == 0 else "")
                   for s in range(1, n + 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + ('{"step": ' if torn else ""))
    return path


def test_curves_draws_every_run(tmp_path):
    """Two runs (one still training: a torn last line) in one PNG, each in its colour, a panel per number the runs
    have; a damaged line is named with its file and line."""
    from PIL import Image
    import curves
    from common import DataError
    synthetic(tmp_path / "a" / "metrics.jsonl", 20, 5.0)
    synthetic(tmp_path / "b" / "metrics.jsonl", 12, 3.0, torn=True)
    cfg = curves.CurvesConfig(runs=(str(tmp_path / "a"), str(tmp_path / "b" / "metrics.jsonl")),
                              out=str(tmp_path / "c.png"))
    curves.main(cfg)
    img = Image.open(tmp_path / "c.png").convert("RGB")
    assert img.size == (3 * curves.PANEL_W, 24 + 32 + 2 * curves.PANEL_H)  # 4 panels: loss_lm, val, latent, lr
    panels = img.crop((0, 24 + 32, img.width, img.height))  # below the legend
    colours = {c for _, c in panels.getcolors(maxcolors=1 << 20)}
    assert set(curves.COLORS[:2]) <= colours and curves.COLORS[2] not in colours
    bad = synthetic(tmp_path / "bad" / "metrics.jsonl", 3, 1.0)
    bad.write_text(bad.read_text().replace("\n", "\nnot json\n", 1))
    with pytest.raises(DataError, match=r"bad/metrics.jsonl:2: not a metrics line"):
        curves.main(curves.CurvesConfig(runs=(str(tmp_path / "bad"),), out=str(tmp_path / "d.png")))
