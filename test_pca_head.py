"""Tests for pca.py and latent_head.py (CPU, a few seconds). Run: python -m pytest -q test_pca_head.py"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import pca
from latent_head import LatentHead, calibrate, ema_norm

HERE = Path(__file__).resolve().parent
D = 32
LAM = [40.0, 30.0, 20.0, 10.0] + [0.25] * (D - 4)  # cumulative share: 0.37, 0.65, 0.84, 0.93 -> k(0.9)=4, k(0.8)=3


def _synthetic(n=20000, seed=0):
    """(n, D) fp64 vectors with a known covariance Q diag(LAM) Q^T and a mean of norm 50 (like vision embeddings)."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.tensor(LAM, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))  # random orthogonal basis
    mu = torch.randn(D, generator=g, dtype=torch.float64)
    mu = 50 * mu / mu.norm()
    z = torch.randn(n, D, generator=g, dtype=torch.float64) * lam.sqrt()  # (n, D)
    return z @ Q.T + mu, lam, Q, mu


def _reference_stats(x):
    """Two-pass fp64 mean and population covariance."""
    x = x.double()
    mean = x.mean(0)
    xc = x - mean
    return mean, xc.T @ xc / x.shape[0]


def _basis(var=0.9, seed=0):
    x, *_ = _synthetic(seed=seed)
    return pca.fit(pca.PCAStats().update(x), var=var), x


def _run(args, cwd, env=None, check=True):
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


# ----------------------------------------------------------------------------- pca.py

def test_pca_fit_recovers_known_spectrum():
    x, lam, Q, mu = _synthetic()
    basis = pca.fit(pca.PCAStats().update(x), var=0.9)
    assert basis["k"] == 4 and basis["P"].shape == (D, 4) and basis["P"].dtype == torch.float32
    assert pca.k_for_var(basis["eigenvalues"], 0.8) == 3
    evals = basis["eigenvalues"].double()
    assert evals.shape == (D,) and (evals[1:] <= evals[:-1]).all()
    torch.testing.assert_close(evals[:4], lam[:4], rtol=0.05, atol=0)  # sampling error ~ sqrt(2/N) = 1%
    torch.testing.assert_close(evals[4:], lam[4:], rtol=0.15, atol=0)  # a near-isotropic block spreads more
    P = basis["P"].double()
    torch.testing.assert_close(P.T @ P, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    assert ((P.T @ Q[:, :4]).diagonal().abs() > 0.99).all()  # the right directions
    assert (P.gather(0, P.abs().argmax(0, keepdim=True)) > 0).all()  # deterministic sign
    torch.testing.assert_close(basis["mu"].double(), mu, atol=0.1, rtol=0)
    assert basis["n"] == x.shape[0]


def test_pca_rel_mse_equals_measured_reconstruction_error():
    x, *_ = _synthetic()
    stats = pca.PCAStats().update(x)
    for var, want_k in [(0.8, 3), (0.9, 4), (0.99, None)]:  # 0.99 lands in the sampled isotropic tail
        basis = pca.fit(stats, var=var)
        k = basis["k"]
        assert k == want_k if want_k else 4 < k < D
        b64 = {"P": basis["P"].double(), "mu": basis["mu"].double()}
        v_hat = pca.reconstruct(b64, pca.project(b64, x))  # eq. 6
        measured = ((x - v_hat) ** 2).sum(-1).mean() / ((x - b64["mu"]) ** 2).sum(-1).mean()  # eq. 7, left side
        assert abs(float(measured) - basis["rel_mse"]) < 1e-6
        assert abs(basis["rel_mse"] - pca.rel_mse(basis["eigenvalues"], k)) < 1e-6


def test_pca_k_for_var_and_rel_mse_edges():
    lam = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert pca.k_for_var(lam, 0.7) == 2  # exactly reaching var counts (>=)
    assert pca.k_for_var(lam, 0.71) == 3
    assert pca.k_for_var(lam, 1.0) == 4
    assert pca.k_for_var(torch.tensor([1.0, 0.0, 0.0]), 1.0) == 1  # zero-variance tail is not needed
    assert abs(pca.rel_mse(lam, 2) - 0.3) < 1e-12 and pca.rel_mse(lam, 4) == 0.0
    with pytest.raises(ValueError, match="descending"):
        pca.k_for_var(lam.flip(0), 0.9)
    with pytest.raises(ValueError, match="var"):
        pca.k_for_var(lam, 0.0)


def test_pca_streaming_and_merge_match_one_batch():
    x, *_ = _synthetic(n=6000, seed=1)
    one = pca.PCAStats().update(x)
    streamed = pca.PCAStats()
    for chunk in torch.split(x, [1, 0, 999, 2500, 2500]):  # uneven chunks, one of them empty
        streamed.update(chunk)
    shards = [pca.PCAStats().update(part) for part in torch.split(x, [1000, 3000, 2000])]
    merged = shards[0].merge(shards[1]).merge(shards[2]).merge(pca.PCAStats())  # an empty shard is a no-op
    ref_mean, ref_cov = _reference_stats(x)
    for stats in (one, streamed, merged):
        assert stats.n == x.shape[0]
        torch.testing.assert_close(stats.mean, ref_mean, atol=1e-10, rtol=0)
        torch.testing.assert_close(stats.cov, ref_cov, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="d=16"):
        one.update(torch.zeros(3, 16))
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        one.update(torch.zeros(D))


def test_pca_stats_stable_under_large_offset():
    # an offset of 1e6 with unit variance: E[x x^T] - mu mu^T would lose ~12 of fp64's 16 digits
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4000, 8, generator=g, dtype=torch.float64) + 1e6
    stats = pca.PCAStats()
    for chunk in torch.split(x, 333):
        stats.update(chunk)
    ref_mean, ref_cov = _reference_stats(x)
    torch.testing.assert_close(stats.cov, ref_cov, atol=1e-8, rtol=0)
    torch.testing.assert_close(stats.mean, ref_mean, atol=1e-8, rtol=0)
    low = pca.PCAStats().update(x[:500].to(torch.bfloat16))  # any float dtype is accepted
    assert low.n == 500 and low.cov.dtype == torch.float64


