"""GAP on Qwen2.5-VL: loading the stock model, the latent-token vocabulary, and the GAP wrapper (the teacher-forced
forward over losses.py, the objective's normalization, generation over latent_loop.py). Checkpoints and the
training state are checkpoint.py's; VaLR's extension of the forward is align.py's.

Implements paper sections 4.1-4.2 (eq. 1-3) and appendix F / I on top of the stock transformers
`Qwen2_5_VLForConditionalGeneration`, used only through its public API (inputs_embeds, explicit M-RoPE
position_ids, past_key_values): nothing of its modeling file is copied or patched.

Not run alone; train.py and infer.py drive it:
    python train.py --model path/or/hub-id --data train.jsonl --latent_tokens 36
    python infer.py image.png "question" --ckpt out/gap
"""
import os

import torch
import torch.nn as nn
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

import latent_loop
from common import DataError, attn_implementation, check_files, default_device, default_dtype, short
from latent_head import LatentHead
from losses import gap_losses, lm_targets, total_loss

LATENT_START, LATENT_PAD, LATENT_END = "<|latent_start|>", "<|latent_pad|>", "<|latent_end|>"


# ----------------------------------------------------------------------------------------------------------
# loading the stock model and adding the latent vocabulary

def load_backbone(path, device=None, dtype=None, attn="auto", what="--model", hint=""):
    """Stock Qwen2.5-VL, its tokenizer and its (PIL) image processor from a local directory or a hub id.
    attn: auto (FlashAttention-2 when it imports on a GPU, else SDPA) | sdpa | flash_attention_2 | eager.
    A directory that cannot be loaded (a file of it truncated or missing) is one DataError naming `what` and the
    file, followed by `hint`."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if os.path.isdir(path):
        check_files(path, hint)  # every JSON parses and every safetensors file is whole, before a loader sees them
    elif os.path.exists(path):
        raise DataError(f"{what} {path}: a file, not a model directory")
    elif path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise DataError(f"{what} {path}: no such directory (and not a hub id of the form org/name)")
    try:
        model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation() if attn == "auto" else attn,
            output_loading_info=True)
        model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    # not a model directory, a hub id that cannot be fetched, weights that do not fit the config, no memory for them
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise DataError(f"{what} {path}: cannot load: {short(e)}{hint}") from None
    missing = sorted(info["missing_keys"])
    if missing:  # transformers would start them from random values, with a warning: a damaged or foreign file
        raise DataError(f"{what} {path}: its weights lack {len(missing)} of the model's tensors (first: {missing[0]}): "
                        f"not this model's weights{hint}")
    return model, tokenizer, image_processor


def add_latent_tokens(model, tokenizer):
    """Add <|latent_start|>, <|latent_pad|>, <|latent_end|> to the tokenizer; resize the embeddings only when
    the vocabulary has no room (Qwen2.5-VL-7B pads its vocab to 152064 > 151665 tokens, so it has room).
    New rows start at the mean embedding, so the new tokens start as an average token, not as noise.
    The ids are read from the tokenizer and recorded in the model config. Returns {start, pad, end}."""
    tokens = [LATENT_START, LATENT_PAD, LATENT_END]
    fresh = [t for t in tokens if t not in tokenizer.get_vocab()]
    if fresh:
        tokenizer.add_tokens(fresh, special_tokens=True)
    ids = dict(zip(("start", "pad", "end"), tokenizer.convert_tokens_to_ids(tokens)))
    emb = model.get_input_embeddings()
    n_rows = emb.weight.shape[0]
    if max(ids.values()) >= n_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if fresh:
        new = [tokenizer.convert_tokens_to_ids(t) for t in fresh]
        with torch.no_grad():
            for w in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
                w[new] = w[:min(n_rows, min(new))].float().mean(0).to(w.dtype)
    model.config.latent_token_ids = ids
    return ids


# ----------------------------------------------------------------------------------------------------------
# the GAP wrapper

class GAP(nn.Module):
    """A stock Qwen2.5-VL backbone plus a latent head. forward() is the teacher-forced training pass (paper eq. 3,
    losses.gap_losses); generate() / steps() the KV-cached latent loop in static batches and generate_continuous()
    / continuous_steps() with continuous batching (latent_loop.py). `latent_tokens` is K (a perfect square; 0: the
    dense-caption control, no latents). counts() and loss() are the objective's normalization and weighting, which
    the training step (step.train_step) applies over micro-batches and ranks; extensions (align.VaLR) override
    them."""

    def __init__(self, backbone, head: LatentHead, latent_ids: dict, latent_tokens: int, lambda_latent=1.0):
        super().__init__()
        K = int(latent_tokens)
        if K < 0 or int(K ** 0.5) ** 2 != K:
            raise ValueError(f"latent_tokens must be a perfect square (a sqrt(K) x sqrt(K) grid), got {K}")
        self.backbone, self.head, self.latent_tokens = backbone, head, K
        self.latent_ids = dict(start=latent_ids["start"], pad=latent_ids["pad"], end=latent_ids["end"])
        self.start_id, self.pad_id, self.end_id = (self.latent_ids[k] for k in ("start", "pad", "end"))
        self.image_token_id = backbone.config.image_token_id
        self.lambda_latent = lambda_latent  # weight of L_latent in L (eq. 3)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, latent_targets=None):
        """Input embeddings (B, T, D) with image features and (training) latent targets scattered in."""
        return latent_loop.embed_inputs(self.backbone, input_ids, pixel_values, image_grid_thw, self.pad_id,
                                        latent_targets)

    def position_ids(self, input_ids, attention_mask, image_grid_thw=None):
        """M-RoPE position ids (3, B, T) from the full token sequence (latent slots are text positions)."""
        return latent_loop.rope_positions(self.backbone, input_ids, attention_mask, image_grid_thw)

    def packed_position_ids(self, input_ids, seq_lens, image_grid_thw=None):
        """(4, 1, T) position ids of one packed row holding len(seq_lens) examples back to back. Row 0 restarts
        at 0 for each example: from it the stock model builds the block-diagonal causal mask (SDPA / eager) or
        the varlen cu_seqlens (FlashAttention-2), so no token attends across examples. Rows 1-3 are each
        example's own M-RoPE ids, exactly as if it were alone in an unpadded batch."""
        examples = torch.split(input_ids[0], list(seq_lens))
        padded = nn.utils.rnn.pad_sequence(examples, batch_first=True, padding_value=0)  # (n, L_max)
        mask = nn.utils.rnn.pad_sequence([torch.ones_like(e) for e in examples], batch_first=True)
        mrope = self.position_ids(padded, mask, image_grid_thw)[:, mask.bool()]  # (3, T)
        text = torch.cat([torch.arange(len(e), device=input_ids.device) for e in examples])  # (T,)
        return torch.cat([text[None], mrope], dim=0)[:, None]  # (4, 1, T)

    def positions(self, input_ids, attention_mask, image_grid_thw=None, seq_lens=None):
        """Position ids of a padded batch, or with `seq_lens` of a packed row (data.collate_packed: one row,
        examples back to back, attention_mask None)."""
        if seq_lens is None:
            return self.position_ids(input_ids, attention_mask, image_grid_thw)
        if attention_mask is not None or input_ids.shape[0] != 1:
            raise ValueError("a packed batch is one row with attention_mask=None (see data.collate_packed)")
        return self.packed_position_ids(input_ids, seq_lens, image_grid_thw)

    def states(self, embeds, attention_mask, position_ids, layer=None):
        """h_bar (B, T, D): the decoder's final-RMSNorm output (what the LM head and the latent head read); with
        `layer` also the output of that decoder layer (1-based; the stock model's hidden_states[layer])."""
        # use_cache=False: no KV cache in training, and with a cache the stock model would not read packed rows'
        # example boundaries from position_ids (it builds their block-diagonal mask only without one)
        out = self.backbone.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False, output_hidden_states=layer is not None)
        return out.last_hidden_state if layer is None else (out.last_hidden_state, out.hidden_states[layer])

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None,
                latent_targets=None, scheduled_sampling=False, seq_lens=None):
        """Teacher-forced pass: the target vectors are the inputs at the latent slots. `seq_lens` marks a packed
        batch. Returns losses.gap_losses' sums and counts (the caller normalizes by global counts: loss())."""
        embeds = self.embed(input_ids, pixel_values, image_grid_thw, latent_targets)
        pos = self.positions(input_ids, attention_mask, image_grid_thw, seq_lens)
        if scheduled_sampling:
            embeds = self.sampled_latents(embeds, attention_mask, pos, input_ids)
        h = self.states(embeds, attention_mask, pos)  # (B, T, D)
        return gap_losses(h, labels, input_ids, self.latent_ids, self.head, self.backbone.lm_head, latent_targets)

    def sampled_latents(self, embeds, attention_mask, pos, input_ids):
        """Scheduled sampling (ablation, appendix F): a no-grad pass predicts every latent, and those predictions
        replace the targets as inputs of the trained pass, closer to inference where latents are fed back."""
        latent_mask = input_ids == self.pad_id  # (B, T)
        if not bool(latent_mask.any()):
            return embeds
        with torch.no_grad():
            v_pred = self.head(self.states(embeds, attention_mask, pos)[:, :-1][latent_mask[:, 1:]])
        return embeds.masked_scatter(latent_mask[..., None], v_pred.to(embeds.dtype))

    def counts(self, batch):
        """What a micro-batch's loss sums are normalized by (summed over a step's micro-batches and ranks):
        supervised next tokens and latent slots."""
        return dict(n_lm=float(lm_targets(batch["labels"], batch["input_ids"], self.latent_ids).sum()),
                    n_latent=float((batch["input_ids"] == self.pad_id).sum()))

    def loss(self, out, n):
        """Eq. 3 for one micro-batch's forward() output `out`, normalized by the step's global counts `n`."""
        return total_loss(out, n["n_lm"], n["n_latent"], self.lambda_latent)

    def generate(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, sampling=None, **kwargs):
        """New tokens (R, S) of latent_loop.generate for left-padded prompts (B, T); R = B * num_samples."""
        return latent_loop.generate(self.backbone, self.head, self.latent_ids, self.latent_tokens, input_ids,
                                    attention_mask, pixel_values, image_grid_thw, sampling, **kwargs)

    def steps(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, sampling=None, **kwargs):
        """latent_loop.latent_steps of this model: one Step per generated token (static batch); logits=True keeps
        each step's logits."""
        return latent_loop.latent_steps(self.backbone, self.head, self.latent_ids, self.latent_tokens, input_ids,
                                        attention_mask, pixel_values, image_grid_thw, sampling, **kwargs)

    def continuous_steps(self, prompts, rows, sampling=None, **kwargs):
        """latent_loop.continuous_steps of this model: (Step, job) per step, `rows` rows taking prompts in turn."""
        return latent_loop.continuous_steps(self.backbone, self.head, self.latent_ids, self.latent_tokens, prompts,
                                            rows, sampling, **kwargs)

    def generate_continuous(self, prompts, rows, sampling=None, **kwargs):
        """latent_loop.generate_continuous of this model: (job, tokens) of each job as it finishes."""
        return latent_loop.generate_continuous(self.backbone, self.head, self.latent_ids, self.latent_tokens,
                                               prompts, rows, sampling, **kwargs)

    def decode(self, tokenizer, ids):
        return latent_loop.decode(tokenizer, ids, self.latent_ids)
