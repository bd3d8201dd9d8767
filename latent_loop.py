"""The KV-cached latent loop of GAP (paper section 4.2 eq. 1, appendix F "EMA norm calibration", the latent
interventions of section 5.4 / table 6), as plain functions over a stock transformers
`Qwen2_5_VLForConditionalGeneration`, a latent head (any callable h_bar (N, D) -> v (N, D)) and the three
latent token ids. It imports only torch and latent_head.py: copy the two files into another codebase as they are.

    from latent_loop import generate, decode
    ids = dict(start=tok.convert_tokens_to_ids("<|latent_start|>"), pad=..., end=...)
    tokens = generate(model, head, ids, 36, input_ids, attention_mask, pixel_values, image_grid_thw)
    print(decode(tokenizer, tokens[0], ids))

How a batch is generated (`latent_steps`, top to bottom):
  1. Prefill: the left-padded prompts (query-image features scattered into the <|image_pad|> positions) run
     once with explicit M-RoPE positions; their keys/values go into a cache allocated once for the whole answer
     (KVCache: each row writes its next column at its own length, no per-step growth). With num_samples = N
     each prompt's cache is written into N rows (row b*N + j is sample j of prompt b).
  2. Each step every row is in one of three states, held in RowState.slot (R,) (RowState: the rows' decode state
     as device tensors, advanced by choose() and advance(), the same two functions in both schedules):
       TEXT (-1)    sample a token from the LM head; <|latent_start|> moves the row to slot 0;
       0 .. K-1     inside a latent span: record <|latent_pad|> and feed v = head(h_bar of the previous step)
                    (the state one position earlier, exactly as in training), then slot + 1;
       K            the span is full: record and feed <|latent_end|>, back to TEXT.
     A row that samples a stop id in TEXT is done; later tokens are DONE (-100).
  3. The fed embeddings of all rows go through the decoder as one new column of the cache, each at its row's
     next text position (latent slots are text positions: the same id on the three M-RoPE axes).
  4. A step never waits on the device: the host reads the rows' state (Known) only at a check, every
     `sync_every` steps, where a row may have stopped or opened a span since the last one. Between two checks
     the LM head and the latent head run where some row may need them, on every row, and each row keeps its own
     (torch.where); the checks find the step at which every row was done, so the steps are those of a check
     at every step. Sampling (temperature > 0, noise latents) reads every step: each row draws for itself only.
`latent_steps` is a generator that yields a `Step` per step (tokens, fed vectors, positions; the logits with
logits=True), so tests and tools read what the loop did without flags inside it; `generate` keeps the tokens.
The decoding settings (max_new_tokens, temperature, top_p, latent_mode, norm_calib, ema_beta, num_samples,
stop_ids, sync_every) are one `Sampling` object, or the same names as keywords.

Continuous batching (`continuous_steps`, `generate_continuous`): the same steps over a list of prompts in a
fixed number of rows; a row that finishes takes the next prompt (prefilled alone into that row of the cache)
while the others go on, so a long answer no longer holds a whole batch. Each prompt gets what latent_steps
gives it alone. `compile_step=True` runs the decoder step through torch.compile (README "Inference speed").

Sampling (temperature > 0, noise latents) draws from `generator`: one torch.Generator shared by all rows (the
draws of a row then depend on what the other rows do), or a list with one generator per row (latent_steps) or
per prompt-sample (continuous_steps), each row drawing from its own only; then a row's sampled tokens do not
depend on the batch it is in, and static and continuous batching sample the same answers.
"""
from dataclasses import dataclass, fields, replace

import torch

from latent_head import calibrate, ema_norm

DONE = -100  # the token recorded for a row after its stop token
TEXT = -1  # slot of a row that samples text
MODES = ("model", "zero", "noise", "given")  # latent feedback: the head's latents | span banned | Gaussian PCA
#                                              latents | the caller's (latent_steps' `given`: shuffled, oracle)


# ----------------------------------------------------------------------------------------------------------
# inputs of the stock model: embeddings and M-RoPE positions (shared with the training forward)

def embed_inputs(model, input_ids, pixel_values=None, image_grid_thw=None, latent_pad_id=None, latent_vectors=None):
    """Input embeddings (B, T, D): token embeddings, query-image features scattered into <|image_pad|> positions
    and, when given, `latent_vectors` (N, D) scattered in order into the <|latent_pad|> positions (training:
    the targets). The vision tower builds no graph when it is frozen."""
    embeds = model.get_input_embeddings()(input_ids)  # (B, T, D)
    image_mask = input_ids == model.config.image_token_id
    n_image = int(image_mask.sum())
    if n_image:
        if pixel_values is None:
            raise ValueError(f"{n_image} <|image_pad|> tokens but no pixel_values")
        visual = model.model.visual
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in visual.parameters())
        with torch.set_grad_enabled(trainable):
            feats = torch.cat(model.model.get_image_features(pixel_values, image_grid_thw).pooler_output, dim=0)
        if feats.shape[0] != n_image:
            raise ValueError(f"{n_image} <|image_pad|> tokens but the vision tower gave {feats.shape[0]} features")
        embeds = embeds.masked_scatter(image_mask[..., None], feats.to(embeds.dtype))
    if latent_pad_id is not None:
        latent_mask = input_ids == latent_pad_id
        n_slots, n_given = int(latent_mask.sum()), 0 if latent_vectors is None else latent_vectors.shape[0]
        if n_slots != n_given:
            raise ValueError(f"{n_slots} <|latent_pad|> tokens but {n_given} latent vectors")
        if n_slots:
            embeds = embeds.masked_scatter(latent_mask[..., None], latent_vectors.to(embeds.dtype))
    return embeds


