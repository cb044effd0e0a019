"""Cost of the global router's fitted descriptors (`global_routing_descriptor="samples"`): fit time, memory, and the
per-query scoring against the instruction descriptor.

    python -m benchmarks.bench_descriptors --out benchmarks/results

Random unit embeddings (the fit's cost does not depend on what they mean): E experts with N embedded samples each,
width D. Reported per setting, medians of `--repeats` runs in one process:
- `fit_s`: `fit_expert_descriptors` (what a build, `add_expert` and `remove_expert` run once), and its floor: the
  FLOPs of its full-batch steps at the machine's
  measured fp32 matmul rate (the logits and the gradient of W: two [E*N, D] x [D, E] products per step);
- `samples_mib`: the bytes the model keeps for the samples (`expert_samples`, fp32) and the descriptors;
- `score_us`: one `GliderGlobalRouter.forward` for a batch of queries with each descriptor; "samples" reads an
  [E, D] descriptor matrix as "instruction" does, so its ratio to "instruction" is the price of the choice.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from configuration_glider import GliderConfig
from modeling_glider.routing import DESCRIPTOR_STEPS, GliderGlobalRouter, fit_expert_descriptors

SETTINGS = ((13, 64, 384), (166, 64, 384), (166, 64, 768), (1000, 16, 384))


def median_seconds(repeats: int, fn, *args) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops_per_second(size: int = 1024) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / median_seconds(10, torch.matmul, a, b)


def router(experts: int, samples: int, width: int) -> GliderGlobalRouter:
    entry = {"target_modules": ["q"], "r": 1, "samples": samples}
    config = GliderConfig(
        experts=[{"name": f"e{i}", **entry} for i in range(experts)], instruction_embedding_dim=width, router_top_k=1
    )
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(experts, width, generator=generator), dim=-1)
    rows = list(torch.nn.functional.normalize(torch.randn(experts, samples, width, generator=generator), dim=-1))
    module = GliderGlobalRouter(config)
    module.set_experts(embeddings, rows)
    return module


def write_markdown(result: dict, out: Path) -> None:
    lines = [
        f"`python -m benchmarks.bench_descriptors` on {result['machine']['platform']}, one thread, fp32 matmul "
        f"{result['matmul_gflops']:.0f} GFLOP/s, {result['batch']} queries per scoring call; medians.",
        "",
        "| E | N | D | fit (s) | fit floor (s) | fit / floor | samples + descriptors (MiB) | score instruction (us) "
        "| score samples (us) | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['experts']} | {r['samples']} | {r['width']} | {r['fit_s']:.2f} | {r['fit_floor_s']:.2f} | "
            f"{r['fit_s'] / r['fit_floor_s']:.1f} | {r['samples_mib']:.1f} | {r['score_us']['instruction']:.0f} | "
            f"{r['score_us']['samples']:.0f} | {r['score_ratio']:.2f} |"
        )
    (out / "bench_descriptors.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="Folder for bench_descriptors.json / .md.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="Queries per scoring call.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rate = matmul_flops_per_second()
    rows = []
    for experts, samples, width in SETTINGS:
        module = router(experts, samples, width)
        counts = [samples] * experts
        fit = median_seconds(
            args.repeats, fit_expert_descriptors, module.expert_embeddings, module.expert_samples, counts
        )
        # per step, the [E*N, D] x [D, E] logits and the gradient of W (the samples need none): two such products
        flops = DESCRIPTOR_STEPS * 2 * 2 * experts * samples * width * experts
        u = torch.randn(args.batch, width)
        score = {}
        for descriptor in ("instruction", "samples"):
            module.config.global_routing_descriptor = descriptor
            with torch.no_grad():
                score[descriptor] = median_seconds(20 * args.repeats, module, u) * 1e6
        tensors = (module.expert_samples, module.expert_descriptors)
        rows.append(
            {
                "experts": experts,
                "samples": samples,
                "width": width,
                "fit_s": fit,
                "fit_floor_s": flops / rate,
                "samples_mib": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
                "score_us": score,
                "score_ratio": score["samples"] / score["instruction"],
            }
        )
        print(rows[-1])
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": 1},
        "matmul_gflops": rate / 1e9,
        "batch": args.batch,
        "rows": rows,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_descriptors.json").write_text(json.dumps(result, indent=2) + "\n")
        write_markdown(result, args.out)
    return result


if __name__ == "__main__":
    main()
