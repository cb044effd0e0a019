"""The glider-mini benchmark, one command:

    python -m benchmarks.glider_mini.benchmark --model glider-mini --out benchmarks/results/glider_mini

Held-in and held-out averages and per-task scores on the test split for: the base model; the uniform merge of all
experts; Arrow (training-free local routing); Phatgoose (local routing only); GLIDER (local + global, each query
embedded as its own instruction: "query" mode); GLIDER with each task's hand-written instruction given; and the
oracle (each held-in task's own expert, through PEFT). Plus sweeps of the alpha policy and of top-k.

The alpha policy (a fixed alpha, or a threshold on the query's best cosine similarity choosing between two alphas)
is the sweep's best on the validation split (mean of the held-in and held-out averages), never chosen on test.
A query's routing depends only on its own alpha, so a threshold policy's answers are assembled from the fixed-alpha
runs' answers; the chosen policy is then run for real through the model's own global router on the test split.

Writes `results.json`, `results.md`, `results.png` and `eval_results.json` (GLIDER's scores for the model card) into
`--out`. Scores are percentages: exact match for
generation tasks, rank-classification accuracy for multiple-choice tasks (local `evaluate` modules in
`benchmarks/metrics/`).
"""

import argparse
import copy
import itertools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from modeling_glider import GliderT5ForConditionalGeneration

from . import library, suite
from .evaluation import predict, task_score

ALPHAS = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
TOLERANCE = 0.5  # points of the validation objective within which the simpler policy is preferred
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6)
TOP_KS = (1, 2, 3)
METHODS = {
    "base": "Base model (no expert)",
    "merged": "Merged experts (uniform average)",
    "arrow": "Arrow (local only)",
    "phatgoose": "Phatgoose (local only)",
    "glider": "GLIDER (global + local, query mode)",
    "glider_instruction": "GLIDER, instruction given",
    "oracle": "Oracle (the task's own expert)",
}


def summarise(scores: dict[str, float]) -> dict:
    def average(tasks):
        values = [scores[t] for t in tasks if t in scores]
        return sum(values) / len(values) if values else None

    return {"held_in": average(suite.HELD_IN), "held_out": average(suite.HELD_OUT), "tasks": scores}


def objective(summary: dict) -> float:
    return (summary["held_in"] + summary["held_out"]) / 2


def policy_name(policy: dict) -> str:
    if policy["global_routing_policy"] == "fixed":
        return f"fixed alpha={policy['global_routing_scale']:g}"
    return (
        f"threshold {policy['global_routing_threshold']:g}: alpha={policy['global_routing_scale']:g} if matched, "
        f"{policy['global_routing_scale_unmatched']:g} otherwise"
    )


