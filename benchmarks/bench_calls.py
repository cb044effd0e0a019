"""Aten calls per generated token, GliderT5 against its base T5: on an accelerator each is a kernel launch.

    python -m benchmarks.bench_calls --out benchmarks/results

The setting of the speed issue: a T5 with d_model 256, 4+4 layers, 36 experts of rank 16 on every linear, top-2,
8 queries of different tasks, 16 new tokens, greedy. Counts every aten operator dispatched during `generate` (a
`TorchDispatchMode`) that is not a view (views launch no kernel), divided by the tokens generated. Counts do not depend on the machine.
"""

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.bench_speed import Setup, build_base, build_glider

SMALL = Setup(d_model=256, d_kv=32, d_ff=1024, num_heads=8, num_layers=4)  # the speed issue's small setting


class CountCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:  # views launch no kernel on an accelerator
            self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def calls_per_token(model, ids: torch.Tensor, new_tokens: int, **kwargs) -> tuple[float, Counter]:
    with torch.no_grad(), CountCalls() as counter:
        model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
    return sum(counter.calls.values()) / new_tokens, counter.calls


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="Folder for bench_calls.json.")
    parser.add_argument("--experts", type=int, default=36)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    setup = SMALL
    base = build_base(setup)
    glider = build_glider(base, setup, args.experts)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, setup.vocab_size, (args.queries, 24), generator=generator)
    embeddings = torch.randn(args.queries, setup.embedding_dim, generator=generator)
    base_calls, _ = calls_per_token(base, ids, args.new_tokens)
    glider_calls, by_op = calls_per_token(glider, ids, args.new_tokens, instruction_embeddings=embeddings)
    result = {
        "setting": {k: v for k, v in vars(args).items() if k != "out"} | {"d_model": 256, "layers": 4, "rank": 16},
        "base_calls_per_token": base_calls,
        "glider_calls_per_token": glider_calls,
        "ratio": glider_calls / base_calls,
        "glider_top_ops": dict(by_op.most_common(12)),
    }
    print(
        f"aten calls (views not counted) per generated token: base {base_calls:.0f}, GliderT5 {glider_calls:.0f} "
        f"({result['ratio']:.2f} x; goal <= 2)"
    )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_calls.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
