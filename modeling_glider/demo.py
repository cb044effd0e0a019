"""`glider demo`: load glider-mini, answer held-in and held-out queries through the `text2text-generation` pipeline
(which routes every query by itself: the query is embedded with all-MiniLM-L6-v2 and compared with each expert's
instruction), print each answer with the experts it used (and the answer of the local routers alone), and write a
routing heatmap (layers x experts) per query.

glider-mini is a GliderT5 committed with this repository: a small T5 pretrained from scratch and one LoRA expert per
held-in task of the glider-mini suite, built by `python -m benchmarks.glider_mini.build --out glider-mini`.
"""

import textwrap
from pathlib import Path

import torch

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "glider-mini"
# (kind, query, expected answer): held-in queries ask a task that has an expert (some in wordings no expert was
# trained on), held-out queries ask for an expert's skill in words or formats it never saw.
QUERIES = [
    ("held-in", "Which word in this list names an animal: plum, tiger, bus, saw, green?", "tiger"),
    ("held-in", "Pick out the color from brush, mango, white, boat, sheep.", "white"),
    ("held-in", "Yesterday, Emma found the wooden ladder in the kitchen. Where did it happen?", "kitchen"),
    ("held-in", "Yesterday, Emma found the wooden ladder in the kitchen. What object is mentioned?", "ladder"),
    ("held-in", "The ferry to Oslo leaves at 9 from platform 4. Which platform does it leave from?", "4"),
    ("held-out", "Which of shovel, bus, lemon, horse, blue is a living creature?", "horse"),
    ("held-out", "Whose action does this describe? Omar fixed the old clock in the attic at noon.", "Omar"),
]


def layer_usage(record, num_experts: int, batch_size: int) -> tuple[list[str], torch.Tensor]:
    """Each query's mean routing weight per expert in every block, `[batch, layers, experts]`, from a routing record."""
    blocks: dict[str, list[torch.Tensor]] = {}
    for path, usage in record.module_usage(num_experts, batch_size).items():
        stack, _, index = path.split(".")[:3]
        blocks.setdefault(f"{stack} {index}", []).append(usage)
    names = sorted(blocks, key=lambda name: (name.split()[0] != "encoder", int(name.split()[1])))
    return names, torch.stack([torch.stack(blocks[name]).mean(0) for name in names], dim=1)


def plot_heatmap(path: Path, layers: list[str], experts: list[str], usage: torch.Tensor, titles: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(titles))
    rows = -(-len(titles) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 4.8 * rows), squeeze=False, layout="constrained")
    for ax, title, weights in zip(axes.flat, titles, usage):
        image = ax.imshow(weights.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(textwrap.fill(title, 44), fontsize=7)
        ax.set_xticks(range(len(experts)), experts, rotation=90, fontsize=6)
        ax.set_yticks(range(len(layers)), layers, fontsize=6)
    for ax in axes.flat[len(titles) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.6, label="mean routing weight")
    fig.suptitle("glider-mini: mean routing weight per layer (rows) and expert (columns)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def run_demo(out_dir: str | Path = "glider-demo", model_dir: str | Path | None = None) -> list[dict]:
    """Run the demo; returns one record per query (query, answer, expected answer, experts, answer without the
    global router)."""
    from transformers import AutoModel, AutoTokenizer, pipeline

    from . import GliderT5ForConditionalGeneration

    model_dir = Path(model_dir or DEFAULT_MODEL)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"No glider-mini at {model_dir}. It is committed with the repository (folder glider-mini/); rebuild it with "
            "`python -m benchmarks.glider_mini.build --out glider-mini`, or pass --model DIR."
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModel.from_pretrained(model_dir).eval()
    if not isinstance(model, GliderT5ForConditionalGeneration):
        raise ValueError(f"{model_dir} holds a {type(model).__name__}, not a GliderT5.")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    names = model.config.expert_names
    policy = model.config.global_routing_policy
    local_router = {"phatgoose": "Phatgoose", "arrow": "Arrow"}[model.config.local_router]
    print(
        f"glider-mini: a T5 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters with its experts) "
        f"routing among {len(names)} LoRA experts, top-{model.config.router_top_k}, global routing policy {policy!r}."
    )

    glider = pipeline("text2text-generation", model=model, tokenizer=tokenizer)  # routes each query by itself
    local_only = pipeline("text2text-generation", model=model, tokenizer=tokenizer, instruction_generator=None)
    queries = [query for _, query, _ in QUERIES]
    routed = glider(queries, return_experts=True, max_new_tokens=12)
    alone = local_only(queries, max_new_tokens=12)
    records = []
    for (kind, query, expected), [answer], [plain] in zip(QUERIES, routed, alone):
        experts = ", ".join(f"{e['name']} {e['weight']:.0%}" for e in answer["experts"][:3])
        records.append({"kind": kind, "query": query, "expected": expected, "answer": answer["generated_text"],
                        "experts": answer["experts"], "local_only": plain["generated_text"]})  # fmt: skip
        print(f"\n[{kind}] {query}\n  GLIDER: {answer['generated_text']!r}   experts used: {experts}")
        print(f"  local routers alone ({local_router}): {plain['generated_text']!r}   expected: {expected!r}")

    # The heatmap: all queries again, embedded as the pipeline embeds them, through `generate` with a routing record
    # (padding and finished rows do not count in it).
    inputs = tokenizer(queries, return_tensors="pt", padding=True)
    embeddings = glider.instruction_embedder.embed(queries)
    usage = {}
    for label, routing in (("GLIDER", {"instruction_embeddings": embeddings}), ("local routers alone", {})):
        output = model.generate(**inputs, **routing, max_new_tokens=12, output_routing=True,
                                return_dict_in_generate=True)  # fmt: skip
        layers, usage[label] = layer_usage(output["routing"], len(names), len(queries))
    order = [(i, label) for i in range(len(QUERIES)) for label in usage]  # per query: GLIDER, then local alone
    titles = [f"{label} [{QUERIES[i][0]}] {QUERIES[i][1]}" for i, label in order]
    plot_heatmap(out_dir / "routing_heatmap.png", layers, names, torch.stack([usage[label][i] for i, label in order]),
                 titles)  # fmt: skip
    print(f"\nRouting heatmap (layers x experts; per query, GLIDER then the local routers alone): "
          f"{out_dir / 'routing_heatmap.png'}")  # fmt: skip
    return records
