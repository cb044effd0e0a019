"""Speed and memory of GliderT5's routed LoRA against the bare base T5, the reference per-expert loop and PEFT.

One command, one process, random weights:

    nice -n 0 python benchmarks/bench_speed.py            # t5-base dimensions, E = 8, 36, 166 (k = 2, r = 16)
    python benchmarks/bench_speed.py --quick              # a small smoke run of every code path
    python benchmarks/bench_speed.py --device cuda --dtype bfloat16 --dims t5-xl --systems base glider

Systems, all sharing one set of weights (base and experts are stored once, so one process holds them all):
- `base`: the bare `T5ForConditionalGeneration`, the limit;
- `glider`: GliderT5 as configured (`lora_implementation="auto"`), global + local routing, top-k per token;
- `reference_loop`: the same GliderT5 with every routed linear computed the way the reference GLIDER code does it
  (dense routing, a sort and a Python loop over every expert; see `reference_loop.py`);
- `peft`: PEFT with the E experts loaded as named adapters and mixed-batch inference, `adapter_names` per row
  (top-1 per sequence: the expert the global router ranks first for that query).

Workloads: `forward` (inputs of `encoder_length` tokens and one decoder token: the encoder's cost), `greedy` and
`beam` generation of exactly `new_tokens` tokens. Each timing is the median of `repeats` runs, the systems
interleaved within each repeat so that drift of a shared machine hits all alike.

Memory: `weights` is the bytes of each system's parameters and buffers (shared tensors counted for every system that
uses them, as if it were alone); `call peak` is the growth of the process's resident set (Linux VmHWM, reset through
/proc/self/clear_refs after `malloc_trim`) during one run of the workload; `peak = weights + call peak`. On a GPU the
call peak is the growth of `torch.cuda.max_memory_allocated` instead (the resident set says nothing of device memory).
"""

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import T5Config, T5ForConditionalGeneration  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from benchmarks.reference_loop import reference_loop_model  # noqa: E402
from configuration_glider import GliderConfig  # noqa: E402
from modeling_glider import GliderT5ForConditionalGeneration  # noqa: E402
from modeling_glider.routing import GliderLinear  # noqa: E402

ALL_LINEARS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
SYSTEMS = ("base", "glider", "reference_loop", "peft")
WORKLOADS = ("forward", "greedy", "beam")


@dataclass(frozen=True)
class Setup:
    """Model dimensions and workload sizes. `FULL` is t5-base (v1.1: gated-gelu FFN) and the paper's libraries."""

    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 2048
    num_heads: int = 12
    num_layers: int = 12
    vocab_size: int = 32128
    experts: tuple[int, ...] = (8, 36, 166)
    rank: int = 16
    lora_alpha: float = 1.0  # scaling 1/r, as the paper's experts
    top_k: int = 2
    global_routing_scale: float = 100.0  # the paper's alpha for held-in tasks
    embedding_dim: int = 384
    encoder_batch: int = 2
    encoder_length: int = 512
    generate_batch: int = 4
    prompt_length: int = 64
    new_tokens: int = 32
    beams: int = 4
    repeats: int = 5
    lora_implementation: str = "auto"
    systems: tuple[str, ...] = SYSTEMS  # base and glider always; the reference loop and PEFT may be left out
    device: str = "cpu"
    dtype: str = "float32"


FULL = Setup()
QUICK = Setup(
    d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, vocab_size=256, experts=(4, 16),
    embedding_dim=32, encoder_length=96, prompt_length=16, new_tokens=4, repeats=2,
)  # fmt: skip


