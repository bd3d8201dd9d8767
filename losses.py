"""GAP's two training losses (paper section 4.2 eq. 2-3) from the decoder's normalized states: next-token cross
entropy over the assistant tokens, and the latent MSE with its one-position shift. Imports only torch: copy it
into another codebase as it is (the states come from any decoder; the head is any callable h_bar -> v).

    sums = gap_losses(h_bar, labels, input_ids, latent_ids, head, lm_head, latent_targets)
    loss = total_loss(sums, n_lm, n_latent, lambda_latent)   # n_*: counts over the whole (global) batch:
    # n_lm = lm_targets(labels, input_ids, latent_ids).sum(), n_latent = (input_ids == latent_ids["pad"]).sum()

The shift: position t predicts what sits at t + 1. For text that is the next token; for a latent slot it is
the slot's input vector, so slot t's latent is head(h_bar[t - 1]) (the <|latent_start|> position for the first
slot), exactly what the generation loop feeds. Positions whose next token is <|latent_pad|> or <|latent_end|>
carry no LM loss (the loop writes those tokens; it never samples them); <|latent_start|> is an LM target (the
model decides when to enter a span).
"""
import torch.nn.functional as F

IGNORE = -100  # label of a position that carries no LM loss


def lm_targets(labels, input_ids, latent_ids):
    """(B, T-1) bool: positions t whose next token t + 1 carries LM loss (it has a label and the loop does not
    write it itself). Its sum is n_lm, the count L_LM is normalized by."""
    next_ids = input_ids[:, 1:]
    written_by_loop = (next_ids == latent_ids["pad"]) | (next_ids == latent_ids["end"])
    return (labels[:, 1:] != IGNORE) & ~written_by_loop


def gap_losses(h_bar, labels, input_ids, latent_ids, head, lm_head, latent_targets=None):
    """h_bar (B, T, D): final-norm decoder states; labels, input_ids (B, T); latent_ids {start, pad, end};
    latent_targets (N_slots, D): the target vector of every <|latent_pad|> in row-major order.
    Returns sums and counts, so the caller can normalize by the global count over micro-steps and ranks:
      lm_sum     = sum of next-token CE over positions with a label (n_lm of them),
      latent_sum = sum over latent slots of MSE(head(h_bar[t - 1]), v_t) averaged over D, in fp32 (n_latent)."""
    h_prev = h_bar[:, :-1]  # (B, T-1, D): position t predicts token / slot t + 1
    supervised = lm_targets(labels, input_ids, latent_ids)  # (B, T-1)
    logits = lm_head(h_prev[supervised]).float()  # (N_lm, V): the LM head runs only where there is a target
    lm_sum = F.cross_entropy(logits, labels[:, 1:][supervised], reduction="sum")
    slot_next = input_ids[:, 1:] == latent_ids["pad"]  # (B, T-1): the next position is a latent slot
    v_hat = head(h_prev[slot_next])  # (N_slots, D) fp32; run even when empty so DDP / FSDP see the head
    n_latent = slot_next.sum()
    if latent_targets is None:
        if int(n_latent):
            raise ValueError(f"{int(n_latent)} latent slots but no latent_targets")
        latent_targets = v_hat.new_zeros(0, v_hat.shape[-1])
    if latent_targets.shape != v_hat.shape:
        raise ValueError(f"latent_targets {tuple(latent_targets.shape)} do not match the {int(n_latent)} latent "
                         f"slots of width {v_hat.shape[-1]}")
    # mean over the D dims per slot (paper eq. 2 sums them: the same loss divided by D, lambda absorbs it)
    latent_sum = (v_hat.float() - latent_targets.float()).pow(2).mean(-1).sum()
    return dict(lm_sum=lm_sum, n_lm=supervised.sum(), latent_sum=latent_sum, n_latent=n_latent)


def total_loss(sums, n_lm, n_latent, lambda_latent=1.0):
    """Eq. 3, L = L_LM + lambda * L_latent, each term normalized by a count of supervised tokens / latent slots.
    With micro-batches and ranks, pass the global counts: then summing the losses of every micro-step (times
    the number of ranks, which DDP / FSDP average over) gives the gradient of one big batch."""
    return sums["lm_sum"] / max(float(n_lm), 1.0) + lambda_latent * sums["latent_sum"] / max(float(n_latent), 1.0)
