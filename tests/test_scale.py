"""Building large libraries: the streaming build (each adapter read once, into the model), build dtypes, and sharded
saves. References are the expert files themselves, read here with safetensors, and the base's own tensors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import T5Config, T5ForConditionalGeneration

from modeling_glider import GliderT5ForConditionalGeneration
from modeling_glider import experts as experts_module
from modeling_glider.library import build_library
from modeling_glider.routing import GliderLinear
from tests.conftest import EMBED_DIM, make_base, make_expert
from tests.hostile.test_expert_inputs import tree_hashes


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A base saved to disk and three experts of different ranks and module sets, with gates and embeddings."""
    root = tmp_path_factory.mktemp("scale")
    base = make_base(seed=3)
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(0)
    dirs = [
        make_expert(root, base, "a", r=2, seed=1, embedding=torch.randn(EMBED_DIM, generator=g)),
        make_expert(root, base, "b", r=4, targets=("q", "v", "wo"), seed=2, embedding=torch.randn(EMBED_DIM, generator=g)),
        make_expert(root, base, "c", r=3, rank_pattern={"k": 1}, seed=3, embedding=torch.randn(EMBED_DIM, generator=g)),
    ]  # fmt: skip
    return root, base, dirs


def expected_slots(directory, path):
    """An expert's A, B and gate at `path`, read from its files here."""
    lora = load_file(directory / "adapter_model.safetensors")
    gates = load_file(directory / "glider_expert.safetensors")
    prefix = f"base_model.model.{path}"
    return lora[f"{prefix}.lora_A.weight"], lora[f"{prefix}.lora_B.weight"], gates[f"gate.{path}"]


def assert_holds_the_files(model, dirs):
    """Every slot of every routed linear holds its expert's tensors from the files (cast to the linear's dtype), zero
    beyond its rank."""
    checked = 0
    for path, module in model.named_modules():
        if not isinstance(module, GliderLinear) or not module.num_experts:
            continue
        for slot, expert_id in enumerate(module.expert_ids):
            A, B, gate = expected_slots(dirs[expert_id], path)
            rank, dtype = A.shape[0], module.weight.dtype
            assert torch.equal(module.lora_A[slot, :rank], A.to(dtype)), path
            assert torch.equal(module.lora_B[slot, :, :rank], B.to(dtype)), path
            assert torch.equal(module.router_gate[slot], gate.to(dtype)), path
            assert not module.lora_A[slot, rank:].any() and not module.lora_B[slot, :, rank:].any()
            checked += 1
    assert checked > 20


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_streaming_build_reads_each_adapter_tensor_once_and_one_expert_at_a_time(library, monkeypatch, dtype):
    root, base, dirs = library
    reads, open_adapters, most_open = {}, set(), [0]
    real_safe_open, real_load_file = experts_module.safe_open, experts_module.load_file

    class CountingFile:
        def __init__(self, path, framework):
            self.path, self.file = str(path), real_safe_open(path, framework)

        def __enter__(self):
            if self.path.endswith("adapter_model.safetensors"):
                open_adapters.add(self.path)
                most_open[0] = max(most_open[0], len(open_adapters))
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            open_adapters.discard(self.path)
            return self.file.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_slice(self, key):
            return self.file.get_slice(key)

        def get_tensor(self, key):
            reads[(self.path, key)] = reads.get((self.path, key), 0) + 1
            return self.file.get_tensor(key)

    def load_file_but_not_adapters(path, *args, **kwargs):
        assert not str(path).endswith("adapter_model.safetensors"), f"{path} read whole"
        return real_load_file(path, *args, **kwargs)

    monkeypatch.setattr(experts_module, "safe_open", CountingFile)
    monkeypatch.setattr(experts_module, "load_file", load_file_but_not_adapters)
    model = GliderT5ForConditionalGeneration.from_experts(root / "base", dirs, top_k=2, dtype=dtype)

    for directory in dirs:
        path = str(directory / "adapter_model.safetensors")
        with real_safe_open(path, "pt") as file:
            assert all(reads.get((path, key)) == 1 for key in file.keys()), path
    assert most_open[0] == 1
    assert_holds_the_files(model, dirs)