class Benchmark:
    """The model, its baselines' ingredients, the prompts of both splits and every prompt's cos(u, G_e)."""

    def __init__(self, model_dir: str | Path, validation_size: int, test_size: int, seed: int):
        from modeling_glider.embedding import InstructionEmbedder
        from modeling_glider.instructions import QueryInstructions, embed_query_instructions

        self.model_dir = Path(model_dir)
        self.model = GliderT5ForConditionalGeneration.from_pretrained(self.model_dir).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.examples = {
            split: {name: suite.examples(name, split, size, seed) for name in suite.TASKS}
            for split, size in (("validation", validation_size), ("test", test_size))
        }
        self.embedder = InstructionEmbedder(self.model.config.instruction_embedding_model)
        experts = F.normalize(self.model.global_router.expert_embeddings.float(), dim=-1)
        self.cosine = {"instruction": {}}
        prompts = sorted({e.input for split in self.examples.values() for task in split.values() for e in task})
        u, _ = embed_query_instructions(prompts, self.embedder, QueryInstructions())
        self.query_embeddings = dict(zip(prompts, u))
        self.cosine["query"] = dict(zip(prompts, F.normalize(u, dim=-1) @ experts.T))
        for name, task in suite.TASKS.items():
            u = self.embedder.embed([task.query_instruction])
            self.cosine["instruction"][name] = (F.normalize(u, dim=-1) @ experts.T)[0]

    def global_top1(self, split: str) -> dict:
        """Per task, the share (%) of prompts whose most similar expert instruction is the task's own expert (held-in)
        or one whose skill it needs (held-out), for the embedded query and for the given instruction."""
        names = self.model.config.expert_names
        shares = {}
        for name, examples in self.examples[split].items():
            task = suite.TASKS[name]
            right = set(task.skills) if task.held_out else {name}
            query = [names[int(self.cosine["query"][e.input].argmax())] in right for e in examples]
            given = names[int(self.cosine["instruction"][name].argmax())] in right
            shares[name] = {"query": 100 * sum(query) / len(query), "instruction": 100.0 * given}
        return shares

    def global_logits(self, mode: str, alpha: float):
        """Routing inputs: alpha * cos(u, G_e) for each prompt's u (its query, or its task's given instruction)."""

        def routing(batch):
            rows = [
                self.cosine["query"][e.input] if mode == "query" else self.cosine["instruction"][e.task] for e in batch
            ]
            return {"global_routing_logits": alpha * torch.stack(rows)}

        return routing

    def instruction_embeddings(self, batch):
        """Routing inputs for the model's own global router: each query embedded ("query" mode)."""
        return {"instruction_embeddings": torch.stack([self.query_embeddings[e.input] for e in batch])}

    def glider_with(self, **config) -> GliderT5ForConditionalGeneration:
        """The model again, with other routing settings."""
        return GliderT5ForConditionalGeneration.from_pretrained(self.model_dir, **config).eval()

    def predictions(self, model, split: str, routing=None, tasks=None, desc: str = "") -> dict[str, list]:
        tasks = tasks or list(suite.TASKS)
        return {
            name: predict(model, self.tokenizer, self.examples[split][name], routing)
            for name in tqdm(tasks, desc=desc, leave=False)
        }

    def score(self, split: str, predictions: dict[str, list]) -> dict:
        return summarise({name: task_score(self.examples[split][name], p) for name, p in predictions.items()})

    def run(self, model, split: str, routing=None, tasks=None, desc: str = "") -> dict:
        return self.score(split, self.predictions(model, split, routing, tasks, desc))

    def threshold_policy(
        self, split: str, by_alpha: dict[float, dict], threshold: float, matched: float, unmatched: float
    ):
        """A threshold policy's answers, taken per prompt from the fixed-alpha runs."""
        assembled = {}
        for name, examples in self.examples[split].items():
            assembled[name] = [
                by_alpha[matched if self.cosine["query"][e.input].max() >= threshold else unmatched][name][i]
                for i, e in enumerate(examples)
            ]
        return assembled


def choose_policy(bench: Benchmark, validation_by_alpha: dict[float, dict]) -> tuple[dict, list[dict]]:
    """Every fixed alpha and threshold policy scored on validation. The chosen one is the first, in the order fixed
    (smaller alpha first) then threshold, whose objective is within `TOLERANCE` of the best: a validation split of
    this size cannot tell closer policies apart."""
    candidates = []
    for alpha in ALPHAS:
        policy = {"global_routing_policy": "fixed", "global_routing_scale": alpha}
        candidates.append((policy, bench.score("validation", validation_by_alpha[alpha])))
    for threshold, matched, unmatched in itertools.product(THRESHOLDS, ALPHAS, ALPHAS):
        if matched <= unmatched:
            continue
        policy = {
            "global_routing_policy": "threshold",
            "global_routing_threshold": threshold,
            "global_routing_scale": matched,
            "global_routing_scale_unmatched": unmatched,
        }
        predictions = bench.threshold_policy("validation", validation_by_alpha, threshold, matched, unmatched)
        candidates.append((policy, bench.score("validation", predictions)))
    best = max(objective(summary) for _, summary in candidates)
    chosen = next(policy for policy, summary in candidates if objective(summary) >= best - TOLERANCE)
    table = [{"policy": p, "validation": {k: s[k] for k in ("held_in", "held_out")}} for p, s in candidates]
    return chosen, table


