"""The README's CPU commands, run as written from a copy of the repository (its tracked files only: no out/, no
cache, nothing a developer's runs left behind), so that the README cannot drift from the code: the quick start
(at --quick size), the smallest run, and the copy-out block of "Copy the pieces" from an empty directory."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ENV, HERE

README = open(os.path.join(HERE, "README.md")).read()


def section(title):
    """The text of the README section `## title` (up to the next `## `)."""
    assert f"\n## {title}\n" in README, f"README has no section '## {title}'"
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def blocks(text, lang):
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def commands(block):
    """The commands of a bash block: continuation lines joined, comments dropped, `a && b` split."""
    lines = block.replace("\\\n", " ").splitlines()
    return [part.strip() for line in lines for part in line.split("#", 1)[0].split("&&") if part.strip()]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The repository's tracked files as they are in the working tree, in a fresh directory."""
    root = tmp_path_factory.mktemp("clone")
    try:
        files = subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked archive): every file there
        files = [os.path.relpath(os.path.join(d, f), HERE) for d, _, fs in os.walk(HERE) for f in fs
                 if not os.path.relpath(d, HERE).startswith(("out", ".git"))]
    for f in files:
        if os.path.isfile(os.path.join(HERE, f)):
            os.makedirs(root / os.path.dirname(f), exist_ok=True)
            shutil.copy2(os.path.join(HERE, f), root / f)
    return root


def sh(command, cwd):
    """One README command in the copy, with the project on no path but its own directory."""
    argv = shlex.split(command)
    argv[0] = sys.executable if argv[0] == "python" else argv[0]
    p = subprocess.run(argv, cwd=cwd, env=dict(ENV, PYTHONPATH=""), capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, f"README command failed: {command}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def test_the_quick_start_runs_and_quotes_the_committed_results(clone):
    """`bash install.sh && python toy.py`: the toy command runs at --quick size (install.sh is what CI ran before
    the suite), and the table under it is what `python toy.py` wrote: toy_results/seed0/results.json, committed."""
    cmds = commands(blocks(section("Install and quick start"), "bash")[0])
    assert cmds[0] == "bash install.sh" and cmds[1] == "python toy.py", cmds
    out = sh(cmds[1] + " --quick", clone)
    assert "results.json" in out and os.path.exists(clone / "out/toy/results.json")
    rows = [row for row in section("Install and quick start").splitlines() if row.startswith("| ")]
    names = [c.strip() for c in rows[0].strip("|").split("|")][1:]
    splits = json.load(open(os.path.join(HERE, "toy_results/seed0/results.json")))["splits"]
    assert len(rows) == 4, rows  # header, rule, one row per test split
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        split = re.search(r"`(\w+)`", cells[0]).group(1)
        for name, value in zip(names, map(float, cells[1:])):
            seeds = splits[split]["variants"][name]["seeds"]
            seed0 = seeds.get("0", seeds.get("all"))  # the base is one model for every seed
            assert abs(seed0 - value) < 5e-4, f"README quick start quotes {split} {name} {value}, results.json {seed0:.4f}"


def test_the_smallest_run_and_the_copy_out_block_run_as_written(clone, tmp_path):
    """Every command of "The smallest run, on a CPU" in order; then the "Copy the pieces" python block from an
    empty directory holding only latent_head.py and latent_loop.py, with MODEL the tiny model the run wrote."""
    cmds = commands(blocks(section("The smallest run, on a CPU"), "bash")[0])
    assert len(cmds) == 5 and cmds[0].startswith("python tiny.py"), cmds
    outputs = [sh(c, clone) for c in cmds]
    assert "answer:" in outputs[3] and "accuracy" in outputs[4], outputs[3:]
    snippet = blocks(section("Copy the pieces"), "python")[0]
    line = 'MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"'
    assert snippet.count(line) == 1
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    for name in ("latent_head.py", "latent_loop.py"):
        shutil.copy(clone / name, empty)
    (empty / "use.py").write_text(snippet.replace(line, f"MODEL = {str(clone / 'out/tiny')!r}"))
    out = sh("python use.py", empty)
    assert "<latent>" in out, out


def test_help_shows_every_default():
    """`train.py --help` tells a user the paper's defaults (lr 1e-5, K 36, global batch 128) without the README."""
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=HERE, env=ENV, capture_output=True, text=True)
    text = " ".join(p.stdout.split())
    for flag, default in [("--lr", "1e-05"), ("--latent_tokens", "36"), ("--global_batch", "128"), ("--fsdp", "False")]:
        assert re.search(rf"{flag} [A-Z_]*.*?\(default: {re.escape(default)}\)", text), (flag, text[:2000])