def test_a_base_given_as_a_model_is_copied_and_tied_weights_stay_tied(library):
    root, base, dirs = library
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2)
    assert model.shared.weight is model.encoder.embed_tokens.weight is model.decoder.embed_tokens.weight
    assert model.lm_head.weight is model.shared.weight  # the tiny T5 ties its embeddings, as does the base
    assert base.lm_head.weight is base.shared.weight
    for name, tensor in model.state_dict().items():
        if name in before:
            assert torch.equal(tensor, before[name]), name
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # the model's weights are its own: the caller's base does not change
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16, "float32"])
def test_build_dtype_stores_base_and_experts_in_it_and_routes_in_fp32(library, dtype):
    root, base, dirs = library
    model = GliderT5ForConditionalGeneration.from_experts(root / "base", dirs, top_k=2, dtype=dtype)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    fp32 = [".global_router.", "lora_scaling"] + ([".wo."] if dtype == torch.float16 else [])  # T5's fp16 wo
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            expected = torch.float32 if any(part in f".{name}" for part in fp32) else dtype
            assert tensor.dtype == expected, (name, tensor.dtype)
    assert_holds_the_files(model, dirs)
    for name, tensor in base.state_dict().items():  # the base's weights, cast
        assert torch.equal(model.state_dict()[name], tensor.to(model.state_dict()[name].dtype)), name
    scalings = model.encoder.block[0].layer[0].SelfAttention.q.lora_scaling
    assert scalings.dtype == torch.float32
    assert torch.equal(scalings, torch.tensor([8 / 2, 8 / 4, 8 / 3]))  # lora_alpha / r of a, b, c, in fp32
    embeddings = torch.stack([load_file(d / "glider_expert.safetensors")["instruction_embedding"] for d in dirs])
    assert torch.equal(model.global_router.expert_embeddings, embeddings)
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=ids[:, :2], instruction_embeddings=embeddings[:1]).logits
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_sharded_bf16_library_saves_with_an_index_and_loads_back_bit_exact(library, tmp_path):
    root, base, dirs = library
    model = build_library(root / "base", dirs, tmp_path / "built", top_k=2, dtype="bfloat16", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "built").glob("model-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "built" / "model.safetensors").exists()
    index = json.loads((tmp_path / "built" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    stored = {}
    for shard in shards:
        assert (tmp_path / "built" / shard).stat().st_size <= 40_000 + 8192  # safetensors header aside
        with safe_open(tmp_path / "built" / shard, "pt") as file:
            stored |= {key: file.get_tensor(key) for key in file.keys()}
    assert {t.dtype for k, t in stored.items() if not k.startswith("global_router")} == {torch.bfloat16}
    assert stored["global_router.expert_embeddings"].dtype == torch.float32

    loaded = GliderT5ForConditionalGeneration.from_pretrained(tmp_path / "built", dtype=torch.bfloat16)
    expected, got = model.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
    ids = torch.tensor([[5, 6, 7, 1]])
    u = torch.randn(1, EMBED_DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=ids, decoder_input_ids=ids[:, :2], instruction_embeddings=u).logits,
            model(input_ids=ids, decoder_input_ids=ids[:, :2], instruction_embeddings=u).logits,
        )


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"dtype": torch.float64}, "dtype must be one of"),
        ({"dtype": "bf16"}, "'bf16'"),
        ({"max_shard_size": 0}, "max_shard_size"),
        ({"max_shard_size": "-5GB"}, "'-5GB'"),
        ({"max_shard_size": "1.5GB"}, "'1.5GB'"),
        ({"max_shard_size": "lots"}, "'lots'"),
        ({"max_shard_size": True}, "max_shard_size"),
    ],
)
def test_bad_dtype_and_shard_size_are_refused_before_anything_is_written(library, tmp_path, kwargs, culprit):
    root, base, dirs = library
    before = tree_hashes(root)
    with pytest.raises(ValueError, match=culprit):
        build_library(root / "base", dirs, tmp_path / "built", top_k=2, **kwargs)
    assert tree_hashes(root) == before and not (tmp_path / "built").exists()
    if "dtype" in kwargs:
        with pytest.raises(ValueError, match=rf"from_experts\(dtype=...\).*{culprit}"):
            GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2, **kwargs)


