"""Readers for local copies of the evaluation data in their published formats, one file per task:

- P3 (bigscience/P3), `<task>.jsonl`: one JSON object per line with `inputs_pretokenized`, `targets_pretokenized`
  and `answer_choices` (a list; empty for generation tasks). With choices the example is scored by rank
  classification and its target must be one of them (compared without surrounding whitespace), else by exact match.
- BIG-bench (google/BIG-bench task JSON), `<task>.json`: an object whose `examples` each have an `input` and either
  `target_scores` ({choice: score}; the highest-scored choice is the answer; rank classification) or `target` (a
  string or a list of accepted strings; exact match).

The task name is the file name without its extension; it must be a key of the input-side embedding file.
"""

import json
import math
from pathlib import Path

from benchmarks.glider_mini.suite import Example


def read_p3(path: Path) -> list[Example]:
    task, examples = path.stem, []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"P3 file {path} is not UTF-8 text ({error}).") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"P3 file {path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not valid JSON ({error}).") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where} must hold a JSON object.")
        for field in ("inputs_pretokenized", "targets_pretokenized"):
            if not isinstance(record.get(field), str):
                raise ValueError(f"{where}: {field!r} must be a string, got {record.get(field)!r}.")
        choices = record.get("answer_choices", [])
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: 'answer_choices' must be a list of strings, got {choices!r}.")
        target = record["targets_pretokenized"].strip()
        if choices:
            stripped = [c.strip() for c in choices]
            if target not in stripped:
                raise ValueError(f"{where}: the target {target!r} is not one of 'answer_choices' {stripped}.")
            examples.append(Example(task, record["inputs_pretokenized"], target, tuple(stripped)))
        else:
            examples.append(Example(task, record["inputs_pretokenized"], target))
    if not examples:
        raise ValueError(f"P3 file {path} holds no examples.")
    return examples


def read_bigbench(path: Path) -> tuple[list[Example], list[list[str] | None]]:
    """The examples, and per example the accepted answers of a `target` list (None where there is one answer)."""
    task = path.stem
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"BIG-bench file {path} is not valid JSON ({error}).") from None
    if not isinstance(content, dict) or not isinstance(content.get("examples"), list) or not content["examples"]:
        raise ValueError(f"BIG-bench file {path} must hold an object with a non-empty 'examples' list.")
    examples, accepted = [], []
    for index, record in enumerate(content["examples"]):
        where = f"BIG-bench file {path}, example {index}"
        if not isinstance(record, dict) or not isinstance(record.get("input"), str):
            raise ValueError(f"{where}: must be an object with an 'input' string.")
        scores, target = record.get("target_scores"), record.get("target")
        if scores is not None:
            if (
                not isinstance(scores, dict)
                or len(scores) < 2
                or not all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                    for s in scores.values()
                )
            ):
                raise ValueError(f"{where}: 'target_scores' must map at least two choices to finite numbers.")
            choices = tuple(scores)
            examples.append(Example(task, record["input"], max(choices, key=scores.__getitem__), choices))
            accepted.append(None)
        elif isinstance(target, str) or (
            isinstance(target, list) and target and all(isinstance(t, str) for t in target)
        ):
            targets = [target] if isinstance(target, str) else target
            examples.append(Example(task, record["input"], targets[0]))
            accepted.append(targets if len(targets) > 1 else None)
        else:
            raise ValueError(f"{where}: needs 'target_scores' (an object) or 'target' (a string or a list of strings).")
    return examples, accepted


def read_task_set(folder: Path) -> dict[str, tuple[list[Example], list[list[str] | None]]]:
    """Every task file in `folder`: {task: (examples, accepted answers)}, in name order."""
    if not folder.is_dir():
        raise FileNotFoundError(f"Missing data folder {folder} (one .jsonl P3 or .json BIG-bench file per task).")
    tasks = {}
    for path in sorted(folder.iterdir()):
        if path.suffix in (".jsonl", ".json") and path.stem in tasks:
            raise ValueError(f"Data folder {folder} holds task {path.stem!r} twice (.json and .jsonl).")
        if path.suffix == ".jsonl":
            examples = read_p3(path)
            tasks[path.stem] = examples, [None] * len(examples)
        elif path.suffix == ".json":
            tasks[path.stem] = read_bigbench(path)
    if not tasks:
        raise ValueError(f"Data folder {folder} holds no task files (.jsonl P3 or .json BIG-bench).")
    return tasks
