"""The glider-mini benchmark, one command:

    python -m benchmarks.glider_mini.benchmark --model glider-mini --out benchmarks/results/glider_mini

Held-in and held-out averages and per-task scores on the test split for: the base model; the uniform merge of all
experts; Arrow (training-free local routing); Phatgoose (local routing only); GLIDER (local + global, each query
embedded as its own instruction: "query" mode), with the global router's descriptor and alpha policy chosen on
validation, and with the paper's instruction descriptor; GLIDER with each task's hand-written instruction given; and
the oracle (each held-in task's own expert, through PEFT). Plus sweeps of the alpha policy and of top-k, each
descriptor's scores, how well a query's best score tells held-in from held-out tasks, and the held-in scores on the
templates never used for training (nor for the experts' embedded samples).

The descriptor (`global_routing_descriptor`: instruction, samples, both) and the alpha policy (a fixed alpha, or a
threshold on the query's best score choosing between two alphas) are the sweep's best on the validation split (mean
of the held-in and held-out averages), never chosen on test.
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
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from configuration_glider.configuration_glider import GLOBAL_ROUTING_DESCRIPTORS as DESCRIPTORS
from modeling_glider import GliderT5ForConditionalGeneration

from . import library, suite
from .evaluation import predict, task_score

ALPHAS = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
TOLERANCE = 0.5  # points of the validation objective within which the simpler policy is preferred
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6)
TOP_KS = (1, 2, 3)
BASELINES = ("base", "merged", "arrow")  # what does not depend on the global router (see `--baselines-from`)
METHODS = {
    "base": "Base model (no expert)",
    "merged": "Merged experts (uniform average)",
    "arrow": "Arrow (local only)",
    "phatgoose": "Phatgoose (local only)",
    "glider": "GLIDER (global + local, query mode)",
    "glider_instruction_descriptor": "GLIDER, query mode, instruction descriptor (the paper)",
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
    descriptor = f"descriptor {policy['global_routing_descriptor']}, "
    if policy["global_routing_policy"] == "fixed":
        return descriptor + f"fixed alpha={policy['global_routing_scale']:g}"
    return descriptor + (
        f"threshold {policy['global_routing_threshold']:g}: alpha={policy['global_routing_scale']:g} if matched, "
        f"{policy['global_routing_scale_unmatched']:g} otherwise"
    )


def separation(higher: list[float], lower: list[float]) -> float:
    """The probability that a random value of `higher` exceeds one of `lower` (ties count half): the ROC AUC."""
    a, b = torch.tensor(higher)[:, None], torch.tensor(lower)[None, :]
    return ((a > b).float().mean() + 0.5 * (a == b).float().mean()).item()


class Benchmark:
    """The model, its baselines' ingredients, the prompts of both splits and every prompt's scores score(u, e) by each
    descriptor the library has."""

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
        self.descriptors = DESCRIPTORS if self.model.config.max_samples else ("instruction",)
        prompts = sorted({e.input for split in self.examples.values() for task in split.values() for e in task})
        u, _ = embed_query_instructions(prompts, self.embedder, QueryInstructions())
        self.query_embeddings = dict(zip(prompts, u))
        given = self.embedder.embed([task.query_instruction for task in suite.TASKS.values()])
        self.scores = {}  # descriptor -> {"query": prompt -> [E], "instruction": task -> [E]}
        for descriptor in self.descriptors:
            scores = self.descriptor_scores(descriptor, torch.cat([u, given]))
            self.scores[descriptor] = {
                "query": dict(zip(prompts, scores[: len(prompts)])),
                "instruction": dict(zip(suite.TASKS, scores[len(prompts) :])),
            }

    @torch.no_grad()
    def descriptor_scores(self, descriptor: str, u: torch.Tensor) -> torch.Tensor:
        """score(u, e) by the model's own global router with `global_routing_descriptor = descriptor`."""
        config = self.model.config
        saved, config.global_routing_descriptor = config.global_routing_descriptor, descriptor
        try:
            return self.model.global_router.scores(u)
        finally:
            config.global_routing_descriptor = saved

    def global_top1(self, split: str, descriptor: str) -> dict:
        """Per task, the share (%) of prompts whose best-scoring expert is the task's own expert (held-in) or one whose
        skill it needs (held-out), for the embedded query and for the given instruction."""
        names, scores = self.model.config.expert_names, self.scores[descriptor]
        shares = {}
        for name, examples in self.examples[split].items():
            task = suite.TASKS[name]
            right = set(task.skills) if task.held_out else {name}
            query = [names[int(scores["query"][e.input].argmax())] in right for e in examples]
            given = names[int(scores["instruction"][name].argmax())] in right
            shares[name] = {"query": 100 * sum(query) / len(query), "instruction": 100.0 * given}
        return shares

    def unseen_detection(self, split: str, descriptor: str) -> dict:
        """How well a query's best score tells held-in tasks (an expert knows the task) from held-out ones."""
        best = {
            part: [
                self.scores[descriptor]["query"][e.input].max().item() for n in tasks for e in self.examples[split][n]
            ]
            for part, tasks in (("held_in", suite.HELD_IN), ("held_out", suite.HELD_OUT))
        }
        return {
            "auc": separation(best["held_in"], best["held_out"]),
            "mean_best_held_in": sum(best["held_in"]) / len(best["held_in"]),
            "mean_best_held_out": sum(best["held_out"]) / len(best["held_out"]),
        }

    def global_logits(self, mode: str, alpha: float, descriptor: str):
        """Routing inputs: alpha * score(u, e) for each prompt's u (its query, or its task's given instruction)."""
        scores = self.scores[descriptor]

        def routing(batch):
            rows = [scores["query"][e.input] if mode == "query" else scores["instruction"][e.task] for e in batch]
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

    def score_unseen_templates(self, split: str, predictions: dict[str, list]) -> float | None:
        """The held-in average over the prompts of the templates never used for training (nor for samples)."""
        scores = []
        for name in suite.HELD_IN:
            if name not in predictions:
                continue
            first_unseen = len(suite.TASKS[name].train_templates)
            kept = [(e, p) for e, p in zip(self.examples[split][name], predictions[name]) if e.template >= first_unseen]
            if kept:
                scores.append(task_score([e for e, _ in kept], [p for _, p in kept]))
        return sum(scores) / len(scores) if scores else None

    def run(self, model, split: str, routing=None, tasks=None, desc: str = "") -> dict:
        return self.score(split, self.predictions(model, split, routing, tasks, desc))

    def threshold_policy(
        self,
        split: str,
        by_alpha: dict[float, dict],
        threshold: float,
        matched: float,
        unmatched: float,
        descriptor: str,
    ):
        """A threshold policy's answers, taken per prompt from the fixed-alpha runs."""
        scores, assembled = self.scores[descriptor]["query"], {}
        for name, examples in self.examples[split].items():
            assembled[name] = [
                by_alpha[matched if scores[e.input].max() >= threshold else unmatched][name][i]
                for i, e in enumerate(examples)
            ]
        return assembled


