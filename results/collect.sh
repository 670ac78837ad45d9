#!/usr/bin/env bash
# Copy the small outputs of a finished run directory into results/NAME/: the config that made it (config.toml),
# where and how it ran (provenance.toml), per-variant metrics, learning curves, the paired findings and, if the
# run was diagnosed, diagnostics.csv and the learning-curve figure. Never checkpoints, pairs or per-point files.
#   usage: results/collect.sh RUN_DIR NAME
set -euo pipefail
if [ $# -ne 2 ] || [ ! -f "$1/config.toml" ]; then
  echo "usage: results/collect.sh RUN_DIR NAME (RUN_DIR: a directory that \`vae-priors run\` wrote)" >&2
  exit 2
fi
dest="$(cd "$(dirname "$0")" && pwd)/$2"
mkdir -p "$dest"
for f in config.toml provenance.toml metrics.csv history.csv findings.csv diagnostics.csv; do
  if [ -f "$1/$f" ]; then cp "$1/$f" "$dest/$f"; fi
done
if [ -f "$1/diagnostics/learning-curves.png" ]; then
  cp "$1/diagnostics/learning-curves.png" "$dest/"
elif [ -f "$1/history.csv" ]; then  # not diagnosed: draw them from history.csv (python: the venv with vae_priors)
  python -c "import sys, pandas as pd; from vae_priors.experiments.reporting import plots
with plots.labelled(sys.argv[3]): plots.learning_curves(pd.read_csv(sys.argv[1]), sys.argv[2])" \
    "$1/history.csv" "$dest/learning-curves.png" "$2 ($(basename "$1"))"
fi
echo "collected $1 into $dest: $(ls "$dest" | tr '\n' ' ')"