def rope_positions(model, input_ids, attention_mask, image_grid_thw=None):
    """M-RoPE position ids (3, B, T) computed once from the full token sequence: image tokens get (t, h, w)
    grid ids, every other token (latent slots included) the same id on all three axes; padding gets 0."""
    mm_token_type_ids = (input_ids == model.config.image_token_id).int()
    pos, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                        image_grid_thw=image_grid_thw, attention_mask=attention_mask)
    return pos


# ----------------------------------------------------------------------------------------------------------
# the settings, the per-row state and the loop

@dataclass(frozen=True)
class Sampling:
    """How the loop decodes: one object for every caller (infer.py, difficulty.py, the toy). A new setting is a
    field here and its use below; an entry point exposes it as a flag of the same name (Sampling.of)."""
    max_new_tokens: int = 512  # generated tokens per row, latents included
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling threshold
    latent_mode: str = "model"  # MODES: the latents fed back
    norm_calib: str = "none"  # none | ema: each latent rescaled to its row's query-image norm (paper table 1)
    ema_beta: float = 0.0  # norm_calib ema: 0 the mean norm of the whole image, else an EMA with this beta
    num_samples: int = 1  # N rows per prompt, one prefill (difficulty.py's N samples)
    stop_ids: tuple = ()  # a row that samples one of these in TEXT is done
    sync_every: int = 8  # steps between two reads of the rows' state (the stop checks, Known); the steps between
    #                      never wait on the device. The results do not depend on it; sampling reads every step

    def __post_init__(self):
        check_modes(self.latent_mode, self.norm_calib)
        if self.sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {self.sync_every}")
        object.__setattr__(self, "stop_ids", tuple(int(t) for t in self.stop_ids))

    @classmethod
    def of(cls, config, **overrides):
        """The settings of an entry point's config: its fields of the same names, then `overrides`."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(config).items() if k in names}, **overrides)


def settings(sampling, overrides):
    """`sampling` (default Sampling()) with keyword overrides, so that callers may pass either."""
    return replace(sampling or Sampling(), **overrides)


@dataclass
class Step:
    """What one step did, for each of the R decode rows."""
    token: torch.Tensor  # (R,) recorded token: sampled text, <|latent_pad|>, <|latent_end|>, or DONE once done
    logits: torch.Tensor | None  # (R, V) fp32 logits the text token was sampled from (banned ids at -inf), NaN in
    #                              rows that sampled nothing (in a span, closing it, done); only with logits=True
    slot: torch.Tensor  # (R,) the row's state when the token was chosen: TEXT, 0..K-1 in a span, K closing
    fed: torch.Tensor | None  # (R, D) input embedding fed for this token (a latent in a span); None at the last step
    position: torch.Tensor | None  # (3, R) M-RoPE position it was fed at; None at the last step


@dataclass
class RowState:
    """The decode state of R rows as device tensors, advanced by choose() and advance() in both schedules."""
    h_last: torch.Tensor  # (R, D) the decoder's state at each row's last position (the LM head and head read it)
    next_pos: torch.Tensor  # (R,) the next text position (latent slots are text positions)
    slot: torch.Tensor  # (R,) TEXT, 0..K-1 inside a span, K closing it
    done: torch.Tensor  # (R,) bool: the row sampled a stop id (continuous schedule: or is idle)
    n_ema: torch.Tensor | None = None  # (R,) the norm latents are calibrated to (norm_calib ema), else None
    generator: object = None  # one torch.Generator shared by the rows, or a list of one per row


@torch.no_grad()
def latent_steps(model, head, latent_ids, latent_tokens, input_ids, attention_mask, pixel_values=None,
                 image_grid_thw=None, sampling: Sampling = None, *, generator=None, compile_step=False, given=None,
                 logits=False, **overrides):
    """Yield one Step per generated token of a batch of left-padded prompts input_ids / attention_mask (B, T).
    latent_ids: {start, pad, end}; latent_tokens: K (0: no spans, <|latent_start|> banned). sampling: a Sampling,
    or its fields as keywords (max_new_tokens=..., temperature=...). Latent modes: model | zero
    (<|latent_start|> banned) | noise (head.noise(n): Gaussian PCA coefficients) | given: `given` (B, K, D) is
    fed instead, slot k of every span of prompt b getting given[b, k] (the content controls: another example's
    latents, or the true aux-image targets); the row still opens spans itself.
    generator: one torch.Generator, or a list of one per row (module docstring, "Sampling").
    compile_step: the decoder step through torch.compile (README "Inference speed" says where it is faster).
    logits: also keep each step's logits (Step.logits, an (R, V) fp32 tensor per step; else None).
    With stop ids the steps come in groups of up to sync_every, at the checks that tell whether every row is
    done; a group ends with the step at which the last row stopped, as if each step had been checked."""
    s = settings(sampling, overrides)
    if (s.latent_mode == "given") != (given is not None):
        raise ValueError("latent_mode='given' and the `given` latents (B, K, D) go together")
    if given is not None:
        d = model.get_input_embeddings().embedding_dim
        if tuple(given.shape) != (input_ids.shape[0], latent_tokens, d):
            raise ValueError(f"given latents {tuple(given.shape)}, expected ({input_ids.shape[0]}, K={latent_tokens}, "
                             f"D={d})")
        if s.norm_calib != "none":  # a control feeds exactly what it is given
            raise ValueError(f"given latents are fed as they are: norm_calib must be 'none', got {s.norm_calib!r}")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded (the last column real in every row): with right padding a "
                         "row's next token would follow its padding")
    N = s.num_samples
    n_rows = input_ids.shape[0] * N  # row b*N + j is sample j of prompt b
    if isinstance(generator, (list, tuple)) and len(generator) != n_rows:
        raise ValueError(f"{len(generator)} generators for {n_rows} rows: give one per row, or one shared")
    cache = KVCache(model, n_rows, input_ids.shape[1] + s.max_new_tokens, static=compile_step)
    # 1. prefill, each prompt once (its cache written into its N rows)
    h_last, next_pos, n_ema = prefill(model, cache, slice(0, n_rows), input_ids, attention_mask, pixel_values,
                                      image_grid_thw, latent_ids["pad"], s.ema_beta if s.norm_calib == "ema" else None)
    slot = torch.where(input_ids[:, -1] == latent_ids["start"], 0, TEXT)  # a prompt may end inside a span
    rows = RowState(*(x.repeat_interleave(N, dim=0) for x in (h_last, next_pos, slot)),
                    done=torch.zeros(n_rows, dtype=torch.bool, device=h_last.device),
                    n_ema=n_ema.repeat_interleave(N) if n_ema is not None else None, generator=generator)
    given = given.repeat_interleave(N, dim=0).to(h_last.device) if given is not None else None
    rules = Rules(model, latent_ids, latent_tokens, s.latent_mode, s.stop_ids)
    known = Known(rules, s)
    known.read(rows)  # the prompts' states, once before the first step
    step_fn = step_function(compile_step, h_last.device)
    held = []  # with stop ids: the steps since the last check, each with whether every row was done after it
    for step in range(s.max_new_tokens):
        # 2. choose each row's token by its state
        pick = choose(model, rules, rows, s, known, logits)
        if step == s.max_new_tokens - 1:
            if held and (yield from checked(known, rows, held)):
                return
            yield Step(pick.token, pick.logits, rows.slot, None, None)
            return
        # 3. feed it: the token's embedding, or in a span the latent predicted from the previous state
        out = advance(model, head, rules, rows, pick, s, known, given)
        rows.h_last = step_fn(model, cache, out.fed, out.position, cache.columns())
        if known.stops:
            held.append((out, rows.done.all()))
        else:
            yield out
        if known.due(step):
            if (yield from checked(known, rows, held)):
                return
            held.clear()


def checked(known, rows, held):
    """The check of latent_steps: read the rows' state and, for each held step, whether every row was done after
    it (one read); yield the held steps through the first after which every row was done, that one as a last step
    (nothing fed). Returns whether there was one."""
    done = known.read(rows, [d for _, d in held])
    for (step, _), ended in zip(held, done):
        if ended:
            yield replace(step, fed=None, position=None)
            return True
        yield step
    return False


def generate(*args, **kwargs):
    """The new tokens (R, S) of latent_steps(*args, **kwargs): DONE after a row's stop token."""
    return torch.stack([step.token for step in latent_steps(*args, **kwargs)], dim=1)


