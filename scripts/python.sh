#!/bin/sh
# The project's Python, for every dvc.yaml stage and MLproject entry:
#
#   sh scripts/python.sh -m virtual_biopsy.stages.NAME [args]
#
# so `dvc repro`, `dvc exp run` (queued too) and `mlflow run . --env-manager local` work with or
# without an activated venv. The interpreter is the first that exists of
#   1. $VIRTUAL_ENV/bin/python   an activated venv; the docker image sets VIRTUAL_ENV=/opt/venv
#   2. <checkout>/.venv/bin/python   `make install`'s venv. A DVC experiment that runs in a temp
#      copy (.dvc/tmp/exps/tmpXXXX, `dvc exp run --queue` / `--temp`) uses the venv of the checkout
#      that holds the copy
#   3. python3 (then python) on PATH   a system-wide install
# This checkout's src/ goes first on PYTHONPATH: the code that runs is the code whose hashes DVC
# recorded as the stage's deps (an experiment's copy, not the checkout the venv was installed from).
# A venv's bin/ goes first on PATH, so what the command starts by name (`dvc`, `vbiopsy`) is that
# venv's too: DVC starts its queue worker as a bare `dvc`, hence, with nothing activated,
#   sh scripts/python.sh -m dvc queue start
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)

python=
if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  python=$VIRTUAL_ENV/bin/python
elif [ -x "$root/.venv/bin/python" ]; then
  python=$root/.venv/bin/python
else
  case $root in
    */.dvc/tmp/*)
      outer=${root%%/.dvc/tmp/*}
      [ -x "$outer/.venv/bin/python" ] && python=$outer/.venv/bin/python ;;
  esac
fi
if [ -n "$python" ]; then
  PATH=${python%/python}${PATH:+:$PATH}
  export PATH
else
  python=$(command -v python3 || command -v python || true)
  if [ -z "$python" ]; then
    echo "scripts/python.sh: no Python found (no \$VIRTUAL_ENV, no $root/.venv, no python3 on PATH); run make install" >&2
    exit 127
  fi
fi

# One torch (OpenMP) thread per stage unless the caller sets OMP_NUM_THREADS: PyTorch's CPU
# results depend on the intra-op thread count (the same 3 training steps give other weights with 1
# and 2 threads), so a pinned count makes a fresh clone reproduce the committed dvc.lock whatever
# its machine's core count. The price, measured on 2 cores: a CPU-profile generator epoch takes
# ~11 s instead of ~7.5 s with two threads; two threads beside another busy process stall in
# OpenMP barriers (a 2-thread step took 7.9 s instead of 0.25 s). Set OMP_NUM_THREADS=2 (or more)
# for speed; the numbers then differ from the committed ones in the last bits. A GPU run computes
# on the GPU either way.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export OMP_NUM_THREADS

# numpy's AVX-512 kernels (SVML exp, sin, log, pow of its X86_V4 dispatch) round differently from
# its AVX2 ones, so on an AVX-512 CPU `vbiopsy synth` wrote another data/raw than data.dvc records
# (measured: an AMD EPYC with AVX-512 hashed b89e5111..., the AVX2 machine that recorded data.dvc
# efc97ce5...; with X86_V4 disabled both give efc97ce5...). Off by default in every stage and make
# target (the Makefile exports the same); set NPY_DISABLE_CPU_FEATURES= (empty) to keep AVX-512.
NPY_DISABLE_CPU_FEATURES=${NPY_DISABLE_CPU_FEATURES-X86_V4}
export NPY_DISABLE_CPU_FEATURES

if [ -d "$root/src/virtual_biopsy" ]; then
  PYTHONPATH=$root/src${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONPATH
fi
exec "$python" "$@"
