"""Time and memory of building, loading and serving large expert libraries, up to 1000 experts.

    python benchmarks/bench_scale.py                 # t5-base: E = 8, 48, 166; t5-small: E = 166, 1000
    python benchmarks/bench_scale.py --quick         # small dimensions and libraries: a smoke run

Random experts are written on the fly as PEFT-format expert directories (adapter_config.json, adapter_model.safetensors,
glider_expert.json, glider_expert.safetensors with Phatgoose gates and an instruction embedding), with safetensors
directly, in fp32, at t5-base dimensions (d_model 768, d_ff 3072, 12 heads, 12+12 layers) and at t5-small dimensions
(d_model 512, d_ff 2048, 8 heads, 6+6 layers); vocab 32128, r 16 on every linear. The base T5 is saved in fp32
beside them. The 1000-expert library is built in bf16 only (fp32 would be ~9 GB on a 24 GB machine shared with other
work).

Each measurement runs in a fresh Python process (so its resident-set high-water mark, Linux VmHWM, is that of the
measured work alone):
- `build`: `glider build` (the command line's own `main`) of E experts in fp32 or `--dtype bfloat16`: peak resident
  memory against the built model's bytes (its parameters and buffers). `peak` is the whole process's high-water mark;
  `growth` is that minus the resident set after the imports, before the build starts (Python, torch, transformers).
- `serve`, in one process: `load`, `GliderT5ForConditionalGeneration.from_pretrained(folder, dtype=...)` of the built
  model, measured as the build; `first answer`, the time from the start of the load to the end of one greedy
  `generate` of a short query with an instruction embedding; then serving: the high-water mark is reset (Linux
  `clear_refs`) and one batched greedy `generate` answers 32 queries of 10 tasks, each query's instruction embedding
  its task expert's own embedding plus noise. Its peak is compared with the base's bytes plus the bytes of all
  experts, and with the base's plus those of the experts the routing used.
Queries are random token ids (there is no tokenizer for random weights).
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


SERVE_QUERIES, SERVE_TASKS, QUERY_TOKENS, NEW_TOKENS = 32, 10, 16, 8
FP32, BF16 = "float32", "bfloat16"


@dataclass(frozen=True)
class Setup:
    name: str
    d_model: int
    d_ff: int
    num_heads: int
    num_layers: int
    vocab_size: int = 32128
    rank: int = 16
    runs: tuple = ()  # (E, dtype) pairs, in order of E


FULL = (
    Setup("t5-base", 768, 3072, 12, 12, runs=((8, FP32), (8, BF16), (48, FP32), (48, BF16), (166, FP32), (166, BF16))),
    Setup("t5-small", 512, 2048, 8, 6, runs=((166, FP32), (166, BF16), (1000, BF16))),
)
QUICK = [Setup("tiny", 64, 256, 4, 2, vocab_size=512, rank=4, runs=((2, FP32), (12, BF16)))]


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
    from transformers.utils import logging as transformers_logging

    config = T5Config(
        vocab_size=setup.vocab_size, d_model=setup.d_model, d_kv=setup.d_model // setup.num_heads, d_ff=setup.d_ff,
        num_layers=setup.num_layers, num_heads=setup.num_heads, feed_forward_proj="relu", decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers_logging.disable_progress_bar()
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


def _reset_peak() -> bool:
    """Set VmHWM to the current resident set (Linux 4.0 and later)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def library_bytes(model) -> tuple[int, int]:
    """Bytes of the base's tensors and of the experts' (LoRA A and B, gates, instruction embeddings); the rest of the
    model's bytes are small routing buffers (LoRA scalings, expert indices)."""
    from modeling_glider.routing import GliderLinear

    experts = [model.global_router.expert_embeddings] if model.global_router is not None else []
    for module in model.modules():
        if isinstance(module, GliderLinear) and module.num_experts:
            experts += [module.lora_A, module.lora_B, module.router_gate]
    expert_ids = {id(t) for t in experts}
    base = {id(t): t for t in model.parameters() if id(t) not in expert_ids}
    return tuple(sum(t.numel() * t.element_size() for t in ts) for ts in (base.values(), experts))