def check_modes(latent_mode, norm_calib):
    if latent_mode not in MODES:
        raise ValueError(f"latent_mode must be one of {MODES}, got {latent_mode!r}")
    if norm_calib not in ("none", "ema"):
        raise ValueError(f"norm_calib must be none or ema, got {norm_calib!r}")


class Rules:
    """The per-step constants of the loop, built once: K, the latent ids, the banned and the stop ids as tensors."""

    def __init__(self, model, latent_ids, latent_tokens, latent_mode, stop_ids):
        device = model.get_input_embeddings().weight.device
        self.K = latent_tokens
        self.start, self.pad, self.end = latent_ids["start"], latent_ids["pad"], latent_ids["end"]
        # the loop writes pad / end itself; <|latent_start|> is banned where no span may open
        ban_start = latent_tokens == 0 or latent_mode == "zero"
        self.spans = not ban_start  # a text row may open a span
        self.banned = torch.tensor([self.pad, self.end] + [self.start] * ban_start, device=device)
        self.stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        self.vocab = model.get_input_embeddings().num_embeddings


UNKNOWN = -2  # Known: a row that sampled text since the last read (it may have stopped or opened a span)


class Known:
    """What the host knows of each row's state without reading the device, so that a step between two reads never
    waits on it: per row TEXT, a slot 0..K, DONE or UNKNOWN, as read at the last check and advanced by the rules
    that need no token (a span moves one slot per step, closing it returns to TEXT). A row that samples text may
    stop or open a span, so it is UNKNOWN until the next read. choose() and feed() run the LM head / the latent
    head only where some row may need them, on every row, and keep each row's own on the device (torch.where).
    Sampling (temperature > 0, noise latents) must draw for exactly the rows that sample -- a row's generator
    advances with its own draws only, so that its tokens do not depend on the batch -- so it reads every step."""

    def __init__(self, rules, s: Sampling):
        self.K, self.spans, self.stops = rules.K, rules.spans, bool(s.stop_ids)
        self.exact = s.temperature > 0 or s.latent_mode == "noise"  # draws: the host must know the rows exactly
        self.every = 1 if self.exact else s.sync_every
        self.slot = []  # per row, on the host
        self.unseen = False  # some row sampled text since the last read

    def read(self, rows: RowState, flags=()):
        """The check: the rows' slots and done flags, and `flags` (device bools), in one read; returns the flags."""
        state = torch.where(rows.done, DONE, rows.slot)
        values = torch.cat([state, torch.stack(list(flags)).long()]).tolist() if flags else state.tolist()
        self.slot, self.unseen = values[:len(state)], False
        return [bool(v) for v in values[len(state):]]

    def step(self):
        """The rows moved on one step: a span one slot, a closing row to TEXT, a text row to UNKNOWN (it may have
        opened a span; without spans it stays TEXT, or is done, which its DONE tokens show until the next read)."""
        self.unseen = self.unseen or any(s in (TEXT, UNKNOWN) for s in self.slot)
        self.slot = [self.after(s) for s in self.slot]

    def after(self, s):
        if s in (DONE, UNKNOWN):
            return s
        if s == TEXT:
            return UNKNOWN if self.spans else TEXT
        return s + 1 if s < self.K else TEXT  # in a span, or closing it

    def due(self, step):
        """Read after 0-based `step`? Every `every` steps, where a row may have stopped or opened a span unseen."""
        return self.unseen and (self.spans or self.stops) and (step + 1) % self.every == 0

    def may_sample(self):
        """The rows that may sample text this step (a host list)."""
        return [r for r, s in enumerate(self.slot) if s in (TEXT, UNKNOWN)]

    def may_be_in_span(self):
        """The rows that may be inside a span this step (a host list)."""
        return [r for r, s in enumerate(self.slot) if 0 <= s < self.K or (s == UNKNOWN and self.spans)]

    def all_are(self, test):
        """Whether every row's known state passes `test` (then no row needs a torch.where)."""
        return all(test(s) for s in self.slot)


