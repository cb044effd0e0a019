"""Resident memory and time of serving a large expert library with its experts offloaded (`expert_offload="disk"`).

    python benchmarks/bench_offload.py            # t5-small dimensions, 1000 experts r16, bf16
    python benchmarks/bench_offload.py --quick    # tiny dimensions: a smoke run

A GliderT5 with E random experts (r 16 on every linear, Phatgoose gates, a 768-d instruction embedding each) is made
in bf16 and saved. Then, each in a fresh Python process (so its resident-set high-water mark, Linux VmHWM, is that of
the measured work alone), the saved model is loaded and serves: once with every expert in memory, once with
`expert_offload="disk"` and a cache of `SERVE_TASKS x CANDIDATES` experts; both with `router_candidates = CANDIDATES`
(the same routing). Serving: one greedy `generate` of a short query (the first answer), then the high-water mark is
reset and one batched greedy `generate` answers `SERVE_QUERIES` queries of `SERVE_TASKS` tasks (the queries of a task
share its instruction embedding: the task expert's own plus noise), then a second batch of the same tasks (the cache
already warm). The floor is what must be resident: the base's bytes plus the bytes of the experts the batch may use
(the union of its queries' candidates); the goal is at most 1.25x that floor. `growth` is the peak minus the resident
set after the imports (Python, torch, transformers), the memory the model and its serving take.
"""

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.bench_scale import EMBED_DIM, _memory_bytes, _reset_peak, machine  # noqa: E402

SERVE_QUERIES, SERVE_TASKS, CANDIDATES, QUERY_TOKENS, NEW_TOKENS = 32, 10, 4, 16, 8
FULL = {"name": "t5-small", "d_model": 512, "d_ff": 2048, "num_heads": 8, "num_layers": 6, "vocab_size": 32128,
        "experts": 1000, "rank": 16}  # fmt: skip
QUICK = {"name": "tiny", "d_model": 64, "d_ff": 256, "num_heads": 4, "num_layers": 2, "vocab_size": 512,
         "experts": 60, "rank": 4}  # fmt: skip
LINEARS = ["q", "k", "v", "o", "wi", "wo"]


def write_model(setup: dict, folder: Path) -> None:
    """A GliderT5 of random experts, made in bf16 and saved (no expert directories: the served files are what count)."""
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.utils import logging as transformers_logging

    from configuration_glider import GliderConfig
    from modeling_glider import GliderT5ForConditionalGeneration
    from modeling_glider.routing import GliderLinear

    transformers_logging.disable_progress_bar()
    d = setup["d_model"]
    experts = [
        {
            "name": f"task{i}",
            "instruction": f"Task {i}.",
            "target_modules": LINEARS,
            "r": setup["rank"],
            "lora_alpha": 1,
        }
        for i in range(setup["experts"])
    ]
    dims = dict(
        vocab_size=setup["vocab_size"], d_model=d, d_kv=d // setup["num_heads"], d_ff=setup["d_ff"],
        num_layers=setup["num_layers"], num_heads=setup["num_heads"], feed_forward_proj="relu",
        decoder_start_token_id=0,
    )  # fmt: skip
    config = GliderConfig(**dims, experts=experts, instruction_embedding_dim=EMBED_DIM, router_top_k=2)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = GliderT5ForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, GliderLinear) and module.num_experts:
                module.lora_A.normal_(std=0.02)
                module.lora_B.normal_(std=0.02)
                module.router_gate.normal_()
        model.global_router.expert_embeddings.normal_()
    model.save_pretrained(folder)
    # the plain T5 with these base weights: what serving the same batch costs without any expert
    base = T5ForConditionalGeneration(T5Config(**dims)).to(torch.bfloat16)
    base.load_state_dict(model.state_dict(), strict=False)
    base.save_pretrained(folder.parent / "base")