def test_pca_save_load_roundtrip(tmp_path):
    basis, _ = _basis()
    path = tmp_path / "sub" / "pca.safetensors"
    pca.save(path, basis)
    assert sorted(p.name for p in path.parent.iterdir()) == ["pca.safetensors"]  # no temp file left behind
    back = pca.load(path)
    for key in ("P", "mu", "eigenvalues"):
        assert torch.equal(back[key], basis[key])
    for key in ("k", "var", "rel_mse", "n"):
        assert back[key] == basis[key], key
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        pca.load(missing)
    save_file({"P": basis["P"]}, str(tmp_path / "partial.safetensors"), metadata={"k": "4"})
    with pytest.raises(KeyError, match="mu"):
        pca.load(tmp_path / "partial.safetensors")


def test_pca_cli_builds_loadable_basis(tmp_path):
    x, *_ = _synthetic()
    (tmp_path / "targets" / "shard1").mkdir(parents=True)
    save_file({"ex0": x[:7000].float(), "ex1": x[7000:9000].float()}, str(tmp_path / "targets" / "a.safetensors"))
    save_file({"ex2": x[9000:].to(torch.bfloat16)}, str(tmp_path / "targets" / "shard1" / "b.safetensors"))
    out = tmp_path / "pca.safetensors"
    res = _run([str(HERE / "pca.py"), "--targets", str(tmp_path / "targets"), "--var", "0.9", "--out", str(out)], HERE)
    assert "k=4" in res.stdout and f"d={D}" in res.stdout, res.stdout
    basis = pca.load(out)
    assert basis["k"] == 4 and basis["n"] == x.shape[0] and basis["P"].shape == (D, 4)
    assert abs(basis["var"] - 0.9) < 1e-12 and 0 < basis["rel_mse"] < 0.1