@dataclass
class Choice:
    token: torch.Tensor  # (R,) the token each row records
    logits: torch.Tensor | None  # (R, V) what a TEXT row sampled from (NaN elsewhere); with logits=True only
    in_span: torch.Tensor  # (R,) bool: the row is inside a span (its token is <|latent_pad|>)
    closing: torch.Tensor  # (R,) bool: the row closes its span (<|latent_end|>)


def choose(model, rules, rows: RowState, s: Sampling, known: Known, keep_logits=False):
    """Each row's token by its state (module docstring, 2); marks the rows that sampled a stop id done. The LM head
    runs only if some row may sample text (Known): greedy, on every row, each text row keeping its token (no read);
    sampling, on exactly the rows that sample, which the host knows."""
    slot, h_last, R = rows.slot, rows.h_last, len(rows.slot)
    in_span, closing = (slot >= 0) & (slot < rules.K), slot == rules.K
    text = (slot == TEXT) & ~rows.done  # (R,)
    token = torch.where(in_span, rules.pad, rules.end)  # (R,): pad in a span, end closing it, DONE below
    may, logits = known.may_sample(), None
    if may:
        some = s.temperature > 0 and len(may) < R  # draws for these rows only (a host list: Known.exact)
        lg = model.lm_head(h_last[may] if some else h_last).float().index_fill_(1, rules.banned, float("-inf"))
        sampled = sample(lg, s.temperature, s.top_p, rows_of(rows.generator, may) if some else rows.generator)
        if some:
            token[may] = sampled
        elif known.all_are(lambda x: x == TEXT):  # every row samples (or is done: DONE below)
            token = sampled
        else:
            token = torch.where(text, sampled, token)
        if keep_logits and some:  # an (R, V) tensor per step: only on request
            logits = h_last.new_full((R, rules.vocab), float("nan"), dtype=torch.float32)
            logits[may] = lg
        elif keep_logits:
            logits = lg.masked_fill(~text[:, None], float("nan"))
    if keep_logits and logits is None:
        logits = h_last.new_full((R, rules.vocab), float("nan"), dtype=torch.float32)
    token = torch.where(rows.done, DONE, token)
    if known.stops:
        rows.done = rows.done | (text & torch.isin(token, rules.stop))
    return Choice(token, logits, in_span, closing)


def advance(model, head, rules, rows: RowState, pick: Choice, s: Sampling, known: Known, given=None):
    """The step of the chosen tokens: what each row is fed (its token's embedding, or in a span the latent from
    its previous state; `given` (R, K, D): those latents instead), at which position. The rows' slots and
    positions move on, on the device and in `known`. Returns the Step; the caller runs the decoder on step.fed."""
    fed = feed(model, head, rows, pick, s, known, given)
    step = Step(pick.token, pick.logits, rows.slot, fed, rows.next_pos.expand(3, len(rows.slot)))  # position (3, R)
    rows.slot = next_slot(rules, rows.slot, pick.token, pick.in_span, pick.closing)
    rows.next_pos = rows.next_pos + 1
    known.step()
    return step


