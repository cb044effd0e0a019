"""Compiled decoding: one decoding step of GliderT5 against the base T5's, both under `torch.compile(fullgraph=True)`.

    python -m benchmarks.bench_compile --out benchmarks/results       # Inductor, the d256 setting, one thread
    python -m benchmarks.bench_compile --quick --backend eager        # a smoke run: tiny dimensions, no code generation

Setting: the speed issue's small one (`bench_speed.py --dims d256`: d_model 256, 4+4 layers), 36 experts of rank 16 on
every linear, top-2, 8 queries of different tasks with instruction embeddings, prompts of 64 tokens. The step: the 8
queries' next token at position `prefill`, self-attention in a `StaticCache` and cross-attention in another, inside an
`EncoderDecoderCache`; each cache is filled by running the encoder and `prefill` uncompiled steps on the same tokens
for every system. Systems: the base T5; GliderT5 with `lora_implementation` "gather" and "dense", each routing among
all experts and among `router_candidates=4` per query.

Then greedy `generate` end to end, the base T5 and GliderT5 ("auto"): uncompiled, and with a static cache and a
`CompileConfig`, with which `generate` compiles its own decoding step (the compiled tokens must equal the uncompiled).

Before timing, the compiled step's logits must equal the uncompiled step's within a tolerance scaled to the logits.
Compile seconds: the first call of the compiled step (tracing, code generation, C++ compilation), with Inductor's
caches off, so every compile is cold. A timing is the mean of `calls` consecutive steps; reported is the median of
`repeats` timings, all systems, compiled and not, interleaved within each repeat.
"""

import argparse
import functools
import json
import statistics
import sys
import time
import types
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import CompileConfig  # noqa: E402
from transformers.cache_utils import EncoderDecoderCache, StaticCache  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from benchmarks.bench_speed import (  # noqa: E402
    DIMS,
    DTYPE_SHORT,
    DTYPES,
    FULL,
    QUICK,
    Setup,
    build_base,
    build_glider,
    check_device,
    machine,
    make_inputs,
    synchronize,
)
from modeling_glider import GliderT5ForConditionalGeneration  # noqa: E402

# name -> (lora_implementation, router_candidates); None: the base T5
SYSTEMS = {
    "base": None,
    "glider gather": ("gather", None),
    "glider dense": ("dense", None),
    "glider gather, 4 candidates": ("gather", 4),
    "glider dense, 4 candidates": ("dense", 4),
}
# timed end to end as well, each model as users get it: GliderT5 with lora_implementation "auto" (the encoder's long
# inputs grouped; compiled steps gather)
GENERATE_SYSTEMS = {"base": "base", "glider (auto)": "glider gather"}  # row -> the model of `SYSTEMS`
# compiled against uncompiled logits, relative to the largest logit: fused kernels round differently
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
SMALL = replace(FULL, **DIMS["d256"], experts=(36,), generate_batch=8, prompt_length=64, repeats=15)
TINY = replace(QUICK, num_layers=1, experts=(8,), generate_batch=8, prompt_length=16, repeats=2)


def decode_step(model, data: dict):
    """The step function of `model` for the queries in `data`: the encoder runs once here, as `generate` runs it."""
    ids = data["input_ids"]
    routing = {}
    with torch.no_grad():
        if isinstance(model, GliderT5ForConditionalGeneration):
            logits = model.global_routing_logits(data["instruction_embeddings"], ids.shape[0])
            routing = {"global_routing_logits": logits, "routing_candidates": model.routing_candidates(logits)}
        encoder_outputs = model.encoder(input_ids=ids, **routing)

    def step(tokens: torch.Tensor, cache: EncoderDecoderCache, position: torch.Tensor) -> torch.Tensor:
        return model(
            encoder_outputs=encoder_outputs, decoder_input_ids=tokens, cache=cache, use_cache=True,
            cache_position=position, **routing,
        ).logits  # fmt: skip

    return step


