"""Tests of the inference paths of latent_loop.py on the tiny random Qwen2.5-VL of conftest.py: the LM head runs
only on rows that sample text, continuous batching gives every prompt the tokens of static batching and the
logits of its solo run (refilled rows included), the compiled step and the eager attention mask give the
tokens and logits of the default path.

    python -m pytest -q test_loop.py

The cached loop == uncached recompute anchor (test_gap.py) runs on the same preallocated cache.
"""
import pytest
import torch

import latent_loop
from conftest import biased, prompts

QUESTIONS = ["How many red circles are there?", "How many?", "Count the blue circles.", "How many green ones?",
             "Are there yellow circles?", "What is left of the circle?"]
STOP = 400  # a token the random model emits greedily in some answers, at different steps: rows end unevenly
LIMITS = [16, 16, 16, 12, 5, 14]  # per-prompt max_new_tokens: more uneven ends


def loop_args(g):
    return g.backbone, g.head, g.latent_ids, g.latent_tokens


@pytest.fixture(scope="module")
def mix(world, gap):
    """The prompts (prompt 2 ends in <|latent_start|>: a latent span), one by one as continuous_steps takes them,
    and each one's solo run through latent_steps (tokens and logits per step)."""
    g, tokenizer, image_processor = gap
    batch = prompts(world, tokenizer, image_processor, QUESTIONS, (2,))
    items = []
    for i in range(len(QUESTIONS)):
        real = batch["attention_mask"][i].bool()
        grid = batch["image_grid_thw"][i:i + 1]
        first = int(batch["image_grid_thw"][:i].prod(-1).sum())  # pixel rows of the earlier images
        items.append(dict(input_ids=batch["input_ids"][i][real], image_grid_thw=grid, max_new_tokens=LIMITS[i],
                          pixel_values=batch["pixel_values"][first:first + int(grid.prod())]))
    solo = []
    for it in items:
        ids = it["input_ids"][None]  # (1, T)
        steps = list(latent_loop.latent_steps(*loop_args(g), ids, torch.ones_like(ids), it["pixel_values"],
                                              it["image_grid_thw"], max_new_tokens=it["max_new_tokens"],
                                              stop_ids=[STOP], logits=True))
        solo.append(dict(tokens=torch.stack([s.token[0] for s in steps]),
                         logits=torch.stack([s.logits[0] for s in steps])))
    return dict(batch=batch, items=items, solo=solo)


def lm_head_rows(g, *args, **kw):
    """The steps of latent_steps and the number of rows the LM head ran on at each of its calls."""
    seen = []
    hook = g.backbone.lm_head.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    try:
        steps = list(latent_loop.latent_steps(*loop_args(g), *args, logits=True, **kw))
    finally:
        hook.remove()
    return steps, seen


