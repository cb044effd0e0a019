"""The GLIDER rows of the authors' evaluation script (`src/scripts/paper-eval.sh`, UNITES-Lab/glider), as data.

`alpha` None is their Phatgoose run (no input-side embedding: local routing only). With `top_p` set their script
passes no top-k; their config default is 2, and the reference computation ignores it anyway. `experts` names the
released library the row runs over (`p3`: MoE-UNC/p3-lora-checkpoints; `flan`: MoE-UNC/flan-lora-checkpoints) and
`input_embeddings` the folder of MoE-UNC/gpt-generated-instruction-nomic-embeddings whose
`nomic_instruction_embedding.pt` holds the row's input side. Not included: LoRAHub and Arrow rows (other methods),
and the "debug" rows that evaluate hand-picked pairs of tasks.
"""

from dataclasses import dataclass

TASK_SETS = ("t0-heldin", "t0-heldout", "bigbench-hard", "bigbench-lite")


@dataclass(frozen=True)
class Row:
    name: str  # the run name in their script
    task_set: str  # one of TASK_SETS: a folder of the data directory
    alpha: float | None
    top_k: int
    top_p: float | None
    experts: str
    input_embeddings: str | None
    routing_compatibility: str = "reference"


def _ablations(prefix: str, task_set: str, alpha: float, input_embeddings: str) -> list[Row]:
    scale = f"scale_{alpha:g}"
    return [
        Row(f"{prefix}/top_1-{scale}", task_set, alpha, 1, None, "p3", input_embeddings),
        Row(f"{prefix}/top_3-{scale}", task_set, alpha, 3, None, "p3", input_embeddings),
        *(Row(f"{prefix}/top_{p:g}-{scale}", task_set, alpha, 2, p, "p3", input_embeddings) for p in (0.25, 0.5, 0.75)),
    ]


ROWS = [
    # 1. Main results
    Row("t0/heldin/top_2-scale_100", "t0-heldin", 100.0, 2, None, "p3", "t0-v4"),
    Row("t0/heldin/phatgoose", "t0-heldin", None, 2, None, "p3", None),
    Row("t0/heldout/top_2-scale_1000", "t0-heldout", 1000.0, 2, None, "p3", "t0-v4"),
    Row("t0/heldout/phatgoose", "t0-heldout", None, 2, None, "p3", None),
    Row("flan/bbh/top_2-scale_3", "bigbench-hard", 3.0, 2, None, "flan", "bigbench"),
    Row("flan/bbl/top_2-scale_3", "bigbench-lite", 3.0, 2, None, "flan", "bigbench"),
    # 2. Ablations on top-k and top-p
    *_ablations("t0/heldin", "t0-heldin", 100.0, "t0-v4"),
    *_ablations("t0/heldout", "t0-heldout", 3.0, "t0-v4"),
    *_ablations("t0/bbh", "bigbench-hard", 3.0, "bigbench"),
    *_ablations("t0/bbl", "bigbench-lite", 3.0, "bigbench"),
]
BY_NAME = {row.name: row for row in ROWS}
