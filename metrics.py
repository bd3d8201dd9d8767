"""Watching a training run: OUT_DIR/metrics.jsonl, one JSON line per log step (and per validation) that rank 0
writes from numbers already reduced over every rank, and, when asked (--log tensorboard | wandb), the same numbers
under the same names to TensorBoard (OUT_DIR/tb) or Weights & Biases (OUT_DIR/wandb). Neither library is imported
unless asked for, and neither is needed to train. curves.py draws metrics.jsonl.

    python train.py ... --out_dir out/gap --log tensorboard     # then: tensorboard --logdir out/gap/tb
    WANDB_MODE=offline python train.py ... --log wandb          # then: wandb sync out/gap/wandb/offline-run-*

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
# what a run writes into its out_dir beside the checkpoint; the export carries them into the new checkpoint
RUN_LOGS = (METRICS, "tb", "wandb")
LOGGERS = ("none", "tensorboard", "wandb")


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
    """torch.utils.tensorboard's SummaryWriter (needs `pip install tensorboard`) over OUT_DIR/tb."""

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
    """A Weights & Biases run (needs `pip install wandb`) under OUT_DIR/wandb; WANDB_MODE=offline writes it there
    only, to `wandb sync` later. A resumed run continues the same W&B run (its id is kept in OUT_DIR/wandb)."""

    def __init__(self, out_dir, start_step, config, project):
        import wandb
        folder = os.path.join(out_dir, "wandb")
        os.makedirs(folder, exist_ok=True)
        id_path = os.path.join(folder, "run_id")
        if start_step and os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:8]  # W&B's own form of run id
            atomic_write_text(id_path, run_id + "\n")
        self.run = wandb.init(project=project, name=os.path.basename(os.path.abspath(out_dir)), id=run_id,
                              resume="allow", dir=out_dir, config=config)

    def log(self, record):
        self.run.log(scalars(record), step=record["step"])

    def close(self):
        self.run.finish()


class RunLog:
    """metrics.jsonl of a run in `out_dir` and the logger asked for (`kind`: none | tensorboard | wandb). Only
    rank 0 writes; the other ranks' RunLog does nothing. `start_step`: the step a resumed run continues from (0:
    a new run, which starts the file, and TensorBoard's directory, anew). `config`: the run's flags (W&B's
    config)."""

    def __init__(self, out_dir, kind="none", start_step=0, config=None, rank=0, project="gap"):
        if kind not in LOGGERS:
            raise DataError(f"--log {kind}: one of {', '.join(LOGGERS)}")
        self.rank, self.path, self.file, self.logger = rank, os.path.join(out_dir, METRICS), None, None
        self.wall0, self.t0 = 0.0, time.time()
        if rank != 0:
            return
        os.makedirs(out_dir, exist_ok=True)
        kept = []
        if start_step and os.path.exists(self.path):
            kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
            self.wall0 = max([r.get("wall_s", 0.0) for r in kept] or [0.0])
        elif not start_step:
            shutil.rmtree(os.path.join(out_dir, "tb"), ignore_errors=True)  # a new run: no older run's curves
        # the killed run's lines after the saved state (and a line it tore) go: the resumed run writes those steps
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a")
        if kind == "tensorboard":
            self.logger = TensorBoard(os.path.join(out_dir, "tb"), start_step)
        elif kind == "wandb":
            self.logger = WandB(out_dir, start_step, config or {}, project)

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