def feed(model, head, rows: RowState, pick: Choice, s: Sampling, known: Known, given=None):
    """The input embedding of each row's token (R, D), or in a span its latent. The latent head runs only if some
    row may be inside a span (Known): on every row, each row in a span keeping its latent (no read); noise latents
    are drawn for exactly the rows in a span, which the host then knows."""
    embedding = model.get_input_embeddings()
    may, R = known.may_be_in_span(), len(rows.slot)
    if not may:
        return embedding(pick.token.clamp(min=0))
    some = s.latent_mode == "noise" and len(may) < R  # draws for these rows only (a host list: Known.exact)
    v = latents(head, rows, s.latent_mode, given, may if some else None)  # (R or len(may), D) fp32
    if known.all_are(lambda x: 0 <= x < known.K):  # every row in a span (as at batch 1): no token embeddings
        return v.to(embedding.weight.dtype)
    fed = embedding(pick.token.clamp(min=0))  # (R, D)
    if some:
        fed[may] = v.to(fed.dtype)
        return fed
    return torch.where(pick.in_span[:, None], v.to(fed.dtype), fed)


def latents(head, rows: RowState, latent_mode, given=None, sel=None):
    """The vectors fed at latent slots, fp32: of every row, or of the rows `sel` (a host list): head(h_bar), the
    head's Gaussian latents (noise), or given[r, slot] (given); calibrated to the row's image norm with n_ema."""
    if latent_mode == "given":  # slot k of a span gets given[r, k]; rows outside a span read slot 0, unused
        return given[torch.arange(len(given), device=given.device), rows.slot.clamp(0, given.shape[1] - 1)]
    h = rows.h_last if sel is None else rows.h_last[sel]
    v = latent_vectors(head, h, latent_mode, rows.generator if sel is None else rows_of(rows.generator, sel))
    if rows.n_ema is None:
        return v
    return calibrate(v, rows.n_ema if sel is None else rows.n_ema[sel])


def rows_of(generator, rows):
    """The generator of the rows `rows` (a host list): a shared one as it is; from a list of one per row, the
    selected rows' own, in order."""
    if not isinstance(generator, (list, tuple)):
        return generator
    return [generator[r] for r in rows]


def next_slot(rules, slot, token, in_span, closing):
    """A span advances one slot; closing it returns to TEXT; a sampled <|latent_start|> opens one (slot 0)."""
    return torch.where(in_span, slot + 1, torch.where(closing | (token != rules.start), TEXT, 0))


# ----------------------------------------------------------------------------------------------------------
# the KV cache: preallocated, each row writes at its own column

