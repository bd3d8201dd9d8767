"""Watching a training run: metrics.jsonl, one JSON line per log step (and per validation) that rank 0 writes from
numbers already reduced over every rank, and, when asked (--log tensorboard | wandb), the same numbers under the same
names to TensorBoard (tb/) or Weights & Biases (wandb/). Neither library is imported unless asked for, and neither
is needed to train. curves.py draws metrics.jsonl.

While the run trains they live in OUT_DIR.logs/ (beside OUT_DIR.state/): OUT_DIR itself is replaced whole by the
export, so a run that dies leaves the checkpoint there as it was, with its own curves. The export copies them into
the new checkpoint (OUT_DIR/metrics.jsonl, OUT_DIR/tb, OUT_DIR/wandb); OUT_DIR.logs stays until a new run starts.

    python train.py ... --out_dir out/gap --log tensorboard     # then: tensorboard --logdir out/gap.logs/tb
    WANDB_MODE=offline python train.py ... --log wandb          # then: wandb sync out/gap.logs/wandb/offline-run-*

A line is appended, flushed and fsynced as soon as it is known, so `tail -f` and a crash both see whole lines.
A resumed run continues the same file from the step of its saved state: the lines a killed run wrote after that
state are dropped (the resumed run computes those steps again), so the file holds one line per step. The
TensorBoard writer is opened with purge_step at that step, which makes TensorBoard drop the killed run's later
events too; W&B cannot rewind an offline run, so there a resumed run's repeated steps are ignored by W&B (their
losses are the killed run's, which a resumed run reproduces exactly; test_train.py).
"""
import json
import os
import resource
import shutil
import time
import uuid

from common import DataError, atomic_write_text, writing

METRICS = "metrics.jsonl"


def logs_dir(out_dir):
    """Where a run's metrics.jsonl, tb/ and wandb/ live while it trains: OUT_DIR.logs."""
    return out_dir.rstrip("/") + ".logs"

LOGGERS = ("none", "tensorboard", "wandb")


def require_logger(kind):
    """A DataError, before any work, when --log names a library that is not installed (found without importing it)."""
    import importlib.util
    import sys
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(kind)
    if package and package not in sys.modules and importlib.util.find_spec(package) is None:
        raise DataError(f"--log {kind}: the {package} package is not installed (pip install {package}), or pass --log "
                        f"none; metrics.jsonl is written either way")


def read_metrics(path):
    """The records of a metrics file, in order. A last line torn by a kill (no newline, or not JSON) is left out;
    a bad line before the last is damage, a DataError naming file and line."""
    records, torn = [], None
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if torn:
                raise DataError(f"{path}:{torn}: not a metrics line, and not the last line (which a kill may tear): "
                                f"the file is damaged; restore it, or move it away")
            try:
                r = json.loads(line)
            except ValueError:
                r = None
            if not line.endswith(b"\n") or not isinstance(r, dict) or not isinstance(r.get("step"), int):
                torn = n
                continue
            records.append(r)
    return records


def peak_memory_gib(device):
    """This process's peak memory since it started, GiB: CUDA's allocated peak on a GPU, the peak resident set size
    (ru_maxrss, KiB on Linux) on a CPU."""
    if device.type == "cuda":
        import torch
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def scalars(record):
    """The numbers of a record that loggers take: everything but the step and the clock."""
    return {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, (int, float))}


class TensorBoard:
    """torch.utils.tensorboard's SummaryWriter (needs `pip install tensorboard`) over LOG_DIR/tb."""

    def __init__(self, log_dir, start_step):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: TensorBoard hides the events at steps >= it that an earlier (killed) run wrote
        self.writer = SummaryWriter(log_dir, purge_step=start_step + 1 if start_step else None)

    def log(self, record):
        for k, v in scalars(record).items():
            self.writer.add_scalar(k, v, record["step"])
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    """A Weights & Biases run (needs `pip install wandb`) under LOG_DIR/wandb; WANDB_MODE=offline writes it there
    only, to `wandb sync` later. A resumed run continues the same W&B run (its id is kept in LOG_DIR/wandb)."""

    def __init__(self, log_dir, name, start_step, config, project):
        import wandb
        folder = os.path.join(log_dir, "wandb")
        os.makedirs(folder, exist_ok=True)
        id_path = os.path.join(folder, "run_id")
        if start_step and os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:8]  # W&B's own form of run id
            atomic_write_text(id_path, run_id + "\n")
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=log_dir, config=config)

    def log(self, record):
        self.run.log(scalars(record), step=record["step"])

    def close(self):
        self.run.finish()


class RunLog:
    """metrics.jsonl of the run whose checkpoint goes to `out_dir`, in logs_dir(out_dir), and the logger asked for
    (`kind`: none | tensorboard | wandb). Only rank 0 writes; the other ranks' RunLog does nothing. `start_step`:
    the step a resumed run continues from (0: a new run, which starts the file and the loggers' folders anew).
    `config`: the run's flags (W&B's config)."""

    def __init__(self, out_dir, kind="none", start_step=0, config=None, rank=0, project="gap"):
        if kind not in LOGGERS:
            raise DataError(f"--log {kind}: one of {', '.join(LOGGERS)}")
        self.dir = logs_dir(out_dir)
        self.rank, self.path, self.file, self.logger = rank, os.path.join(self.dir, METRICS), None, None
        self.wall0, self.t0 = 0.0, time.time()
        if rank != 0:
            return
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            raise DataError(f"{self.dir}: a file where the run's metrics go (a directory, OUT_DIR.logs): move it away")
        os.makedirs(self.dir, exist_ok=True)
        kept = []
        if start_step and os.path.exists(self.path):
            kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
            self.wall0 = max([r.get("wall_s", 0.0) for r in kept] or [0.0])
        elif not start_step:  # a new run: no older run's curves or W&B run
            for name in ("tb", "wandb"):
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)
        # the killed run's lines after the saved state (and a line it tore) go: the resumed run writes those steps
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a")
        if kind == "tensorboard":
            self.logger = TensorBoard(os.path.join(self.dir, "tb"), start_step)
        elif kind == "wandb":
            self.logger = WandB(self.dir, os.path.basename(os.path.abspath(out_dir)), start_step, config or {},
                                project)

    def wall_s(self):
        """Seconds of this run so far, the segments before a resume included (up to their last kept line)."""
        return self.wall0 + time.time() - self.t0

    def write(self, record):
        """Append one record (a dict with an int `step`; rank 0) and pass it to the logger."""
        if self.file is None:
            return
        with writing(self.path, f"{self.path} holds the lines before this one; the run stopped: free space and run "
                                f"the same command again, it resumes from its last saved state"):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())
        if self.logger is not None:
            self.logger.log(record)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.logger is not None:
            self.logger.close()
            self.logger = None
