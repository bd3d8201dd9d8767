"""Tests of training at scale (train.py) on a tiny random Qwen2.5-VL, with real torchrun launches of 2 gloo ranks
on the CPU: the gradients of 2 ranks equal those of 1 process (DDP, FSDP2, packed rows, activation
checkpointing), packed rows give the loss of padded batches, a run killed with SIGKILL and resumed gives the
losses of an uninterrupted run, a kill mid-save leaves the previous state whole, and the FSDP2 export loads;
two nodes simulated by two torchrun launchers train as one launcher does, and recover from a killed node.

    python -m pytest -q test_train.py
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import pca as pca_lib
from conftest import ENV, HERE, K, SAVE_FIRST_GRADS, kill_tree, make_gap, run, stop, torchrun, write_jsonl
from data import DataSpec, GAPDataset, collate, collate_packed, pack

DRIVER = SAVE_FIRST_GRADS + """
import json, os, signal, sys, time
import torch
import checkpoint, data, train
from common import run_main
mode, out, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
rank = int(os.environ.get("RANK", 0))
cfg = train.parse_config(train.TrainConfig, argv)
reduced = set()  # dtypes FSDP2 reduce-scatters gradients in
for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
    if hasattr(torch.distributed, name):
        def record(*a, _real=getattr(torch.distributed, name), **kw):
            reduced.add(str((kw.get("input") if "input" in kw else a[1]).dtype))
            return _real(*a, **kw)
        setattr(torch.distributed, name, record)
real_collate = data.StepCollate.__call__
def collate(self, items):  # runs in this process with --num_workers 0
    micro, errors = real_collate(self, items)
    print(f"rank {rank}: {len(micro)} micro-batches", flush=True)
    return micro, errors
data.StepCollate.__call__ = collate
if mode == "grads":
    train.main(cfg, on_grads=first_grads(out, rank))
    print(f"rank {rank} reduced gradients in: {sorted(reduced)}", flush=True)
else:  # train.main, SIGKILLed on rank 0 after the state of step N is saved, or in the middle of that save; or
    # (hold) every rank of this launcher waits after that save, until the test kills the launcher
    kill = os.environ.get("KILL", "")
    if kill:
        where, at = kill.split(":")
        real_save, real_replace = train.save_state, checkpoint.replace_dir
        def save_state(path, gap, opt, sched, step, *a):
            real_save(path, gap, opt, sched, step, *a)
            if where == "after_save" and step == int(at) and rank == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            if where == "hold" and step == int(at):
                open(out + ".held", "w").close()
                time.sleep(600)
        def replace_dir(tmp, path):  # rank 0 only, once the whole state is in tmp
            if where == "mid_save" and torch.load(os.path.join(tmp, "meta.pt"))["step"] == int(at):
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(tmp, path)
        train.save_state, checkpoint.replace_dir = save_state, replace_dir
    losses = run_main(train.main, cfg)["losses"]  # as train.py's __main__ runs it
    if rank == 0:
        with open(out, "w") as f:
            json.dump(losses, f)
print(f"driver done on rank {rank}", flush=True)
"""


@pytest.fixture(scope="module")
def setup(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    (tmp / "driver.py").write_text(DRIVER)
    pca_lib.save(str(tmp / "pca.safetensors"), world["basis"])  # one basis for every run
    args = ["--model", world["model"], "--data", world["data"], "--target_cache", str(world["root"] / "cache"),
            "--latent_tokens", str(K), "--adapter_dim", "16", "--pca_path", str(tmp / "pca.safetensors"),
            "--lr", "1e-3", "--head_lr", "1e-3", "--max_len", "200", "--num_workers", "0"]
    return dict(tmp=tmp, driver=tmp / "driver.py", args=args)


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def same_weights(a, b):
    """Whether the exported models in directories a and b are equal, bit for bit."""
    from safetensors.torch import load_file
    a, b = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


GRADS = ["--global_batch", "4", "--max_steps", "1", "--grad_clip", "0"]  # the first step of 4 examples, unclipped


@pytest.fixture(scope="module")
def reference_grads(setup):
    """1 process, the step's 4 examples as 2 padded micro-batches of 2."""
    out = setup["tmp"] / "grads_one.pt"
    torchrun([setup["driver"], "grads", out, *setup["args"], *GRADS, "--micro_batch", "2",
              "--out_dir", setup["tmp"] / "one"], nproc=1)
    return torch.load(out)


