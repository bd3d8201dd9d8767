"""The sharded, resumable, kill-safe evaluation skeleton that infer.py --data and difficulty.py share: every example of
a JSONL checked first, cut into chunks of --batch_size that rank r of a torchrun run takes (r, r + world, ...),
decoded in static chunks or continuously, each finished result line appended to OUT-stem.rankR.jsonl (flushed
and fsynced), and the parts merged by rank 0 into OUT in input order. A restart reads every part file, drops a
line torn by a kill, skips the ids already there, and refuses parts made with other flags, data or checkpoint
(OUT-stem.config.json), or damaged anywhere but in their last line. A full disk ends the run with one line: the
finished lines stay in the part files (a line cut by it is dropped on the next run, as a torn one) and OUT stays
as it was, so the same command resumes. What an example produces is the entry point's (a Producer); everything
else is here.

    results = run(rows, out, run_config, check, make_producer, batch_size=8, schedule="continuous")
"""
import datetime
import json
import os
import time

import torch.distributed as dist

from common import BadExamples, DataError, atomic_write_text, read_json, writing
from data import check_rows

# continuous schedule: prompts are encoded WINDOW x --batch_size at a time, so that the encoded images held at once
# stay bounded; rows idle only at the end of each window
WINDOW = 16


class Producer:
    """What an entry point supplies: encode(row) -> a prompt item (raises DataError for a bad one); static(items,
    rows, seconds) -> the result lines (JSON + newline) of rows, in order, from one generate call; continuous(items,
    rows, seconds) -> yields the result line of each row as it finishes. seconds: how long each item's encoding
    took (for latencies)."""

    def encode(self, row):
        raise NotImplementedError

    def static(self, items, rows, seconds):
        raise NotImplementedError

    def continuous(self, items, rows, seconds):
        raise NotImplementedError


def encode_rows(producer, rows, bad: BadExamples):
    """(items, the rows they are of, seconds each took, `_skipped` lines): a bad example is an error, or with
    skip_bad a `_skipped` line that the merge counts and leaves out (so that a resume does not try it again)."""
    items, kept, seconds, skipped = [], [], [], []
    for r in rows:
        t0 = time.perf_counter()
        try:
            items.append(producer.encode(r))
        except DataError as e:
            bad.add(str(e))  # raises unless --skip_bad
            skipped.append(json.dumps({"id": r["id"], "_skipped": str(e)}) + "\n")
            continue
        kept.append(r)
        seconds.append(time.perf_counter() - t0)
    return items, kept, seconds, skipped


def static_lines(producer, chunk, bad):
    """The result lines of one chunk (static schedule), in chunk order."""
    items, kept, seconds, skipped = encode_rows(producer, chunk, bad)
    lines = {json.loads(line)["id"]: line for line in skipped}
    if items:
        lines.update({r["id"]: line for r, line in zip(kept, producer.static(items, kept, seconds))})
    return [lines[r["id"]] for r in chunk]


def continuous_lines(producer, rows, batch_size, bad):
    """Yield the result line of each of `rows` as it finishes (continuous schedule), window by window."""
    size = WINDOW * batch_size
    for w in range(0, len(rows), size):
        items, kept, seconds, skipped = encode_rows(producer, rows[w:w + size], bad)
        yield from skipped
        if items:
            yield from producer.continuous(items, kept, seconds)


def run(rows, out, run_config, check, make_producer, batch_size, schedule, skip_bad=False, what="the run", desc="",
        unit="example"):
    """Answer every row into OUT (module docstring). check(row) raises DataError for a bad example (all checked
    before `what` starts, unless skip_bad); make_producer() is called only when there is work left. Returns, on rank 0,
    the result dicts of the examples answered (input order; skipped ones left out), else None."""
    from tqdm import tqdm
    if batch_size < 1:
        raise DataError(f"--batch_size must be >= 1, got {batch_size}")
    if os.path.isdir(out):
        raise DataError(f"{out}: a directory, not a results file (--out names the JSONL to write)")
    if os.path.exists(os.path.dirname(out) or ".") and not os.path.isdir(os.path.dirname(out) or "."):
        raise DataError(f"{os.path.dirname(out)}: a file, not a directory to write {os.path.basename(out)} in")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    barrier = rank_barrier(world)
    if not skip_bad:  # every example checked first: no bad one stops the run hours in
        check_rows(rows, check, what, rank, world)
    done, mine = resume_parts(out, run_config, rank, barrier)
    chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)][rank::world]
    todo = [c for c in chunks if any(r["id"] not in done for r in c)]
    print(f"rank {rank}/{world}: {sum(len(c) for c in chunks)} examples, "
          f"{sum(r['id'] in done for c in chunks for r in c)} already done")
    bad = BadExamples(skip_bad)
    producer = make_producer() if todo else None  # nothing to do: every result is there, only the merge runs
    kept = ("the results finished before are kept in it (a line cut by the full disk is dropped on the next run): "
            "free space and run the same command again, it resumes")
    with writing(mine, kept), open(mine, "a") as f:
        def write(text):  # whole lines, on disk before the next one starts
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

        if schedule == "static":
            for chunk in tqdm(todo, desc=desc, unit="batch", disable=rank != 0):
                lines = static_lines(producer, chunk, bad)
                # a chunk cut by a kill is answered again whole, only its missing lines written
                write("".join(line for r, line in zip(chunk, lines) if r["id"] not in done))
        elif todo:
            left = [r for c in todo for r in c if r["id"] not in done]
            for line in tqdm(continuous_lines(producer, left, batch_size, bad), desc=desc, unit=unit,
                             total=len(left), disable=rank != 0):
                write(line)
    barrier()
    if rank != 0:
        return None
    lines = merge_parts(out, [r["id"] for r in rows])
    results = [json.loads(line) for line in lines]
    atomic_write_text(out, "".join(line for line, r in zip(lines, results) if "_skipped" not in r),
                      kept=f"{out} is as it was, and every result is kept in the part files beside it: free space and "
                           f"run the same command again (it merges them)")
    return [r for r in results if "_skipped" not in r]