def test_lm_head_runs_where_a_row_may_sample(world, gap, mix):
    """Greedy, rows inside a latent span, closing one, or done get NaN logits, text rows real ones; the LM head
    runs at no step where the host knows that no row samples (batch 1 inside a span: K + 1 steps without it).
    Sampling runs it on exactly the rows that sample text, no more."""
    g = gap[0]
    b = mix["batch"]
    args = (b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"])
    steps, _ = lm_head_rows(g, *args, max_new_tokens=16, stop_ids=[STOP])
    text = [int(((s.slot == latent_loop.TEXT) & (s.token != latent_loop.DONE)).sum()) for s in steps]
    assert sum(text) < len(steps) * len(QUESTIONS), "the run must have latent and done rows to mean anything"
    for s in steps:
        sampled = (s.slot == latent_loop.TEXT) & (s.token != latent_loop.DONE)
        assert torch.isnan(s.logits[~sampled]).all() and not torch.isnan(s.logits[sampled]).any()
    one = [x[2:3] for x in args[:2]] + [mix["items"][2]["pixel_values"], mix["items"][2]["image_grid_thw"]]
    steps, seen = lm_head_rows(g, *one, max_new_tokens=g.latent_tokens + 4)  # prompt 2 opens with a span
    assert [int(s.slot[0]) for s in steps[:g.latent_tokens + 1]] == list(range(g.latent_tokens + 1))
    assert seen == [1] * (len(steps) - g.latent_tokens - 1)
    steps, seen = lm_head_rows(g, *args, max_new_tokens=16, temperature=1.0,
                               generator=torch.Generator().manual_seed(0))
    text = [int((s.slot == latent_loop.TEXT).sum()) for s in steps]
    assert min(text) < len(QUESTIONS) and seen == [n for n in text if n]


def test_continuous_batching_equals_static_batching(gap, mix):
    """Two rows through six prompts of uneven lengths: every prompt's tokens are its row of one static batch
    (greedy), cut at its stop id or its own max_new_tokens."""
    g = gap[0]
    b = mix["batch"]
    static = latent_loop.generate(*loop_args(g), b["input_ids"], b["attention_mask"], b["pixel_values"],
                                  b["image_grid_thw"], max_new_tokens=max(LIMITS), stop_ids=[STOP])
    out = dict(latent_loop.generate_continuous(*loop_args(g), mix["items"], 2, stop_ids=[STOP]))
    assert sorted(out) == list(range(len(QUESTIONS)))
    ends = set()
    for i, tokens in out.items():
        n = len(tokens)
        assert torch.equal(tokens, static[i, :n]), f"prompt {i}"
        stopped = int(tokens[-1]) == STOP
        assert stopped or n == LIMITS[i], f"prompt {i} ended early"
        assert (static[i, n:] == latent_loop.DONE).all() or not stopped
        ends.add(n)
    assert len(ends) >= 4, "answers of uneven lengths: rows must be refilled at different steps"


def test_refilled_rows_equal_solo_generation(gap, mix):
    """Every prompt, whichever row takes it and whatever the other row is doing then, gets the logits (1e-5)
    and the tokens of its solo run, then DONE until the read that finds it stopped; prompts 2..5 go into rows that
    held an earlier prompt (the refill path)."""
    g = gap[0]
    per_prompt = {}
    rows_of = {}
    for step, prompt in latent_loop.continuous_steps(*loop_args(g), mix["items"], 2, stop_ids=[STOP],
                                                             logits=True):
        for r, i in enumerate(prompt.tolist()):
            if i >= 0:
                per_prompt.setdefault(i, []).append((step.token[r], step.logits[r]))
                rows_of.setdefault(i, set()).add(r)
    assert all(len(rows_of[i]) == 1 for i in rows_of)
    assert len(per_prompt) == len(QUESTIONS)
    for i, solo in enumerate(mix["solo"]):
        n = len(solo["tokens"])  # a row that stopped records DONE until the next read of the rows' state
        tokens = torch.stack([t for t, _ in per_prompt[i]])
        assert len(tokens) < n + latent_loop.Sampling().sync_every and (tokens[n:] == latent_loop.DONE).all()
        tokens, logits = tokens[:n], torch.stack([lg for _, lg in per_prompt[i][:n]])
        assert torch.equal(tokens, solo["tokens"]), f"prompt {i}"
        assert torch.equal(torch.isnan(logits), torch.isnan(solo["logits"])), f"prompt {i}: text steps differ"
        torch.testing.assert_close(logits, solo["logits"], atol=1e-5, rtol=1e-5, equal_nan=True)


def test_compiled_step_equals_eager(gap, mix, monkeypatch):
    """compile_step (a static cache: attention over every column, guards skipped after the first step) gives
    the eager loop's tokens and logits, the step traced as one graph (fullgraph: no host read, no graph break).
    Traced by dynamo with the eager backend: the same graph, no C++ build."""
    g = gap[0]
    b = mix["batch"]
    monkeypatch.setitem(latent_loop.COMPILED, None, torch.compile(latent_loop.decode_step, backend="eager",
                                                                         fullgraph=True))
    args = (*loop_args(g), b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"])
    eager = list(latent_loop.latent_steps(*args, max_new_tokens=12, logits=True))
    compiled = list(latent_loop.latent_steps(*args, max_new_tokens=12, compile_step=True, logits=True))
    assert torch.equal(torch.stack([s.token for s in eager]), torch.stack([s.token for s in compiled]))
    torch.testing.assert_close(torch.stack([s.logits for s in compiled]), torch.stack([s.logits for s in eager]),
                               atol=1e-5, rtol=1e-5, equal_nan=True)
    out = dict(latent_loop.generate_continuous(*loop_args(g), mix["items"], 2, stop_ids=[STOP], compile_step=True))
    for i, solo in enumerate(mix["solo"]):
        assert torch.equal(out[i], solo["tokens"][solo["tokens"] != latent_loop.DONE]), f"prompt {i}"


def test_eager_attention_mask_equals_sdpa(gap, mix):
    """The additive mask the loop builds for eager attention gives the logits of the boolean sdpa mask."""
    g = gap[0]
    b = mix["batch"]
    args = (*loop_args(g), b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"])
    sdpa = torch.stack([s.logits for s in latent_loop.latent_steps(*args, max_new_tokens=8, logits=True)])
    g.backbone.set_attn_implementation("eager")
    try:
        eager = torch.stack([s.logits for s in latent_loop.latent_steps(*args, max_new_tokens=8, logits=True)])
    finally:
        g.backbone.set_attn_implementation("sdpa")
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_bench_infer_mode_runs():
    """bench_infer.py --mode infer at toy sizes: every measurement is there and positive, and its eval mix (uneven
    answer lengths, every answer opening a latent span) comes out identical from static and continuous batching."""
    import bench_infer
    rows = bench_infer.main(bench_infer.BenchConfig(mode="infer", hidden=32, context=24, latent_tokens=4, rows=2, eval_prompts=5,
                                        median_new=6, new_tokens=4, repeats=1))
    by = {r["name"]: r for r in rows}
    assert {"latent step / text step", "recompute / cached, 4 latents", "decode step ms, batch 2",
            "eval samples/s, continuous / static"} <= set(by)
    assert all(r["value"] > 0 for r in rows if not r["name"].startswith("host reads"))
    assert by["host reads per step, static, batch 1, zero latents, no stop ids"]["value"] == 0
    mix = by["eval samples/s, continuous / static"]
    assert mix["identical_outputs"] and mix["max_new"] > mix["median_new"]


def test_per_row_generators_sample_the_same_in_any_schedule(gap, mix):
    """With one generator per row (static) or per job (continuous), sampling with noise latents gives every
    sample the same tokens in one static batch (2 samples per prompt, a shared prefill) and in 5 continuous rows
    (each prompt prefilled once, its second sample's row copying the prompt from the first's), cut at each
    prompt's own max_new_tokens; the two samples of a prompt differ."""
    g = gap[0]
    b = mix["batch"]
    seeds = range(2 * len(QUESTIONS))  # job / row i*2 + j: sample j of prompt i
    kw = dict(temperature=1.0, latent_mode="noise", num_samples=2, stop_ids=[STOP])
    static = latent_loop.generate(*loop_args(g), b["input_ids"], b["attention_mask"], b["pixel_values"],
                                  b["image_grid_thw"], max_new_tokens=max(LIMITS),
                                  generator=[torch.Generator().manual_seed(s) for s in seeds], **kw)
    rows_of = {}
    out = {}
    for step, job in latent_loop.continuous_steps(*loop_args(g), mix["items"], 5,
                                                  generator=[torch.Generator().manual_seed(s) for s in seeds], **kw):
        for r, i in enumerate(job.tolist()):
            if i >= 0:
                out.setdefault(i, []).append(int(step.token[r]))
                rows_of.setdefault(i, r)
    assert sorted(out) == list(seeds)
    assert any(rows_of[i] != rows_of[i - 1] for i in range(3, len(seeds), 2)), "no refill copied a prompt"
    for i, tokens in out.items():
        assert tokens == static[i, :len(tokens)].tolist(), f"job {i}"
        assert len(tokens) == LIMITS[i // 2] or tokens[-1] == STOP
    for i in range(len(QUESTIONS)):
        assert out[2 * i] != out[2 * i + 1], f"the samples of prompt {i} are the same"


def test_given_latents_are_fed_slot_by_slot(world, gap, mix):
    """latent_mode given (the shuffled and oracle controls of toy.py): feeding back the latents model mode fed
    gives model mode's tokens; other latents are fed exactly, slot k of a span getting given[b, k]."""
    g = gap[0]
    b = mix["batch"]
    args = (*loop_args(g), b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"])
    K = g.latent_tokens
    own = list(latent_loop.latent_steps(*args, max_new_tokens=16, stop_ids=[STOP]))
    span = [s for s in own if s.fed is not None and 0 <= int(s.slot[2]) < K]  # prompt 2 opens with a span
    assert len(span) >= K
    given = torch.randn(len(QUESTIONS), K, g.backbone.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    given[2] = torch.stack([s.fed[2] for s in span[:K]])
    again = list(latent_loop.latent_steps(*args, max_new_tokens=16, stop_ids=[STOP], latent_mode="given", given=given))
    assert torch.equal(torch.stack([s.token for s in again]), torch.stack([s.token for s in own]))
    other = given.clone()
    other[2] = torch.randn(K, other.shape[-1], generator=torch.Generator().manual_seed(1)) * 10
    steps = list(latent_loop.latent_steps(*args, max_new_tokens=16, stop_ids=[STOP], latent_mode="given", given=other))
    fed = [s.fed[2] for s in steps if s.fed is not None and 0 <= int(s.slot[2]) < K][:K]
    torch.testing.assert_close(torch.stack(fed), other[2])
    with pytest.raises(ValueError, match="given"):
        list(latent_loop.latent_steps(*args, max_new_tokens=4, latent_mode="given"))
    for wrong in (given[:, :1], given[..., :-1]):  # K or D off
        with pytest.raises(ValueError, match="given latents"):
            list(latent_loop.latent_steps(*args, max_new_tokens=4, latent_mode="given", given=wrong))
    with pytest.raises(ValueError, match="norm_calib"):
        list(latent_loop.latent_steps(*args, max_new_tokens=4, latent_mode="given", given=given, norm_calib="ema"))


def counted(fn):
    """fn()'s result and the host's reads of device values while it ran (bench_infer.HostReads)."""
    from bench_infer import HostReads
    with HostReads() as reads:
        out = fn()
    return out, reads.n


def test_static_decode_reads_the_host_only_at_checks(gap, mix):
    """Greedy static decoding reads the device's values once per check, every sync_every steps, and not in the
    steps between (8 more steps: 2 more reads at sync_every 4); zero latents without stop ids never read (nothing
    can change unseen). One `.item()` planted in choose() or feed() makes it 8 more."""
    g = gap[0]
    b = mix["batch"]
    args = (*loop_args(g), b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"])
    never = [g.latent_ids["end"]]  # a stop id no text row can sample (banned): the checks run, no row stops

    def reads(n, **kw):
        return counted(lambda: list(latent_loop.latent_steps(*args, max_new_tokens=n, **kw)))[1]
    assert reads(17, stop_ids=never, sync_every=4) - reads(9, stop_ids=never, sync_every=4) == 2
    assert reads(17, latent_mode="zero") == reads(9, latent_mode="zero")


def test_continuous_decode_reads_the_host_only_where_a_row_may_have_stopped(gap, mix):
    """Continuous batching reads nothing at a step without a refill, but once at each check (every sync_every
    steps) where a row may have stopped; a refill (prefill of the next prompt) only where a row finished."""
    g = gap[0]
    marks, jobs = [], []

    def run():
        from bench_infer import HostReads
        with HostReads() as reads:
            for _, job in latent_loop.continuous_steps(*loop_args(g), mix["items"], 2, stop_ids=[STOP], sync_every=4):
                marks.append(reads.n)
                jobs.append(job.clone())
    run()
    quiet = [i for i in range(1, len(jobs)) if torch.equal(jobs[i], jobs[i - 1])]  # no row took a new job
    assert len(quiet) > 20
    for i in quiet:
        assert marks[i] - marks[i - 1] == (1 if i % 4 == 0 else 0), f"step {i}"


@pytest.mark.parametrize("kw", [dict(), dict(temperature=1.0, latent_mode="noise")], ids=["greedy", "sampled"])
def test_sync_every_changes_no_result(world, gap, mix, kw):
    """Reading the rows' state every step or every 5 steps gives the same steps -- tokens, logits, fed vectors,
    positions -- in static batches (rows stopping and opening spans at different steps: <|latent_start|> made a
    little likelier) and the same jobs' tokens in continuous batching, greedy and sampled with one generator per
    row."""
    g, tokenizer, image_processor = gap
    b = prompts(world, tokenizer, image_processor, QUESTIONS[:4], (2,))  # rows that stop within 16 steps
    args = (*loop_args(g), b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"])
    runs, out = {}, {}
    with biased(g.backbone, g.start_id, 0.4):
        for every in (1, 5):
            gens = dict(generator=[torch.Generator().manual_seed(i) for i in range(4)]) if kw else {}
            runs[every] = list(latent_loop.latent_steps(*args, max_new_tokens=16, stop_ids=[STOP], sync_every=every,
                                                        logits=True, **gens, **kw))
            gens = dict(generator=[torch.Generator().manual_seed(i) for i in range(len(QUESTIONS))]) if kw else {}
            out[every] = dict(latent_loop.generate_continuous(*loop_args(g), mix["items"], 2, stop_ids=[STOP],
                                                              sync_every=every, **gens, **kw))
    tokens = torch.stack([s.token for s in runs[5]], 1)  # (R, S)
    ended = ((tokens == STOP) | (tokens == latent_loop.DONE)).cummax(1).values.all(0)  # (S,) every row has stopped
    assert len(runs[1]) == len(runs[5]) == (int(ended.int().argmax()) + 1 if ended.any() else 16)
    assert kw or len(runs[5]) < 16, "the rows must all stop, at a step the checks must find"
    if not kw:  # what the reads tell apart
        assert any((s.token == latent_loop.DONE).any() for s in runs[1]), "no row stopped"
        assert any((s.token == g.start_id).any() for s in runs[1][1:]), "no span opened during the run"
    for one, five in zip(runs[1], runs[5]):
        for name in ("token", "logits", "slot", "fed", "position"):
            a, z = getattr(one, name), getattr(five, name)
            assert (a is None and z is None) or torch.equal(a.nan_to_num(), z.nan_to_num()), name
    assert sorted(out[1]) == sorted(out[5]) == list(range(len(QUESTIONS)))
    assert all(torch.equal(out[1][i], out[5][i]) for i in out[1])


def test_no_square_mask_and_no_logits_unless_needed(gap, mix):
    """An unpadded prompt's prefill builds no (T, T) mask (sdpa's causal path needs none), a left-padded batch
    does; without logits=True no step fills an (R, V) logits tensor with NaN."""
    from torch.utils._python_dispatch import TorchDispatchMode
    g = gap[0]
    b = mix["batch"]

    class Made(TorchDispatchMode):  # the sides of the square bool tensors, and the fills with NaN
        def __init__(self):
            super().__init__()
            self.square, self.nan = set(), 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.bool and out.ndim >= 2:
                self.square.add(out.shape[-1] if out.shape[-1] == out.shape[-2] else 0)
            nan = any(isinstance(a, float) and a != a for a in args)
            self.nan += nan and ("fill" in str(func) or "full" in str(func))
            return out

    def made(ids, mask, pv, grid, **kw):
        with Made() as m:
            list(latent_loop.latent_steps(*loop_args(g), ids, mask, pv, grid, max_new_tokens=12, **kw))
        return m

    it = mix["items"][2]  # opens a span: latent steps
    one = it["input_ids"][None]
    m = made(one, torch.ones_like(one), it["pixel_values"], it["image_grid_thw"])
    assert one.shape[1] not in m.square and m.nan == 0
    m = made(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"], logits=True)
    assert b["input_ids"].shape[1] in m.square and m.nan > 0
