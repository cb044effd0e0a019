"""benchmarks/bench_speed.py at toy sizes: every code path runs, the baselines compute what they claim (the
reference-loop rebuild equals GliderT5; PEFT's adapters equal GliderT5 routed to one expert), the report is written.
No timing is asserted."""

import json
from dataclasses import replace

import pytest
import torch
from transformers import T5ForConditionalGeneration

from benchmarks.bench_speed import (
    DIMS,
    QUICK,
    SYSTEMS,
    WORKLOADS,
    Setup,
    build_base,
    build_glider,
    build_peft,
    main,
    make_inputs,
    run_benchmark,
    t5_config,
)
from benchmarks.reference_loop import ReferenceExpert, reference_loop_model

TINY = Setup(
    d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, vocab_size=64, experts=(2, 3), rank=4, embedding_dim=8,
    encoder_batch=2, encoder_length=70, generate_batch=2, prompt_length=6, new_tokens=3, beams=2, repeats=1,
)  # fmt: skip


def test_reference_loop_equals_glider_and_runs_every_expert():
    base = build_base(TINY)
    glider = build_glider(base, TINY, num_experts=3)
    reference = reference_loop_model(glider)
    data = make_inputs(TINY, glider)["forward"]
    calls = []
    for module in reference.modules():
        if isinstance(module, ReferenceExpert):
            module.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        kwargs = {"input_ids": data["input_ids"], "decoder_input_ids": data["input_ids"][:, :4]}
        expected = glider(**kwargs, instruction_embeddings=data["instruction_embeddings"]).logits
        got = reference(**kwargs, instruction_embeddings=data["instruction_embeddings"]).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    linears = 2 * (7 + 11)  # encoder and decoder blocks, every linear adapted
    assert len(calls) == linears * 3 and 0 in calls  # every expert at every linear, chosen or not


def test_peft_adapters_equal_glider_routed_to_one_expert():
    setup = Setup(**{**TINY.__dict__, "top_k": 1, "global_routing_scale": 1e4})
    base = build_base(setup)
    glider = build_glider(base, setup, num_experts=3)
    peft_model = build_peft(base, glider, setup)
    ids = torch.randint(2, setup.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    chosen = [2, 0, 1]
    u = glider.global_router.expert_embeddings[chosen]  # alpha 1e4: each row uses its expert at every token
    with torch.no_grad():
        expected = glider(input_ids=ids, decoder_input_ids=ids[:, :4], instruction_embeddings=u).logits
        got = peft_model(
            input_ids=ids, decoder_input_ids=ids[:, :4], adapter_names=[f"expert_{i}" for i in chosen]
        ).logits
        assert not torch.allclose(got, base(input_ids=ids, decoder_input_ids=ids[:, :4]).logits, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_benchmark_runs_every_system_and_writes_its_report(tmp_path):
    report = run_benchmark(TINY, tmp_path, name="tiny", command="test")
    assert json.loads((tmp_path / "tiny.json").read_text())["ratios"] == json.loads(json.dumps(report["ratios"]))
    markdown = (tmp_path / "tiny.md").read_text()
    assert "| 3 | beam |" in markdown and "growth" in markdown
    for result in report["results"]:
        for workload in WORKLOADS:
            assert set(result["seconds"][workload]) == set(SYSTEMS)
            assert all(t > 0 for t in result["seconds"][workload].values())
            assert all(p is not None for p in result["call_peak_mib"][workload].values())
        assert result["weights_mib"]["glider"] - result["weights_mib"]["base"] >= result["lora_and_gates_mib"] > 0
    assert report["ratios"]["growth"]["greedy: glider E=3/E=2"] > 0


def test_main_runs_a_preset_in_bfloat16_and_names_its_results(tmp_path):
    argv = ["--quick", "--dims", "d256", "--layers", "1", "--experts", "4", "--repeats", "1", "--threads", "1"]
    argv += ["--systems", "base", "glider", "--dtype", "bfloat16", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bench_speed_quick_d256_bfloat16.json",
        "bench_speed_quick_d256_bfloat16.md",
    ]
    report = json.loads((tmp_path / "bench_speed_quick_d256_bfloat16.json").read_text())
    assert report["setup"]["dtype"] == "bfloat16" and report["setup"]["d_model"] == 256
    with torch.device("meta"):  # the parameter count of the preset, independently of the benchmark's builders
        reference = T5ForConditionalGeneration(t5_config(replace(QUICK, **(DIMS["d256"] | {"num_layers": 1}))))
    unique = {id(p): p.numel() for p in reference.parameters()}
    assert report["results"][0]["weights_mib"]["base"] == pytest.approx(sum(unique.values()) * 2 / 2**20, rel=1e-3)
    for result in report["results"]:
        assert all(set(t) == {"base", "glider"} for t in result["seconds"].values())
    markdown = (tmp_path / "bench_speed_quick_d256_bfloat16.md").read_text()
    assert "bf16" in markdown and "peft" not in markdown and "glider/base" in markdown


@pytest.mark.parametrize(
    "device, message",
    [("cuda", "CUDA is not available"), ("cuda:3", "CUDA is not available"), ("tpu9", "not a torch device")],
)
def test_an_unusable_device_is_one_line_error_naming_it(tmp_path, capsys, device, message):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("checks the error of a machine without CUDA; this one has it")
    assert main(["--quick", "--device", device, "--dtype", "bfloat16", "--dims", "t5-xl", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench_speed.py: error: --device ")
    assert device in err and message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())