@pytest.mark.parametrize("flags", [["--micro_batch", "1"], ["--fsdp", "--micro_batch", "1"],
                                   ["--fsdp", "--pack", "--pack_len", "200"], ["--pack", "--pack_len", "200"],
                                   ["--fsdp", "--grad_ckpt", "--micro_batch", "1"],
                                   ["--fsdp", "--grad_sync", "every", "--micro_batch", "1"]],
                         ids=["ddp", "fsdp", "fsdp-packed", "ddp-packed", "fsdp-grad_ckpt", "fsdp-sync_every"])
def test_two_ranks_give_the_gradients_of_one_process(setup, reference_grads, flags):
    """Global-token normalization across micro-steps and ranks; with packing one rank holds 2 rows and the
    other 1, so this also covers the zero-weight filler step that keeps FSDP's collectives aligned."""
    name = "_".join(f.strip("-") for f in flags)
    out = setup["tmp"] / f"grads_{name}.pt"
    p = torchrun([setup["driver"], "grads", out, *setup["args"], *GRADS, *flags, "--out_dir", setup["tmp"] / name])
    if "--pack" in flags:
        # the ranks' lines may interleave on the shared pipe: read the counts, not the lines
        counts = sorted(int(n) for n in re.findall(r"rank \d+: (\d+) micro-batches", p.stdout))
        assert counts == [1, 2], p.stdout  # one rank packs its 2 examples into 2 rows, the other into 1
    two = torch.load(out)
    assert two.keys() == reference_grads.keys() and any(k.startswith("head.") for k in two)
    for name, g in reference_grads.items():  # per tensor: entries that cancel to ~0 differ by summation order
        assert rel_err(two[name], g) < 1e-4, f"{name}: relative gradient difference {rel_err(two[name], g):.2e}"


@pytest.mark.parametrize("flags", [["--micro_batch", "1"], ["--fsdp", "--micro_batch", "1"],
                                   ["--fsdp", "--pack", "--pack_len", "200"]], ids=["ddp", "fsdp", "fsdp-packed"])
