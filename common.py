"""Plumbing shared by the entry points (train.py, infer.py, difficulty.py, targets.py, toy.py, the benchmarks): the
CLI built from a @dataclass, atomic writes, the device and process-group setup, bad-input errors and the
skip-and-count policy, failing every rank together, and the files a user hands in: read through user_file /
read_json / reading(), so a missing, empty, truncated or foreign one is one line naming it, and written through
writing(), so a full disk is one line saying what is intact. No GAP logic lives here (the sharded evaluation
skeleton is sharded.py).
"""
import argparse
import contextlib
import errno
import itertools
import dataclasses
import hashlib
import json
import math
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
    # every flag's --help line ends with its default: a user learns lr, K and the batch from --help
    p = OneLineParser(description=(cls.__doc__ or "").strip(), formatter_class=DefaultsHelp)
    groups = {}  # the fields of a base dataclass (train.py's VaLR flags) are listed under its docstring
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in cls.__dict__.get("__annotations__", {})):
        owner = next(c for c in cls.__mro__ if f.name in c.__dict__.get("__annotations__", {}))
        group = p if owner is cls else groups.setdefault(owner, p.add_argument_group((owner.__doc__ or "").strip()))
        kw = dict(default=f.default, help=f.metadata.get("help", ""))
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if f.type in (bool, "bool"):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            # a field of several values (nargs "+", a tuple) holds strings
            kw["type"] = str if "nargs" in f.metadata else {"int": int, "float": float, "str": str}.get(f.type, f.type)
        if f.metadata.get("positional"):  # nargs "+": a tuple of values
            group.add_argument(f.name, nargs=f.metadata.get("nargs", "?"), **kw)
        else:
            group.add_argument("--" + f.name, **kw)
    args = p.parse_args(argv)
    for f in dataclasses.fields(cls):
        lo, hi = f.metadata.get("range", (None, None))
        value = getattr(args, f.name)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            p.error(f"--{f.name} {value} is out of range [{lo}, {hi}]")
        if "check" in f.metadata and not f.metadata["check"][0](value):
            p.error(f"--{f.name} {value}: {f.metadata['check'][1]}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()})


class DefaultsHelp(argparse.HelpFormatter):
    """--help lists each flag's default (argparse's ArgumentDefaultsHelpFormatter, minus empty defaults)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, "", argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """A flag error is one line on stderr and exit code 2 (argparse's default adds the whole usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def perfect_square(k):
    return k >= 0 and math.isqrt(k) ** 2 == k


# metadata "check" of a --latent_tokens field: K latents fill a sqrt(K) x sqrt(K) grid of the auxiliary image
SQUARE = (perfect_square, "must be a perfect square >= 0 (K latents fill a sqrt(K) x sqrt(K) grid: 4, 16, 36, ...)")


# ----------------------------------------------------------------------------------------------------------
# files that are whole or absent

def atomic_write_text(path, text, kept=None):
    """Write a file so that a crash leaves either the old or the new content, never half of one. A full disk ends
    the run with one line (writing()) saying that `path` is as it was, or `kept` when the caller knows more."""
    atomic_write_bytes(path, text.encode("utf-8"), kept)


def atomic_write_bytes(path, data, kept=None):
    """atomic_write_text for bytes (a PNG)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with writing(path, kept or f"{path} is as it was", cleanup=lambda: remove_file(tmp)):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    fsync_dir(path)


def remove_file(path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def fsync_dir(path):
    """Make a rename of `path` durable: the rename lives in the directory, which a power loss can otherwise lose
    even after the file itself was fsynced."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp, path):
    """Swap a fully written directory `tmp` into `path`: a crash at any point leaves a whole `path` or a whole
    `path`.old (which the loaders fall back to), never a half-written one."""
    old = path.rstrip("/") + ".old"
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path)
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


_GROUPS = itertools.count()  # process groups this process has made


def setup_distributed():
    """(rank, world, device). One process without torchrun; a process group (nccl on GPU, gloo on CPU) under it."""
    if "RANK" not in os.environ:
        return 0, 1, (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # workers restarted by torchrun (--max-restarts), or a process that makes a second group (smoke.py runs
    # train.main several times), meet in the same store as the group before when it is the launcher's (torchrun's
    # default); its keys (the old ranks' addresses) must not be read, so each group gets its own prefix (without it
    # gloo connected to dead addresses and hung). With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 every rendezvous round
    # has a new store, and the restart count is left out: a node whose launcher was replaced counts from 0, the others not
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if agent_store else "0"
    attempt = f"{restarts}_{next(_GROUPS)}"
    if attempt == "0_0":
        dist.init_process_group(backend)
    else:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=rank == 0 and not agent_store)
        dist.init_process_group(backend, store=dist.PrefixStore(f"gap_group_{attempt}", store), rank=rank,
                                world_size=world)
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
    """Run an entry point's main(cfg). Bad input (a DataError: a bad example, file or flag) ends it with its one
    line on stderr and exit code 2; anything else is a bug: its traceback, then exit code 1. Under torchrun the
    failing rank's process ends at once, so torchrun stops the other ranks instead of leaving them waiting in a
    collective for the one that died (teardown of a half-used process group can itself hang, so it exits
    without it)."""
    try:
        return main(cfg)
    except Exception as e:
        rank = os.environ.get("RANK")
        where = f"rank {rank}: " if rank is not None else ""
        bad_input = isinstance(e, DataError)
        if not bad_input:
            traceback.print_exc()
        hint = " (--skip_bad skips and counts bad examples)" if bad_input and e.example else ""
        print(f"{where}error: {e}{hint}", file=sys.stderr, flush=True)
        code = 2 if bad_input else 1
        if rank is not None:
            sys.stdout.flush()
            os._exit(code)
        raise SystemExit(code) from None


# ----------------------------------------------------------------------------------------------------------
# bad input

class DataError(ValueError):
    """Bad input, with the file, line and field it came from: DataError(file, line, field, msg), or an
    already formatted DataError(message) (a bad flag or file, a write the disk had no room for, or an example's
    error rebuilt after crossing a process boundary). `example`: whether it is one example's fault (which
    --skip_bad may skip)."""

    def __init__(self, file, line=None, field=None, msg=None, example=None):
        super().__init__(file if line is None else f"{file}:{line}: field '{field}': {msg}")
        self.field = field
        self.example = line is not None if example is None else example


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
            raise DataError(message, example=True)
        self.count += 1
        print(f"skipping bad example: {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# the files a user hands in, and writes that fail for want of room: one line naming the file, never a traceback

def user_file(path, what, hint=""):
    """`path` when it is a file that can be read and holds something; else a DataError naming it: not found, a
    directory, empty or unreadable. `what` says what it should be ("data file"); `hint`, what to do about it.
    (Run as root, a file without read permission is read all the same: there is nothing to refuse.)"""
    if os.path.isdir(path):
        problem = f"a directory, not a {what}"
    elif not os.path.exists(path):
        problem = f"{what} not found"
    else:
        try:
            with open(path, "rb") as f:
                problem = None if f.read(1) else f"empty {what}"
        except OSError as e:
            problem = f"cannot read this {what}: {e.strerror}"
    if problem:
        raise DataError(f"{path}: {problem}{hint}")
    return path


def user_dir(path, what, hint=""):
    """`path` when it is a directory that can be listed; else a DataError naming it."""
    if not os.path.exists(path):
        raise DataError(f"{path}: {what} not found{hint}")
    if not os.path.isdir(path):
        raise DataError(f"{path}: a file, not a {what}{hint}")
    try:
        os.listdir(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read this {what}: {e.strerror}{hint}") from None
    return path


def short(e):
    """An exception in a few words: its first line (the type's name when it has no text); for a
    torch.distributed.checkpoint CheckpointException, its first rank's."""
    failures = getattr(e, "failures", None)
    if failures and isinstance(next(iter(failures.values())), tuple):
        e = next(iter(failures.values()))[0]
    text = (str(e).strip().splitlines() or [""])[0]
    if len(text) > 120 and ". " in text:  # torch's long explanations: their first sentence says what happened
        text = text[:text.index(". ")]
    return text[:200] or type(e).__name__


@contextlib.contextmanager
def reading(path, what, hint=""):
    """Read a user's file inside this block: whatever fails (a truncated file, a file of another kind, a key it
    lacks) becomes one DataError naming it. Keep the block to the reading alone: a bug there would read as a bad
    file."""
    try:
        yield
    except (DataError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is not an Exception
        raise DataError(f"{path}: not a readable {what} (damaged, truncated or of another kind: {short(e)}){hint}") \
            from None


def read_json(path, what, hint=""):
    """The JSON object in a user's file (user_file's checks, then a parse), or a DataError naming it."""
    with reading(user_file(path, what, hint), what, hint):
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    if not isinstance(value, dict):
        raise DataError(f"{path}: not a {what} (a JSON {type(value).__name__}, not an object){hint}")
    return value


def check_files(directory, hint=""):
    """Every *.json and *.safetensors file in a model or checkpoint directory whole: a JSON that parses, a
    safetensors file whose header covers it (a truncated one fails here, in milliseconds, not deep inside a
    loader with no file named)."""
    from safetensors import safe_open
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(".json"):
            with reading(user_file(path, "JSON file", hint), "JSON file", hint), open(path, encoding="utf-8") as f:
                json.load(f)
        elif name.endswith(".safetensors"):
            with reading(user_file(path, "safetensors file", hint), "safetensors file", hint):
                with safe_open(path, "pt"):
                    pass


# what a write that ran out of room leaves, whoever made it: Python (an OSError), safetensors' Rust ("os error
# 28"), torch.save's C++ stream writer (a short write, no errno: "unexpected pos ...", after "iostream error")
NO_ROOM = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EFBIG: "file too large for this process's file-size limit (ulimit -f)"}
NO_ROOM_TEXT = {"No space left": NO_ROOM[errno.ENOSPC], "os error 28": NO_ROOM[errno.ENOSPC],
                "Disk quota": NO_ROOM[errno.EDQUOT], "File too large": NO_ROOM[errno.EFBIG],
                "unexpected pos": None, "file write failed": None}


def write_failure(e, path):
    """Why a write of `path` ran out of room (a full disk, a quota, a file-size limit), from an exception, its
    causes and a torch.distributed.checkpoint CheckpointException's per-rank failures; None when it is something
    else."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in NO_ROOM:
            return NO_ROOM[x.errno]
        for text, reason in NO_ROOM_TEXT.items():
            if text in str(x):
                return reason or short_write(path)
        failures = getattr(x, "failures", None)
        todo += [x.__cause__, x.__context__] + [f[0] for f in (failures or {}).values() if isinstance(f, tuple)]
    return None


def short_write(path):
    """A short write says no more than that: name the file-size limit when there is one, else the free space."""
    import resource
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f"a short write, at this process's file-size limit of {limit} bytes (ulimit -f)"
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free >> 20
    return f"no space left on device (a short write; {free} MB free)" if free < 1 else \
        f"a short write, with {free} MB free on its disk (a quota?)"


@contextlib.contextmanager
def writing(path, kept, cleanup=None):
    """Write `path` inside this block. When the write runs out of room, `cleanup()` removes what was half
    written and the run ends with one line naming `path`, why, and what is intact (`kept`); a nested writing()'s
    line is replaced by this one's (its file was a part of `path`). Any other failure is a bug and stays a
    traceback (after the cleanup)."""
    try:
        yield
    except BaseException as e:
        if cleanup is not None:
            cleanup()
        reason = getattr(e, "no_room", None) if isinstance(e, DataError) else write_failure(e, path)
        if reason is None:
            raise
        error = DataError(f"{path}: cannot write it ({reason}); {kept}")
        error.no_room = reason
        raise error from None


def file_hash(path):
    """sha256 (16 hex) of a file's bytes: results derived from a data file record it, so an edited file is noticed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def chunk_seed(seed, first_id):
    """A stable 63-bit seed from (seed, id) for a chunk's generator; Python's hash() is salted per process."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{first_id}".encode()).digest()[:8], "little") >> 1
