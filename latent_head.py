"""
latent_head.py -- the latent head that turns the backbone's normalized last state h_bar into the next latent
input embedding (GAP paper section 4.2 eq. 1-2; appendix F "Latent head implementation", "EMA norm calibration").

Three kinds behind one interface, h_bar (..., d) in -> fp32 latent (..., d) out:
  pca    (GAP): c = W (h_bar + A(h_bar)), W = Linear(d, k) initialised to P_k^T, A a SwiGLU adapter whose output
         projection starts at zero (so the head starts exactly at P_k^T); v_hat = P_k c + mu, P_k and mu fixed.
  full   (LH ablation): v_hat = MLP(h_bar), Linear(d, d) -> GELU -> Linear(d, d), about 2 d^2 parameters.
  hidden (output-as-input baseline, Monet/LVR style): v_hat = h_bar, no parameters.
Plus noise() for the Gaussian-latent intervention (paper table 6) and ema_norm() / calibrate() for the
inference-time EMA norm calibration (paper table 1). The basis dict comes from pca.py (P, mu, eigenvalues).

Run (a self-check on random tensors):  python latent_head.py
Imports only torch / stdlib, so it can be copied into another codebase as is.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("pca", "full", "hidden")


class SwiGLU(nn.Module):
    """d -> hidden (gate, up) -> d. The output projection is zero-initialised: the adapter starts as exactly 0."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)
        nn.init.zeros_(self.down.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _check_basis(basis: dict, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    missing = [key for key in ("P", "mu", "eigenvalues") if key not in basis]
    if missing:
        raise ValueError(f"PCA basis lacks {missing}; expected a dict with P (d, k), mu (d,), eigenvalues (>=k,)")
    P, mu, lam = (torch.as_tensor(basis[key]).detach().to(torch.float32).clone() for key in ("P", "mu", "eigenvalues"))
    if P.ndim != 2 or P.shape[0] != d or not 1 <= P.shape[1] <= d:
        raise ValueError(f"PCA basis P must be (d={d}, k) with 1 <= k <= d, got {tuple(P.shape)}")
    k = P.shape[1]
    if "k" in basis and int(basis["k"]) != k:
        raise ValueError(f"PCA basis says k={basis['k']} but P has {k} columns")
    if mu.shape != (d,):
        raise ValueError(f"PCA basis mu must be ({d},), got {tuple(mu.shape)}")
    if lam.ndim != 1 or lam.numel() < k or (lam[:k] < 0).any():
        raise ValueError(f"PCA basis eigenvalues must be 1-D, >= 0, at least k={k} long, got {tuple(lam.shape)}")
    return P, mu, lam[:k].clone()


class LatentHead(nn.Module):
    def __init__(self, kind: str, d: int, basis: dict | None = None, adapter_dim: int = 256):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown latent head kind {kind!r}; expected one of {KINDS}")
        if kind == "pca" and basis is None:
            raise ValueError("LatentHead(kind='pca') needs basis= (a dict with P, mu, eigenvalues; see pca.py)")
        self.kind, self.d, self.adapter_dim = kind, d, adapter_dim
        self.k = None
        if basis is not None:  # any kind may carry the basis: noise() needs it, forward of full/hidden ignores it
            P, mu, lam = _check_basis(basis, d)
            self.k = P.shape[1]
            # persistent buffers: the basis is fixed during training (app. F) but travels with the checkpoint
            self.register_buffer("P", P)  # (d, k)
            self.register_buffer("mu", mu)  # (d,)
            self.register_buffer("eigenvalues", lam)  # (k,) variances of the coefficients, used by noise()
        if kind == "pca":
            self.W = nn.Linear(d, self.k, bias=False)  # weight (k, d)
            with torch.no_grad():
                self.W.weight.copy_(self.P.T)  # start from the empirical vision subspace, not a random basis
            self.A = SwiGLU(d, adapter_dim)
        elif kind == "full":
            self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))

    def config(self) -> dict:
        """The constructor arguments besides the basis (which travels in the state dict): enough to rebuild it."""
        return dict(kind=self.kind, d=self.d, adapter_dim=self.adapter_dim)

    def extra_repr(self) -> str:
        s = f"kind={self.kind!r}, d={self.d}"
        if self.k is not None:
            s += f", k={self.k}"
        return s + (f", adapter_dim={self.adapter_dim}" if self.kind == "pca" else "")

    def _fp32(self, x: torch.Tensor, dim: int, what: str) -> torch.Tensor:
        if x.shape[-1] != dim:
            raise ValueError(f"LatentHead.{what}: expected (..., {dim}), got {tuple(x.shape)}")
        # the head is small and its outputs are fed back as inputs: keep it in fp32 even when the backbone is bf16.
        # A cast (module.to, FSDP's mixed precision) changes every tensor alike, so one of each kind tells. Checked
        # once per public call (a decode step calls forward once): the checks and autocast contexts cost more than
        # the head's matmuls at small widths
        for name, t in filter(None, (next(self.named_parameters(), None), next(self.named_buffers(), None))):
            if t.dtype != torch.float32:
                raise TypeError(f"LatentHead.{name} is {t.dtype}; the head must stay fp32 "
                                "(cast the backbone to bf16, not the head)")
        return x.float()

    def coefficients(self, h_bar: torch.Tensor) -> torch.Tensor:
        """Eq. 1: c = W (h_bar + A(h_bar)). (..., d) -> (..., k) fp32."""
        if self.kind != "pca":
            raise RuntimeError(f"LatentHead(kind={self.kind!r}) has no coefficients; only kind='pca' predicts c")
        x = self._fp32(h_bar, self.d, "coefficients")  # (..., d)
        # an outer bf16 autocast (train.py's mixed precision) must not reach the head
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.W(x + self.A(x))  # (..., k)

    def forward(self, h_bar: torch.Tensor) -> torch.Tensor:
        """h_bar (..., d), any float dtype -> next latent input v_hat (..., d) fp32."""
        x = self._fp32(h_bar, self.d, "forward")  # (..., d)
        if self.kind == "hidden":
            return x  # output-as-input
        with torch.autocast(device_type=x.device.type, enabled=False):  # one context for the whole head
            if self.kind == "pca":
                return (self.W(x + self.A(x))) @ self.P.T + self.mu  # eq. 1: P_k c + mu
            return self.mlp(x)

    def _require_basis(self, what: str):
        if self.k is None:
            raise RuntimeError(f"LatentHead(kind={self.kind!r}).{what} needs a PCA basis: pass basis= at construction")

    def reconstruct(self, c: torch.Tensor) -> torch.Tensor:
        """v = P c + mu. (..., k) -> (..., d) fp32."""
        self._require_basis("reconstruct")
        c = self._fp32(c, self.k, "reconstruct")  # (..., k)
        with torch.autocast(device_type=c.device.type, enabled=False):
            return c @ self.P.T + self.mu

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n Gaussian latents: c_j ~ N(0, lambda_j), reconstructed with P, mu (the 'noise' intervention). (n, d) fp32.
        A generator must live on the head's device."""
        self._require_basis("noise")
        c = torch.randn(n, self.k, generator=generator, device=self.P.device)  # (n, k)
        return self.reconstruct(c * self.eigenvalues.sqrt())