def test_bf16_gives_the_fp32_gradients_within_bf16_tolerance(setup, reference_grads, flags):
    """--precision bf16 on CPU/gloo, the paths a GPU run takes (DDP autocast; FSDP2 bf16 parameters): the 2-rank
    gradients are the fp32 one-process gradients up to bf16 rounding, not equal to them (autocast / bf16
    parameters really on), FSDP2 reduces them in fp32, and the latent head runs in fp32 (it raises otherwise)."""
    name = "bf16_" + "_".join(f.strip("-") for f in flags)
    out = setup["tmp"] / f"grads_{name}.pt"
    p = torchrun([setup["driver"], "grads", out, *setup["args"], *GRADS, *flags, "--precision", "bf16",
                  "--out_dir", setup["tmp"] / name])
    two = torch.load(out)
    assert two.keys() == reference_grads.keys()
    errs = {n: rel_err(two[n], g) for n, g in reference_grads.items()}
    worst = max(errs, key=errs.get)
    assert errs[worst] < 0.1, f"{worst}: {errs[worst]:.2e} is more than bf16 rounding"
    assert sorted(errs.values())[len(errs) // 2] > 1e-4, "bf16 compute is off: the gradients are fp32's"
    assert all(g.dtype == torch.float32 for g in two.values())
    if "--fsdp" in flags:
        assert "rank 0 reduced gradients in: ['torch.float32']" in p.stdout, p.stdout


def test_bf16_run_trains_saves_and_infers(world, tmp_path):
    """One process, --precision bf16 (CPU autocast): the run exports fp32 weights that infer.py loads and
    generates with, and its losses are the fp32 run's up to bf16 rounding."""
    import train
    from checkpoint import load_checkpoint
    common = dict(model=world["model"], data=world["data"], target_cache=str(world["root"] / "cache"),
                  latent_tokens=K, adapter_dim=16, lr=1e-3, head_lr=1e-3, global_batch=4, max_steps=2,
                  num_workers=0)
    runs = {p: train.main(train.TrainConfig(**common, precision=p, out_dir=str(tmp_path / p)))["losses"]
            for p in ("fp32", "bf16")}
    for (lm32, lat32), (lm16, lat16) in zip(runs["fp32"], runs["bf16"]):
        assert lm16 != lm32 and abs(lm16 - lm32) < 0.02 * lm32 and abs(lat16 - lat32) < 0.05 * lat32
    g, tokenizer, _, _ = load_checkpoint(str(tmp_path / "bf16"), "cpu")
    assert all(p.dtype == torch.float32 for p in g.parameters())
    run(["infer.py", str(world["root"] / "data" / "img" / "q0.png"), "How many?", "--ckpt", tmp_path / "bf16",
         "--max_new_tokens", "6"])


def test_packed_loss_equals_padded_loss(world):
    """The same examples packed into one row (each with its own positions, no attention across them) give the
    padded batch's loss sums and gradients."""
    g, tokenizer, image_processor = make_gap(world)
    g.train()
    ds = GAPDataset(world["data"], tokenizer, image_processor, g.backbone.config.latent_token_ids,
                    DataSpec(K, 0.0, 512, 0, 0), world["cache"])
    items = [ds[i] for i in range(6)]
    assert len({len(it["input_ids"]) for it in items}) > 2, "the sample data should have uneven lengths"
    rows = pack(items, 400)
    assert len(rows) == 2 and sum(map(len, rows)) == 6
    padded = {k: v for k, v in collate(items, tokenizer.pad_token_id).items() if k != "ids"}
    results = []
    for batches in ([padded], [{k: v for k, v in collate_packed(r).items() if k != "ids"} for r in rows]):
        g.zero_grad(set_to_none=True)
        sums = torch.zeros(4)
        for b in batches:
            out = g(**b)
            (out["lm_sum"] + out["latent_sum"]).backward()
            sums += torch.stack([out[k].detach().float() for k in ("lm_sum", "n_lm", "latent_sum", "n_latent")])
        results.append((sums, {n: p.grad.clone() for n, p in g.named_parameters() if p.grad is not None}))
    (s1, g1), (s2, g2) = results
    assert s1[1] == s2[1] and s1[3] == s2[3] and s1[3] > 0
    assert torch.allclose(s1, s2, rtol=1e-5), (s1, s2)
    for name in g1:
        assert rel_err(g2[name], g1[name]) < 1e-4, name
    with pytest.raises(ValueError, match="packing budget"):
        pack(items, 50)


@pytest.fixture(scope="module")
def straight(setup):
    """Uninterrupted 6-step runs (2 epochs of 3 steps, state saved at step 3) on 2 ranks, DDP and FSDP2."""
    runs = {}
    for mode in ("ddp", "fsdp"):
        out = setup["tmp"] / f"straight_{mode}"
        torchrun([setup["driver"], "train", f"{out}.json", *setup["args"], "--global_batch", "4", "--epochs", "2",
                  "--save_every", "3", "--out_dir", out] + (["--fsdp"] if mode == "fsdp" else []))
        runs[mode] = dict(losses=json.load(open(f"{out}.json")), out=out)
        assert len(runs[mode]["losses"]) == 6
    return runs


@pytest.mark.parametrize("mode,kill,save_every", [("ddp", "after_save:3", 3), ("fsdp", "after_save:3", 3),
                                                   ("fsdp", "mid_save:4", 2)])
def test_kill_and_resume_equals_uninterrupted(setup, straight, mode, kill, save_every):
    """SIGKILL on rank 0 (torchrun then stops rank 1), then the same command continues from the last whole state: the remaining
    steps' losses equal the uninterrupted run's exactly, and so does the exported model. With mid_save:4 the
    kill lands after the step-4 state is fully written to its temporary directory but before it replaces the
    step-2 state, which must survive whole."""
    out = setup["tmp"] / f"resumed_{mode}_{kill.replace(':', '')}"
    args = [*setup["args"], "--global_batch", "4", "--epochs", "2", "--save_every", str(save_every),
            "--out_dir", out] + (["--fsdp"] if mode == "fsdp" else [])
    p = torchrun([setup["driver"], "train", f"{out}.json", *args], expect_ok=False, env={"KILL": kill})
    assert p.returncode != 0, "the run was meant to be killed"
    state, at = f"{out}.state", int(kill.split(":")[1])
    saved = torch.load(os.path.join(state, "meta.pt"))["step"]
    if kill.startswith("mid_save"):
        assert saved == at - save_every
        assert torch.load(os.path.join(f"{state}.tmp", "meta.pt"))["step"] == at  # the save that was cut off
    else:
        assert saved == at
    assert not os.path.exists(os.path.join(out, "gap.json")), "a killed run must not have exported"
    torchrun([setup["driver"], "train", f"{out}.json", *args])  # the same command: it continues by itself
    resumed = json.load(open(f"{out}.json"))
    assert resumed == straight[mode]["losses"][saved:]
    assert same_weights(out, straight[mode]["out"])


def test_fsdp_export_matches_ddp_and_loads(straight):
    """The FSDP2 run's export (full state dict gathered to rank 0) holds the same model as the DDP run's, and
    infer.py's loader and the stock class read it."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from checkpoint import load_checkpoint
    g_fsdp, _, _, config = load_checkpoint(str(straight["fsdp"]["out"]), "cpu")
    g_ddp, _, _, _ = load_checkpoint(str(straight["ddp"]["out"]), "cpu")
    assert config["fsdp"] and config["step"] == 6
    a, b = g_fsdp.state_dict(), g_ddp.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("head.") for k in a)
    for k in a:  # 6 Adam steps amplify summation-order differences a little; a wrong gather would be O(1)
        assert rel_err(a[k].float(), b[k].float()) < 1e-3, k
    Qwen2_5_VLForConditionalGeneration.from_pretrained(str(straight["fsdp"]["out"]))


def test_a_saved_state_is_continued_by_itself_or_refused(setup, tmp_path, monkeypatch):
    """One process. A run that stopped after saving (here: its export fails) leaves its state; the same command
    continues from it with no flag, other data-order / schedule flags are refused with what differs, --fresh
    starts over, and a finished run leaves no state behind."""
    import dataclasses
    import train
    from common import parse_config
    cfg = parse_config(train.TrainConfig, [*setup["args"], "--global_batch", "4", "--max_steps", "2",
                                           "--save_every", "1", "--out_dir", str(tmp_path / "gap")])
    state = tmp_path / "gap.state"

    def export_fails(*a, **kw):
        raise RuntimeError("export failed")
    with monkeypatch.context() as m:
        m.setattr(train, "export", export_fails)
        with pytest.raises(RuntimeError, match="export failed"):
            train.main(cfg)
    assert torch.load(state / "meta.pt")["step"] == 1  # saved after step 1 of 2
    with pytest.raises(ValueError, match=r"--global_batch 4 -> 6.*--fresh to discard it"):
        train.main(dataclasses.replace(cfg, global_batch=6))
    assert len(train.main(cfg)["losses"]) == 1  # step 2 of 2, continued from the saved step 1
    assert not state.exists() and (tmp_path / "gap" / "gap.json").exists()
    with monkeypatch.context() as m:
        m.setattr(train, "export", export_fails)
        with pytest.raises(RuntimeError):
            train.main(cfg)
    assert len(train.main(dataclasses.replace(cfg, fresh=True))["losses"]) == 2  # --fresh: both steps again


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "skip_bad"])
def test_a_rank_that_raises_stops_every_rank(world, setup, tmp_path, mode):
    """A bad example drawn by one rank only (missing image, found when the step's examples load; --no-validate, else
    the check before step 1 finds it, test_reliability.py): every rank
    exits non-zero within the timeout and the message names file, line and field, instead of the other rank
    waiting in a collective. With --skip_bad the run finishes and reports the example as skipped."""
    rows = [json.loads(line) for line in open(world["data"])]
    rows[5]["image"] = "img/missing.png"
    os.symlink(os.path.join(os.path.dirname(world["data"]), "img"), tmp_path / "img")
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    args = [a if a != world["data"] else data for a in setup["args"]]
    t0 = time.time()
    p = torchrun([setup["driver"], "train", tmp_path / "losses.json", *args, "--global_batch", "4", "--epochs", "1",
                  "--out_dir", tmp_path / "gap", "--num_workers", "1", "--no-validate"] + {"ddp": [], "fsdp": ["--fsdp"],
                                                                           "skip_bad": ["--skip_bad"]}[mode],
                 expect_ok=mode == "skip_bad", timeout=300)
    if mode == "skip_bad":
        assert "done: 3 steps, 1 bad examples skipped" in p.stdout, p.stdout
        return
    out = p.stdout + p.stderr
    assert p.returncode != 0 and time.time() - t0 < 240
    assert f"error: {data}:6: field 'image': image file not found" in out, out[-3000:]
    assert "driver done" not in out


def test_elastic_restart_after_a_killed_worker_equals_uninterrupted(setup, tmp_path):
    """torchrun --max-restarts 2, one worker SIGKILLed from outside at a random moment after the first save:
    torchrun restarts the worker group, train.py continues from its last state by itself, and the final weights
    are an uninterrupted run's exactly."""
    import random
    import signal
    # 36 steps, saved every 2: the kill lands in the middle of the run, not after it ended
    args = [*setup["args"], "--global_batch", "4", "--epochs", "12", "--save_every", "2"]
    torchrun([setup["driver"], "train", tmp_path / "straight.json", *args, "--out_dir", tmp_path / "straight"])
    out = tmp_path / "elastic"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--max-restarts", "2", "--monitor-interval", "0.1"]
    log = open(tmp_path / "elastic.log", "w+")
    proc = subprocess.Popen(launcher + list(map(str, [setup["driver"], "train", tmp_path / "elastic.json", *args,
                                                      "--out_dir", out])),
                            cwd=HERE, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)
    state, t0 = f"{out}.state", time.time()
    while not os.path.exists(os.path.join(state, "meta.pt")):  # the first save (step 2 of 36)
        assert proc.poll() is None and time.time() - t0 < 120, "the run ended before its first save"
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.5))
    assert os.path.exists(os.path.join(state, "meta.pt")), "the run finished before the kill: make it longer"
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "no worker to kill"
    os.kill(int(random.choice(workers)), signal.SIGKILL)
    try:
        proc.wait(timeout=240)
    finally:
        stop([proc])
        log.seek(0)
        output = log.read()
        print(output[-5000:])  # shown by pytest when the test fails
    done = "driver done on rank 0" in output and "driver done on rank 1" in output
    assert proc.returncode == 0 or (done and "terminate called without an active exception" in output), output[-3000:]
    assert output.count("resumed from") >= 1, output[-3000:]  # the restarted group continued from the state
    assert same_weights(out, tmp_path / "straight")


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(port, args, log, env=None, host=None, extra=()):
    """Start the torchrun launcher of one simulated node: one process, a c10d rendezvous on 127.0.0.1:port (host:
    whether this launcher holds the rendezvous store; None: the first to bind the port does)."""
    conf = [] if host is None else ["--rdzv_conf", f"is_host={int(host)}" + "".join(f",{c}" for c in extra)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend",
           "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "gap-test", *conf, *map(str, args)]
    return subprocess.Popen(cmd, cwd=HERE, env=dict(ENV, **(env or {})), stdout=log, stderr=subprocess.STDOUT, text=True)


def finished(p, output):
    """A launcher exited 0, or every rank it ran finished and only gloo's teardown abort followed (see torchrun)."""
    return p.returncode == 0 or ("driver done" in output and "terminate called without an active exception" in output)


STRAIGHT = ["--global_batch", "4", "--epochs", "2", "--save_every", "3"]  # the straight fixture's run


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_nodes_on_one_machine_train_as_one_launcher(setup, straight, tmp_path, mode):
    """Two torchrun launchers, --nnodes 2 --nproc_per_node 1, meeting through a c10d rendezvous on 127.0.0.1, run
    the 6 steps to the end: the losses and the exported weights of one launcher with 2 processes, exactly (the
    same 2 ranks and reductions; that run's gradients are one process's on the combined batch, tested above)."""
    port, losses = free_port(), tmp_path / "losses.json"
    args = [setup["driver"], "train", losses, *setup["args"], *STRAIGHT, "--out_dir", tmp_path / "gap"]
    args += ["--fsdp"] if mode == "fsdp" else []
    logs = [open(tmp_path / f"node{i}.log", "w+") for i in range(2)]
    nodes = [node(port, args, log) for log in logs]
    try:
        for p in nodes:
            p.wait(timeout=240)
    finally:
        outputs = stop(nodes, logs)
    assert all(finished(p, o) for p, o in zip(nodes, outputs))
    assert "2 rank(s)" in "".join(outputs)
    assert json.load(open(losses)) == straight[mode]["losses"]
    assert same_weights(tmp_path / "gap", straight[mode]["out"])


def test_a_node_killed_and_started_again_recovers(setup, straight, tmp_path):
    """Two nodes (FSDP2), torchrun --max-restarts 2 with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: the node that does
    not hold the rendezvous store is killed whole (launcher and worker, SIGKILL) after the state of step 3 of 6
    is saved, and its launcher started again with the same rendezvous id. The other launcher restarts its
    worker, both meet in a new rendezvous round, train.py continues from step 3 by itself, and the losses and
    weights are the uninterrupted run's exactly."""
    port, losses, out = free_port(), tmp_path / "losses.json", tmp_path / "gap"
    args = ["--max-restarts", "2", "--monitor-interval", "0.1", setup["driver"], "train", losses, *setup["args"],
            *STRAIGHT, "--fsdp", "--out_dir", out]
    # a dead node leaves the rendezvous after keep_alive_interval x keep_alive_max_attempt seconds without heartbeat
    extra, env = ["keep_alive_interval=1", "keep_alive_max_attempt=5"], {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    logs = [open(tmp_path / f"node{i}.log", "w+") for i in range(3)]
    nodes = [node(port, args, logs[0], env, host=True, extra=extra),
             node(port, args, logs[1], dict(env, KILL="hold:3"), host=False, extra=extra)]
    t0 = time.time()
    try:
        while not os.path.exists(f"{losses}.held"):  # node 1 saved step 3 and waits; node 0 waits in step 4
            assert all(p.poll() is None for p in nodes) and time.time() - t0 < 180, "no save at step 3"
            time.sleep(0.05)
        kill_tree(nodes[1].pid)
        nodes[1].wait(timeout=30)
        t_kill = time.time()
        nodes.append(node(port, args, logs[2], env, host=False, extra=extra))  # the node's launcher, started again
        for p in (nodes[0], nodes[2]):
            p.wait(timeout=180)
        print(f"recovered and finished {time.time() - t_kill:.1f} s after the kill")
    finally:
        outputs = stop(nodes, logs)
    assert "driver done" not in outputs[1]
    assert finished(nodes[0], outputs[0]) and finished(nodes[2], outputs[2])
    assert f"resumed from {out}.state at step 3" in outputs[0] + outputs[2]
    assert json.load(open(losses)) == straight["fsdp"]["losses"][3:]
    assert same_weights(out, straight["fsdp"]["out"])