def test_pca_cli_rejects_bad_tensor(tmp_path):
    save_file({"good": torch.randn(10, D), "bad_key": torch.randn(D)}, str(tmp_path / "broken.safetensors"))
    res = _run([str(HERE / "pca.py"), "--targets", str(tmp_path), "--out", str(tmp_path / "o.safetensors")], HERE,
               check=False)
    assert res.returncode != 0
    assert "broken.safetensors" in res.stderr and "bad_key" in res.stderr, res.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_pca_cli_torchrun_matches_single_process(tmp_path):
    # 3 gloo ranks, 2 files of uneven size: the all_reduce must re-centre each rank's M2 on the global mean, and
    # rank 2 reads nothing yet must still join it with the right d
    x, *_ = _synthetic(n=3000, seed=4)
    (tmp_path / "t").mkdir()
    save_file({"a": x[:500].float()}, str(tmp_path / "t" / "a.safetensors"))
    save_file({"b": x[500:2000].float(), "c": x[2000:].float()}, str(tmp_path / "t" / "b.safetensors"))
    cli = [str(HERE / "pca.py"), "--targets", str(tmp_path / "t"), "--var", "0.9"]
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", *cli,
          "--out", str(tmp_path / "dist.safetensors")], HERE)
    dist_basis = pca.load(tmp_path / "dist.safetensors")
    one = pca.fit(pca.PCAStats().update(x.float()), var=0.9)
    assert dist_basis["n"] == 3000 and dist_basis["k"] == one["k"] == 4
    for key in ("P", "mu", "eigenvalues"):
        torch.testing.assert_close(dist_basis[key], one[key], atol=1e-5, rtol=1e-6)


COPY_OUT = {  # run in a directory that holds only the copied file
    "pca": "import torch, pca; b = pca.fit(pca.PCAStats().update(torch.randn(500, 16) * torch.arange(1, 17)), 0.9); "
           "pca.save('b.safetensors', b); print('k', pca.load('b.safetensors')['k'])",
    "latent_head": "import runpy; runpy.run_path('latent_head.py', run_name='__main__')",
}


@pytest.mark.parametrize("name", sorted(COPY_OUT))
def test_pca_and_head_copy_out_alone(tmp_path, name):
    """Copied alone into an empty directory, each runs (a fit and save/load; the head's self-check) with
    nothing of the project importable."""
    shutil.copy(HERE / f"{name}.py", tmp_path / f"{name}.py")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    guard = "import importlib.util; assert importlib.util.find_spec('model') is None; "
    res = _run(["-c", guard + COPY_OUT[name]], tmp_path, env=env)
    assert ("k " if name == "pca" else "calibrated norms") in res.stdout


# ----------------------------------------------------------------------------- latent_head.py

