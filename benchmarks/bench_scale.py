"""Memory of building and loading large expert libraries: `glider build` at the paper's library size.

    python benchmarks/bench_scale.py                 # t5-base dimensions, E = 8, 48, 166; fp32 and bf16
    python benchmarks/bench_scale.py --quick         # small dimensions and libraries: a smoke run

Random experts are written on the fly as PEFT-format expert directories (adapter_config.json, adapter_model.safetensors,
glider_expert.json, glider_expert.safetensors with Phatgoose gates and an instruction embedding), with safetensors
directly, at t5-base dimensions (d_model 768, d_ff 3072, 12 heads, 12+12 layers, vocab 32128; r 16 on every linear).
The base T5 is saved in fp32 beside them.

Each measurement runs in a fresh Python process (so its resident-set high-water mark, Linux VmHWM, is that of the
measured work alone):
- `build`: `glider build` (the command line's own `main`) of E experts in fp32 or `--dtype bfloat16`: peak resident
  memory against the built model's bytes (its parameters and buffers). `peak` is the whole process's high-water mark;
  `growth` is that minus the resident set after the imports, before the build starts (Python, torch, transformers).
- `load`: `GliderT5ForConditionalGeneration.from_pretrained(folder, dtype=...)` of the built model, likewise.
"""

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

ALL_LINEARS = ["q", "k", "v", "o", "wi", "wo"]
EMBED_DIM = 768


@dataclass(frozen=True)
class Setup:
    d_model: int = 768
    d_ff: int = 3072
    num_heads: int = 12
    num_layers: int = 12
    vocab_size: int = 32128
    rank: int = 16
    experts: tuple = (8, 48, 166)
    dtypes: tuple = ("float32", "bfloat16")


FULL = Setup()
QUICK = Setup(d_model=64, d_ff=256, num_heads=4, num_layers=2, vocab_size=512, rank=4, experts=(2, 6))


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if sys.platform.startswith("linux") else ""
    model_name = re.search(r"Model name:\s+(.+)", lscpu)
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    total = re.search(r"MemTotal:\s+(\d+)", meminfo)
    return {
        "cpu": model_name[1].strip() if model_name else platform.processor(),
        "cpus": os.cpu_count(),
        "memory_gib": round(int(total[1]) / 2**20, 1) if total else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def linear_shapes(setup: Setup) -> dict[str, tuple[int, int]]:
    """Module path -> (d_in, d_out) of every linear of a T5 (relu feed-forward, as t5-base) with these dimensions."""
    d, f = setup.d_model, setup.d_ff
    shapes = {}
    for stack, attentions in (("encoder", ["SelfAttention"]), ("decoder", ["SelfAttention", "EncDecAttention"])):
        for block in range(setup.num_layers):
            for layer, attention in enumerate(attentions):
                for name in ("q", "k", "v", "o"):
                    shapes[f"{stack}.block.{block}.layer.{layer}.{attention}.{name}"] = (d, d)
            ff = f"{stack}.block.{block}.layer.{len(attentions)}.DenseReluDense"
            shapes[f"{ff}.wi"], shapes[f"{ff}.wo"] = (d, f), (f, d)
    return shapes


def write_base(setup: Setup, directory: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=setup.vocab_size, d_model=setup.d_model, d_kv=setup.d_model // setup.num_heads, d_ff=setup.d_ff,
        num_layers=setup.num_layers, num_heads=setup.num_heads, feed_forward_proj="relu", decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(directory)


def write_expert(setup: Setup, directory: Path, index: int) -> None:
    """One random expert in the PEFT + glider format, written with safetensors directly."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(index)
    directory.mkdir(parents=True)
    lora, gates = {}, {}
    for path, (d_in, d_out) in linear_shapes(setup).items():
        lora[f"base_model.model.{path}.lora_A.weight"] = torch.randn(setup.rank, d_in, generator=generator) * 0.02
        lora[f"base_model.model.{path}.lora_B.weight"] = torch.randn(d_out, setup.rank, generator=generator) * 0.02
        gates[f"gate.{path}"] = torch.randn(d_in, generator=generator)
    gates["instruction_embedding"] = torch.randn(EMBED_DIM, generator=generator)
    save_file(lora, directory / "adapter_model.safetensors")
    save_file(gates, directory / "glider_expert.safetensors")
    adapter_config = {
        "peft_type": "LORA", "r": setup.rank, "lora_alpha": 1, "target_modules": ALL_LINEARS, "lora_dropout": 0.0,
        "bias": "none", "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": "base",
    }  # fmt: skip
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config))
    (directory / "glider_expert.json").write_text(json.dumps({"name": f"task{index}", "instruction": f"Task {index}."}))


def run_child(args: list[str]) -> dict:
    """Run this script's `child` mode in a fresh interpreter; its last output line is its JSON result."""
    process = subprocess.run([sys.executable, __file__, "child", *args], capture_output=True, text=True)
    if process.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def _memory_bytes() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{key}:\s+(\d+)", status)[1]) * 1024 for key in ("VmRSS", "VmHWM"))


def model_bytes(model) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def child(argv: list[str]) -> int:
    """`build BASE OUT DTYPE EXPERT...` or `load FOLDER DTYPE`: do it, print a JSON line of memory and time."""
    torch.set_num_threads(1)
    from transformers.utils import logging as transformers_logging

    from modeling_glider import GliderT5ForConditionalGeneration
    from modeling_glider.cli import main

    transformers_logging.set_verbosity_error()
    rss_before, _ = _memory_bytes()
    start = time.perf_counter()
    if argv[0] == "build":
        base, out, dtype, experts = argv[1], argv[2], argv[3], argv[4:]
        code = main(["build", "--base", base, "--out", out, "--dtype", dtype, "--experts", *experts])
        if code:
            raise SystemExit(code)
        seconds = time.perf_counter() - start
        _, peak = _memory_bytes()
        model = GliderT5ForConditionalGeneration.from_pretrained(out, dtype=getattr(torch, dtype))  # for its bytes
    else:
        folder, dtype = argv[1], argv[2]
        model = GliderT5ForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, dtype))
        seconds = time.perf_counter() - start
        _, peak = _memory_bytes()
    result = {"rss_before": rss_before, "peak": peak, "model_bytes": model_bytes(model), "seconds": seconds}
    print(json.dumps(result))
    return 0


