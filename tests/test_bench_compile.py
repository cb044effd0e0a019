"""benchmarks/bench_compile.py at toy sizes with the `eager` backend (tracing, no code generation): every system
compiles as one graph, its logits are checked against the uncompiled step's, the report is written. No timing is
asserted."""

import json

import pytest
import torch

from benchmarks.bench_compile import GENERATE_SYSTEMS, SYSTEMS, TINY, TOLERANCE, main, run, time_generate
from benchmarks.bench_speed import build_base, build_glider, make_inputs


def test_quick_run_reports_every_system_compiled_and_not(tmp_path):
    argv = ["--quick", "--backend", "eager", "--repeats", "1", "--calls", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bench_compile_quick_eager.json",
        "bench_compile_quick_eager.md",
    ]
    report = json.loads((tmp_path / "bench_compile_quick_eager.json").read_text())
    assert report["machine"]["cpu"] and report["setting"]["backend"] == "eager"
    assert report["setting"]["batch"] == 8 and report["setting"]["calls"] == 2
    assert list(report["systems"]) == list(SYSTEMS)
    base = report["systems"]["base"]
    for name, row in report["systems"].items():
        assert (row["lora_implementation"], row["router_candidates"]) == (SYSTEMS[name] or (None, None))
        assert row["compile_seconds"] > 0 and row["uncompiled_ms"] > 0 and row["compiled_ms"] > 0
        assert 0 <= row["compiled_logits_difference"] <= TOLERANCE["float32"]
        assert row["compiled / compiled base"] == pytest.approx(row["compiled_ms"] / base["compiled_ms"])
        assert row["uncompiled / uncompiled base"] == pytest.approx(row["uncompiled_ms"] / base["uncompiled_ms"])
    assert list(report["generate"]) == list(GENERATE_SYSTEMS) and report["setting"]["new_tokens"] > 0
    base = report["generate"]["base"]
    for row in report["generate"].values():
        assert row["compile_seconds"] > 0
        for kind in ("uncompiled", "compiled"):
            ratio = row[f"{kind}_ms_per_token"] / base[f"{kind}_ms_per_token"]
            assert row[f"{kind} / {kind} base"] == pytest.approx(ratio)
    markdown = (tmp_path / "bench_compile_quick_eager.md").read_text()
    assert all(f"| {name} |" in markdown for name in SYSTEMS) and "compiled / compiled base" in markdown
    assert "ms/token" in markdown


def test_compiled_generate_that_changes_the_tokens_is_refused():
    def negated(graph, example_inputs, **options):  # a backend whose graphs negate every floating output
        def call(*args):
            return [-o if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in graph(*args)]

        return call

    base = build_base(TINY)
    models = {"base": base, "glider gather": build_glider(base, TINY, TINY.experts[0])}
    data = make_inputs(TINY, models["glider gather"])["generate"]
    try:
        with pytest.raises(RuntimeError, match="^base: compiled generate gave other tokens"):
            time_generate(models, data, TINY, negated)
    finally:
        torch._dynamo.reset()


def test_a_compiled_step_that_changes_the_logits_is_refused():
    def off_by_one(graph, example_inputs):  # a backend whose graphs return every floating output plus one
        def call(*args):
            return [o + 1 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in graph(*args)]

        return call

    try:
        with pytest.raises(RuntimeError, match="^base: the compiled step's logits differ"):
            run(TINY, off_by_one, prefill=2, calls=1)
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA; this one has it")
def test_cuda_without_a_gpu_is_one_line_error(tmp_path, capsys):
    assert main(["--quick", "--device", "cuda", "--dtype", "bfloat16", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench_compile.py: error: --device cuda: CUDA is not available")
    assert not any(tmp_path.iterdir())
