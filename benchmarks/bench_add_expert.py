"""Growing a library: `model.add_expert(dir)` against rebuilding the whole GliderT5 with `from_experts`.

A randomly initialised T5 of t5-base shape (d_model 768, 12 + 12 blocks) and rank-16 experts on every linear, made
here. Prints the median seconds of each and their ratio, measured in one run.

    python benchmarks/bench_add_expert.py [--experts 8] [--repeats 3]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import T5Config, T5ForConditionalGeneration

from modeling_glider import GliderT5ForConditionalGeneration
from modeling_glider.experts import routable_linears, save_expert_files


def make_expert(directory: Path, base, name: str, r: int = 16) -> Path:
    directory.mkdir(parents=True)
    tensors, gates = {}, {}
    for path, linear in routable_linears(base).items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(r, linear.in_features) * 0.01
        tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(linear.out_features, r) * 0.01
        gates[path] = torch.randn(linear.in_features)
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 1, "target_modules": ["q", "k", "v", "o", "wi", "wo"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_expert_files(directory, name, gates=gates, instruction_embedding=torch.randn(64))
    return directory


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8, help="Experts already in the library.")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = T5ForConditionalGeneration(T5Config(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12)).eval()
    with tempfile.TemporaryDirectory() as scratch:
        dirs = [make_expert(Path(scratch) / f"e{i}", base, f"e{i}") for i in range(args.experts + 1)]
        rebuild = median_seconds(lambda: GliderT5ForConditionalGeneration.from_experts(base, dirs), args.repeats)

        def add():  # the expert must be absent to be added: each repeat removes it, then adds it back
            model.remove_expert(f"e{args.experts}")
            model.add_expert(dirs[-1])

        model = GliderT5ForConditionalGeneration.from_experts(base, dirs)
        add_and_remove = median_seconds(add, args.repeats)
    threads = torch.get_num_threads()
    print(f"t5-base shape, {args.experts} experts + 1, rank 16 on every linear, {threads} torch threads, CPU")
    print(f"from_experts (rebuild, {args.experts + 1} experts): median {rebuild:.2f} s")
    print(f"remove_expert + add_expert (one expert):   median {add_and_remove:.2f} s")
    print(f"ratio rebuild / (remove + add): {rebuild / add_and_remove:.1f}x")


if __name__ == "__main__":
    main()