def measure(setup: Setup, root: Path, experts: list[Path], dtype: str) -> dict:
    out = root / f"built-{len(experts)}-{dtype}"
    build = run_child(["build", str(root / "base"), str(out), dtype, *map(str, experts)])
    files = sorted(p.name for p in out.iterdir() if re.fullmatch(r"model.*\.safetensors(\.index\.json)?", p.name))
    disk = sum((out / name).stat().st_size for name in files)
    load = run_child(["load", str(out), dtype])
    shutil.rmtree(out)
    row = {"experts": len(experts), "dtype": dtype, "weight_files": files, "disk_bytes": disk}
    for name, result in (("build", build), ("load", load)):
        row[name] = {
            **result,
            "peak_ratio": result["peak"] / result["model_bytes"],
            "growth_ratio": (result["peak"] - result["rss_before"]) / result["model_bytes"],
        }
        print(
            f"E={len(experts):4d} {dtype:9s} {name:5s}: model {result['model_bytes'] / 2**30:.2f} GiB, peak "
            f"{result['peak'] / 2**30:.2f} GiB ({row[name]['peak_ratio']:.2f}x), growth "
            f"{(result['peak'] - result['rss_before']) / 2**30:.2f} GiB ({row[name]['growth_ratio']:.2f}x), "
            f"{result['seconds']:.0f} s",
            flush=True,
        )
    return row


def markdown(report: dict) -> str:
    m, s = report["machine"], report["setup"]
    lines = [
        f"Machine: {m['cpu']} ({m['cpus']} CPUs, {m['memory_gib']} GiB), torch {m['torch']}, {m['date']}. "
        f"Command: `{report['command']}`. {report['note']}",
        "",
        f"Experts: random r = {s['rank']} LoRA on every linear of a T5 with d_model {s['d_model']}, d_ff {s['d_ff']}, "
        f"{s['num_heads']} heads, {s['num_layers']}+{s['num_layers']} layers, vocab {s['vocab_size']}; Phatgoose "
        f"gates and a {EMBED_DIM}-d instruction embedding each; the base saved in fp32. Each figure comes from a fresh "
        "process: peak = its resident-set high-water mark (VmHWM); growth = peak minus the resident set after the "
        "imports; both over the model's bytes (parameters and buffers).",
        "",
        "| E | dtype | model (GiB) | weight files | build peak (GiB) | build peak / model | build growth / model "
        "| build (s) | load peak / model | load growth / model | load (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        b, lo = r["build"], r["load"]
        lines.append(
            f"| {r['experts']} | {r['dtype']} | {b['model_bytes'] / 2**30:.2f} | {len(r['weight_files'])} | "
            f"{b['peak'] / 2**30:.2f} | {b['peak_ratio']:.2f} | {b['growth_ratio']:.2f} | {b['seconds']:.0f} | "
            f"{lo['peak_ratio']:.2f} | {lo['growth_ratio']:.2f} | {lo['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "child":
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small dimensions and libraries: a smoke run")
    parser.add_argument("--experts", type=int, nargs="+", help="library sizes E (default: 8 48 166)")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"], help="build dtypes")
    parser.add_argument("--work", type=Path, help="folder for the experts and models (default: a temporary one)")
    parser.add_argument("--note", default="", help="a sentence for the report (e.g. that the machine was shared)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else FULL
    setup = replace(setup, **{k: tuple(v) for k, v in (("experts", args.experts), ("dtypes", args.dtypes)) if v})
    name = "bench_scale_quick" if args.quick else "bench_scale"
    command = shlex.join(["python", "benchmarks/bench_scale.py", *argv])

    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.work) as work:
        root = Path(work)
        write_base(setup, root / "base")
        experts = []
        results = []
        for size in sorted(setup.experts):
            start = time.perf_counter()
            while len(experts) < size:
                experts.append(root / f"expert{len(experts)}")
                write_expert(setup, experts[-1], len(experts) - 1)
            print(f"wrote {size} experts ({time.perf_counter() - start:.0f} s)", flush=True)
            for dtype in setup.dtypes:
                results.append(measure(setup, root, experts[:size], dtype))

    report = {"command": command, "note": args.note, "machine": machine(), "setup": asdict(setup), "results": results}
    text = markdown(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
