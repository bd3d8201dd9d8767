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
`latent_steps` is a generator that yields a `Step` per step (tokens, logits, fed vectors, positions), so
tests and tools read what the loop did without flags inside it; `generate` keeps the tokens. The decoding
settings (max_new_tokens, temperature, top_p, latent_mode, norm_calib, ema_beta, num_samples, stop_ids) are one
`Sampling` object, or the same names as keywords.

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

    def __post_init__(self):
        check_modes(self.latent_mode, self.norm_calib)
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
    logits: torch.Tensor  # (R, V) fp32 logits the text token was sampled from (banned ids at -inf); NaN in rows
    #                       that sampled nothing (inside a span, closing it, done): the LM head runs on TEXT rows only
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
                 **overrides):
    """Yield one Step per generated token of a batch of left-padded prompts input_ids / attention_mask (B, T).
    latent_ids: {start, pad, end}; latent_tokens: K (0: no spans, <|latent_start|> banned). sampling: a Sampling,
    or its fields as keywords (max_new_tokens=..., temperature=...). Latent modes: model | zero
    (<|latent_start|> banned) | noise (head.noise(n): Gaussian PCA coefficients) | given: `given` (B, K, D) is
    fed instead, slot k of every span of prompt b getting given[b, k] (the content controls: another example's
    latents, or the true aux-image targets); the row still opens spans itself.
    generator: one torch.Generator, or a list of one per row (module docstring, "Sampling").
    compile_step: the decoder step through torch.compile (README "Inference speed" says where it is faster)."""
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
    h_last, next_pos, n_ema = prefill(model, cache, cache.row, input_ids, attention_mask, pixel_values,
                                      image_grid_thw, latent_ids["pad"], s.ema_beta if s.norm_calib == "ema" else None)
    slot = torch.where(input_ids[:, -1] == latent_ids["start"], 0, TEXT)  # a prompt may end inside a span
    rows = RowState(*(x.repeat_interleave(N, dim=0) for x in (h_last, next_pos, slot)),
                    done=torch.zeros(n_rows, dtype=torch.bool, device=h_last.device),
                    n_ema=n_ema.repeat_interleave(N) if n_ema is not None else None, generator=generator)
    given = given.repeat_interleave(N, dim=0).to(h_last.device) if given is not None else None
    rules = Rules(model, latent_ids, latent_tokens, s.latent_mode, s.stop_ids)
    step_fn = step_function(compile_step, h_last.device)
    for step in range(s.max_new_tokens):
        # 2. choose each row's token by its state
        pick = choose(model, rules, rows, s)
        if bool(rows.done.all()) or step == s.max_new_tokens - 1:
            yield Step(pick.token, pick.logits, rows.slot, None, None)
            return
        # 3. feed it: the token's embedding, or in a span the latent predicted from the previous state
        out = advance(model, head, rules, rows, pick, s, given)
        yield out
        rows.h_last = step_fn(model, cache, out.fed, out.position)


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
        self.banned = torch.tensor([self.pad, self.end] + [self.start] * ban_start, device=device)
        self.stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        self.vocab = model.get_input_embeddings().num_embeddings


@dataclass
class Choice:
    token: torch.Tensor  # (R,) the token each row records
    logits: torch.Tensor  # (R, V) what a TEXT row sampled from (NaN elsewhere)
    in_span: torch.Tensor  # (R,) bool: the row is inside a span (its token is <|latent_pad|>)
    closing: torch.Tensor  # (R,) bool: the row closes its span (<|latent_end|>)


def choose(model, rules, rows: RowState, s: Sampling):
    """Each row's token by its state (module docstring, 2); the LM head runs only on rows in TEXT that are not
    done. Marks the rows that sampled a stop id done."""
    slot, h_last = rows.slot, rows.h_last
    in_span, closing = (slot >= 0) & (slot < rules.K), slot == rules.K
    text = (slot == TEXT) & ~rows.done
    if bool(text.all()):
        logits = model.lm_head(h_last).float().index_fill_(1, rules.banned, float("-inf"))  # (R, V)
        token = sample(logits, s.temperature, s.top_p, rows.generator)
    else:
        logits = h_last.new_full((len(slot), rules.vocab), float("nan"), dtype=torch.float32)
        token = torch.where(in_span, rules.pad, rules.end)  # (R,): pad in a span, end closing it, DONE below
        if bool(text.any()):
            some = model.lm_head(h_last[text]).float().index_fill_(1, rules.banned, float("-inf"))
            logits[text], token[text] = some, sample(some, s.temperature, s.top_p, rows_of(rows.generator, text))
    token = torch.where(rows.done, DONE, token)
    rows.done = rows.done | (text & torch.isin(token, rules.stop))
    return Choice(token, logits, in_span, closing)