def serve(model, seconds_before: float, start: float) -> dict:
    """One query (the first answer), then SERVE_QUERIES queries of SERVE_TASKS tasks in one batch."""
    vocab, experts = model.config.vocab_size, model.global_router.expert_embeddings
    generator = torch.Generator().manual_seed(0)
    greedy = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, "num_beams": 1}

    def queries(tasks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(2, vocab, (len(tasks), QUERY_TOKENS), generator=generator)
        ids[:, -1] = model.config.eos_token_id
        noise = torch.randn(len(tasks), experts.shape[1], generator=generator) * experts.std()
        return ids, experts[tasks] + 0.5 * noise  # cosine ~0.9 with the task's own expert

    ids, u = queries([0])
    model.generate(input_ids=ids, instruction_embeddings=u, **greedy)
    first_answer = seconds_before + time.perf_counter() - start

    num_experts = experts.shape[0]
    num_tasks = min(SERVE_TASKS, num_experts)
    task_experts = [i * num_experts // num_tasks for i in range(num_tasks)]
    tasks = [task_experts[i % len(task_experts)] for i in range(SERVE_QUERIES)]
    ids, u = queries(tasks)
    reset = _memory_bytes()[0] if _reset_peak() else None
    start = time.perf_counter()
    output = model.generate(
        input_ids=ids, instruction_embeddings=u, output_routing=True, return_dict_in_generate=True, **greedy
    )
    seconds = time.perf_counter() - start
    rss, peak = _memory_bytes()
    used = set()
    for calls in output.routing.calls.values():
        for weights, expert_ids, _ in calls:
            used.update(expert_ids[weights > 0].unique().tolist())
    base, expert = library_bytes(model)
    return {
        "first_answer_seconds": first_answer,
        "queries": SERVE_QUERIES, "tasks": len(task_experts), "task_experts": task_experts, "used_experts": len(used),
        "task_experts_used": sorted(set(task_experts) & used),
        "rss_at_reset": reset, "peak": peak, "rss_after": rss, "seconds": seconds,
        "base_bytes": base, "expert_bytes": expert, "bytes_per_expert": expert / num_experts,
    }  # fmt: skip


def child(argv: list[str]) -> int:
    """`build BASE OUT DTYPE EXPERT...` or `serve FOLDER DTYPE`: do it, print a JSON line of memory and time."""
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
    if argv[0] == "serve":
        start = time.perf_counter()
        with torch.no_grad():
            result["serve"] = serve(model, seconds, start)
    print(json.dumps(result))
    return 0


def measure(root: Path, experts: list[Path], dtype: str) -> dict:
    out = root / f"built-{len(experts)}-{dtype}"
    build = run_child(["build", str(root / "base"), str(out), dtype, *map(str, experts)])
    files = sorted(p.name for p in out.iterdir() if re.fullmatch(r"model.*\.safetensors(\.index\.json)?", p.name))
    disk = sum((out / name).stat().st_size for name in files)
    load = run_child(["serve", str(out), dtype])
    shutil.rmtree(out)
    serving = load.pop("serve")
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
    all_experts = serving["base_bytes"] + serving["expert_bytes"]
    used_experts = serving["base_bytes"] + serving["used_experts"] * serving["bytes_per_expert"]
    row["serve"] = {
        **serving,
        "peak_over_all": serving["peak"] / all_experts,
        "peak_over_used": serving["peak"] / used_experts,
    }
    print(
        f"E={len(experts):4d} {dtype:9s} serve: first answer {serving['first_answer_seconds']:.1f} s, "
        f"{serving['queries']} queries of {serving['tasks']} tasks in {serving['seconds']:.1f} s using "
        f"{serving['used_experts']} experts, peak {serving['peak'] / 2**30:.2f} GiB = "
        f"{row['serve']['peak_over_all']:.2f}x base + all experts, {row['serve']['peak_over_used']:.2f}x base + used",
        flush=True,
    )
    return row


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['cpu']} ({m['cpus']} CPUs, {m['memory_gib']} GiB), torch {m['torch']}, {m['date']}. "
        f"{report['note']}",
        "",
        f"Experts: random r LoRA on every linear, Phatgoose gates and a {EMBED_DIM}-d instruction embedding each, "
        "written in fp32; the base saved in fp32. Each row's build and its load-and-serve run in fresh processes: "
        "peak = the process's resident-set high-water mark (VmHWM); growth = peak minus the resident set after the "
        "imports; both over the model's bytes (parameters and buffers). First answer = load + one greedy generate "
        f"({NEW_TOKENS} new tokens) of a {QUERY_TOKENS}-token query with an instruction embedding. Serving: one "
        f"batched greedy generate of {SERVE_QUERIES} queries of {SERVE_TASKS} tasks ({NEW_TOKENS} new tokens each; "
        "instruction embeddings = the task experts' own plus noise) after resetting the high-water mark; its peak "
        "over the base's bytes plus all experts' bytes, and over the base's plus the bytes of the experts the routing "
        "used (any token, any linear).",
    ]
    for setup in report["setups"]:
        s = setup["setup"]
        lines += [
            "",
            f"### {s['name']}: d_model {s['d_model']}, d_ff {s['d_ff']}, {s['num_heads']} heads, "
            f"{s['num_layers']}+{s['num_layers']} layers, vocab {s['vocab_size']}, r = {s['rank']}",
            "",
            "| E | dtype | model (GiB) | weight files | build (s) | build peak (GiB) | build peak / model "
            "| build growth / model | load (s) | load peak / model | load growth / model | first answer (s) "
            "| serve (s) | experts used | serve peak (GiB) | serve peak / (base + all experts) "
            "| serve peak / (base + used experts) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in setup["results"]:
            b, lo, sv = r["build"], r["load"], r["serve"]
            lines.append(
                f"| {r['experts']} | {r['dtype']} | {b['model_bytes'] / 2**30:.2f} | {len(r['weight_files'])} | "
                f"{b['seconds']:.0f} | {b['peak'] / 2**30:.2f} | {b['peak_ratio']:.2f} | {b['growth_ratio']:.2f} | "
                f"{lo['seconds']:.1f} | {lo['peak_ratio']:.2f} | {lo['growth_ratio']:.2f} | "
                f"{sv['first_answer_seconds']:.1f} | {sv['seconds']:.1f} | {sv['used_experts']} | "
                f"{sv['peak'] / 2**30:.2f} | {sv['peak_over_all']:.2f} | {sv['peak_over_used']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "child":
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small dimensions and libraries: a smoke run")
    parser.add_argument("--setups", nargs="+", choices=[s.name for s in FULL], help="dimensions (default: all)")
    parser.add_argument("--experts", type=int, nargs="+", help="only these library sizes E")
    parser.add_argument("--dtypes", nargs="+", choices=[FP32, BF16, "float16"], help="only these build dtypes")
    parser.add_argument("--work", type=Path, help="folder for the experts and models (default: a temporary one)")
    parser.add_argument("--note", default="", help="a sentence for the report (e.g. that the machine was shared)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    args = parser.parse_args(argv)
    setups = QUICK if args.quick else [s for s in FULL if not args.setups or s.name in args.setups]
    if args.experts or args.dtypes:  # the given sizes and dtypes instead of each setup's runs
        for i, s in enumerate(setups):
            sizes = args.experts or sorted({size for size, _ in s.runs})
            dtypes = args.dtypes or sorted({dtype for _, dtype in s.runs}, reverse=True)
            setups[i] = replace(s, runs=tuple((size, dtype) for size in sizes for dtype in dtypes))
    name = "bench_scale_quick" if args.quick else "bench_scale"
    command = shlex.join(["python", "benchmarks/bench_scale.py", *argv])

    reports = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.work) as work:
        for setup in setups:
            root = Path(work) / setup.name
            write_base(setup, root / "base")
            experts, results = [], []
            for size, dtype in sorted(setup.runs, key=lambda run: run[0]):
                start = time.perf_counter()
                while len(experts) < size:
                    experts.append(root / f"expert{len(experts)}")
                    write_expert(setup, experts[-1], len(experts) - 1)
                print(f"{setup.name}: wrote {size} experts ({time.perf_counter() - start:.0f} s)", flush=True)
                results.append(measure(root, experts[:size], dtype))
            shutil.rmtree(root)  # the next setup's experts need the disk
            reports.append({"setup": asdict(setup), "results": results})

    report = {"command": command, "note": args.note, "machine": machine(), "setups": reports}
    text = markdown(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
