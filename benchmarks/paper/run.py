"""Run rows of the GLIDER authors' evaluation script over a converted model (see README, "Reproducing the paper's
computation"):

    python -m benchmarks.paper.run --model DIR --data DIR (--row NAME ... | --all) --out DIR \
        [--input-embeddings FILE]

`--data` holds one folder per task set (`t0-heldin`, `t0-heldout`, `bigbench-hard`, `bigbench-lite`) of task files
(`benchmarks/paper/data.py`). Routing: with `--input-embeddings` (a `{task: tensor}` file) every query of a task is
routed by that task's embedding, the paper's protocol; without it each query is embedded by the model's recorded
embedder (`--embedder` for a local copy), this project's protocol. Rows with alpha None (Phatgoose) route locally.
Writes `results.json` and `results.md` into `--out` (a new or empty folder), all or nothing. The `paper` column comes
from `--paper-figures` (default `benchmarks/paper/paper_figures.json`; null where unknown).
"""

import json
import math
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.utils.logging import disable_progress_bar

from benchmarks.glider_mini.evaluation import _metric, choice_scores, generate_answers
from modeling_glider import GliderT5ForConditionalGeneration
from modeling_glider.cli import USER_ERRORS, ArgumentParser
from modeling_glider.convert import load_task_embeddings
from modeling_glider.embedding import load_config_embedder
from modeling_glider.experts import read_json_object
from modeling_glider.instructions import embed_query_instructions
from modeling_glider.paper import task_instruction_embeddings
from modeling_glider.staging import staged_folder

from .data import read_task_set
from .rows import BY_NAME, ROWS, Row

PAPER_FIGURES = Path(__file__).resolve().parent / "paper_figures.json"


def score_task(model, tokenizer, examples, accepted, routing) -> tuple[float, list]:
    """The task's score in percent, rank-classification accuracy (all examples have choices) or exact match, and the
    predictions it counts: per example every choice's length-normalised cross-entropy, or the greedy answer."""
    if all(e.choices for e in examples):
        predictions = choice_scores(model, tokenizer, examples, routing)
        references = [e.choices.index(e.target) for e in examples]
        result = _metric("rank_classification").compute(predictions=predictions, references=references)
        return 100 * result["accuracy"], predictions
    if any(e.choices for e in examples):
        raise ValueError(f"Task {examples[0].task!r} mixes examples with and without answer choices.")
    answers = generate_answers(model, tokenizer, examples, routing)
    # a BIG-bench `target` list accepts any of its answers: compare with the one the answer matches, if any
    references = [
        next((a for a in (ok or []) if a.strip() == answer.strip()), e.target)
        for e, ok, answer in zip(examples, accepted, answers)
    ]
    return 100 * _metric("exact_match").compute(predictions=answers, references=references)["exact_match"], answers


def routing_for(row: Row, model, task: str, table: dict | None, embedder):
    """Per batch of examples, the model inputs that route it under `row` (None: local routing only)."""
    if row.alpha is None:
        return None
    if table is not None:
        return lambda batch: {
            "instruction_embeddings": task_instruction_embeddings(table, [task] * len(batch), model.config)
        }
    return lambda batch: {"instruction_embeddings": embed_query_instructions([e.input for e in batch], embedder)[0]}


def run_row(row: Row, model, tokenizer, tasks: dict, table: dict | None, embedder) -> dict:
    model.config.routing_compatibility = row.routing_compatibility
    model.config.global_routing_policy = "fixed"
    model.config.router_top_k = row.top_k
    model.config.router_top_p = row.top_p
    if row.alpha is not None:
        model.config.global_routing_scale = row.alpha
    scores, predictions = {}, {}
    for task, (examples, accepted) in tasks.items():
        routing = routing_for(row, model, task, table, embedder)
        scores[task], predictions[task] = score_task(model, tokenizer, examples, accepted, routing)
    return {"score": sum(scores.values()) / len(scores), "tasks": scores, "predictions": predictions}


def markdown(results: list[dict]) -> str:
    lines = [
        "| row | task set | alpha | top-k | top-p | routing | score | paper |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = [r["row"], r["task_set"], r["alpha"], r["top_k"], r["top_p"], r["routing"], f"{r['score']:.2f}"]
        cells.append("" if r["paper"] is None else f"{r['paper']:.2f}")
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def paper_figures(path: Path) -> dict:
    figures = read_json_object(path, "Paper figures")
    for name, value in figures.items():
        if name not in BY_NAME:
            raise ValueError(f"Paper figures {path}: {name!r} is not a row (see benchmarks/paper/rows.py).")
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            raise ValueError(f"Paper figures {path}: row {name!r} must be a number or null, got {value!r}.")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="glider paper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A GliderT5 folder (with its tokenizer).")
    parser.add_argument("--data", required=True, help="Folder with one folder of task files per task set.")
    rows = parser.add_mutually_exclusive_group(required=True)
    rows.add_argument("--row", action="append", choices=list(BY_NAME), metavar="NAME", help="A row; repeatable.")
    rows.add_argument("--all", action="store_true", help="Every row.")
    parser.add_argument("--out", required=True, help="New or empty folder for results.json and results.md.")
    parser.add_argument("--input-embeddings", help="{task: tensor} file: route each task by its embedding.")
    parser.add_argument("--embedder", help="Local copy of the model's recorded embedder (per-query routing).")
    parser.add_argument("--device", help="Where the model runs (default: cuda when available, else cpu).")
    parser.add_argument("--paper-figures", default=str(PAPER_FIGURES), help="JSON {row: figure or null}.")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return exit.code
    try:
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"--out {out} exists and is not an empty folder.")
        figures = paper_figures(Path(args.paper_figures))
        selected = ROWS if args.all else [BY_NAME[name] for name in args.row]
        # every input is read and checked before the model is loaded and the first row runs
        data = {name: read_task_set(Path(args.data) / name) for name in dict.fromkeys(r.task_set for r in selected)}
        table = embedder = None
        if args.input_embeddings:
            table = load_task_embeddings(args.input_embeddings, "Input-side instruction embeddings")
            for row in selected:
                if row.alpha is not None:
                    task_instruction_embeddings(table, list(data[row.task_set]))  # names a missing task
        disable_progress_bar()
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = GliderT5ForConditionalGeneration.from_pretrained(args.model).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if table is not None:
            task_instruction_embeddings(table, list(table)[:1], model.config)  # the width, against the experts'
        elif any(row.alpha is not None for row in selected):
            embedder = load_config_embedder(model.config, args.embedder)
        results = []
        with torch.no_grad():
            for row in selected:
                result = run_row(row, model, tokenizer, data[row.task_set], table, embedder)
                results.append({
                    "row": row.name, "task_set": row.task_set, "alpha": row.alpha, "top_k": row.top_k,
                    "top_p": row.top_p, "routing_compatibility": row.routing_compatibility,
                    "routing": "local" if row.alpha is None else ("task" if table is not None else "query"),
                    **result, "paper": figures.get(row.name),
                })  # fmt: skip
        with staged_folder(out) as staging:
            (staging / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            (staging / "results.md").write_text(markdown(results))
    except KeyboardInterrupt:
        print("glider paper: error: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
        print(f"glider paper: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
