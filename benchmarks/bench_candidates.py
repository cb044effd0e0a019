"""Per-token routing cost against the number of experts E, with and without candidate experts per query.

    python -m benchmarks.bench_candidates --out benchmarks/results

One `GliderLinear` (`bench_linear.routed_linear`: rank 16, top-2, fp32) at decoding shapes (1, 8 and 64 rows of one
token, each row a query of its own task), d_model 768 and 2048, E in {8, 36, 166}: the median time of its routing
alone (`route`: local logits, softmax, top-k) and of the whole call, with every expert a candidate
(`router_candidates=None`, the local logits against all E gates) and with `router_candidates=4` (against the 4
candidates' gates; the candidates are computed once per model call, so they are given here as the model gives them).
All four timings are interleaved within each repeat, so a noisy machine hits them alike.
"""

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench_linear import machine, routed_linear
from modeling_glider.routing import candidate_experts

CANDIDATES = 4


def measure(d_model: int, rows: int, num_experts: int, repeats: int) -> dict:
    linear = routed_linear(d_model, num_experts, torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 1, d_model, generator=g)
    global_logits = 100 * (2 * torch.rand(rows, num_experts, generator=g) - 1)  # every row a task of its own
    candidates = candidate_experts(global_logits, CANDIDATES)

    def every(call):
        linear.config.router_candidates = None
        return call(x, global_logits)

    def some(call):
        linear.config.router_candidates = CANDIDATES
        return call(x, global_logits, routing_candidates=candidates)

    runs = {"route_all": (every, linear.route), "route_candidates": (some, linear.route)}
    runs.update(call_all=(every, linear), call_candidates=(some, linear))
    times = {name: [] for name in runs}
    with torch.no_grad():
        for _ in range(3):
            for setting, call in runs.values():
                setting(call)
        for _ in range(repeats):
            for name, (setting, call) in runs.items():
                start = time.perf_counter()
                setting(call)
                times[name].append(time.perf_counter() - start)
    linear.config.router_candidates = None
    medians = {f"{name}_us": statistics.median(t) * 1e6 for name, t in times.items()}
    return {"d_model": d_model, "rows": rows, "experts": num_experts, **medians}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="Folder for bench_candidates.md and bench_candidates.json.")
    parser.add_argument("--quick", action="store_true", help="Two small shapes, few repeats (a smoke run).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s).")
    parser.add_argument("--repeats", type=int, default=40, help="Timed calls per shape (default: %(default)s).")
    parser.add_argument("--note", default="", help="A line on the conditions of the run, for the report.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        shapes, args.repeats = [(256, 1, 8), (256, 1, 36)], 5
    else:
        shapes = [(d, rows, e) for d in (768, 2048) for rows in (1, 8, 64) for e in (8, 36, 166)]
    results = [measure(d, rows, e, args.repeats) for d, rows, e in shapes]
    lines = [
        "| d_model | rows | E | route, all E (us) | route, 4 candidates (us) | ratio | call, all E (us) | "
        "call, 4 candidates (us) | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['d_model']} | {r['rows']} | {r['experts']} | {r['route_all_us']:.1f} | {r['route_candidates_us']:.1f} "
            f"| {r['route_candidates_us'] / r['route_all_us']:.2f} | {r['call_all_us']:.1f} | "
            f"{r['call_candidates_us']:.1f} | {r['call_candidates_us'] / r['call_all_us']:.2f} |"
        )
    growth = ["", "Growth from E = 8 to E = 166 (median time at 166 / at 8):", ""]
    for d in sorted({r["d_model"] for r in results}):
        for rows in sorted({r["rows"] for r in results}):
            by_e = {r["experts"]: r for r in results if r["d_model"] == d and r["rows"] == rows}
            if 8 in by_e and 166 in by_e:
                ratio = {k: by_e[166][k] / by_e[8][k] for k in by_e[8] if k.endswith("_us")}
                growth.append(
                    f"- d_model {d}, {rows} row(s): route {ratio['route_all_us']:.2f} (all E) vs "
                    f"{ratio['route_candidates_us']:.2f} (4 candidates); call {ratio['call_all_us']:.2f} vs "
                    f"{ratio['call_candidates_us']:.2f}"
                )
    print("\n".join(lines + growth))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python -m benchmarks.bench_candidates " + shlex.join(argv if argv is not None else sys.argv[1:])
        header = [
            "# Routing cost against E, with and without candidate experts per query",
            "",
            f"`{command.strip()}` on {machine()}. Medians of interleaved calls. {args.note}",
            "",
        ]
        (args.out / "bench_candidates.md").write_text("\n".join(header + lines + growth) + "\n")
        (args.out / "bench_candidates.json").write_text(
            json.dumps({"machine": machine(), "results": results}, indent=1)
        )
    return results


if __name__ == "__main__":
    main()