def expert_bytes(model) -> int:
    """Bytes of one expert as stored: A, B and gate at every linear (what the cache holds per expert)."""
    from modeling_glider.routing import GliderLinear

    total = 0
    for module in model.modules():
        if isinstance(module, GliderLinear) and module.num_experts:
            rows = sum(torch.Size(shape[1:]).numel() for shape in module.expert_tensor_shapes())
            total += rows * module.weight.element_size()
    return total


def serve(folder: str, offload: str) -> dict:
    """Load the saved model (`offload`: "disk", "cpu", "none" = every expert in memory, "base" = the plain T5 alone)
    and serve the first answer and two batches; memory and times."""
    from safetensors import safe_open
    from transformers import T5ForConditionalGeneration
    from transformers.utils import logging as transformers_logging

    from modeling_glider import GliderT5ForConditionalGeneration

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    with safe_open(Path(folder) / "model.safetensors", "pt") as file:  # the instructions come from the experts
        expert_embeddings = file.get_tensor("global_router.expert_embeddings").float()
    rss_before, _ = _memory_bytes()
    start = time.perf_counter()
    if offload == "base":
        model = T5ForConditionalGeneration.from_pretrained(Path(folder).parent / "base", dtype=torch.bfloat16)
    else:
        options = {"router_candidates": CANDIDATES}
        if offload != "none":
            options.update(expert_offload=offload, expert_cache_size=SERVE_TASKS * CANDIDATES)
        model = GliderT5ForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, **options)
    model.eval()
    load_seconds = time.perf_counter() - start
    _, load_peak = _memory_bytes()
    num_experts, vocab = expert_embeddings.shape[0], model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    task_experts = [i * num_experts // SERVE_TASKS for i in range(SERVE_TASKS)]
    noise = torch.randn(SERVE_TASKS, EMBED_DIM, generator=generator) * expert_embeddings.std()
    instructions = expert_embeddings[task_experts] + 0.5 * noise  # cosine ~0.9 with the task's own expert
    greedy = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, "num_beams": 1}

    def batch(tasks: list[int]) -> dict:
        ids = torch.randint(2, vocab, (len(tasks), QUERY_TOKENS), generator=generator)
        ids[:, -1] = model.config.eos_token_id
        return (
            {"input_ids": ids}
            if offload == "base"
            else {"input_ids": ids, "instruction_embeddings": instructions[tasks]}
        )

    tasks = [i % SERVE_TASKS for i in range(SERVE_QUERIES)]
    used, per_expert = 0, 0
    with torch.no_grad():
        model.generate(**batch([0]), **greedy)
        first_answer = time.perf_counter() - start
        if offload != "base":
            candidates = model.routing_candidates(model.global_routing_logits(instructions[tasks]))
            used, per_expert = len(set(candidates.flatten().tolist()) - {-1}), expert_bytes(model)
        reset = _memory_bytes()[0] if _reset_peak() else None
        times = []
        for _ in range(2):  # the second batch finds its experts in the cache
            start = time.perf_counter()
            model.generate(**batch(tasks), **greedy)
            times.append(time.perf_counter() - start)
    rss, peak = _memory_bytes()
    offloaded = {"lora_A", "lora_B", "router_gate"}
    params = {id(p): p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] not in offloaded}
    base = sum(p.numel() * p.element_size() for p in params.values())
    cache = getattr(model, "expert_cache", None)
    return {
        "offload": offload, "rss_before": rss_before, "load_seconds": load_seconds, "load_peak": load_peak,
        "first_answer_seconds": first_answer, "serve_seconds": times, "rss_at_reset": reset, "peak": peak,
        "rss_after": rss, "base_bytes": base, "bytes_per_expert": per_expert, "experts": num_experts,
        "used_experts": used, "floor": base + used * per_expert,
        "resident_experts": len(cache.resident()) if cache is not None else (0 if offload == "base" else num_experts),
    }  # fmt: skip


