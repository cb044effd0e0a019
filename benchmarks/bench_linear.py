"""One routed linear against the plain linear and against its memory floor.

    python -m benchmarks.bench_linear --out benchmarks/results          # add --quick for a smoke run

For d_model in {256, 768, 2048}, tokens in {1, 8, 64, 512} (one token per row, each row a query of its own task, as
at a decoding step of a mixed batch; 512 is a prefill), E in {8, 36, 166} experts of rank 16, top-2, fp32 and bf16:
the median time of `GliderLinear.forward` (routing included) and of the plain `F.linear` with the same weight,
interleaved within each repeat so that a noisy machine hits both alike.

The floor is what the call must read, in units of the plain linear's time: a decoding step is memory-bound, so
`floor = (bytes of W + bytes of the distinct experts' A and B the tokens selected + bytes of the E gates) / bytes of
W x the plain linear's time`. The goal: every decode shape (tokens <= 64) within 1.5 x its floor.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from configuration_glider import GliderConfig
from modeling_glider import GliderLinear

MODULE = "encoder.block.0.layer.0.SelfAttention.q"
RANK, TOP_K = 16, 2


def routed_linear(d_model: int, num_experts: int, dtype: torch.dtype) -> GliderLinear:
    experts = [{"name": f"e{i}", "target_modules": ["q"], "r": RANK, "lora_alpha": RANK} for i in range(num_experts)]
    config = GliderConfig(experts=experts, router_top_k=TOP_K, d_model=d_model)
    linear = GliderLinear(config, MODULE, d_model, d_model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        linear.weight.normal_(0, d_model**-0.5, generator=g)
        linear.set_experts(
            {
                i: (
                    torch.randn(RANK, d_model, generator=g) * d_model**-0.5,
                    torch.randn(d_model, RANK, generator=g) * RANK**-0.5,
                    torch.randn(d_model, generator=g),
                )
                for i in range(num_experts)
            }
        )
    return linear.to(dtype).eval()


def median_times(
    linear: GliderLinear, x: torch.Tensor, global_logits: torch.Tensor, repeats: int
) -> tuple[float, float]:
    glider, plain = [], []
    with torch.no_grad():
        for _ in range(3):
            linear(x, global_logits), torch.nn.functional.linear(x, linear.weight)
        for _ in range(repeats):
            start = time.perf_counter()
            linear(x, global_logits)
            middle = time.perf_counter()
            torch.nn.functional.linear(x, linear.weight)
            plain.append(time.perf_counter() - middle)
            glider.append(middle - start)
    return statistics.median(glider), statistics.median(plain)


def measure(d_model: int, tokens: int, num_experts: int, dtype: torch.dtype, repeats: int) -> dict:
    linear = routed_linear(d_model, num_experts, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, 1, d_model, generator=g).to(dtype)
    global_logits = 100 * (2 * torch.rand(tokens, num_experts, generator=g) - 1)  # every row a task of its own
    glider, plain = median_times(linear, x, global_logits, repeats)
    with torch.no_grad():
        _, indices = linear.route(x, global_logits)
    distinct = indices.unique().numel()
    size = linear.weight.element_size()
    weight_bytes = linear.weight.numel() * size
    expert_bytes = distinct * (linear.lora_A[0].numel() + linear.lora_B[0].numel()) * size
    gate_bytes = linear.router_gate.numel() * size
    floor = (weight_bytes + expert_bytes + gate_bytes) / weight_bytes * plain
    return {
        "d_model": d_model, "tokens": tokens, "experts": num_experts, "dtype": str(dtype).removeprefix("torch."),
        "distinct_experts": distinct, "glider_us": glider * 1e6, "plain_us": plain * 1e6,
        "floor_us": floor * 1e6, "vs_plain": glider / plain, "vs_floor": glider / floor,
    }  # fmt: skip


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="Folder for bench_linear.md and bench_linear.json.")
    parser.add_argument("--quick", action="store_true", help="Two small shapes, few repeats (a smoke run).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s).")
    parser.add_argument("--repeats", type=int, default=40, help="Timed calls per shape (default: %(default)s).")
    parser.add_argument("--note", default="", help="A line on the conditions of the run, for the report.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        shapes = [(256, t, 8, torch.float32) for t in (1, 8)]
        args.repeats = 5
    else:
        shapes = [
            (d, t, e, dtype)
            for dtype in (torch.float32, torch.bfloat16)
            for d in (256, 768, 2048)
            for t in (1, 8, 64, 512)
            for e in (8, 36, 166)
        ]
    results = []
    for d, t, e, dtype in shapes:
        result = measure(d, t, e, dtype, args.repeats if t < 512 else max(5, args.repeats // 4))
        results.append(result)
        print(
            f"d {d:5d} tokens {t:4d} E {e:4d} {result['dtype']:9s} used {result['distinct_experts']:3d}: "
            f"{result['glider_us']:9.1f} us = {result['vs_plain']:5.2f} x plain, {result['vs_floor']:5.2f} x floor"
        )
    decode = [r for r in results if r["tokens"] <= 64]
    worst = max(decode, key=lambda r: r["vs_floor"])
    met = sum(r["vs_floor"] <= 1.5 for r in decode)
    summary = (
        f"Decode shapes (tokens <= 64) within 1.5 x their floor: {met} of {len(decode)}; worst {worst['vs_floor']:.2f} x "
        f"(d {worst['d_model']}, tokens {worst['tokens']}, E {worst['experts']}, {worst['dtype']})."
    )
    print(summary)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python -m benchmarks.bench_linear " + " ".join(argv if argv is not None else sys.argv[1:])
        header = [
            "# One routed linear against the plain linear and its memory floor",
            "",
            f"`{command.strip()}` on {machine()}. Medians of interleaved calls; times in microseconds. {args.note}",
            "floor = (W + the distinct selected experts' A and B + the gates, in bytes) / (W in bytes) x plain.",
            "",
            summary,
            "",
            "| d_model | tokens | E | dtype | experts used | GliderLinear us | plain us | floor us | x plain | x floor |",
            "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        rows = [
            f"| {r['d_model']} | {r['tokens']} | {r['experts']} | {r['dtype']} | {r['distinct_experts']} | "
            f"{r['glider_us']:.1f} | {r['plain_us']:.1f} | {r['floor_us']:.1f} | {r['vs_plain']:.2f} | {r['vs_floor']:.2f} |"
            for r in results
        ]
        (args.out / "bench_linear.md").write_text("\n".join(header + rows) + "\n")
        (args.out / "bench_linear.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