# ----------------------------------------------------------------------------------------------------------
# the part files: each rank appends its finished results to OUT-stem.rankR.jsonl, a restart skips the ids already
# in any part file, rank 0 merges in input order


def output_paths(out):
    """(part file pattern with {} for the rank, config sidecar, summary) beside OUT."""
    stem = out[:-len(".jsonl")] if out.endswith(".jsonl") else out
    return stem + ".rank{}.jsonl", stem + ".config.json", stem + ".summary.json"


def clear_outputs(out):
    """Remove OUT and everything beside it that a run wrote, so that the next run starts fresh."""
    pattern, config_path, summary_path = output_paths(out)
    for path in [out, config_path, summary_path, *part_files(pattern)]:
        if os.path.exists(path):
            os.remove(path)


def part_files(pattern):
    folder, name = os.path.split(pattern)
    prefix, suffix = name.split("{}")
    names = os.listdir(folder or ".")
    return sorted(os.path.join(folder, f) for f in names
                  if f.startswith(prefix) and f.endswith(suffix) and f[len(prefix):-len(suffix)].isdigit())


def read_part(path):
    """({id: line}, n_bytes) of the complete result lines at the start of a part file. The last line, when a
    kill tore it (no newline, or not JSON), is not part of them; a bad line before the last is damage, not a
    kill, and a DataError naming it (dropping it would drop every line after it)."""
    results, good = {}, 0
    if os.path.isdir(path):
        raise DataError(f"{path}: a directory where a part file of results belongs: move it away")
    if os.path.exists(path):
        with open(path, "rb") as f:
            torn = None  # the number of a bad line: torn by a kill when nothing follows it
            for n, line in enumerate(f, 1):
                if torn:
                    raise DataError(f"{path}:{torn}: not a result line, and not the last line (which a kill may "
                                    f"tear): the file is damaged; restore it, or move it away to answer its examples "
                                    f"again")
                try:
                    r = json.loads(line)
                except ValueError:  # JSON or UTF-8 cut mid-way
                    r = None
                if not line.endswith(b"\n") or not isinstance(r, dict) or "id" not in r:
                    torn = n
                    continue
                results[str(r["id"])] = line.decode()
                good += len(line)
    return results, good


def rank_barrier(world):
    """A barrier over a gloo group with a long timeout (ranks of a sharded run may finish hours apart)."""
    if world == 1:
        return lambda: None
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    return lambda: dist.barrier(group=group)


def resume_parts(out, run_config, rank, barrier):
    """Start or resume a sharded run that writes OUT. The flags that change results (`run_config`) are kept in
    OUT-stem.config.json; a run with other ones fails while parts are there. Returns ({id: line} of every
    rank's finished results, this rank's part file, cut back to its complete lines)."""
    pattern, config_path, _ = output_paths(out)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    parts = part_files(pattern)
    if os.path.exists(config_path) and parts:
        before = read_json(config_path, "results config", "; restore it, or move it and the part files beside it "
                                                          "away to start over")
        if before != run_config:  # a key only one side has: written by another version of GAP
            changed = {k: (before.get(k), run_config.get(k)) for k in sorted(set(before) | set(run_config))
                       if before.get(k) != run_config.get(k)}
            raise DataError(f"{config_path}: the parts beside it were made with other flags, data or checkpoint "
                            f"(was, now): {changed}; use those, or another --out")
    done, mine = {}, pattern.format(rank)
    for path in parts:  # parts of any rank count: the output does not depend on the rank
        done.update(read_part(path)[0])
    keep = read_part(mine)[1]
    barrier()  # every rank has read the parts before any rank changes them
    if os.path.exists(mine) and os.path.getsize(mine) != keep:
        os.truncate(mine, keep)  # drop a line torn by a kill (or cut by a full disk)
    if rank == 0 and not (parts and os.path.exists(config_path)):
        atomic_write_text(config_path, json.dumps(run_config, indent=2) + "\n")
    return done, mine


def merge_parts(out, ids):
    """Rank 0, after every rank is done: the result lines of `ids` from all part files, in that order."""
    pattern = output_paths(out)[0]
    results = {}
    for path in part_files(pattern):
        results.update(read_part(path)[0])
    missing = [i for i in ids if i not in results]
    if missing:
        raise RuntimeError(f"{len(missing)} examples have no result in {pattern.format('*')} "
                           f"(first: {missing[0]!r}); re-run to finish them")
    return [results[i] for i in ids]
