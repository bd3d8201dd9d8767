"""Held-out validation during training (train.py --eval_data FILE --eval_every N): on a file in the training data's
format, what the training loss cannot say --

  val_loss_lm, val_loss_latent (, val_loss_align)   the teacher-forced losses of eq. 3 (VaLR: + REPA), normalized by
                                                    the number of supervised tokens / latent slots over the whole set
  val_latent_cos                                    mean cosine of the predicted latent head(h_bar[t-1]) and its target
  val_latent_pca_cos, val_latent_relmse             in the PCA space (c = P^T (v - mu), the targets' mean removed): the
                                                    mean cosine of c_hat and c, and sum ||c_hat - c||^2 / sum ||c||^2,
                                                    the error left relative to the targets' variance (1: predicting mu)
  val_latent_norm, val_vision_norm, val_norm_ratio  mean L2 norm of the predicted (fed-back) latents and of the query
                                                    image's vision embeddings, and their ratio (paper Fig. 2b; norms.py)
  val_span_open, val_well_formed, val_accuracy      greedy generation (the KV-cached latent loop, GAP.generate) on the
                                                    first --eval_generate examples: the share that opens a latent span,
                                                    that writes <answer>...</answer>, and that is right (answers.py)
  val_generated                                     how many answers those rates are of

Each rank takes every world-th example and the sums are reduced over ranks, so every rank returns the same numbers.
The forward is GAP's own (the module the step trains, hooked to read the head's output and the input embeddings),
so the validation loss is the training objective on other data, not a second implementation of it. Under FSDP2 the
generation part is skipped: a rank's decode steps run collectives that the other ranks' answers of other lengths
would not match.

Not run alone; train.py calls it:
    python train.py ... --eval_data val.jsonl --eval_every 200 --eval_generate 16
"""
import math
import time

import torch

from answers import answers_match, extract_answer, well_formed
from common import all_reduce
from data import collate, encode_row
from latent_loop import Sampling
from pca import project
from step import to_device

GENERATE_BATCH = 8  # answers decoded together (a rank's share of --eval_generate is a few)