class KVCache:
    """A preallocated KV cache of R rows x W columns, handed to the stock model as past_key_values (its attention
    layers call update(keys, values, layer_idx)). Per layer keys and values (R, H, W, hd); row r's next token is
    written at column length[r], and valid (R, W) marks the columns each row attends to: its prompt without the
    padding, then every token fed to it. Rows are independent, so one row can take a new prompt while the others
    decode (continuous_steps). Nothing is concatenated or reallocated per step. static: attention reads all W
    columns at every step (one shape: what a compiled step needs), else only the columns in use. The host keeps
    its own copy of the lengths and of which rows hold padding (columns()), so that a step reads nothing."""

    def __init__(self, model, rows, width, static=False):
        device, config = model.get_input_embeddings().weight.device, model.config.get_text_config()
        if "sliding_attention" in config.layer_types:
            raise ValueError("the latent loop builds full-attention masks only; this model has sliding-window layers")
        self.attn, self.mask_kinds = config._attn_implementation or "sdpa", set(config.layer_types)
        self.dtype = model.get_input_embeddings().weight.dtype
        self.width, self.layers, self.static = width, {}, static
        self.row = torch.arange(rows, device=device)  # (R,)
        self.length = torch.zeros(rows, dtype=torch.long, device=device)  # (R,) next column each row writes
        self.valid = torch.zeros(rows, width, dtype=torch.bool, device=device)  # (R, W)
        self.used = width if static else 0  # columns attention reads: up to the longest row (a Python int)
        self.lengths = [0] * rows  # the host's copy of `length`
        self.padded = set()  # rows whose prompt holds padding
        self.masked = True  # some column that attention reads is masked (columns() tells for each step)
        self.active = (None, None)  # the last step's active rows: (host list, device mask)
        self.fill = None  # during a prefill: the rows it writes, a slice (None: a decode step of every row)
        for t in (self.row, self.length, self.valid):  # changed in place: a CUDA-graph step keeps their address
            torch._dynamo.mark_static_address(t)

    def update(self, keys, values, layer_idx, *args, **kwargs):
        if layer_idx not in self.layers:  # first call: allocate the whole cache once
            shape = (len(self.row), keys.shape[1], self.width)
            self.layers[layer_idx] = keys.new_zeros(shape + keys.shape[3:]), values.new_zeros(shape + values.shape[3:])
            for t in self.layers[layer_idx]:
                torch._dynamo.mark_static_address(t)
        k_all, v_all = self.layers[layer_idx]
        if self.fill is not None:  # prefill (B, H, T, hd) into columns 0..T-1 of its rows; it attends to itself only
            n, T = (self.fill.stop - self.fill.start) // keys.shape[0], keys.shape[2]
            k_all[self.fill, :, :T] = keys.repeat_interleave(n, 0)
            v_all[self.fill, :, :T] = values.repeat_interleave(n, 0)
            return keys, values
        k_all[self.row, :, self.length] = keys[:, :, 0]  # (R, H, hd): one column per row, each at its own length
        v_all[self.row, :, self.length] = values[:, :, 0]
        return k_all[:, :, :self.used], v_all[:, :, :self.used]

    def prefilled(self, rows, T, padded):
        """The host's record of a prefill of `rows` (a slice): T columns each, with or without padding."""
        for r in range(*rows.indices(len(self.lengths))):
            self.lengths[r] = T
            (self.padded.add if padded else self.padded.discard)(r)

    def copy_prompt(self, src, dst, T):
        """Row dst takes row src's first T columns (a prompt prefilled once, decoded in several rows)."""
        for k_all, v_all in self.layers.values():
            k_all[dst, :, :T], v_all[dst, :, :T] = k_all[src, :, :T], v_all[src, :, :T]
        valid = self.valid[src, :T].clone()  # src may be dst
        self.valid[dst] = False
        self.valid[dst, :T] = valid
        self.length[dst] = T
        self.prefilled(slice(dst, dst + 1), T, src in self.padded)

    def columns(self, active=None):
        """The host's bookkeeping of a decode step, so that the step itself reads nothing: the columns attention
        reads (up to the longest row), whether any of them is masked (padding, rows of other lengths, rows not
        `active`), and each active row's next column. active: a host list of bools (continuous_steps), or None for
        every row (latent_steps). Returns the device mask of the active rows for decode_step (None with None: a
        compiled step keeps the kind of argument of its first call), built only when it changes."""
        grows = active or [True] * len(self.lengths)
        if not self.static:
            self.used = max(self.lengths) + 1
        self.masked = bool(self.padded) or not all(grows) or len(set(self.lengths)) > 1
        self.lengths = [n + 1 if a else n for n, a in zip(self.lengths, grows)]
        if active is not None and active != self.active[0]:
            self.active = (active, torch.tensor(active, device=self.row.device))
        return None if active is None else self.active[1]

    def get_seq_length(self, layer_idx=0):
        return self.used

    def masks(self, masked, allowed, padding):
        """{layer type: mask} in the form the attention implementation takes: FlashAttention the (R, C) padding
        mask (causality is its own), eager an additive float mask, sdpa the boolean one, `allowed()` (R, 1, Q, C).
        With nothing `masked`, sdpa and FlashAttention take none: the kernels' faster unmasked path (causal in a
        prefill), and no (T, T) mask is built. The stock model takes a ready mapping as it is, so it builds no mask
        per step."""
        if self.attn == "eager":
            allowed = allowed()
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
            mask = mask.masked_fill(~allowed, torch.finfo(self.dtype).min)
        elif not masked:
            mask = None
        else:
            mask = padding if self.attn.startswith("flash") else allowed()
        return {kind: mask for kind in self.mask_kinds}


def prefill(model, cache, rows, input_ids, attention_mask, pixel_values, image_grid_thw, pad_id, ema_beta=None):
    """Run left-padded prompts (B, T) once and write their keys/values into `rows` of the cache (a slice of B x n
    rows: prompt b into rows b*n .. b*n+n-1). Returns the state at each prompt's last position (B, D), its next
    text position (B,) and, with ema_beta given, the image-norm target of calibration (B,)."""
    embeds = embed_inputs(model, input_ids, pixel_values, image_grid_thw, pad_id)  # (B, T, D); no pads in a prompt
    pos = rope_positions(model, input_ids, attention_mask, image_grid_thw)  # (3, B, T)
    n_ema = None if ema_beta is None else image_norm(embeds, input_ids == model.config.image_token_id, ema_beta)
    T, real = input_ids.shape[1], attention_mask.bool()
    padded = not bool(real.all())  # one read per prefill

    def allowed():  # (B, 1, T, T); a padding position sees itself, so that no row of the softmax is empty
        causal = torch.ones(T, T, dtype=torch.bool, device=real.device).tril()
        return (causal & real[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=real.device)

    cache.fill = rows
    try:
        out = model.model(inputs_embeds=embeds, attention_mask=cache.masks(padded, allowed, attention_mask),
                          position_ids=pos, past_key_values=cache, use_cache=True)
    finally:
        cache.fill = None
    n = (rows.stop - rows.start) // len(real)
    cache.valid[rows] = False
    cache.valid[rows, :T] = real.repeat_interleave(n, 0)
    cache.length[rows] = T
    cache.prefilled(rows, T, padded)
    return out.last_hidden_state[:, -1], pos.amax(dim=(0, 2)) + 1, n_ema  # text continues after the largest id


def decode_step(model, cache, fed, position, active=None):
    """Feed one new column: fed (R, D) at M-RoPE positions (3, R), each row at its own cache column. Rows not
    `active` (R,) bool (just given a new prompt, or idle) compute a column that stays masked and is overwritten
    later. Reads nothing on the host: cache.columns() has done the host's part. Returns the new last states (R, D)."""
    cache.valid[cache.row, cache.length] = True if active is None else active
    masks = cache.masks(cache.static or cache.masked, lambda: cache.valid[:, None, None, :cache.used],
                        cache.valid[:, :cache.used])
    out = model.model(inputs_embeds=fed[:, None], attention_mask=masks, position_ids=position[..., None],
                      past_key_values=cache, use_cache=True)
    cache.length += 1 if active is None else active
    return out.last_hidden_state[:, -1].clone()  # a copy: a CUDA-graph step reuses its output buffer


COMPILED = {}


def step_function(compile_step, device):
    """decode_step, or with compile_step its torch.compile (CUDA graphs on a GPU; the cache must be static),
    compiled once per process and shape, as one graph (fullgraph: a graph break is an error, not a silent split
    that CUDA graphs could not capture; decode_step reads nothing on the host). Within one generation every step
    after the first has the shapes of the first, so the guards that chose the graph then are not evaluated again
    (on a small model they cost as much as the step)."""
    if not compile_step:
        return decode_step
    mode = "reduce-overhead" if device.type == "cuda" else None
    if mode not in COMPILED:
        COMPILED[mode] = torch.compile(decode_step, mode=mode, dynamic=False, fullgraph=True)
    calls = []

    def step(*args):
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=bool(calls)):
            calls.append(1)
            return COMPILED[mode](*args)
    return step


