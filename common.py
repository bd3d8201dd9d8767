"""Plumbing shared by the entry points (train.py, infer.py, difficulty.py, data.py, toy.py, bench.py): the CLI
built from a @dataclass, atomic writes, the device and process-group setup, bad-input errors and the
skip-and-count policy, and failing every rank together. No GAP logic lives here.
"""
import argparse
import contextlib
import dataclasses
import os
import shutil
import sys
import traceback

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------------------
# the CLI of an entry point, generated from its config dataclass

def parse_config(cls, argv=None):
    """Build an argparse CLI from a @dataclass: every field is a snake_case flag with its default and its
    `help` metadata; fields with metadata positional=True are optional positionals, choices=... restricts a
    value, and range=(lo, hi) rejects a number outside [lo, hi] before any work starts."""
    p = argparse.ArgumentParser(description=(cls.__doc__ or "").strip())
    for f in dataclasses.fields(cls):
        kw = dict(default=f.default, help=f.metadata.get("help", ""))
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if f.type in (bool, "bool"):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float, "str": str}.get(f.type, f.type)
        if f.metadata.get("positional"):
            p.add_argument(f.name, nargs="?", **kw)
        else:
            p.add_argument("--" + f.name, **kw)
    args = p.parse_args(argv)
    for f in dataclasses.fields(cls):
        lo, hi = f.metadata.get("range", (None, None))
        value = getattr(args, f.name)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            p.error(f"--{f.name} {value} is out of range [{lo}, {hi}]")
    return cls(**vars(args))


# ----------------------------------------------------------------------------------------------------------
# files that are whole or absent

def atomic_write_text(path, text):
    """Write a file so that a crash leaves either the old or the new content, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir(tmp, path):
    """Swap a fully written directory `tmp` into `path`: a crash at any point leaves a whole `path` or a whole
    `path`.old (which the loaders fall back to), never a half-written one."""
    old = path.rstrip("/") + ".old"
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# devices and processes

def default_device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device):
    # bf16 on GPU as in the paper; fp32 on CPU where bf16 matmuls are slow and tests want exact numbers
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def attn_implementation():
    """FlashAttention-2 when it imports (and a GPU is there), else PyTorch SDPA (a flash kernel on Hopper)."""
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def setup_distributed():
    """(rank, world, device). One process without torchrun; a process group (nccl on GPU, gloo on CPU) under it."""
    if "RANK" not in os.environ:
        return 0, 1, (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce(values, device, op=None):
    """Sum (or `op`) a list of numbers over ranks with one all_reduce; a plain list in one process."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def run_main(main, cfg):
    """Run an entry point's main(cfg). A DataError ends it with its one-line message; under torchrun, any
    exception on one rank ends that process at once with a non-zero code and its message on stderr, so
    torchrun stops the other ranks instead of leaving them waiting in a collective for the one that died
    (teardown of a half-used process group can itself hang, so the process exits without it)."""
    try:
        return main(cfg)
    except Exception as e:
        rank = os.environ.get("RANK")
        where = f"rank {rank}: " if rank is not None else ""
        if not isinstance(e, DataError):
            traceback.print_exc()
        print(f"{where}error: {e}" + (" (--skip_bad skips and counts bad examples)"
                                      if isinstance(e, DataError) else ""), file=sys.stderr, flush=True)
        if rank is not None:
            sys.stdout.flush()
            os._exit(1)
        raise SystemExit(1) from None


# ----------------------------------------------------------------------------------------------------------
# bad input

class DataError(ValueError):
    """Bad input, with the file, line and field it came from: DataError(file, line, field, msg), or an
    already formatted DataError(message) (how it is rebuilt when it crosses a process boundary)."""

    def __init__(self, file, line=None, field=None, msg=None):
        super().__init__(file if line is None else f"{file}:{line}: field '{field}': {msg}")


class BadExamples:
    """The skip-bad policy in one place: `with bad.guard(): ...` lets a DataError through, or, when skipping
    was asked for, prints it, counts it and carries on after the with-block."""

    def __init__(self, skip: bool):
        self.skip, self.count = skip, 0

    @contextlib.contextmanager
    def guard(self):
        try:
            yield
        except DataError as e:
            self.add(str(e))

    def add(self, message):
        """One bad example, known by its message: raise it, or count it."""
        if not self.skip:
            raise DataError(message)
        self.count += 1
        print(f"skipping bad example: {message}", flush=True)
