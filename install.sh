#!/usr/bin/env bash
# Set-up in one command, the same on a CPU and a GPU machine:
#     bash install.sh            # torch, then requirements.txt
#     bash install.sh --test     # also what the tests need: requirements-test.txt, the harness pins of requirements-eval.txt
# torch first: a bare `torch` requirement with no torch installed pulls the CUDA packages even on a CPU machine.
# A torch 2.11-2.13 already installed (a GPU machine's CUDA build) is kept.
set -euo pipefail
cd "$(dirname "$0")"
PIP="python -m pip install --quiet --disable-pip-version-check"
if ! python -c "import sys, torch; v = tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])); sys.exit(not (2, 11) <= v < (2, 14))" 2>/dev/null; then
    $PIP torch==2.13.0
fi
$PIP -r requirements.txt
if [[ "${1:-}" == "--test" ]]; then
    # TensorBoard, whose event files test_watch.py reads back (training needs it only with --log tensorboard)
    $PIP -r requirements-test.txt
    # the two harnesses without dependencies: both require torchvision, which their tested code paths never import
    $PIP --no-deps -r requirements-eval.txt
fi
python -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}: ready')"