def advance(model, head, rules, rows: RowState, pick: Choice, s: Sampling, given=None):
    """The step of the chosen tokens: what each row is fed (its token's embedding, or in a span the latent from
    its previous state; `given` (R, K, D): those latents instead), at which position. The rows' slots and
    positions move on. Returns the Step; the caller runs the decoder on step.fed."""
    fed = feed(model, head, pick.token, rows.h_last, pick.in_span, s.latent_mode, rows.n_ema, rows.generator)
    if given is not None and bool(pick.in_span.any()):  # the caller's latents, slot by slot
        fed[pick.in_span] = given[pick.in_span, rows.slot[pick.in_span]].to(fed.dtype)
    step = Step(pick.token, pick.logits, rows.slot, fed, rows.next_pos.expand(3, len(rows.slot)))  # position (3, R)
    rows.slot = next_slot(rules, rows.slot, pick.token, pick.in_span, pick.closing)
    rows.next_pos = rows.next_pos + 1
    return step


def feed(model, head, token, h_last, in_span, latent_mode, n_ema, generator):
    """The input embedding of each row's token (R, D), or in a span the latent from the previous state."""
    embedding = model.get_input_embeddings()
    if bool(in_span.all()):  # every row in a span (as at batch 1): no token embeddings, no row selection
        v = latent_vectors(head, h_last, latent_mode, generator)
        return (calibrate(v, n_ema) if n_ema is not None else v).to(embedding.weight.dtype)
    fed = embedding(token.clamp(min=0))  # (R, D)
    if bool(in_span.any()):
        v = latent_vectors(head, h_last[in_span], latent_mode, rows_of(generator, in_span))
        if n_ema is not None:
            v = calibrate(v, n_ema[in_span])
        fed[in_span] = v.to(fed.dtype)
    return fed


def rows_of(generator, rows):
    """The generator of the rows selected by `rows` (R,) bool: a shared one as it is; from a list of one per
    row, the selected rows' own, in order."""
    if not isinstance(generator, (list, tuple)):
        return generator
    return [generator[r] for r in rows.nonzero()[:, 0].tolist()]


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
    columns at every step (one shape: what a compiled step needs), else only the columns in use."""

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
        self.fill = None  # during a prefill: the rows it writes (None: a decode step of every row)
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
            n, T = len(self.fill) // keys.shape[0], keys.shape[2]
            k_all[self.fill, :, :T] = keys.repeat_interleave(n, 0)
            v_all[self.fill, :, :T] = values.repeat_interleave(n, 0)
            return keys, values
        k_all[self.row, :, self.length] = keys[:, :, 0]  # (R, H, hd): one column per row, each at its own length
        v_all[self.row, :, self.length] = values[:, :, 0]
        return k_all[:, :, :self.used], v_all[:, :, :self.used]

    def copy_prompt(self, src, dst, T):
        """Row dst takes row src's first T columns (a prompt prefilled once, decoded in several rows)."""
        for k_all, v_all in self.layers.values():
            k_all[dst, :, :T], v_all[dst, :, :T] = k_all[src, :, :T], v_all[src, :, :T]
        valid = self.valid[src, :T].clone()  # src may be dst
        self.valid[dst] = False
        self.valid[dst, :T] = valid
        self.length[dst] = T

    def get_seq_length(self, layer_idx=0):
        return self.used

    def masks(self, allowed, padding):
        """{layer type: mask} for `allowed` (R, 1, Q, C) bool in the form the attention implementation takes:
        FlashAttention the (R, C) padding mask (causality is its own), eager an additive float mask, sdpa the
        boolean one. The stock model takes a ready mapping as it is, so it builds no mask per step."""
        if self.attn == "eager":
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
            mask = mask.masked_fill(~allowed, torch.finfo(self.dtype).min)
        elif (allowed.shape[2] > 1 or not self.static) and bool(padding.all()):
            mask = None  # nothing masked: the kernels' faster unmasked (causal in a prefill) path; a compiled step
            #              (static) always reads masked columns and keeps its one graph
        else:
            mask = padding if self.attn.startswith("flash") else allowed
        return {kind: mask for kind in self.mask_kinds}


