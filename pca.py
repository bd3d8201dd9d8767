"""
pca.py -- the fixed PCA basis of the auxiliary-image vision embeddings (GAP paper appendix C, eq. 5-7;
used by the PCA-aligned latent head of section 4.2).

Streams the cached target vectors v_i through a float64 mean / covariance accumulator (shardable across
files and ranks), eigendecomposes the covariance (eq. 5), keeps the top-k eigenvectors P_k with k the
smallest count whose cumulative explained variance reaches `var`, and saves P_k, mu and all eigenvalues as
safetensors. The latent head (latent_head.py) predicts coefficients c = P_k^T (v - mu) (eq. 6) and feeds
back v_hat = P_k c + mu. RelMSE(k) = 1 - sum_{j<=k} lambda_j / sum_j lambda_j (eq. 7).

Run:
    python pca.py --targets targets/ --var 0.95 --out pca.safetensors
    torchrun --nproc_per_node 8 pca.py --targets targets/ --device cuda --out pca.safetensors  # files split by rank

Imports only torch / safetensors / stdlib, so it can be copied into another codebase as is.
"""

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

TENSOR_KEYS = ("P", "mu", "eigenvalues")
META_KEYS = ("k", "var", "rel_mse")


class PCAStats:
    """Streaming float64 mean and population covariance (1/N, eq. 5) over the rows of (N, d) tensors.

    Keeps (n, mean, M2) with M2 = sum_i (v_i - mean)(v_i - mean)^T and combines batches with Chan et al.'s
    pairwise update. No raw sum of squares is ever formed, so the ~50-norm offset of vision embeddings costs
    no precision (E[v v^T] - mu mu^T would cancel most of the fp64 digits away).
    """

    def __init__(self, d: int | None = None, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.d, self._n, self._mean, self._m2 = None, 0, None, None  # mean (d,), M2 (d, d), both float64
        if d is not None:
            self._set_d(d, "__init__")

    def _set_d(self, d: int, where: str):
        if self.d is None:  # d is taken from the first batch unless given up front
            self.d = int(d)
            self._mean = torch.zeros(self.d, dtype=torch.float64, device=self.device)
            self._m2 = torch.zeros(self.d, self.d, dtype=torch.float64, device=self.device)
        if d != self.d:
            raise ValueError(f"PCAStats.{where}: got d={d}, the accumulator has d={self.d}")

    def _combine(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor):
        # Chan's exact merge of two (n, mean, M2) summaries
        if n_b == 0:
            return
        n = self._n + n_b
        delta = mean_b - self._mean  # (d,)
        self._mean += delta * (n_b / n)
        self._m2 += m2_b + torch.outer(delta, delta) * (self._n * n_b / n)
        self._n = n

    def update(self, x: torch.Tensor) -> "PCAStats":
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
            raise ValueError(f"PCAStats.update expects an (N, d) float tensor, got {getattr(x, 'shape', type(x))}")
        self._set_d(x.shape[1], "update")  # an empty batch falls through to _combine's n_b == 0 no-op
        x = x.detach().to(device=self.device, dtype=torch.float64)  # (N, d)
        if not torch.isfinite(x).all():
            raise ValueError("PCAStats.update: input has NaN/inf values; they would poison the whole basis")
        mean_b = x.mean(0)  # (d,)
        xc = x - mean_b  # (N, d)
        self._combine(x.shape[0], mean_b, xc.T @ xc)
        return self

    def merge(self, other: "PCAStats") -> "PCAStats":
        if other.d is not None:
            self._set_d(other.d, "merge")
            self._combine(other._n, other._mean.to(self.device), other._m2.to(self.device))
        return self

    def all_reduce(self) -> "PCAStats":
        """Combine the stats of all ranks in place (no-op without a process group). Two fp64 sum all_reduces:
        (n, n * mean) gives the global mean, then each rank's M2 re-centred on it sums to the global M2 exactly."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        if self.d is None:
            raise ValueError("PCAStats.all_reduce: d unknown; build PCAStats(d=...) on ranks that may see no data")
        # nccl only reduces CUDA tensors; gloo reduces CPU ones
        dev = torch.device(f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu")
        n_local = torch.tensor([float(self._n)], dtype=torch.float64, device=dev)  # exact in fp64 up to 2^53
        sums = torch.cat([n_local, self._mean.to(dev) * self._n])  # (1 + d,)
        dist.all_reduce(sums)
        n = int(round(sums[0].item()))
        if n == 0:
            raise ValueError("PCAStats.all_reduce: no rank saw any vector")
        mean = sums[1:] / n  # (d,)
        delta = self._mean.to(dev) - mean
        m2 = self._m2.to(dev) + torch.outer(delta, delta) * self._n  # (d, d) this rank's M2 about the global mean
        dist.all_reduce(m2)
        self._n, self._mean, self._m2 = n, mean.to(self.device), m2.to(self.device)
        return self

    @property
    def n(self) -> int:
        return self._n

    @property
    def mean(self) -> torch.Tensor:  # (d,) float64
        if self._n == 0:
            raise ValueError("PCAStats: no vectors accumulated yet")
        return self._mean.clone()

    @property
    def cov(self) -> torch.Tensor:  # (d, d) float64, population covariance (1/N) as in eq. 5
        if self._n == 0:
            raise ValueError("PCAStats: no vectors accumulated yet")
        return self._m2 / self._n


def k_for_var(eigenvalues: torch.Tensor, var: float) -> int:
    """Smallest k whose top-k eigenvalues (descending) explain at least `var` of the total variance."""
    if not 0.0 < var <= 1.0:
        raise ValueError(f"var must be in (0, 1], got {var}")
    lam = torch.as_tensor(eigenvalues).detach().to("cpu", torch.float64)
    if lam.ndim != 1 or lam.numel() == 0:
        raise ValueError(f"eigenvalues must be a non-empty 1-D tensor, got shape {tuple(lam.shape)}")
    if (lam[1:] > lam[:-1]).any():
        raise ValueError("eigenvalues must be sorted in descending order")
    lam = lam.clamp_min(0)  # round-off negatives of a PSD matrix carry no variance
    if lam.sum() <= 0:
        raise ValueError("total variance is zero: all vectors are identical")
    ratio = lam.cumsum(0) / lam.sum()
    ratio[-1] = 1.0  # round-off must not make var=1.0 unreachable
    k = int(torch.searchsorted(ratio, torch.tensor([var], dtype=torch.float64)).item()) + 1
    return min(k, lam.numel())


def rel_mse(eigenvalues: torch.Tensor, k: int) -> float:
    """Eq. 7: fraction of centred variance outside the top-k subspace, 1 - sum_{j<=k} lambda_j / sum_j lambda_j."""
    lam = torch.as_tensor(eigenvalues).detach().to("cpu", torch.float64).clamp_min(0)
    if not 0 <= k <= lam.numel():
        raise ValueError(f"k={k} out of range for {lam.numel()} eigenvalues")
    return float(lam[k:].sum() / lam.sum())  # the tail sum: no cancellation when RelMSE is small


def fit(stats: PCAStats, var: float = 0.95) -> dict:
    """Eigendecompose the covariance (fp64) and keep the top-k eigenvectors reaching `var` explained variance."""
    if stats.n < 2:
        raise ValueError(f"fit needs at least 2 vectors, got {stats.n}")
    evals, evecs = torch.linalg.eigh(stats.cov)  # ascending; (d,), (d, d) float64
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)  # descending
    k = k_for_var(evals, var)
    P = evecs[:, :k]  # (d, k)
    # eigh returns each eigenvector up to sign (which differs across LAPACK builds): make the largest-|.|
    # entry of every column positive so reruns and machines give the same basis
    rows = P.abs().argmax(0)  # (k,)
    P = P * torch.sign(P[rows, torch.arange(k, device=P.device)])
    return {"P": P.to("cpu", torch.float32).contiguous(),  # (d, k)
            "mu": stats.mean.to("cpu", torch.float32),  # (d,)
            "eigenvalues": evals.to("cpu", torch.float32),  # (d,) all of them, descending
            "k": k, "var": float(var), "rel_mse": rel_mse(evals, k), "n": stats.n}


def project(basis: dict, v: torch.Tensor) -> torch.Tensor:
    """Eq. 6: c = P^T (v - mu). (..., d) -> (..., k)."""
    P, mu = basis["P"].to(v.device), basis["mu"].to(v.device)
    if v.shape[-1] != P.shape[0]:
        raise ValueError(f"project: v has last dim {v.shape[-1]}, the basis has d={P.shape[0]}")
    return (v.to(P.dtype) - mu) @ P


def reconstruct(basis: dict, c: torch.Tensor) -> torch.Tensor:
    """Eq. 6: v_hat = P c + mu. (..., k) -> (..., d)."""
    P, mu = basis["P"].to(c.device), basis["mu"].to(c.device)
    if c.shape[-1] != P.shape[1]:
        raise ValueError(f"reconstruct: c has last dim {c.shape[-1]}, the basis has k={P.shape[1]}")
    return c.to(P.dtype) @ P.T + mu


def _check(basis: dict, where: str):
    P, mu, lam, k = basis["P"], basis["mu"], basis["eigenvalues"], int(basis["k"])
    if P.ndim != 2 or mu.shape != (P.shape[0],) or lam.ndim != 1 or lam.numel() < P.shape[1] or P.shape[1] != k:
        raise ValueError(f"{where}: inconsistent basis: P {tuple(P.shape)}, mu {tuple(mu.shape)}, "
                         f"eigenvalues {tuple(lam.shape)}, k={k} (want P (d, k), mu (d,), eigenvalues (>=k,))")


def save(path: str | Path, basis: dict):
    """Write the basis as safetensors, atomically: a crash never leaves a half-written file at `path`."""
    path = Path(path)
    _check(basis, f"save({path})")
    tensors = {key: basis[key].detach().to("cpu", torch.float32).contiguous() for key in TENSOR_KEYS}
    metadata = {"k": str(int(basis["k"])), "var": repr(float(basis["var"])), "rel_mse": repr(float(basis["rel_mse"]))}
    if "n" in basis:
        metadata["n"] = str(int(basis["n"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PCA basis file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata() or {}
        for key in TENSOR_KEYS:
            if key not in keys:
                raise KeyError(f"{path}: missing tensor '{key}' (file has {sorted(keys)})")
        basis = {key: f.get_tensor(key) for key in TENSOR_KEYS}
    for key in META_KEYS:
        if key not in meta:
            raise KeyError(f"{path}: missing metadata '{key}' (file has {sorted(meta)})")
    basis.update(k=int(meta["k"]), var=float(meta["var"]), rel_mse=float(meta["rel_mse"]))
    if "n" in meta:
        basis["n"] = int(meta["n"])
    _check(basis, str(path))
    return basis


@dataclass
class Config:
    targets: str = ""  # folder searched recursively for *.safetensors target caches; every tensor is an (n, d) block
    var: float = 0.95  # explained-variance target; k = smallest count reaching it (paper: 0.95 -> k=629 of 3584)
    out: str = "pca.safetensors"  # where the basis is written (atomically)
    device: str = "cpu"  # where the fp64 accumulation and eigh run; "cuda" is much faster at d=3584


def parse_config(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        if isinstance(f.default, bool):
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f"default: {f.default!r}")
    return Config(**vars(parser.parse_args(argv)))


def fail(message: str):
    """A bad input or a failed write: one line on stderr and exit code 2, no traceback."""
    print(f"pca.py: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def scan(files: list[Path]) -> int:
    """Check every tensor header (no data read) and return d: a bad tensor fails in seconds, not after hours of
    accumulation, and ranks that get no file still know d for the all_reduce."""
    d = None
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                blocks = [(key, f.get_slice(key).get_shape(), f.get_slice(key).get_dtype()) for key in f.keys()]
        except Exception as e:  # a truncated file, a directory, a file of another kind
            fail(f"{path}: not a readable safetensors file ({str(e).strip() or type(e).__name__})")
        for key, shape, dtype in blocks:
            if len(shape) != 2 or dtype not in ("F64", "F32", "F16", "BF16") or shape[1] != (d or shape[1]):
                fail(f"{path} [{key}]: expected an (n, {d or 'd'}) float block of target vectors, got shape "
                     f"{tuple(shape)} {dtype}")
            d = shape[1]
    if d is None:
        fail("the target files hold no tensors")
    return d


def main(cfg: Config):
    if not cfg.targets:
        fail("--targets DIR is required")
    files = sorted(Path(cfg.targets).rglob("*.safetensors"))
    if not files:
        fail(f"no *.safetensors files under {cfg.targets}")
    rank, world, device = 0, 1, cfg.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: each rank reads every world-th file
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    d = scan(files)
    stats = PCAStats(d=d, device=device)
    for path in files[rank::world]:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                stats.update(f.get_tensor(key))  # (n, d), one block in memory at a time
    stats.all_reduce()
    if rank == 0:
        basis = fit(stats, cfg.var)
        try:
            save(cfg.out, basis)
        except Exception as e:
            if not any(t in str(e) for t in ("No space left", "Disk quota", "File too large")):
                raise
            fail(f"{cfg.out}: cannot write it ({str(e).strip()}); it is as it was: free space and run again")
        print(f"n={basis['n']} d={d} k={basis['k']} var={basis['var']} rel_mse={basis['rel_mse']:.6f} -> {cfg.out}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_config())
