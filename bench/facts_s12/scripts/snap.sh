#!/bin/bash
# Session 12's snapshot (run HERE, not on the device): session 11's snap.sh on the code paths only, so that helpers'
# uncommitted edits never travel into a run and the carry stays under 64 MiB (the whole tree's archive is ~19 MB;
# this one ~0.7 MB). The models (small, tiny) and s11's fp16 export are copied from the tree on the device instead.
#   bash bench/facts_s12/scripts/snap.sh [REV]     (REV defaults to HEAD; commit first)
cd /work/main || exit 1
REV=${1:-HEAD}
exec bash bench/facts_s11/scripts/snap.sh "$REV" \
  $(git ls-tree -r --name-only "$REV" superlinear_lab kernels tests | grep -v '^superlinear_lab/models/') \
  $(git ls-tree -r --name-only "$REV" bench | grep -E '^bench/[^/]*\.py$|^bench/facts_s1[2-9]/|^bench/facts_s1[1-9]_[^/]*\.json$') \
  bench/h200_s11/jobs.sh bench/facts_s11/scripts/prelude.sh setup.py pyproject.toml