def filled_cache(model, step, tokens: torch.Tensor, prompt_length: int, steps: int) -> EncoderDecoderCache:
    """A static cache holding the cross-attention states and the self-attention states of `tokens`, with room for
    `steps` more tokens."""
    cache = EncoderDecoderCache(
        StaticCache(config=model.config, max_cache_len=tokens.shape[1] + steps),
        StaticCache(config=model.config, max_cache_len=prompt_length),
    )
    for position in range(tokens.shape[1]):
        step(tokens[:, position : position + 1], cache, torch.tensor([position], device=tokens.device))
    return cache


def rewind(cache: EncoderDecoderCache, steps: int) -> None:
    """Forget the self-attention states of the last `steps` tokens (a static layer counts its tokens on the device;
    the next steps overwrite the slots). The cross-attention states stay."""
    for layer in cache.self_attention_cache.layers:
        layer.crop(-steps)


def own_code(fn, name: str):
    """`fn` with a code object of its own: Dynamo keeps compiled graphs per code object, so each system's step has
    its graph and guards to itself (one shared code object would test every system's guards at every call)."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


@torch.no_grad()
def run(setup: Setup, backend: str, prefill: int, calls: int) -> dict:
    """Build, check and time every system; returns the report (without command and machine)."""
    base = build_base(setup)
    models = {}
    for name, variant in SYSTEMS.items():
        if variant is None:
            models[name] = base
            continue
        implementation, candidates = variant
        models[name] = build_glider(base, replace(setup, lora_implementation=implementation), setup.experts[0])
        models[name].config.router_candidates = candidates
    data = make_inputs(setup, models["glider gather"])["generate"]
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(2, setup.vocab_size, (setup.generate_batch, prefill + 1), generator=generator)
    tokens[:, 0] = 0  # the decoder start token
    tokens = tokens.to(setup.device)
    # `calls` consecutive steps at positions prefill, prefill + 1, ...: as in decoding, feeding the same token
    prompt, last = tokens[:, :-1], tokens[:, -1:]
    positions = [torch.tensor([prefill + i], device=setup.device) for i in range(calls)]

    torch._dynamo.reset()
    runs, systems = {}, {}
    for i, (name, model) in enumerate(models.items()):
        step = decode_step(model, data)
        compiled = torch.compile(own_code(step, f"step_{i}"), fullgraph=True, backend=backend)
        plain_cache = filled_cache(model, step, prompt, setup.prompt_length, calls)
        compiled_cache = filled_cache(model, step, prompt, setup.prompt_length, calls)
        expected = step(last, plain_cache, positions[0])
        synchronize(setup.device)
        start = time.perf_counter()
        got = compiled(last, compiled_cache, positions[0])
        synchronize(setup.device)
        compile_seconds = time.perf_counter() - start
        rewind(plain_cache, 1)
        rewind(compiled_cache, 1)
        scale = expected.float().abs().max().item()
        difference = (got.float() - expected.float()).abs().max().item() / scale
        if not difference <= TOLERANCE[setup.dtype]:
            raise RuntimeError(
                f"{name}: the compiled step's logits differ from the uncompiled step's by {difference:.2e} of the "
                f"largest logit (tolerance {TOLERANCE[setup.dtype]:.0e})"
            )
        variant = SYSTEMS[name] or (None, None)
        systems[name] = {
            "lora_implementation": variant[0],
            "router_candidates": variant[1],
            "compile_seconds": compile_seconds,
            "compiled_logits_difference": difference,
        }
        runs[(name, "uncompiled")] = (step, plain_cache)
        runs[(name, "compiled")] = (compiled, compiled_cache)
        print(f"{name}: compiled in {compile_seconds:.1f} s, logits within {difference:.1e} of the largest", flush=True)

    times = {key: [] for key in runs}
    torch._dynamo.config.error_on_recompile = True  # a guard failing while timed would time a compile
    try:
        for _ in range(setup.repeats):
            for key, (fn, cache) in runs.items():
                synchronize(setup.device)
                start = time.perf_counter()
                for position in positions:
                    fn(last, cache, position)
                synchronize(setup.device)
                times[key].append((time.perf_counter() - start) / calls)
                rewind(cache, calls)
    finally:
        torch._dynamo.config.error_on_recompile = False
    for name, row in systems.items():
        for kind in ("uncompiled", "compiled"):
            row[f"{kind}_ms"] = statistics.median(times[(name, kind)]) * 1e3
        row["compiled / uncompiled"] = row["compiled_ms"] / row["uncompiled_ms"]
        row["uncompiled / uncompiled base"] = row["uncompiled_ms"] / systems["base"]["uncompiled_ms"]
        row["compiled / compiled base"] = row["compiled_ms"] / systems["base"]["compiled_ms"]
    torch._dynamo.reset()
    generation = time_generate(models, data, setup, backend)
    setting = {
        k: v
        for k, v in asdict(setup).items()
        if k in ("d_model", "d_kv", "d_ff", "num_heads", "num_layers", "vocab_size", "rank", "top_k", "embedding_dim")
    }
    setting |= {"experts": setup.experts[0], "batch": setup.generate_batch, "prompt_length": setup.prompt_length}
    setting |= {"prefill": prefill, "device": setup.device, "dtype": setup.dtype, "backend": backend}
    setting |= {"repeats": setup.repeats, "calls": calls, "new_tokens": setup.new_tokens}
    return {"setting": setting, "systems": systems, "generate": generation}


def time_generate(models: dict, data: dict, setup: Setup, backend: str) -> dict:
    """Greedy `generate` of `setup.new_tokens` tokens end to end, for the systems of `GENERATE_SYSTEMS`: uncompiled
    (dynamic cache), and with a static cache and a `CompileConfig`, whose decoding step `generate` compiles itself (as
    it does unasked on an accelerator). The compiled run must give the uncompiled tokens. Medians of interleaved runs."""
    compile_config = CompileConfig(fullgraph=True, backend=backend)
    compile_config._compile_all_devices = True  # on a CPU too
    n = setup.new_tokens
    runs, rows = {}, {}
    for name, system in GENERATE_SYSTEMS.items():
        model = models[system]
        routing = {} if SYSTEMS[system] is None else {"instruction_embeddings": data["instruction_embeddings"]}
        settings = {"input_ids": data["input_ids"], "max_new_tokens": n, "min_new_tokens": n, "do_sample": False}
        runs[name, "uncompiled"] = functools.partial(model.generate, **settings, **routing)
        runs[name, "compiled"] = functools.partial(
            model.generate, **settings, **routing, cache_implementation="static", compile_config=compile_config
        )
    glider = models[GENERATE_SYSTEMS["glider (auto)"]]
    implementation, glider.config.lora_implementation = glider.config.lora_implementation, "auto"
    times = {key: [] for key in runs}
    try:
        for name in GENERATE_SYSTEMS:
            expected = runs[name, "uncompiled"]()
            synchronize(setup.device)
            start = time.perf_counter()
            got = runs[name, "compiled"]()
            synchronize(setup.device)
            rows[name] = {"compile_seconds": time.perf_counter() - start}  # the first call: compiles, then generates
            if not torch.equal(got, expected):
                raise RuntimeError(f"{name}: compiled generate gave other tokens than uncompiled generate")
            print(f"{name}: generate compiled in {rows[name]['compile_seconds']:.1f} s, same tokens", flush=True)
        torch._dynamo.config.error_on_recompile = True
        for _ in range(setup.repeats):
            for key, fn in runs.items():
                synchronize(setup.device)
                start = time.perf_counter()
                fn()
                synchronize(setup.device)
                times[key].append(time.perf_counter() - start)
    finally:
        glider.config.lora_implementation = implementation
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    for name, row in rows.items():
        for kind in ("uncompiled", "compiled"):
            row[f"{kind}_ms_per_token"] = statistics.median(times[name, kind]) * 1e3 / n
    for row in rows.values():
        for kind in ("uncompiled", "compiled"):
            row[f"{kind} / {kind} base"] = row[f"{kind}_ms_per_token"] / rows["base"][f"{kind}_ms_per_token"]
    return rows


def markdown(report: dict) -> str:
    s, m = report["setting"], report["machine"]
    device = f"{m['gpu']} ({s['device']}), " if "gpu" in m else ""
    lines = [
        f"Machine: {device}{m['cpu']} ({m['cpus']} CPUs), {m['torch_threads']} torch threads, torch {m['torch']}, "
        f"{m['date']}. Command: `{report['command']}`.",
        "",
        f"One decoding step: T5 d_model {s['d_model']}, d_ff {s['d_ff']}, {s['num_layers']}+{s['num_layers']} layers, "
        f"{s['experts']} experts r {s['rank']} on every linear, top-{s['top_k']}, {s['batch']} queries of different "
        f"tasks, prompts of {s['prompt_length']} tokens, decoder tokens {s['prefill'] + 1}-{s['prefill'] + s['calls']} "
        "with static caches, "
        f"{DTYPE_SHORT[s['dtype']]}; `torch.compile(fullgraph=True)`, backend {s['backend']}. Medians of "
        f"{s['repeats']} timings of {s['calls']} steps each, interleaved. Logits difference: the largest between the "
        "compiled and the uncompiled step, over the largest logit.",
        "",
        "| system | uncompiled (ms) | compiled (ms) | compiled / uncompiled | uncompiled / uncompiled base "
        "| compiled / compiled base | compile (s) | logits difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["systems"].items():
        lines.append(
            f"| {name} | {r['uncompiled_ms']:.2f} | {r['compiled_ms']:.2f} | {r['compiled / uncompiled']:.2f} | "
            f"{r['uncompiled / uncompiled base']:.2f} | {r['compiled / compiled base']:.2f} | "
            f"{r['compile_seconds']:.1f} | {r['compiled_logits_difference']:.1e} |"
        )
    lines += [
        "",
        f"Greedy `generate` of {s['new_tokens']} tokens end to end (encoder, prefill and steps), the same queries: "
        "uncompiled with a dynamic cache; compiled: a static cache and a `CompileConfig` (fullgraph, the backend "
        "above), `generate` compiling its decoding step itself. Compile: the first compiled call, generation "
        "included. The compiled tokens equal the uncompiled ones.",
        "",
        "| system | uncompiled (ms/token) | compiled (ms/token) | uncompiled / uncompiled base | compiled / compiled base "
        "| compile (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["generate"].items():
        lines.append(
            f"| {name} | {r['uncompiled_ms_per_token']:.2f} | {r['compiled_ms_per_token']:.2f} | "
            f"{r['uncompiled / uncompiled base']:.2f} | {r['compiled / compiled base']:.2f} | "
            f"{r['compile_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny dimensions, 8 experts, 2 repeats: a smoke run")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default: %(default)s)")
    parser.add_argument("--repeats", type=int, help="timings per system (default: 15)")
    parser.add_argument("--calls", type=int, default=20, help="steps per timing (default: %(default)s)")
    parser.add_argument("--prefill", type=int, default=4, help="tokens in the self-attention cache before the step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations (default: float32)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    args = parser.parse_args(argv)
    problem = check_device(args.device)
    if problem is not None:
        print(f"bench_compile.py: error: {problem}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    transformers_logging.set_verbosity_error()
    setup = TINY if args.quick else SMALL
    setup = replace(setup, device=args.device, dtype=args.dtype, repeats=args.repeats or setup.repeats)
    report = {"command": "python -m benchmarks.bench_compile " + " ".join(sys.argv[1:] if argv is None else argv)}
    # every compile cold, whatever an earlier run left on disk; and in this process: no worker pool beside the timings
    with torch._inductor.config.patch(force_disable_caches=True, compile_threads=1):
        report |= {"machine": machine(args.device)} | run(setup, args.backend, args.prefill, args.calls)
    text = markdown(report)
    print(text)
    name = "bench_compile_quick" if args.quick else "bench_compile"
    for value, default in [
        (torch.device(args.device).type, "cpu"),
        (args.dtype, "float32"),
        (args.backend, "inductor"),
    ]:
        name += f"_{value}" if value != default else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