def prefill(model, cache, rows, input_ids, attention_mask, pixel_values, image_grid_thw, pad_id, ema_beta=None):
    """Run left-padded prompts (B, T) once and write their keys/values into `rows` of the cache (B x n rows:
    prompt b into rows b*n .. b*n+n-1). Returns the state at each prompt's last position (B, D), its next text
    position (B,) and, with ema_beta given, the image-norm target of calibration (B,)."""
    embeds = embed_inputs(model, input_ids, pixel_values, image_grid_thw, pad_id)  # (B, T, D); no pads in a prompt
    pos = rope_positions(model, input_ids, attention_mask, image_grid_thw)  # (3, B, T)
    n_ema = None if ema_beta is None else image_norm(embeds, input_ids == model.config.image_token_id, ema_beta)
    T, real = input_ids.shape[1], attention_mask.bool()
    causal = torch.ones(T, T, dtype=torch.bool, device=real.device).tril()
    # (B, 1, T, T); a padding position sees itself, so that no row of the softmax is empty
    allowed = (causal & real[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=real.device)
    cache.fill = rows
    try:
        out = model.model(inputs_embeds=embeds, attention_mask=cache.masks(allowed, attention_mask), position_ids=pos,
                          past_key_values=cache, use_cache=True)
    finally:
        cache.fill = None
    cache.valid[rows] = False
    cache.valid[rows, :T] = real.repeat_interleave(len(rows) // len(real), 0)
    cache.length[rows] = T
    return out.last_hidden_state[:, -1], pos.amax(dim=(0, 2)) + 1, n_ema  # text continues after the largest id


def decode_step(model, cache, fed, position, active=None):
    """Feed one new column: fed (R, D) at M-RoPE positions (3, R), each row at its own cache column. Rows not
    `active` (R,) bool (just given a new prompt, or idle) compute a column that stays masked and is overwritten
    later. Returns the new last states (R, D)."""
    cache.valid[cache.row, cache.length] = True if active is None else active
    if not cache.static:
        cache.used = int(cache.length.max()) + 1
    masks = cache.masks(cache.valid[:, None, None, :cache.used], cache.valid[:, :cache.used])
    out = model.model(inputs_embeds=fed[:, None], attention_mask=masks, position_ids=position[..., None],
                      past_key_values=cache, use_cache=True)
    cache.length += 1 if active is None else active
    return out.last_hidden_state[:, -1].clone()  # a copy: a CUDA-graph step reuses its output buffer


COMPILED = {}


def step_function(compile_step, device):
    """decode_step, or with compile_step its torch.compile (CUDA graphs on a GPU; the cache must be static),
    compiled once per process and shape. Within one generation every step after the first has the shapes of the
    first, so the guards that chose the graph then are not evaluated again (on a small model they cost as much
    as the step)."""
    if not compile_step:
        return decode_step
    mode = "reduce-overhead" if device.type == "cuda" else None
    if mode not in COMPILED:
        COMPILED[mode] = torch.compile(decode_step, mode=mode, dynamic=False)
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
                     generator=None, compile_step=False, **overrides):
    """latent_steps over a list of prompts with `rows` decode rows: when a row finishes (a stop id, or its
    max_new_tokens), it takes the next job -- its prompt prefilled alone and written into that row of the cache
    -- while the other rows go on decoding, so no row idles until the longest one of a batch ends. A prompt is a
    dict with input_ids (T,), pixel_values and image_grid_thw (None without an image) and optionally its own
    max_new_tokens. With num_samples = N each prompt is N jobs (job i*N + j is sample j of prompt i, as the
    rows of latent_steps), prefilled once: the row of sample j > 0 copies the prompt's columns from the row
    that took sample j - 1 (which holds them until it takes a job of another prompt, i.e. after the last
    sample has started). Yields (Step, job) per step, job (R,) the job each row works on (-1: idle, the jobs
    are used up). Each job gets the tokens and logits of latent_steps on its prompt alone; its draws come from
    `generator`: shared (then they depend on the schedule), or a list of one per job (then they do not)."""
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
    step_fn = step_function(compile_step, cache.row.device)
    dev, hidden = cache.row.device, model.get_input_embeddings().embedding_dim
    state = RowState(h_last=torch.zeros(rows, hidden, dtype=cache.dtype, device=dev),
                     next_pos=torch.zeros(rows, dtype=torch.long, device=dev),
                     slot=torch.full((rows,), TEXT, device=dev),
                     done=torch.ones(rows, dtype=torch.bool, device=dev),  # an idle row counts as done
                     n_ema=torch.ones(rows, device=dev) if s.norm_calib == "ema" else None,
                     generator=[None] * rows if isinstance(generator, (list, tuple)) else generator)
    job, budget = torch.full((rows,), -1, device=dev), torch.zeros(rows, dtype=torch.long, device=dev)
    queue = iter(range(n_jobs))
    last = {}  # the latest prefill: its row, length, last state, next position, image norm

    def refill(r):
        """Row r takes the next job (prefill its prompt, or copy it from the row of the previous sample), or goes
        idle."""
        n = next(queue, -1)
        job[r], state.done[r] = n, n < 0
        if n < 0:
            return
        i = n // N
        p = prompts[i]
        ids = p["input_ids"].to(dev)[None]  # (1, T): one prompt, no padding
        if n % N == 0:
            pv, grid = (p[k].to(dev) if p.get(k) is not None else None for k in ("pixel_values", "image_grid_thw"))
            h, pos, ema = prefill(model, cache, cache.row[r:r + 1], ids, torch.ones_like(ids), pv, grid,
                                  latent_ids["pad"], s.ema_beta if state.n_ema is not None else None)
            last.update(h=h[0], pos=pos[0], ema=None if ema is None else ema[0])
        else:
            cache.copy_prompt(last["row"], r, ids.shape[1])
        last["row"] = r
        state.h_last[r], state.next_pos[r], budget[r] = last["h"], last["pos"], limits[i]
        state.slot[r] = 0 if int(ids[0, -1]) == start else TEXT  # a prompt may end inside a span
        if state.n_ema is not None:
            state.n_ema[r] = last["ema"]
        if isinstance(generator, (list, tuple)):
            state.generator[r] = generator[n]

    for r in range(rows):
        refill(r)
    while bool((job >= 0).any()):
        pick = choose(model, rules, state, s)
        budget -= 1
        out = advance(model, head, rules, state, pick, s)
        yield out, job.clone()
        finished = (job >= 0) & (state.done | (budget == 0))
        for r in finished.nonzero()[:, 0].tolist():
            refill(r)
        active = (job >= 0) & ~finished  # refilled rows already hold their prompt's last state
        state.h_last = torch.where(active[:, None], step_fn(model, cache, out.fed, out.position, active),
                                   state.h_last)


def generate_continuous(*args, **kwargs):
    """Yield (i, tokens) for each job of continuous_steps(*args, **kwargs) as it finishes: job i's new tokens
    (S_i,), through its stop id (job i is prompts[i], or with num_samples = N sample i % N of prompts[i // N]);
    the same as row i of generate() up to the first DONE."""
    current = {}  # row -> (prompt index, its tokens so far)
    for step, prompt in continuous_steps(*args, **kwargs):
        for r, (i, t) in enumerate(zip(prompt.tolist(), step.token.tolist())):
            if r in current and current[r][0] != i:  # the row moved on: its prompt is finished
                yield current[r][0], torch.tensor(current.pop(r)[1])
            if i >= 0:
                current.setdefault(r, (i, []))[1].append(t)
    for i, tokens in current.values():
        yield i, torch.tensor(tokens)


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