def run_benchmark(
    model_dir: str | Path, out: str | Path, validation_size: int = 100, test_size: int = 300, seed: int = 0
) -> dict:
    start = time.perf_counter()
    bench = Benchmark(model_dir, validation_size, test_size, seed)
    model = bench.model
    top_k = model.config.router_top_k
    results = {"model": str(model_dir), "top_k": top_k, "methods": {}, "alpha_sweep": {}, "top_k_sweep": {}}

    # The alpha policy, chosen on validation; the fixed-alpha sweep is reported on test too.
    by_alpha = {}
    for split in ("validation", "test"):
        by_alpha[split] = {
            alpha: bench.predictions(model, split, bench.global_logits("query", alpha), desc=f"alpha={alpha:g} {split}")
            for alpha in ALPHAS
        }
        results["alpha_sweep"][split] = {str(a): bench.score(split, p) for a, p in by_alpha[split].items()}
    policy, candidates = choose_policy(bench, by_alpha["validation"])
    results["policy"] = {"chosen": policy, "name": policy_name(policy), "candidates": candidates}
    alpha = policy["global_routing_scale"]

    methods = results["methods"]
    base = library.base_model(model)
    methods["base"] = bench.run(base, "test", desc="base")
    methods["merged"] = bench.run(library.merged_model(model), "test", desc="merged")
    methods["phatgoose"] = bench.score("test", by_alpha["test"][0.0])  # alpha 0 (in ALPHAS): local routing only
    glider = bench.glider_with(**policy)
    methods["glider"] = bench.run(glider, "test", bench.instruction_embeddings, desc="glider")
    if policy["global_routing_policy"] == "threshold":
        args = (policy["global_routing_threshold"], alpha, policy["global_routing_scale_unmatched"])
        assembled = bench.score("test", bench.threshold_policy("test", by_alpha["test"], *args))
    else:
        assembled = results["alpha_sweep"]["test"][str(alpha)]
    results["glider_check"] = {"through_the_model": methods["glider"]["tasks"], "assembled": assembled["tasks"]}
    from .candidates import candidates_results  # imports this module

    results["router_candidates"] = candidates_results(bench, policy)
    methods["glider_instruction"] = bench.run(model, "test", bench.global_logits("instruction", alpha), desc="instr")
    with tempfile.TemporaryDirectory() as scratch:
        dirs = library.export_experts(model, scratch)
        arrow = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=top_k, local_router="arrow").eval()
        methods["arrow"] = bench.run(arrow, "test", desc="arrow")
        from peft import PeftModel

        oracle = {}
        for name, directory in zip(model.config.expert_names, dirs):
            expert = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
            oracle.update(bench.run(expert, "test", tasks=[name], desc=f"oracle {name}")["tasks"])
        methods["oracle"] = summarise(oracle)

    for k in TOP_KS:
        if k == top_k:
            results["top_k_sweep"][str(k)] = {"glider": methods["glider"], "phatgoose": methods["phatgoose"]}
        elif k <= len(model.config.experts):
            results["top_k_sweep"][str(k)] = {
                "glider": bench.run(bench.glider_with(router_top_k=k, **policy), "test", bench.instruction_embeddings),
                "phatgoose": bench.run(bench.glider_with(router_top_k=k), "test", desc=f"phatgoose k={k}"),
            }
    results["global_top1"] = bench.global_top1("test")
    results["goals"] = goals(methods)
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["machine"] = {"platform": platform.platform(), "torch_threads": torch.get_num_threads()}
    results["sizes"] = {"validation": validation_size, "test": test_size, "seed": seed}

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    (out / "eval_results.json").write_text(json.dumps(eval_results(results), indent=2) + "\n")
    plot(results, out / "results.png")
    return results


def eval_results(results: dict) -> dict:
    """GLIDER's scores in the model card's format (`glider push DIR REPO --eval-results eval_results.json`)."""
    glider, rows = results["methods"]["glider"], []
    for part, label in (("held_in", "held-in"), ("held_out", "held-out")):
        rows.append(
            {"task": f"glider-mini {label} tasks", "dataset": f"glider-mini/{label}", "split": "test",
             "metric": "glider_mini_score", "metric_name": "Average of exact match / rank-classification accuracy",
             "value": round(glider[part] / 100, 4)}
        )  # fmt: skip
    for name, value in glider["tasks"].items():
        metric = "accuracy" if suite.TASKS[name].kind == "multiple_choice" else "exact_match"
        rows.append({"task": name, "dataset": f"glider-mini/{name}", "split": "test", "metric": metric,
                     "value": round(value / 100, 4)})  # fmt: skip
    return {"results": rows}