def test_head_pca_init_is_projection():
    basis, x = _basis()
    head = LatentHead("pca", D, basis=basis)
    P, mu = basis["P"].double(), basis["mu"].double()
    h = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(0)) * 4  # (B, T, D)
    for h_in in (h, h.to(torch.bfloat16)):
        want = h_in.double() @ P @ P.T + mu  # P P^T h_bar + mu
        out = head(h_in)
        assert out.dtype == torch.float32 and out.shape == h.shape
        torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # an outer bf16 autocast must not reach the head
            torch.testing.assert_close(head(h_in).double(), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(head.coefficients(h).double(), h.double() @ P, atol=1e-5, rtol=1e-6)
    c = torch.randn(7, basis["k"], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = head.reconstruct(c)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v.double(), c.double() @ P.T + mu, atol=1e-6, rtol=1e-6)


def test_head_pca_adapter_gets_gradient():
    basis, x = _basis()
    head = LatentHead("pca", D, basis=basis, adapter_dim=16)
    h = torch.randn(64, D, generator=torch.Generator().manual_seed(1))
    assert head.A(h).abs().max() == 0  # zero-initialised output projection
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    loss = torch.nn.functional.mse_loss(head(h), x[:64].float())
    loss.backward()
    assert head.A.down.weight.grad.abs().max() > 0 and head.W.weight.grad.abs().max() > 0
    opt.step()
    assert head.A(h).abs().max() > 0
    assert torch.equal(head.P, basis["P"]) and torch.equal(head.mu, basis["mu"])  # the basis stays fixed


def test_head_full_hidden_and_bad_args():
    full = LatentHead("full", D)
    assert sum(p.numel() for p in full.parameters()) == 2 * D * D + 2 * D
    h = torch.randn(2, 3, D, dtype=torch.bfloat16)
    assert full(h).dtype == torch.float32 and full(h).shape == (2, 3, D)
    hidden = LatentHead("hidden", D)
    assert list(hidden.parameters()) == [] and torch.equal(hidden(h), h.float())
    assert "kind='hidden'" in repr(hidden)
    with pytest.raises(ValueError, match="unknown latent head kind"):
        LatentHead("mlp", D)
    with pytest.raises(ValueError, match="basis"):
        LatentHead("pca", D)
    basis, _ = _basis()
    with pytest.raises(ValueError, match="d=16"):
        LatentHead("pca", 16, basis=basis)
    with pytest.raises(ValueError, match=f"{D}"):
        hidden(torch.randn(2, D + 1))
    with pytest.raises(RuntimeError, match="basis"):
        full.noise(4)


def test_head_noise_matches_eigenvalues():
    basis, x = _basis()
    k = basis["k"]
    for head in (LatentHead("pca", D, basis=basis), LatentHead("full", D, basis=basis)):
        v = head.noise(50000, generator=torch.Generator().manual_seed(0))  # (n, D)
        assert v.shape == (50000, D) and v.dtype == torch.float32
        c = pca.project(basis, v)  # (n, k)
        torch.testing.assert_close(c.var(0), basis["eigenvalues"][:k], rtol=0.03, atol=0)
        assert c.mean(0).abs().max() < 0.1
        # the noise lives in the data's norm regime: centred energy = the top-k share of the data's variance
        noise_energy = ((v - basis["mu"]) ** 2).sum(-1).mean()
        data_energy = ((x - x.mean(0)) ** 2).sum(-1).mean() * (1 - basis["rel_mse"])
        assert abs(float(noise_energy / data_energy) - 1) < 0.03
        assert abs(float(v.norm(dim=-1).mean() / x.norm(dim=-1).mean()) - 1) < 0.03
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(head.noise(3, generator=g1), head.noise(3, generator=g2))


def test_head_state_dict_carries_basis_and_stays_fp32():
    basis, _ = _basis()
    head = LatentHead("pca", D, basis=basis)
    assert {"P", "mu", "eigenvalues", "W.weight"} <= set(head.state_dict())
    assert head.eigenvalues.shape == (basis["k"],)
    other = LatentHead("pca", D, basis={**basis, "mu": basis["mu"] + 1})
    other.load_state_dict(head.state_dict())
    torch.testing.assert_close(other(torch.ones(D)), head(torch.ones(D)))
    head.to(torch.bfloat16)  # casting the whole model to bf16 must not silently degrade the head
    with pytest.raises(TypeError, match="fp32"):
        head(torch.ones(D))


def test_head_ema_norm():
    assert abs(float(ema_norm(torch.full((50,), 7.5))) - 7.5) < 1e-6
    # beta weights the running average: [1, 10] -> 0.9 * 1 + 0.1 * 10 = 1.9 (a flipped beta would give 9.1)
    assert abs(float(ema_norm(torch.tensor([1.0, 10.0]), beta=0.9)) - 1.9) < 1e-6
    assert abs(float(ema_norm(torch.tensor([10.0, 1.0]), beta=0.9)) - 9.1) < 1e-6  # order matters
    # beta=0 (the default): the plain mean of all tokens, the whole image (an EMA at 0.9 would give ~the last)
    assert abs(float(ema_norm(torch.tensor([3.0, 5.0, 8.0, 20.0]))) - 9.0) < 1e-6
    norms = torch.rand(100, generator=torch.Generator().manual_seed(0)) + 1
    want = norms[0].item()
    for value in norms[1:].tolist():
        want = 0.8 * want + 0.2 * value
    assert abs(float(ema_norm(norms, beta=0.8)) - want) < 1e-5
    with pytest.raises(ValueError):
        ema_norm(torch.tensor([]))
    with pytest.raises(ValueError, match="beta"):
        ema_norm(norms, beta=1.0)


def test_head_calibrate():
    v = torch.randn(4, 6, D, generator=torch.Generator().manual_seed(0)) * 30
    out = calibrate(v, 12.5)
    torch.testing.assert_close(out.norm(dim=-1), torch.full((4, 6), 12.5), rtol=1e-5, atol=0)
    torch.testing.assert_close(out / out.norm(dim=-1, keepdim=True), v / v.norm(dim=-1, keepdim=True))  # same direction
    target = torch.arange(1.0, 25.0).reshape(4, 6)  # per-row target norms
    torch.testing.assert_close(calibrate(v, target).norm(dim=-1), target, rtol=1e-5, atol=0)
    assert torch.isfinite(calibrate(torch.zeros(2, D), 3.0)).all()
    assert calibrate(v.to(torch.bfloat16), 1.0).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="target_norm"):
        calibrate(v, torch.ones(5))