def run_child(args: list[str]) -> dict:
    process = subprocess.run([sys.executable, __file__, "child", *args], capture_output=True, text=True)
    if process.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    m, s = report["machine"], report["setup"]
    lines = [
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['cpu']} ({m['cpus']} CPUs, {m['memory_gib']} GiB), torch {m['torch']}, {m['date']}. "
        f"{report['note']}",
        "",
        f"Model: {s['name']} dimensions (d_model {s['d_model']}, d_ff {s['d_ff']}, {s['num_layers']}+"
        f"{s['num_layers']} layers, vocab {s['vocab_size']}), {s['experts']} random experts r {s['rank']} on every "
        f"linear, bf16, one file of {report['file_bytes'] / 2**30:.2f} GiB. router_candidates = {CANDIDATES}, top-2. "
        f"Serving: {SERVE_QUERIES} queries of {SERVE_TASKS} tasks per batch ({NEW_TOKENS} new tokens, greedy), "
        "one thread. Floor = base + the experts the batch may use (the union of its queries' candidates); growth = "
        "peak - resident set after the imports. The file was just written: its pages are in the kernel's page cache "
        "(not counted in the process's resident set), so the reads are memory copies, not disk reads.",
        "",
        "Against the plain T5 (the same base weights, no experts, serving the same token ids): its growth and peak "
        "plus the experts' bytes are what the GliderT5 cannot do without; the goal is at most 1.25x that.",
        "",
        "| model | load (s) | first answer (s) | batch (s), cold / warm cache | experts used | base + used (GiB) "
        "| serve peak (GiB) | serve growth (GiB) | growth / (base + used) | growth / (plain T5's growth + used) "
        "| peak / (plain T5's peak + used) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain = next(r for r in report["results"] if r["offload"] == "base")
    for r in report["results"]:
        where = {"base": "plain T5, no experts", "none": "GliderT5, every expert in memory"}.get(
            r["offload"], f"GliderT5, expert_offload={r['offload']!r}, cache {SERVE_TASKS * CANDIDATES}"
        )
        growth, used = r["peak"] - r["rss_before"], r["used_experts"] * r["bytes_per_expert"]
        lines.append(
            f"| {where} | {r['load_seconds']:.1f} | {r['first_answer_seconds']:.1f} | "
            f"{r['serve_seconds'][0]:.1f} / {r['serve_seconds'][1]:.1f} | {r['used_experts']} | "
            f"{r['floor'] / 2**30:.3f} | {r['peak'] / 2**30:.2f} | {growth / 2**30:.2f} | {growth / r['floor']:.2f} | "
            f"{growth / (plain['peak'] - plain['rss_before'] + used):.2f} | {r['peak'] / (plain['peak'] + used):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "child":
        torch.set_num_threads(1)
        if argv[1] == "write":
            write_model(json.loads(argv[2]), Path(argv[3]))
            print(json.dumps({}))
        else:
            print(json.dumps(serve(argv[2], argv[1])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny dimensions: a smoke run")
    parser.add_argument("--work", type=Path, help="folder for the model (default: a temporary one)")
    parser.add_argument("--note", default="", help="a sentence for the report (e.g. that the machine was shared)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else FULL
    name = "bench_offload_quick" if args.quick else "bench_offload"
    with tempfile.TemporaryDirectory(prefix="bench-offload-", dir=args.work) as work:
        folder = Path(work) / "model"
        start = time.perf_counter()
        run_child(["write", json.dumps(setup), str(folder)])
        file_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        print(f"wrote {setup['experts']} experts: {file_bytes / 2**30:.2f} GiB ({time.perf_counter() - start:.0f} s)")
        results = []
        for offload in ("base", "disk", "none"):
            results.append(run_child([offload, str(folder)]))
            print(json.dumps(results[-1]), flush=True)
    report = {
        "command": shlex.join(["python", "benchmarks/bench_offload.py", *argv]), "note": args.note,
        "machine": machine(), "setup": setup, "file_bytes": file_bytes, "results": results,
    }  # fmt: skip
    text = markdown(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
