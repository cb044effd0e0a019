"""GLIDER with candidate experts per query (`router_candidates = m`) on glider-mini, against every expert (m = None):

    python -m benchmarks.glider_mini.candidates --model glider-mini --test-size 300 --out benchmarks/results/glider_mini

GLIDER in query mode (each prompt embedded as its own instruction, through the model's own global router) with the
alpha policy the full benchmark chose on validation (read from its `results.json`; `run_benchmark` passes its own),
on the validation and test splits, for m in {2, 4, 8} and None: held-in and held-out averages, and the share of
queries whose global gap certifies that the candidates route exactly as every expert would
(`routing.candidates_are_exact`: alpha (c_(k) - c_(m+1)) > 2 sqrt(largest d_in)). Writes `router_candidates.json`
and `router_candidates.md`.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from modeling_glider.routing import candidates_are_exact

from . import suite
from .benchmark import Benchmark, _fmt

CANDIDATES = (None, 2, 4, 8)
RESULTS = Path(__file__).resolve().parents[1] / "results" / "glider_mini" / "results.json"  # the chosen policy


def certified_shares(bench: Benchmark, model, split: str, m: int) -> dict:
    """Share (%) of the split's held-in and held-out queries certified exact for `m` candidates."""
    config = model.config
    max_d_in = max(config.d_model, config.d_ff, config.num_heads * config.d_kv)
    shares = {}
    for part, held_out in (("held_in", False), ("held_out", True)):
        prompts = [
            e.input for n, task in bench.examples[split].items() if suite.TASKS[n].held_out == held_out for e in task
        ]
        with torch.no_grad():
            logits = model.global_routing_logits(torch.stack([bench.query_embeddings[p] for p in prompts]))
        shares[part] = 100 * candidates_are_exact(logits, config.router_top_k, m, max_d_in).float().mean().item()
    return shares


def candidates_results(bench: Benchmark, policy: dict) -> dict:
    """GLIDER (query mode, `policy`) per split and m: held-in / held-out averages, per-task scores, certified shares."""
    results = {"policy": policy, "splits": {}}
    for split in ("validation", "test"):
        rows = {}
        for m in CANDIDATES:
            model = bench.glider_with(router_candidates=m, **policy)
            rows[str(m)] = bench.run(model, split, bench.instruction_embeddings, desc=f"candidates={m} {split}")
            if m is not None:
                rows[str(m)]["certified_exact"] = certified_shares(bench, model, split, m)
        results["splits"][split] = rows
    return results


def markdown_section(results: dict) -> list[str]:
    lines = [
        "",
        "Candidate experts per query (`router_candidates = m`, GLIDER query mode, same alpha policy); certified: share "
        "of queries (held-in / held-out) whose global gap proves the routing equal to m = None:",
        "",
        "| m | val held-in | val held-out | test held-in | test held-out | test certified exact |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in CANDIDATES:
        v, t = results["splits"]["validation"][str(m)], results["splits"]["test"][str(m)]
        certified = t.get("certified_exact")
        exact = "—" if certified is None else f"{certified['held_in']:.0f}% / {certified['held_out']:.0f}%"
        label = "None (every expert)" if m is None else str(m)
        lines.append(
            f"| {label} | {_fmt(v['held_in'])} | {_fmt(v['held_out'])} | {_fmt(t['held_in'])} | {_fmt(t['held_out'])} "
            f"| {exact} |"
        )
    return lines


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return f"{cpu or platform.processor()}, {torch.get_num_threads()} torch thread(s), {platform.platform()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="glider-mini", help="A saved glider-mini (default: %(default)s).")
    parser.add_argument("--out", default="benchmarks/results/glider_mini", help="Output folder (default: %(default)s).")
    parser.add_argument("--validation-size", type=int, default=100)
    parser.add_argument("--test-size", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s).")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    policy = json.loads(RESULTS.read_text())["policy"]["chosen"] if RESULTS.exists() else {}
    bench = Benchmark(args.model, args.validation_size, args.test_size, args.seed)
    results = candidates_results(bench, policy)
    command = (
        f"python -m benchmarks.glider_mini.candidates --model {args.model} --validation-size {args.validation_size} "
        f"--test-size {args.test_size} --seed {args.seed} --threads {args.threads}"
    )
    results.update(command=command, machine=machine(), minutes=round((time.perf_counter() - start) / 60, 1))
    policy_text = ", ".join(f"{k}={v}" for k, v in policy.items()) or "the model's own"
    head = [
        f"Made by `{command}` in {results['minutes']:.0f} min on {results['machine']}.",
        "",
        f"{args.test_size} test and {args.validation_size} validation prompts per task; alpha policy: {policy_text}.",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "router_candidates.json").write_text(json.dumps(results, indent=2) + "\n")
    text = "\n".join(head + markdown_section(results)) + "\n"
    (out / "router_candidates.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