def ema_norm(norms: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """The running average of the L2 norms of the query image's vision embeddings that calibration rescales
    latents to (app. F). beta 0 (default): the plain mean over all image tokens, i.e. the whole image.
    0 < beta < 1: an EMA in raster order, initialised from the first norm, n <- beta * n + (1 - beta) * norm_t;
    it weighs the last ~1 / (1 - beta) tokens (beta 0.9: the bottom-right ~10 patches). (N,) -> scalar fp32."""
    norms = torch.as_tensor(norms)
    if norms.ndim != 1 or norms.numel() == 0:
        raise ValueError(f"ema_norm expects a non-empty (N,) tensor of norms, got shape {tuple(norms.shape)}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"ema_norm: beta must be in [0, 1), got {beta}")
    if beta == 0.0:
        return norms.double().mean().to(torch.float32)
    values = norms.detach().double().cpu().tolist()  # a plain fp64 loop: cheap even for ~16K image tokens
    n_ema = values[0]
    for value in values[1:]:
        n_ema = beta * n_ema + (1.0 - beta) * value  # beta weights the running average, 1 - beta the new token
    return torch.tensor(n_ema, dtype=torch.float32, device=norms.device)


def calibrate(v: torch.Tensor, target_norm, eps: float = 1e-6) -> torch.Tensor:
    """Rescale v (..., d) to target_norm (a scalar or a (...,) tensor): v * target / ||v||, in v's dtype."""
    target = torch.as_tensor(target_norm, dtype=torch.float32, device=v.device)
    if target.ndim > 0 and tuple(target.shape) != tuple(v.shape[:-1]):
        raise ValueError(f"calibrate: target_norm shape {tuple(target.shape)} must be () or {tuple(v.shape[:-1])}")
    x = v.float()
    norm = x.norm(dim=-1, keepdim=True).clamp_min(eps)  # (..., 1); eps keeps an all-zero v finite
    return (x * (target.unsqueeze(-1) if target.ndim > 0 else target) / norm).to(v.dtype)


if __name__ == "__main__":
    torch.manual_seed(0)
    d, k = 64, 16
    P, _ = torch.linalg.qr(torch.randn(d, d))
    basis = {"P": P[:, :k], "mu": torch.randn(d), "eigenvalues": torch.linspace(2.0, 0.1, d)}
    h_bar = torch.randn(2, 5, d, dtype=torch.bfloat16)  # (B, T, d)
    for kind in KINDS:
        head = LatentHead(kind, d, basis=basis if kind == "pca" else None)
        v = head(h_bar)
        print(head, f"params={sum(p.numel() for p in head.parameters())} out={tuple(v.shape)} {v.dtype}")
    v = calibrate(head.forward(h_bar), ema_norm(torch.full((10,), 3.0)))
    print(f"calibrated norms: {v.norm(dim=-1).flatten()[:3].tolist()}")