def choose_policy(bench: Benchmark, validation: dict[str, dict[float, dict]]) -> tuple[dict, list[dict]]:
    """Every descriptor with every fixed alpha and threshold policy scored on validation (`validation`: descriptor ->
    alpha -> answers). The chosen one is the first, in the order descriptor (instruction first), fixed (smaller alpha
    first), then threshold, whose objective is within `TOLERANCE` of the best: a validation split of this size cannot
    tell closer policies apart."""
    candidates = []
    for descriptor, by_alpha in validation.items():
        for alpha in ALPHAS:
            policy = {
                "global_routing_descriptor": descriptor,
                "global_routing_policy": "fixed",
                "global_routing_scale": alpha,
            }
            candidates.append((policy, bench.score("validation", by_alpha[alpha])))
        for threshold, matched, unmatched in itertools.product(THRESHOLDS, ALPHAS, ALPHAS):
            if matched <= unmatched:
                continue
            policy = {
                "global_routing_descriptor": descriptor,
                "global_routing_policy": "threshold",
                "global_routing_threshold": threshold,
                "global_routing_scale": matched,
                "global_routing_scale_unmatched": unmatched,
            }
            predictions = bench.threshold_policy("validation", by_alpha, threshold, matched, unmatched, descriptor)
            candidates.append((policy, bench.score("validation", predictions)))
    best = max(objective(summary) for _, summary in candidates)
    chosen = next(policy for policy, summary in candidates if objective(summary) >= best - TOLERANCE)
    table = [{"policy": p, "validation": {k: s[k] for k in ("held_in", "held_out")}} for p, s in candidates]
    return chosen, table


def best_of(table: list[dict], descriptor: str) -> dict:
    """The policy of `descriptor` chosen as `choose_policy` chooses, among that descriptor's candidates only."""
    rows = [row for row in table if row["policy"]["global_routing_descriptor"] == descriptor]
    best = max(objective(row["validation"]) for row in rows)
    return next(row for row in rows if objective(row["validation"]) >= best - TOLERANCE)