# ----------------------------------------------------------------------------------------------------------
# continuous batching: a row that finishes takes the next prompt

@torch.no_grad()
def continuous_steps(model, head, latent_ids, latent_tokens, prompts, rows, sampling: Sampling = None, *,
                     generator=None, compile_step=False, logits=False, **overrides):
    """latent_steps over a list of prompts with `rows` decode rows: when a row finishes (a stop id, or its
    max_new_tokens), it takes the next job -- its prompt prefilled alone and written into that row of the cache
    -- while the other rows go on decoding, so no row idles until the longest one of a batch ends. A prompt is a
    dict with input_ids (T,), pixel_values and image_grid_thw (None without an image) and optionally its own
    max_new_tokens. With num_samples = N each prompt is N jobs (job i*N + j is sample j of prompt i, as the
    rows of latent_steps), prefilled once: the row of sample j > 0 copies the prompt's columns from the row
    that took sample j - 1 (which holds them until it takes a job of another prompt, i.e. after the last
    sample has started). Yields (Step, job) per step, job (R,) on the CPU the job each row works on (-1: idle, the
    jobs are used up). Each job gets the tokens and logits of latent_steps on its prompt alone; its draws come from
    `generator`: shared (then they depend on the schedule), or a list of one per job (then they do not).
    The host reads the rows' state only where a row may have stopped (it sampled text since the last read), every
    sync_every steps: a row that stopped between two reads records DONE until the read (a job's tokens end at its
    first DONE); a row that used its max_new_tokens is known on the host and takes the next job at once."""
    s = settings(sampling, overrides)
    if s.latent_mode == "given":
        raise ValueError("latent_mode='given' is a latent_steps option (static batches)")
    N = s.num_samples
    n_jobs = len(prompts) * N
    if isinstance(generator, (list, tuple)) and len(generator) != n_jobs:
        raise ValueError(f"{len(generator)} generators for {n_jobs} jobs: give one per job, or one shared")
    K, start = latent_tokens, latent_ids["start"]
    limits = [p.get("max_new_tokens", s.max_new_tokens) for p in prompts]
    cache = KVCache(model, rows, max(len(p["input_ids"]) + n for p, n in zip(prompts, limits)), static=compile_step)
    rules = Rules(model, latent_ids, K, s.latent_mode, s.stop_ids)
    known = Known(rules, s)
    step_fn = step_function(compile_step, cache.row.device)
    dev, hidden = cache.row.device, model.get_input_embeddings().embedding_dim
    state = RowState(h_last=torch.zeros(rows, hidden, dtype=cache.dtype, device=dev),
                     next_pos=torch.zeros(rows, dtype=torch.long, device=dev),
                     slot=torch.full((rows,), TEXT, device=dev),
                     done=torch.ones(rows, dtype=torch.bool, device=dev),  # an idle row counts as done
                     n_ema=torch.ones(rows, device=dev) if s.norm_calib == "ema" else None,
                     generator=[None] * rows if isinstance(generator, (list, tuple)) else generator)
    known.slot = [DONE] * rows
    job, budget = [-1] * rows, [0] * rows  # on the host: each row's job, the tokens it may still record
    queue = iter(range(n_jobs))
    last = {}  # the latest prefill: its row, length, last state, next position, image norm

    def refill(r):
        """Row r takes the next job (prefill its prompt, or copy it from the row of the previous sample), or goes
        idle."""
        n = next(queue, -1)
        job[r], known.slot[r] = n, DONE
        state.done[r] = n < 0
        if n < 0:
            return
        i = n // N
        p = prompts[i]
        opens = int(p["input_ids"][-1]) == start  # a prompt may end inside a span (read from the prompt's ids)
        ids = p["input_ids"].to(dev)[None]  # (1, T): one prompt, no padding
        if n % N == 0:
            pv, grid = (p[k].to(dev) if p.get(k) is not None else None for k in ("pixel_values", "image_grid_thw"))
            h, pos, ema = prefill(model, cache, slice(r, r + 1), ids, torch.ones_like(ids), pv, grid,
                                  latent_ids["pad"], s.ema_beta if state.n_ema is not None else None)
            last.update(h=h[0], pos=pos[0], ema=None if ema is None else ema[0])
        else:
            cache.copy_prompt(last["row"], r, ids.shape[1])
        last["row"] = r
        state.h_last[r], state.next_pos[r], budget[r] = last["h"], last["pos"], limits[i]
        state.slot[r] = known.slot[r] = 0 if opens else TEXT
        if state.n_ema is not None:
            state.n_ema[r] = last["ema"]
        if isinstance(generator, (list, tuple)):
            state.generator[r] = generator[n]

    for r in range(rows):
        refill(r)
    step = 0
    while any(j >= 0 for j in job):
        pick = choose(model, rules, state, s, known, logits)
        out = advance(model, head, rules, state, pick, s, known)
        budget = [b - 1 for b in budget]
        yield out, torch.tensor(job)
        if known.due(step):  # a row may have stopped
            known.read(state)
        step += 1
        finished = [r for r, j in enumerate(job) if j >= 0 and (budget[r] == 0 or known.slot[r] == DONE)]
        for r in finished:
            refill(r)
        # refilled rows already hold their prompt's last state; idle rows decode nothing
        active = cache.columns([j >= 0 and r not in finished for r, j in enumerate(job)])
        state.h_last = torch.where(active[:, None], step_fn(model, cache, out.fed, out.position, active), state.h_last)


