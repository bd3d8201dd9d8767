"""Compare two results files of the same rows (infer.py --data outputs, e.g. a checkpoint with and without its
latent channel) with the paired tests of stats.py: exact McNemar on the per-row correctness, and a paired bootstrap
of the accuracy difference (95% interval, two-sided p). One line:

    python compare.py out/gap/results_model.jsonl out/gap/results_zero.jsonl
    # results_model - results_zero: ACC_A - ACC_B = DIFF [LO, HI] bootstrap p P; McNemar N10/N01 p P; n N
    #   (N10: rows only a answers right, N01: only b; the interval is the bootstrap's 95%)

Rows are paired by id; both files must hold the same ids, each scored (an `answer` in the data), else a one-line
error names the file and the first id that differs. --json also prints the numbers as one JSON object.
"""
import dataclasses
import json
import os
from dataclasses import field

import stats
from controls import result_lines
from common import DataError, parse_config, reading, run_main, user_file


@dataclasses.dataclass
class CompareConfig:
    """Paired comparison of two infer.py results files of the same rows (a - b)."""
    a: str = field(default="", metadata={"help": "results JSONL a", "positional": True})
    b: str = field(default="", metadata={"help": "results JSONL b (the same rows)", "positional": True})
    n_boot: int = field(default=10000, metadata={"help": "bootstrap resamples", "range": (100, None)})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})
    json: bool = field(default=False, metadata={"help": "also print the numbers as one JSON line"})


def read_results(path):
    """{id: correct} of a results file, in file order; a DataError naming the file and line of a bad one."""
    user_file(path, "results file")
    out = {}
    with reading(path, "results file"):
        for n, r in result_lines(path):
            if not isinstance(r.get("correct"), bool):
                raise DataError(path, n, "correct", f"is {r.get('correct')!r}: the row is not scored (no `answer` "
                                                    f"in the data)")
            if r["id"] in out:
                raise DataError(path, n, "id", f"{r['id']!r} occurs twice")
            out[r["id"]] = r["correct"]
    if not out:
        raise DataError(f"{path}: no result lines")
    return out


def paired(a, b, path_a="a", path_b="b", n_boot=10000, seed=0):
    """The paired statistics of two {id: correct} maps over the same ids (b's ids must be a's)."""
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b), key=str)[0]
        where = path_a if only in a else path_b
        raise DataError(f"{path_a} and {path_b} hold other rows: id {only!r} is only in {where} (compare results of "
                        f"one data file)")
    ids = list(a)
    xa, xb = [int(a[i]) for i in ids], [int(b[i]) for i in ids]
    n10, n01, p = stats.mcnemar(xa, xb)
    boot = stats.paired_bootstrap([xa], [xb], n_boot=n_boot, seed=seed)
    return dict(a=path_a, b=path_b, n=len(ids), acc_a=sum(xa) / len(ids), acc_b=sum(xb) / len(ids),
                diff=boot["diff"], lo=boot["lo"], hi=boot["hi"], p_bootstrap=boot["p"], n10=n10, n01=n01,
                p_mcnemar=p)


def line(c):
    name = lambda p: os.path.splitext(os.path.basename(p))[0]  # noqa: E731
    return (f"{name(c['a'])} - {name(c['b'])}: {c['acc_a']:.4f} - {c['acc_b']:.4f} = {c['diff']:+.4f} "
            f"[{c['lo']:+.4f}, {c['hi']:+.4f}] bootstrap p {c['p_bootstrap']:.2g}; McNemar {c['n10']}/{c['n01']} "
            f"p {c['p_mcnemar']:.2g}; n {c['n']}")


def main(cfg: CompareConfig):
    if not (cfg.a and cfg.b):
        raise DataError("give two results files: python compare.py A.jsonl B.jsonl")
    c = paired(read_results(cfg.a), read_results(cfg.b), cfg.a, cfg.b, cfg.n_boot, cfg.seed)
    print(line(c))
    if cfg.json:
        print(json.dumps(c))
    return c


if __name__ == "__main__":
    run_main(main, parse_config(CompareConfig))