def test_an_adapter_changed_between_the_check_and_the_read_is_refused_naming_it(library, tmp_path, monkeypatch):
    root, base, dirs = library
    real_header = experts_module.read_expert_header

    def header_then_shrink(spec):
        expert = real_header(spec)
        if expert.name == "b":  # rewritten after its header was checked: another rank
            lora = load_file(dirs[1] / "adapter_model.safetensors")
            shrunk = {k: (v[:1] if ".lora_A." in k else v[:, :1]).contiguous() for k, v in lora.items()}
            save_file(shrunk, tmp_path / "shrunk.st")
            monkeypatch.setattr(expert, "directory", tmp_path / "b")
            (tmp_path / "b").mkdir()
            (tmp_path / "shrunk.st").rename(tmp_path / "b" / "adapter_model.safetensors")
        return expert

    monkeypatch.setattr(experts_module, "read_expert_header", header_then_shrink)
    with pytest.raises(ValueError, match=r"Expert 'b'.*lora_A.*adapter_model\.safetensors.*changed while"):
        GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2, local_router="arrow")


def test_bench_scale_quick_reports_the_library_it_built(tmp_path):
    """`benchmarks/bench_scale.py --quick` builds, loads and serves its libraries in fresh processes; its byte counts
    match a plain Transformers T5 of the same dimensions and the LoRA sizes counted here from the dimensions, and every
    task's expert serves its queries."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench_scale_quick.json").read_text())
    table = (tmp_path / "bench_scale_quick.md").read_text()
    assert report["command"] in table and report["machine"]["cpu"] in table
    rows = 0
    for entry in report["setups"]:
        s = entry["setup"]
        d, f, layers, r = s["d_model"], s["d_ff"], s["num_layers"], s["rank"]
        config = T5Config(
            vocab_size=s["vocab_size"], d_model=d, d_kv=d // s["num_heads"], d_ff=f, num_layers=layers,
            num_heads=s["num_heads"], feed_forward_proj="relu",
        )  # fmt: skip
        base_parameters = sum(p.numel() for p in T5ForConditionalGeneration(config).parameters())
        # every linear: 4 attention linears per encoder block, 8 per decoder block (self and cross), wi and wo each
        linears = [(d, d)] * (12 * layers) + [(d, f), (f, d)] * (2 * layers)
        lora_and_gates = sum(r * (d_in + d_out) + d_in for d_in, d_out in linears)
        assert [(row["experts"], row["dtype"]) for row in entry["results"]] == [tuple(run) for run in s["runs"]]
        for row in entry["results"]:
            size = getattr(torch, row["dtype"]).itemsize
            serve, experts = row["serve"], row["experts"]
            assert serve["base_bytes"] == base_parameters * size
            assert serve["expert_bytes"] == experts * (lora_and_gates * size + 768 * 4)  # 768-d embeddings, fp32
            assert (
                row["build"]["model_bytes"] == row["load"]["model_bytes"] >= serve["base_bytes"] + serve["expert_bytes"]
            )
            assert serve["tasks"] == min(10, experts) == len(set(serve["task_experts"]))
            assert serve["task_experts_used"] == serve["task_experts"] and serve["used_experts"] <= experts
            assert serve["first_answer_seconds"] > row["load"]["seconds"] > 0
            assert serve["peak"] >= serve["rss_at_reset"] > 0
            assert f"| {experts} | {row['dtype']} | " in table
            rows += 1
    assert rows == 2


def test_bench_offload_quick_serves_from_the_files_what_the_candidates_name(tmp_path):
    """`benchmarks/bench_offload.py --quick`: the plain T5, the offloaded and the in-memory GliderT5 serve in fresh
    processes; the offloaded one holds exactly the experts its batches' candidates name, and the byte counts match
    the dimensions counted here."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_offload.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench_offload_quick.json").read_text())
    assert report["command"] in (tmp_path / "bench_offload_quick.md").read_text()
    s = report["setup"]
    d, f, layers, r = s["d_model"], s["d_ff"], s["num_layers"], s["rank"]
    linears = [(d, d)] * (12 * layers) + [(d, f), (f, d)] * (2 * layers)
    per_expert = sum(r * (d_in + d_out) + d_in for d_in, d_out in linears) * 2  # bf16
    plain, disk, memory = (
        next(row for row in report["results"] if row["offload"] == o) for o in ("base", "disk", "none")
    )
    assert disk["bytes_per_expert"] == memory["bytes_per_expert"] == per_expert
    assert plain["base_bytes"] == disk["base_bytes"] == memory["base_bytes"]
    assert 0 < disk["used_experts"] == memory["used_experts"] == disk["resident_experts"] <= 40 < s["experts"]
    assert memory["resident_experts"] == s["experts"]