# Dimension presets (`--dims`): T5 v1.1 shapes with a gated-gelu FFN; `d256` is the speed issue's small setting.
DIMS = {
    "d256": {"d_model": 256, "d_kv": 32, "d_ff": 1024, "num_heads": 8, "num_layers": 4},
    "t5-small": {"d_model": 512, "d_kv": 64, "d_ff": 2048, "num_heads": 8, "num_layers": 6},
    "t5-base": {"d_model": 768, "d_kv": 64, "d_ff": 2048, "num_heads": 12, "num_layers": 12},
    "t5-xl": {"d_model": 2048, "d_kv": 64, "d_ff": 5120, "num_heads": 32, "num_layers": 24},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def synchronize(device: str) -> None:
    """Wait for the device's queued kernels, so that a clock read after it covers them (nothing to wait for on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def check_device(device: str) -> str | None:
    """Why `device` cannot run this benchmark (one line), or None when it can."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        return f"--device {device!r} is not a torch device (use cpu or cuda[:N])"
    if parsed.type not in ("cpu", "cuda"):
        return f"--device {device!r}: only cpu and cuda are supported"
    if parsed.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: CUDA is not available to this torch ({torch.__version__}) on this machine"
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def check_placement(model, setup: Setup, what: str) -> None:
    """Every tensor of `model` is on the setup's device: a stray CPU tensor would fail later, or copy at every call."""
    kind = torch.device(setup.device).type
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type != kind:
            raise RuntimeError(f"{what} tensor {name} is on {t.device}, not on {setup.device}")


def t5_config(setup: Setup) -> T5Config:
    return T5Config(
        vocab_size=setup.vocab_size,
        d_model=setup.d_model,
        d_kv=setup.d_kv,
        d_ff=setup.d_ff,
        num_layers=setup.num_layers,
        num_decoder_layers=setup.num_layers,
        num_heads=setup.num_heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def build_base(setup: Setup, seed: int = 0) -> T5ForConditionalGeneration:
    """A random T5 on the setup's device in its dtype (initialised there: a t5-xl never passes through CPU memory)."""
    torch.manual_seed(seed)
    with torch.device(setup.device):
        model = T5ForConditionalGeneration(t5_config(setup))
    return model.to(DTYPES[setup.dtype]).eval()


def build_glider(base: T5ForConditionalGeneration, setup: Setup, num_experts: int, seed: int = 0):
    """A GliderT5 on `base`'s weights (shared, not copied) with `num_experts` random experts adapting every linear."""
    experts = [
        {"name": f"expert_{i}", "target_modules": ALL_LINEARS, "r": setup.rank, "lora_alpha": setup.lora_alpha}
        for i in range(num_experts)
    ]
    base_config = {k: v for k, v in base.config.to_dict().items() if k not in ("model_type", "architectures")}
    config = GliderConfig(
        **base_config,
        experts=experts,
        router_top_k=setup.top_k,
        global_routing_scale=setup.global_routing_scale,
        instruction_embedding_dim=setup.embedding_dim,
        lora_implementation=setup.lora_implementation,
    )
    with torch.device("meta"):
        glider = GliderT5ForConditionalGeneration(config)
    glider.load_state_dict(base.state_dict(), strict=False, assign=True)
    generator = torch.Generator().manual_seed(seed)
    for module in glider.modules():
        if isinstance(module, GliderLinear):
            E, r, d_in, d_out = module.num_experts, setup.rank, module.in_features, module.out_features
            A = torch.randn(E, r, d_in, generator=generator) / math.sqrt(d_in)
            B = torch.randn(E, d_out, r, generator=generator) * 0.5
            gate = torch.randn(E, d_in, generator=generator)
            module.set_experts({e: (A[s], B[s], gate[s]) for s, e in enumerate(module.expert_ids)})
    embeddings = torch.randn(num_experts, setup.embedding_dim, generator=generator)
    glider.global_router.expert_embeddings = embeddings.to(setup.device)
    glider.tie_weights()
    leftover = [n for n, t in [*glider.named_parameters(), *glider.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"GliderT5 tensors left unset: {leftover[:5]}")
    check_placement(glider, setup, "GliderT5")
    return glider.eval().requires_grad_(False)


def build_peft(base: T5ForConditionalGeneration, glider: GliderT5ForConditionalGeneration, setup: Setup):
    """PEFT on `base`'s weights with every expert of `glider` as a named LoRA adapter (tensors shared).

    `PeftModel.add_adapter` walks the whole model once per adapter, and the model grows with every adapter: about 10
    minutes for 166 adapters on t5-base. So the first adapter is injected by `get_peft_model` and the others are
    added layer by layer with PEFT's own `LoraLayer.update_layer`, which `add_adapter` calls for every layer anyway:
    the modules are the same, built in O(E).
    """
    with torch.device("meta"):
        model = T5ForConditionalGeneration(base.config)
    model.load_state_dict(base.state_dict(), assign=True)
    model.tie_weights()
    names = glider.config.expert_names
    lora = LoraConfig(
        r=setup.rank, lora_alpha=setup.lora_alpha, target_modules=ALL_LINEARS, lora_dropout=0.0, init_lora_weights=False
    )
    peft_model = get_peft_model(model, lora, adapter_name=names[0], low_cpu_mem_usage=True)
    for name in names[1:]:
        peft_model.peft_config[name] = lora
    routed = [(path, m) for path, m in glider.named_modules() if isinstance(m, GliderLinear) and m.num_experts]
    for path, module in tqdm(routed, desc="PEFT adapters", leave=False):
        layer = peft_model.base_model.model.get_submodule(path)
        for slot, expert in enumerate(module.expert_ids):
            weights = {"lora_A": module.lora_A.data[slot], "lora_B": module.lora_B.data[slot]}
            if names[expert] in layer.lora_A:
                for key, tensor in weights.items():
                    getattr(layer, key)[names[expert]].weight = torch.nn.Parameter(tensor, requires_grad=False)
            else:
                with torch.device("meta"):  # no throw-away initialisation: the weights are tied to glider's
                    layer.update_layer(names[expert], setup.rank, setup.lora_alpha, lora, tied_adapter=weights)
    leftover = [n for n, p in peft_model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"PEFT tensors left unset: {leftover[:5]}")
    check_placement(peft_model, setup, "PEFT")
    return peft_model.eval().requires_grad_(False)


def make_inputs(setup: Setup, glider: GliderT5ForConditionalGeneration, seed: int = 1) -> dict:
    """Token ids and, per query, an instruction embedding close to one expert's: queries of different tasks. Drawn on
    the CPU (the same values on every device), then moved to the setup's device."""
    generator = torch.Generator().manual_seed(seed)
    G = glider.global_router.expert_embeddings.cpu()
    inputs = {}
    for workload, batch, length in [
        ("forward", setup.encoder_batch, setup.encoder_length),
        ("generate", setup.generate_batch, setup.prompt_length),
    ]:
        task = torch.randperm(G.shape[0], generator=generator)[:batch]
        u = (G[task] + 0.5 * torch.randn(batch, G.shape[1], generator=generator)).to(setup.device)
        inputs[workload] = {
            "input_ids": torch.randint(2, setup.vocab_size, (batch, length), generator=generator).to(setup.device),
            "instruction_embeddings": u,
            # PEFT: top-1 per sequence, the expert the global router ranks first
            "adapter_names": [glider.config.expert_names[i] for i in glider.global_routing_logits(u).argmax(-1)],
        }
    return inputs


def run_workload(system: str, model, workload: str, inputs: dict, setup: Setup, **extra):
    """One run of `workload` on `system`; returns the model's output."""
    data = inputs["forward" if workload == "forward" else "generate"]
    ids = data["input_ids"]
    routing = {}
    if system in ("glider", "reference_loop"):
        routing = {"instruction_embeddings": data["instruction_embeddings"]}
    elif system == "peft":
        routing = {"adapter_names": data["adapter_names"]}
    if workload == "forward":
        with torch.inference_mode():
            start = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)
            return model(input_ids=ids, decoder_input_ids=start, **routing, **extra)
    beams = setup.beams if workload == "beam" else 1
    n = setup.new_tokens
    with torch.inference_mode():
        return model.generate(
            input_ids=ids, max_new_tokens=n, min_new_tokens=n, num_beams=beams, do_sample=False, **routing, **extra
        )


_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def experts_in_use(glider, workload: str, inputs: dict, setup: Setup) -> float:
    """Distinct experts per routed-linear call of GliderT5, averaged over the calls of one run: the LoRA weights a
    call must read (the whole batch shares one call)."""
    extra = {"output_routing": True} | ({} if workload == "forward" else {"return_dict_in_generate": True})
    record = run_workload("glider", glider, workload, inputs, setup, **extra).routing
    counts = [ids.unique().numel() for calls in record.calls.values() for _, ids, _ in calls]
    return sum(counts) / len(counts)


def _rss_mib() -> tuple[float, float]:
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{key}:\s+(\d+)", status)[1]) / 1024 for key in ("VmRSS", "VmHWM"))


def call_peak_mib(fn, device: str = "cpu") -> float | None:
    """Growth of the resident set during `fn()` (MiB), or None where Linux's counters are not available. On a CUDA
    device: the growth of the device's peak allocated memory above what was allocated before."""
    if torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if _LIBC is None:
        return None
    gc.collect()
    _LIBC.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    except OSError:
        return None
    before, _ = _rss_mib()
    fn()
    return _rss_mib()[1] - before


def tensor_mib(model) -> float:
    """Parameters and buffers."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def lora_and_gate_mib(glider) -> float:
    return (
        sum(
            t.numel() * t.element_size()
            for m in glider.modules()
            if isinstance(m, GliderLinear) and m.num_experts
            for t in (m.lora_A, m.lora_B, m.router_gate)
        )
        / 2**20
    )


def machine(device: str = "cpu") -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if sys.platform.startswith("linux") else ""
    model_name = re.search(r"Model name:\s+(.+)", lscpu)
    info = {
        "cpu": model_name[1].strip() if model_name else platform.processor(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def bench_library(base, setup: Setup, num_experts: int) -> dict:
    """Time (median seconds) and memory of every system on every workload for one library size."""
    glider = build_glider(base, setup, num_experts)
    models = {"base": base, "glider": glider}
    if "reference_loop" in setup.systems:
        models["reference_loop"] = reference_loop_model(glider)
    if "peft" in setup.systems:
        models["peft"] = build_peft(base, glider, setup)
    inputs = make_inputs(setup, glider)
    in_use = {w: experts_in_use(glider, w, inputs, setup) for w in WORKLOADS}  # also builds GliderT5's gate cache
    result = {
        "experts": num_experts,
        "lora_and_gates_mib": lora_and_gate_mib(glider),
        "weights_mib": {s: tensor_mib(m) for s, m in models.items()},
        "seconds": {},
        "call_peak_mib": {},
        "experts_in_use": in_use,
    }
    for workload in WORKLOADS:
        for system, model in models.items():  # warm-up, and one run each for memory
            result["call_peak_mib"].setdefault(workload, {})[system] = call_peak_mib(
                lambda m=model, s=system, w=workload: run_workload(s, m, w, inputs, setup), setup.device
            )
        times = {s: [] for s in models}
        for _ in tqdm(range(setup.repeats), desc=f"E={num_experts} {workload}", leave=False):
            for system, model in models.items():
                synchronize(setup.device)
                start = time.perf_counter()
                run_workload(system, model, workload, inputs, setup)
                synchronize(setup.device)
                times[system].append(time.perf_counter() - start)
        result["seconds"][workload] = {s: statistics.median(t) for s, t in times.items()}
        print(
            f"E={num_experts:4d} {workload:8s} "
            + "  ".join(f"{s} {t:.3f}s" for s, t in result["seconds"][workload].items()),
            flush=True,
        )
    del models, glider
    gc.collect()
    return result


def ratios(results: list[dict]) -> dict:
    """The ratios the goals are stated in, from one run's medians."""
    out = {"per_library": [], "growth": {}}
    for r in results:
        row = {"experts": r["experts"]}
        for workload, t in r["seconds"].items():
            for other in ("base", "reference_loop", "peft"):
                if other in t and "glider" in t:
                    row[f"{workload}: glider/{other}"] = t["glider"] / t[other]
        peaks = r["call_peak_mib"].get("forward", {})
        if "base" in peaks and "glider" in peaks and None not in (peaks["base"], peaks["glider"]):
            above = r["weights_mib"]["glider"] + peaks["glider"] - r["weights_mib"]["base"] - peaks["base"]
            row["forward: peak above base / (LoRA+gates)"] = above / r["lora_and_gates_mib"]
        out["per_library"].append(row)
    if len(results) > 1:
        small, large = min(results, key=lambda r: r["experts"]), max(results, key=lambda r: r["experts"])
        for workload in small["seconds"]:
            for system in small["seconds"][workload]:
                key = f"{workload}: {system} E={large['experts']}/E={small['experts']}"
                out["growth"][key] = large["seconds"][workload][system] / small["seconds"][workload][system]
    return out


def markdown(report: dict) -> str:
    setup, results, summary = report["setup"], report["results"], report["ratios"]
    systems = tuple(s for s in SYSTEMS if s in setup.get("systems", SYSTEMS))
    others = [s for s in ("base", "reference_loop", "peft") if s in systems]
    gpu = report["machine"].get("gpu")
    lines = [
        (f"Device: {gpu} ({setup['device']}). " if gpu else "")
        + f"Machine: {report['machine']['cpu']} ({report['machine']['cpus']} CPUs), "
        f"{report['machine']['torch_threads']} torch threads, torch "
        f"{report['machine']['torch']}, {report['machine']['date']}. Command: `{report['command']}`.",
        "",
        f"Model: T5 d_model {setup['d_model']}, d_ff {setup['d_ff']} (gated-gelu), {setup['num_heads']} heads, "
        f"{setup['num_layers']}+{setup['num_layers']} layers, vocab {setup['vocab_size']}; every linear adapted, "
        f"r = {setup['rank']}, k = {setup['top_k']}, alpha = {setup['global_routing_scale']}, "
        f"{DTYPE_SHORT[setup.get('dtype', 'float32')]}. "
        f"forward: {setup['encoder_batch']} x {setup['encoder_length']} tokens + 1 decoder token; greedy / beam "
        f"{setup['beams']}: {setup['generate_batch']} queries x {setup['prompt_length']} tokens, exactly "
        f"{setup['new_tokens']} new tokens. Medians of {setup['repeats']} runs.",
        "",
        "| E | workload | experts in use per linear call | " + " | ".join(f"{s} (s)" for s in systems)
        + " | " + " | ".join(f"glider/{o}" for o in others) + " |",
        "|---|---|---|" + "---|" * (len(systems) + len(others)),
    ]  # fmt: skip
    for r in results:
        for workload, t in r["seconds"].items():
            ratio = [f"{t['glider'] / t[o]:.2f}" for o in others]
            lines.append(
                f"| {r['experts']} | {workload} | {r['experts_in_use'][workload]:.1f} | "
                + " | ".join(f"{t[s]:.3f}" for s in systems) + " | " + " | ".join(ratio) + " |"
            )  # fmt: skip
    if summary["growth"]:
        lines += ["", "| growth | ratio |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in summary["growth"].items()]
    growth = (
        "the device's peak allocated memory (torch.cuda.max_memory_allocated)"
        if gpu
        else "the process's resident set during one run (VmHWM after clear_refs)"
    )
    lines += [
        "",
        "Memory: parameter and buffer bytes of each system "
        "(shared tensors counted for each system) + the growth of "
        f"{growth}.",
        "",
        "| E | LoRA+gates (MiB) | workload | " + " | ".join(f"{s} weights+call peak (MiB)" for s in systems)
        + " | glider peak above base / (LoRA+gates) |",
        "|---|---|---|" + "---|" * (len(systems) + 1),
    ]  # fmt: skip
    for r in results:
        for workload, peaks in r["call_peak_mib"].items():
            if None in peaks.values():
                continue
            total = {s: r["weights_mib"][s] + peaks[s] for s in systems}
            above = (total["glider"] - total["base"]) / r["lora_and_gates_mib"]
            lines.append(
                f"| {r['experts']} | {r['lora_and_gates_mib']:.0f} | {workload} | "
                + " | ".join(f"{r['weights_mib'][s]:.0f}+{peaks[s]:.0f}" for s in systems) + f" | {above:.3f} |"
            )  # fmt: skip
    return "\n".join(lines) + "\n"


def run_benchmark(setup: Setup, out_dir: Path | None, name: str = "bench_speed", command: str = "") -> dict:
    """Run every library size, print the tables and write `<name>.json` and `<name>.md` to `out_dir`."""
    base = build_base(setup)
    results = [bench_library(base, setup, e) for e in setup.experts]
    report = {"command": command, "machine": machine(setup.device), "setup": asdict(setup), "results": results}
    report["ratios"] = ratios(results)
    text = markdown(report)
    print(text)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        (out_dir / f"{name}.md").write_text(text)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small dimensions and libraries: a smoke run")
    parser.add_argument("--experts", type=int, nargs="+", help="library sizes E (default: 8 36 166)")
    parser.add_argument(
        "--dims", choices=DIMS, help="model dimensions (default: t5-base; with --quick: tiny); --layers overrides"
    )
    parser.add_argument("--layers", type=int, help="encoder and decoder layers (default: 12, t5-base)")
    parser.add_argument("--repeats", type=int, help="timed runs per system and workload (default: 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--implementation", default="auto", help="GliderT5 lora_implementation (default: auto)")
    parser.add_argument(
        "--systems", nargs="+", choices=SYSTEMS, default=SYSTEMS, help="systems to run (base and glider always)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations (default: float32)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    args = parser.parse_args(argv)
    problem = check_device(args.device)
    if problem is not None:
        print(f"bench_speed.py: error: {problem}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    transformers_logging.set_verbosity_error()
    setup = replace(QUICK if args.quick else FULL, **DIMS.get(args.dims, {}))
    overrides = {"experts": tuple(args.experts) if args.experts else None, "num_layers": args.layers}
    overrides |= {"repeats": args.repeats, "lora_implementation": args.implementation}
    overrides |= {"systems": tuple(s for s in SYSTEMS if s in {"base", "glider", *args.systems})}
    overrides |= {"device": args.device, "dtype": args.dtype}
    setup = replace(setup, **{k: v for k, v in overrides.items() if v is not None})
    name = "bench_speed_quick" if args.quick else "bench_speed"
    # every setting off the default names its own results file: a GPU or t5-xl run never overwrites the CPU table
    for value, default in [(args.dims, None), (torch.device(args.device).type, "cpu"), (args.dtype, "float32")]:
        name += f"_{value}" if value != default else ""
    run_benchmark(
        setup, args.out, name=name, command="python benchmarks/bench_speed.py " + " ".join(argv or sys.argv[1:])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