def run_benchmark(
    model_dir: str | Path,
    out: str | Path,
    validation_size: int = 100,
    test_size: int = 300,
    seed: int = 0,
    full: bool = False,
    baselines_from: str | Path | None = None,
) -> dict:
    """`full`: also every fixed alpha on test, the chosen policy's answers assembled from them against those through the
    model (`glider_check`), and the top-k sweep. `baselines_from`: a results.json of the same model weights, prompts
    and seed whose base, merged and Arrow scores are taken instead of run again (they do not depend on the global
    router; recorded in the results)."""
    start = time.perf_counter()
    bench = Benchmark(model_dir, validation_size, test_size, seed)
    model = bench.model
    top_k = model.config.router_top_k
    results = {"model": str(model_dir), "top_k": top_k, "methods": {}, "alpha_sweep": {}, "top_k_sweep": {}}

    # The descriptor and alpha policy, chosen on validation; the chosen descriptor's fixed-alpha sweep is reported on
    # test too. alpha 0 is local routing alone, whatever the descriptor: run once.
    validation = {}
    for descriptor in bench.descriptors:
        validation[descriptor] = {
            alpha: validation[bench.descriptors[0]][0.0] if alpha == 0 and validation else bench.predictions(
                model, "validation", bench.global_logits("query", alpha, descriptor), desc=f"{descriptor} alpha={alpha:g}"
            )
            for alpha in ALPHAS
        }  # fmt: skip
    policy, candidates = choose_policy(bench, validation)
    descriptor, alpha = policy["global_routing_descriptor"], policy["global_routing_scale"]
    results["policy"] = {"chosen": policy, "name": policy_name(policy), "candidates": candidates}
    test_alphas = ALPHAS if full else (0.0,)
    test_by_alpha = {
        a: bench.predictions(model, "test", bench.global_logits("query", a, descriptor), desc=f"alpha={a:g} test")
        for a in test_alphas
    }
    results["alpha_sweep"] = {
        "descriptor": descriptor,
        "validation": {str(a): bench.score("validation", p) for a, p in validation[descriptor].items()},
        "test": {str(a): bench.score("test", p) for a, p in test_by_alpha.items()},
    }

    methods, unseen_templates = results["methods"], {}
    base = library.base_model(model)
    if baselines_from is not None:
        earlier = json.loads(Path(baselines_from).read_text())
        if earlier["sizes"] != {"validation": validation_size, "test": test_size, "seed": seed}:
            raise ValueError(f"{baselines_from} was made with other sizes or seed: {earlier['sizes']}.")
        methods.update({name: earlier["methods"][name] for name in BASELINES})
        results["baselines_from"] = {"path": str(baselines_from), "methods": list(BASELINES)}
    else:
        methods["base"] = bench.run(base, "test", desc="base")
        methods["merged"] = bench.run(library.merged_model(model), "test", desc="merged")
    methods["phatgoose"] = bench.score("test", test_by_alpha[0.0])  # alpha 0 (in ALPHAS): local routing only
    glider = bench.glider_with(**policy)
    answers = bench.predictions(glider, "test", bench.instruction_embeddings, desc="glider")
    methods["glider"] = bench.score("test", answers)
    unseen_templates["glider"] = bench.score_unseen_templates("test", answers)
    if full and policy["global_routing_policy"] == "threshold":
        args = (policy["global_routing_threshold"], alpha, policy["global_routing_scale_unmatched"], descriptor)
        assembled = bench.score("test", bench.threshold_policy("test", test_by_alpha, *args))
        results["glider_check"] = {"through_the_model": methods["glider"]["tasks"], "assembled": assembled["tasks"]}
    elif full:
        assembled = results["alpha_sweep"]["test"][str(alpha)]
        results["glider_check"] = {"through_the_model": methods["glider"]["tasks"], "assembled": assembled["tasks"]}

    # Each descriptor at its own best policy on validation, run on test through the model.
    results["descriptors"] = {}
    for name in bench.descriptors:
        row = best_of(candidates, name)
        if name == descriptor:
            scored = methods["glider"]
        else:
            own = bench.predictions(bench.glider_with(**row["policy"]), "test", bench.instruction_embeddings, desc=name)
            scored = bench.score("test", own)
            unseen_templates[f"glider, descriptor {name}"] = bench.score_unseen_templates("test", own)
        results["descriptors"][name] = {
            "policy": policy_name(row["policy"]), "validation": row["validation"], "test": scored,
            "global_top1": bench.global_top1("test", name), "unseen_detection": bench.unseen_detection("test", name),
        }  # fmt: skip
    methods["glider_instruction_descriptor"] = results["descriptors"]["instruction"]["test"]
    methods["glider_instruction"] = bench.run(
        model, "test", bench.global_logits("instruction", alpha, descriptor), desc="instr"
    )
    if full:  # m in {2, 4, 8} on both splits
        from .candidates import candidates_results  # imports this module

        results["router_candidates"] = candidates_results(bench, policy)
    with tempfile.TemporaryDirectory() as scratch:
        dirs = library.export_experts(model, scratch)
        if baselines_from is None:
            arrow = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=top_k, local_router="arrow")
            methods["arrow"] = bench.run(arrow.eval(), "test", desc="arrow")
        from peft import PeftModel

        oracle = {}
        for name, directory in zip(model.config.expert_names, dirs):
            expert = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
            oracle.update(bench.predictions(expert, "test", tasks=[name], desc=f"oracle {name}"))
        methods["oracle"] = bench.score("test", oracle)
        unseen_templates["oracle"] = bench.score_unseen_templates("test", oracle)
    results["unseen_templates"] = unseen_templates

    for k in TOP_KS if full else ():
        if k == top_k:
            results["top_k_sweep"][str(k)] = {"glider": methods["glider"]}
        elif k <= len(model.config.experts):
            glider_k = bench.glider_with(router_top_k=k, **policy)
            results["top_k_sweep"][str(k)] = {"glider": bench.run(glider_k, "test", bench.instruction_embeddings)}
    results["global_top1"] = bench.global_top1("test", descriptor)
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
        + (" --full" if "glider_check" in results else "")
        + (f" --baselines-from {results['baselines_from']['path']}" if "baselines_from" in results else "")
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
        "Global router descriptors (GLIDER, query mode; each at its best policy on validation; top-1: share of test",
        "prompts whose best-scoring expert is the task's own, or one whose skill a held-out task needs; AUC: how well",
        "a query's best score tells held-in from held-out prompts):",
        "",
        "| Descriptor | Policy | val held-in | val held-out | test held-in | test held-out | top-1 held-in | "
        "top-1 held-out | AUC |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["descriptors"].items():
        top1 = {
            part: [row["global_top1"][t]["query"] for t in tasks]
            for part, tasks in (("in", suite.HELD_IN), ("out", suite.HELD_OUT))
        }
        v, t = row["validation"], row["test"]
        lines.append(
            f"| {name} | {row['policy']} | {_fmt(v['held_in'])} | {_fmt(v['held_out'])} | {_fmt(t['held_in'])} | "
            f"{_fmt(t['held_out'])} | {_fmt(sum(top1['in']) / len(top1['in']))} | "
            f"{_fmt(sum(top1['out']) / len(top1['out']))} | {row['unseen_detection']['auc']:.2f} |"
        )
    lines += ["", "Held-in average on the templates never used for training nor for the embedded samples (test):", ""]
    lines += [f"- {name}: {_fmt(value)}" for name, value in results["unseen_templates"].items()]
    lines += [
        "",
        f"Fixed alpha (GLIDER, query mode, descriptor {results['alpha_sweep']['descriptor']}):",
        "",
        "| alpha | val held-in | val held-out | test held-in | test held-out |",
    ]
    lines.append("|---:|---:|---:|---:|---:|")
    for alpha in ALPHAS:
        v = results["alpha_sweep"]["validation"][str(alpha)]
        t = results["alpha_sweep"]["test"].get(str(alpha), {"held_in": None, "held_out": None})  # `--full`
        lines.append(
            f"| {alpha:g} | {_fmt(v['held_in'])} | {_fmt(v['held_out'])} | {_fmt(t['held_in'])} | {_fmt(t['held_out'])} |"
        )
    if results["top_k_sweep"]:
        lines += [
            "",
            "top-k (test):",
            "",
            "| k | GLIDER held-in | GLIDER held-out |",
        ]
        lines.append("|---:|---:|---:|")
        for k, row in results["top_k_sweep"].items():
            lines.append(f"| {k} | {_fmt(row['glider']['held_in'])} | {_fmt(row['glider']['held_out'])} |")
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
        shown = [a for a in alphas if str(a) in results["alpha_sweep"][split]]
        for part in ("held_in", "held_out"):
            values = [results["alpha_sweep"][split][str(a)][part] for a in shown]
            sweep.plot(shown, values, style, marker="o", label=f"{split} {part.replace('_', '-')}")
    sweep.set_xscale("log")
    sweep.set_xlabel("alpha (fixed)")
    sweep.set_title("GLIDER, query mode: alpha")
    sweep.legend(fontsize=7)
    ks = list(results["top_k_sweep"])
    for offset, part in ((-0.2, "held_in"), (0.2, "held_out")):
        values = [results["top_k_sweep"][k]["glider"][part] for k in ks]
        topk.bar([int(k) + offset for k in ks], values, width=0.4, label=f"GLIDER {part.replace('_', '-')}")
    topk.set_xlabel("top-k")
    topk.set_title("top-k (test)")
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
    parser.add_argument(
        "--full", action="store_true", help="Also every fixed alpha on test, the assembled-answers check and top-k 1-3."
    )
    parser.add_argument(
        "--baselines-from", help="results.json of the same weights, prompts and seed: take base/merged/Arrow from it."
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_benchmark(
        args.model, args.out, args.validation_size, args.test_size, args.seed, args.full, args.baselines_from
    )
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
