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
     once with explicit M-RoPE positions; their KV cache is kept for the whole answer. With num_samples = N
     the cache is repeated so each prompt is decoded in N rows (row b*N + j is sample j of prompt b).
  2. Each step every row is in one of three states, held in `slot` (R,):
       TEXT (-1)    sample a token from the LM head; <|latent_start|> moves the row to slot 0;
       0 .. K-1     inside a latent span: record <|latent_pad|> and feed v = head(h_bar of the previous step)
                    (the state one position earlier, exactly as in training), then slot + 1;
       K            the span is full: record and feed <|latent_end|>, back to TEXT.
     A row that samples a stop id in TEXT is done; later tokens are DONE (-100).
  3. The fed embeddings of all rows go through the decoder as one new column of the cache, each at its row's
     next text position (latent slots are text positions: the same id on the three M-RoPE axes).
`latent_steps` is a generator that yields a `Step` per step (tokens, logits, fed vectors, positions), so
tests and tools read what the loop did without flags inside it; `generate` keeps the tokens.
"""
from dataclasses import dataclass

import torch

from latent_head import calibrate, ema_norm

DONE = -100  # the token recorded for a row after its stop token
TEXT = -1  # slot of a row that samples text
MODES = ("model", "zero", "noise")  # latent feedback: the head's latents | span banned | Gaussian PCA latents


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
# the loop

@dataclass
class Step:
    """What one step did, for each of the R decode rows."""
    token: torch.Tensor  # (R,) recorded token: sampled text, <|latent_pad|>, <|latent_end|>, or DONE once done
    logits: torch.Tensor  # (R, V) fp32 logits the text token was sampled from (banned ids at -inf)
    slot: torch.Tensor  # (R,) the row's state when the token was chosen: TEXT, 0..K-1 in a span, K closing
    fed: torch.Tensor | None  # (R, D) input embedding fed for this token (a latent in a span); None at the last step
    position: torch.Tensor | None  # (3, R) M-RoPE position it was fed at; None at the last step


@torch.no_grad()
def latent_steps(model, head, latent_ids, latent_tokens, input_ids, attention_mask, pixel_values=None,
                 image_grid_thw=None, *, max_new_tokens=512, temperature=0.0, top_p=1.0, latent_mode="model",
                 norm_calib="none", ema_beta=0.0, num_samples=1, stop_ids=(), generator=None):
    """Yield one Step per generated token of a batch of left-padded prompts input_ids / attention_mask (B, T).
    latent_ids: {start, pad, end}; latent_tokens: K (0: no spans, <|latent_start|> banned).
    latent_mode: model | zero (<|latent_start|> banned) | noise (head.noise(n): Gaussian PCA coefficients).
    norm_calib: none | ema (each latent rescaled to ema_norm(query-image embedding norms, ema_beta) of its row)."""
    K, start, pad, end = latent_tokens, latent_ids["start"], latent_ids["pad"], latent_ids["end"]
    if latent_mode not in MODES:
        raise ValueError(f"latent_mode must be one of {MODES}, got {latent_mode!r}")
    if norm_calib not in ("none", "ema"):
        raise ValueError(f"norm_calib must be none or ema, got {norm_calib!r}")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded (the last column real in every row): with right padding a "
                         "row's next token would follow its padding")
    # 1. prefill
    embeds = embed_inputs(model, input_ids, pixel_values, image_grid_thw)  # (B, T, D)
    pos = rope_positions(model, input_ids, attention_mask, image_grid_thw)  # (3, B, T)
    n_ema = image_norm(embeds, input_ids == model.config.image_token_id, ema_beta) if norm_calib == "ema" else None
    out = model.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=pos, use_cache=True)
    h_last, cache = out.last_hidden_state[:, -1], out.past_key_values  # (B, D)
    next_pos = pos.amax(dim=(0, 2)) + 1  # (B,) text continues after the prompt's largest position id
    slot = torch.where(input_ids[:, -1] == start, 0, TEXT)  # a prompt may end inside a span
    if num_samples > 1:
        cache.batch_repeat_interleave(num_samples)
        h_last, next_pos, slot, attention_mask = (x.repeat_interleave(num_samples, dim=0)
                                                  for x in (h_last, next_pos, slot, attention_mask))
        n_ema = n_ema.repeat_interleave(num_samples) if n_ema is not None else None
    n_rows, dev = h_last.shape[0], h_last.device
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=dev)
    banned = [pad, end] + ([start] if K == 0 or latent_mode == "zero" else [])  # the loop writes pad/end itself
    done = torch.zeros(n_rows, dtype=torch.bool, device=dev)
    for step in range(max_new_tokens):
        # 2. choose each row's token by its state
        logits = model.lm_head(h_last).float()  # (R, V)
        logits[:, banned] = float("-inf")
        in_span, closing = (slot >= 0) & (slot < K), slot == K
        token = torch.where(in_span, pad, torch.where(closing, end, sample(logits, temperature, top_p, generator)))
        token = torch.where(done, DONE, token)
        done = done | ((slot == TEXT) & torch.isin(token, stop))
        if bool(done.all()) or step == max_new_tokens - 1:
            yield Step(token, logits, slot, None, None)
            return
        # 3. feed it: the token's embedding, or in a span the latent predicted from the previous state
        fed = model.get_input_embeddings()(token.clamp(min=0))  # (R, D)
        if bool(in_span.any()):
            v = latent_vectors(head, h_last[in_span], latent_mode, generator)
            if n_ema is not None:
                v = calibrate(v, n_ema[in_span])
            fed[in_span] = v.to(fed.dtype)
        position = next_pos.expand(3, n_rows)  # (3, R)
        yield Step(token, logits, slot, fed, position)
        slot = torch.where(in_span, slot + 1, torch.where(closing | (token != start), TEXT, 0))
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(n_rows, 1)], dim=1)
        out = model.model(inputs_embeds=fed[:, None], attention_mask=attention_mask, position_ids=position[..., None],
                          past_key_values=cache, use_cache=True)
        h_last, cache, next_pos = out.last_hidden_state[:, -1], out.past_key_values, next_pos + 1


def generate(*args, **kwargs):
    """The new tokens (R, S) of latent_steps(*args, **kwargs): DONE after a row's stop token."""
    return torch.stack([step.token for step in latent_steps(*args, **kwargs)], dim=1)


def latent_vectors(head, h_bar, latent_mode, generator=None):
    """The vectors fed at latent slots, (N, D) fp32: head(h_bar), or for `noise` the head's Gaussian latents."""
    if latent_mode == "noise":
        if not hasattr(head, "noise"):
            raise ValueError("latent_mode=noise needs a head with noise(n, generator) (a PCA basis)")
        return head.noise(h_bar.shape[0], generator=generator).to(h_bar.device)
    return head(h_bar)


def image_norm(embeds, image_mask, beta=0.0):
    """Per prompt, the EMA-norm target of calibration: ema_norm of the L2 norms of its query-image embeddings
    (beta 0: their plain mean, the whole image). (B,) fp32."""
    if not bool(image_mask.any(1).all()):
        raise ValueError("norm_calib=ema needs a query image in every prompt")
    return torch.stack([ema_norm(embeds[b][image_mask[b]].float().norm(dim=-1), beta) for b in range(len(embeds))])


def sample(logits, temperature, top_p, generator=None):
    """Greedy when temperature == 0, else temperature + nucleus (top-p) sampling. logits (R, V) fp32."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p * keep)
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