class Validation:
    """The validation of one run. `dataset`: the held-out examples as training reads them (a GAPDataset, or VaLR's
    AlignedDataset); `basis`: the PCA basis (None: no val_latent_relmse)."""

    def __init__(self, dataset, tokenizer, image_processor, basis, micro_batch=1, n_generate=8, max_new_tokens=256,
                 bf16=False, fsdp=False, rank=0, world=1):
        self.dataset, self.tokenizer, self.image_processor, self.basis = dataset, tokenizer, image_processor, basis
        self.micro_batch, self.bf16, self.fsdp, self.rank, self.world = micro_batch, bf16, fsdp, rank, world
        self.generate_rows = [] if fsdp else dataset.rows[:n_generate]
        self.sampling = Sampling(max_new_tokens=max_new_tokens, stop_ids=[
            tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")])

    def __call__(self, gap, device):
        """The numbers above for `gap` (the module the step runs forward on: FSDP2 gathers its parameters), and
        val_s, the seconds it took. Every rank must call it (the sums are all-reduced)."""
        t0 = time.time()
        was_training = gap.training
        gap.eval()
        try:
            with torch.no_grad():
                out = self.teacher_forced(gap, device)
                out.update(self.generation(gap, device))
        finally:
            gap.train(was_training)
        out["val_s"] = time.time() - t0
        return out

    def batches(self):
        """This rank's micro-batches as (weight, batch): every rank runs as many forwards as the rank with the most
        (FSDP2 gathers parameters in each), repeating one with weight 0 where it has fewer."""
        n = len(self.dataset)
        mine = list(range(self.rank, n, self.world))
        n_batches = math.ceil(math.ceil(n / self.world) / self.micro_batch)
        chunks = [mine[i:i + self.micro_batch] for i in range(0, len(mine), self.micro_batch)] or [[0]]
        for j in range(n_batches):
            weight = float(j < len(chunks) and bool(mine))
            yield weight, collate([self.dataset[i] for i in chunks[min(j, len(chunks) - 1)]],
                                  self.tokenizer.pad_token_id)

    def teacher_forced(self, gap, device):
        """The teacher-forced numbers (module docstring), reduced over ranks."""
        seen = {}  # what the hooks read in the forward running now

        def head_out(module, args, out):  # the last head call of a forward is gap_losses' (VaLR self-feeding: the
            seen["v_hat"] = out           # passes before it)

        def embeds_in(module, args, kwargs):
            seen["embeds"] = kwargs["inputs_embeds"]

        hooks = [gap.head.register_forward_hook(head_out),
                 gap.backbone.model.register_forward_pre_hook(embeds_in, with_kwargs=True)]
        sums = {}
        try:
            for weight, batch in self.batches():
                n = gap.counts(batch)
                mb = to_device(batch, device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16 and not self.fsdp):
                    out = gap(**mb)
                parts = {k: out[k] for k in out if k.endswith("_sum")}
                parts.update({k: v for k, v in n.items()})
                parts.update(self.latent_sums(seen["v_hat"], mb.get("latent_targets")))
                vision = seen["embeds"][mb["input_ids"] == gap.image_token_id].float()  # (N_image, D)
                parts.update(vision_norm=vision.norm(dim=-1).sum(), n_vision=vision.shape[0])
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + weight * float(v)
        finally:
            for h in hooks:
                h.remove()
        sums = dict(zip(sums, all_reduce(list(sums.values()), device)))
        res = {f"val_loss_{k[:-len('_sum')]}": v / max(sums["n_" + k[:-len("_sum")]], 1.0)
               for k, v in sums.items() if k.endswith("_sum") and "n_" + k[:-len("_sum")] in sums}
        if sums["n_pred"]:
            res.update(val_latent_cos=sums["cos"] / sums["n_pred"], val_latent_norm=sums["pred_norm"] / sums["n_pred"])
            if self.basis is not None:
                res.update(val_latent_pca_cos=sums["pca_cos"] / sums["n_pred"],
                           val_latent_relmse=sums["pca_err"] / max(sums["pca_var"], 1e-30))
        res["val_vision_norm"] = sums["vision_norm"] / max(sums["n_vision"], 1.0)
        if "val_latent_norm" in res:
            res["val_norm_ratio"] = res["val_latent_norm"] / max(res["val_vision_norm"], 1e-30)
        return res

    def latent_sums(self, v_hat, targets):
        """Sums over this batch's latent slots of the predicted latents against their targets (none: zeros)."""
        # the same keys in the same order on every rank: the sums are all-reduced as one list
        if targets is None or v_hat is None or v_hat.shape[0] == 0:
            return dict(cos=0.0, pred_norm=0.0, pca_cos=0.0, pca_err=0.0, pca_var=0.0, n_pred=0)
        v, t = v_hat.float(), targets.float()  # (N_slots, D)
        out = dict(cos=torch.nn.functional.cosine_similarity(v, t, dim=-1).sum(), pred_norm=v.norm(dim=-1).sum(),
                   pca_cos=0.0, pca_err=0.0, pca_var=0.0, n_pred=v.shape[0])
        if self.basis is not None:
            c_hat, c = project(self.basis, v), project(self.basis, t)  # (N_slots, k)
            out.update(pca_cos=torch.nn.functional.cosine_similarity(c_hat, c, dim=-1).sum(),
                       pca_err=(c_hat - c).pow(2).sum(), pca_var=c.pow(2).sum())
        return out

    def generation(self, gap, device):
        """Greedy answers of this rank's share of the generation examples, scored; reduced over ranks."""
        if self.fsdp or not self.generate_rows:
            return {}
        rows = self.generate_rows[self.rank::self.world]
        counts = [0.0] * 5  # answered, opened a span, well formed, with an answer, right
        for i in range(0, len(rows), GENERATE_BATCH):
            chunk = rows[i:i + GENERATE_BATCH]
            batch = collate([encode_row(self.tokenizer, self.image_processor, r, self.dataset.spec) for r in chunk],
                            self.tokenizer.pad_token_id, left=True)
            # the weights as they are (infer.py's way), without the training step's autocast
            tokens = gap.generate(*(batch[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values",
                                                                  "image_grid_thw")), self.sampling)
            for r, row_tokens in zip(chunk, tokens.cpu()):
                response = gap.decode(self.tokenizer, row_tokens)
                truth = str(r.get("answer", ""))
                counts[0] += 1
                counts[1] += "<latent>" in response
                counts[2] += well_formed(response)
                counts[3] += bool(truth)
                counts[4] += bool(truth) and answers_match(extract_answer(response), truth, r["question"])
        n, opened, formed, with_answer, right = all_reduce(counts, device)
        out = dict(val_generated=n, val_span_open=opened / max(n, 1.0), val_well_formed=formed / max(n, 1.0))
        if with_answer:
            out["val_accuracy"] = right / with_answer
        return out
