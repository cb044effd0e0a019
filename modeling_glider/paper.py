"""The paper's evaluation protocol beside this project's: every query of an evaluation task is routed by that TASK's
instruction embedding, read from a precomputed `{task: tensor}` file of the input side (as the GLIDER authors'
evaluation does), instead of an embedding of each query's own instruction.

    rows = task_instruction_embeddings("input_nomic_instruction_embedding.pt", ["p3paws"] * len(texts), model.config)
    generator(texts, instruction_embeddings=rows)          # or model.generate(..., instruction_embeddings=rows)

With `routing_compatibility="reference"` the model also computes the routing as the authors' code does.
"""

import difflib
import os
from collections.abc import Sequence

import torch

from .convert import load_task_embeddings


def task_instruction_embeddings(
    table: str | os.PathLike | dict[str, torch.Tensor], tasks: Sequence[str], config=None
) -> torch.Tensor:
    """`[len(tasks), D]`: row i is the embedding of `tasks[i]` in `table` (a `{task: tensor}` file or dict).

    With a GliderT5 `config`, the width is checked against the experts' (`instruction_embedding_dim`). A task missing
    from the table is an error naming it and the closest entries.
    """
    source = "the given table" if isinstance(table, dict) else str(table)
    if not isinstance(table, dict):
        table = load_task_embeddings(table, "Input-side instruction embeddings")
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a list with one task name per query, got the string {tasks!r}.")
    rows = []
    for task in tasks:
        if task not in table:
            close = difflib.get_close_matches(str(task), [str(t) for t in table], n=3)
            raise ValueError(
                f"Input-side instruction embeddings {source} have no entry for task {task!r}; close: {close}."
            )
        row = torch.as_tensor(table[task]).float().flatten()
        if not torch.isfinite(row).all():
            raise ValueError(f"Input-side instruction embeddings {source}: task {task!r} holds NaN or inf values.")
        rows.append(row)
    if not rows:
        raise ValueError("tasks is empty: give one task name per query.")
    embeddings = torch.stack(rows)
    if config is not None and embeddings.shape[-1] != config.instruction_embedding_dim:
        raise ValueError(
            f"Input-side instruction embeddings {source} are {embeddings.shape[-1]} wide, the experts' "
            f"{config.instruction_embedding_dim} (instruction_embedding_dim)."
        )
    return embeddings


__all__ = ["task_instruction_embeddings"]