def goals(methods: dict) -> dict:
    g, p, o = methods["glider"], methods["phatgoose"], methods["oracle"]
    return {
        "GLIDER held-in >= Phatgoose held-in + 10": g["held_in"] >= p["held_in"] + 10,
        "GLIDER held-in >= oracle held-in - 3": g["held_in"] >= o["held_in"] - 3,
        "GLIDER held-out >= Phatgoose held-out - 1": g["held_out"] >= p["held_out"] - 1,
        "GLIDER above merged (held-in and held-out)": all(g[s] > methods["merged"][s] for s in ("held_in", "held_out")),
        "GLIDER above Arrow (held-in and held-out)": all(g[s] > methods["arrow"][s] for s in ("held_in", "held_out")),
    }


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def markdown(results: dict) -> str:
    methods = results["methods"]
    sizes, machine = results["sizes"], results["machine"]
    command = (
        f"python -m benchmarks.glider_mini.benchmark --model {results['model']} --validation-size "
        f"{sizes['validation']} --test-size {sizes['test']} --seed {sizes['seed']} --threads {machine['torch_threads']}"
    )
    lines = [
        f"Made by `{command}` in {results['seconds'] / 60:.0f} min ({machine['platform']}).",
        "",
        f"Test split, {results['sizes']['test']} prompts per task, top-k = {results['top_k']}. GLIDER's alpha policy, "
        f"chosen on the validation split: {results['policy']['name']}.",
        "",
        "| Method | Held-in avg | Held-out avg |",
        "|---|---:|---:|",
    ]
    for key, label in METHODS.items():
        lines.append(f"| {label} | {_fmt(methods[key]['held_in'])} | {_fmt(methods[key]['held_out'])} |")
    lines += ["", "| Task | " + " | ".join(METHODS) + " |", "|---|" + "---:|" * len(METHODS)]
    for name, task in suite.TASKS.items():
        kind = f"{'held-out' if task.held_out else 'held-in'}, {'MC' if task.kind == 'multiple_choice' else 'EM'}"
        lines.append(f"| {name} ({kind}) | " + " | ".join(_fmt(methods[k]["tasks"].get(name)) for k in METHODS) + " |")
    lines += [
        "",
        "Fixed alpha (GLIDER, query mode):",
        "",
        "| alpha | val held-in | val held-out | test held-in | test held-out |",
    ]
    lines.append("|---:|---:|---:|---:|---:|")
    for alpha in ALPHAS:
        v, t = results["alpha_sweep"]["validation"][str(alpha)], results["alpha_sweep"]["test"][str(alpha)]
        lines.append(
            f"| {alpha:g} | {_fmt(v['held_in'])} | {_fmt(v['held_out'])} | {_fmt(t['held_in'])} | {_fmt(t['held_out'])} |"
        )
    lines += [
        "",
        "top-k (test):",
        "",
        "| k | GLIDER held-in | GLIDER held-out | Phatgoose held-in | Phatgoose held-out |",
    ]
    lines.append("|---:|---:|---:|---:|---:|")
    for k, row in results["top_k_sweep"].items():
        g, p = row["glider"], row["phatgoose"]
        lines.append(
            f"| {k} | {_fmt(g['held_in'])} | {_fmt(g['held_out'])} | {_fmt(p['held_in'])} | {_fmt(p['held_out'])} |"
        )
    if "router_candidates" in results:
        from .candidates import markdown_section

        lines += markdown_section(results["router_candidates"])
    lines += ["", "Goals:", ""] + [f"- {'met' if ok else 'MISSED'}: {goal}" for goal, ok in results["goals"].items()]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, sweep, topk) = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [2.2, 1.4, 1]})
    keys = list(METHODS)
    for offset, part in ((-0.2, "held_in"), (0.2, "held_out")):
        values = [results["methods"][k][part] or 0.0 for k in keys]
        bars.bar([i + offset for i in range(len(keys))], values, width=0.4, label=part.replace("_", "-"))
    bars.set_xticks(range(len(keys)), [k.replace("_", "\n") for k in keys], fontsize=8)
    bars.set_ylabel("score (%)")
    bars.set_title("Test split")
    bars.legend()
    alphas = [a for a in ALPHAS if a > 0]
    for split, style in (("validation", "--"), ("test", "-")):
        for part in ("held_in", "held_out"):
            values = [results["alpha_sweep"][split][str(a)][part] for a in alphas]
            sweep.plot(alphas, values, style, marker="o", label=f"{split} {part.replace('_', '-')}")
    sweep.set_xscale("log")
    sweep.set_xlabel("alpha (fixed)")
    sweep.set_title("GLIDER, query mode: alpha")
    sweep.legend(fontsize=7)
    ks = list(results["top_k_sweep"])
    for offset, method in ((-0.2, "glider"), (0.2, "phatgoose")):
        values = [results["top_k_sweep"][k][method]["held_in"] for k in ks]
        topk.bar([int(k) + offset for k in ks], values, width=0.4, label=f"{method} held-in")
    topk.set_xlabel("top-k")
    topk.set_title("top-k (test, held-in)")
    topk.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="glider-mini", help="A saved glider-mini (default: %(default)s).")
    parser.add_argument("--out", default="benchmarks/results/glider_mini", help="Output folder (default: %(default)s).")
    parser.add_argument("--validation-size", type=int, default=100, help="Prompts per task for choosing the policy.")
    parser.add_argument("--test-size", type=int, default=300, help="Prompts per task for the reported scores.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_benchmark(args.model, args.out, args.validation_size, args.test_size, args.seed)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