def generate_continuous(*args, **kwargs):
    """Yield (i, tokens) for each job of continuous_steps(*args, **kwargs) as it finishes: job i's new tokens
    (S_i,), through its stop id (job i is prompts[i], or with num_samples = N sample i % N of prompts[i // N]);
    the same as row i of generate() up to the first DONE. A job's tokens are read once, as it finishes."""
    held = {}  # row -> (its job, the (R,) tokens of each step since it took the job)
    for step, job in continuous_steps(*args, **kwargs):
        for r, i in enumerate(job.tolist()):
            if r in held and held[r][0] != i:  # the row moved on: its job is finished
                yield job_tokens(r, *held.pop(r))
            if i >= 0:
                held.setdefault(r, (i, []))[1].append(step.token)
    for r, (i, tokens) in held.items():
        yield job_tokens(r, i, tokens)


def job_tokens(r, i, tokens):
    """(i, row r's tokens up to their first DONE) of a job: one read."""
    t = torch.stack(tokens)[:, r].tolist()
    return i, torch.tensor(t[:t.index(DONE)] if DONE in t else t)


# ----------------------------------------------------------------------------------------------------------
# latents, sampling, text

def latent_vectors(head, h_bar, latent_mode, generator=None):
    """The vectors fed at latent slots, (N, D) fp32: head(h_bar), or for `noise` the head's Gaussian latents."""
    if latent_mode == "noise":
        if not hasattr(head, "noise"):
            raise ValueError("latent_mode=noise needs a head with noise(n, generator) (a PCA basis)")
        if isinstance(generator, (list, tuple)):  # one per row: each row's latent from its own generator
            return torch.cat([head.noise(1, generator=g) for g in generator]).to(h_bar.device)
        return head.noise(h_bar.shape[0], generator=generator).to(h_bar.device)
    return head(h_bar)


def image_norm(embeds, image_mask, beta=0.0):
    """Per prompt, the EMA-norm target of calibration: ema_norm of the L2 norms of its query-image embeddings
    (beta 0: their plain mean, the whole image). (B,) fp32."""
    if not bool(image_mask.any(1).all()):
        raise ValueError("norm_calib=ema needs a query image in every prompt")
    return torch.stack([ema_norm(embeds[b][image_mask[b]].float().norm(dim=-1), beta) for b in range(len(embeds))])


def sample(logits, temperature, top_p, generator=None):
    """Greedy when temperature == 0, else temperature + nucleus (top-p) sampling. logits (R, V) fp32; generator
    one shared, or a list of one per row."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p * keep)
    if isinstance(generator, (list, tuple)):  # one per row: each row's draw from its own generator
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def decode(tokenizer, ids, latent_ids):
    """Text of generated ids with each latent span shown as `<latent>` (never the raw pad ids), also a span
    begun in the prompt (ids that open with pads); stops at the first DONE; special tokens are dropped."""
    pieces, text, in_span = [], [], False
    for t in map(int, ids):
        if t < 0:
            break
        opens = t == latent_ids["start"] or (t == latent_ids["pad"] and not in_span)
        if opens:
            pieces += [tokenizer.decode(text, skip_special_tokens=True), "<latent>"]
            text, in_span = [], True
        elif in_span and t in (latent_ids["pad"], latent_ids["end"]):
            in_span = t != latent_ids["end"]
        else:
            in_span = False
            text.append(t)
    return "".join(pieces + [tokenizer.decode(text, skip_special_tokens=True)])
