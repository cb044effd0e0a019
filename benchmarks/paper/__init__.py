"""The rows of the GLIDER authors' evaluation script (`src/scripts/paper-eval.sh`), run over a converted model and
local copies of the datasets in their published formats: `python -m benchmarks.paper.run --help`."""
