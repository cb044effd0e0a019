"""The model's own edges: caches, knobs set after loading, saved files that disagree with their config, half
precision, routing records, and changing the library while other threads generate. Each case either gives the answer
an independent reference gives, or a clear error that names the culprit and leaves files unchanged."""

import hashlib
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file, save_file

from modeling_glider import GliderLinear, GliderT5ForConditionalGeneration, RoutingRecord
from tests.conftest import EMBED_DIM, make_base, make_expert


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-model")
    base = make_base(seed=3)
    embeddings = torch.eye(4, EMBED_DIM)
    dirs = [make_expert(root, base, f"task{i}", r=3, seed=10 + i, embedding=embeddings[i]) for i in range(4)]
    return root, base, dirs


def build(library, experts=3, **overrides) -> GliderT5ForConditionalGeneration:
    _, base, dirs = library
    return GliderT5ForConditionalGeneration.from_experts(base, dirs[:experts], top_k=2, **overrides).eval()


@pytest.fixture(scope="module")
def saved(library):
    folder = library[0] / "saved"
    build(library, global_routing_scale=4.0).save_pretrained(folder)
    return folder


def inputs(rows: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(2, 64, (rows, 6), generator=g),
        "decoder_input_ids": torch.randint(2, 64, (rows, 5), generator=g),
        "instruction_embeddings": torch.randn(rows, EMBED_DIM, generator=g),
    }


def local_only(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "instruction_embeddings"}


# 1a. past_key_values, T5's deprecated-but-accepted name of the cache


@torch.no_grad()
def test_past_key_values_is_used_like_t5_uses_it(library):
    model, batch = build(library), inputs()
    full = model(**batch).logits[:, -1]
    prefix = model(**{**batch, "decoder_input_ids": batch["decoder_input_ids"][:, :-1]}, use_cache=True)
    step = model(
        encoder_outputs=(prefix.encoder_last_hidden_state,),
        decoder_input_ids=batch["decoder_input_ids"][:, -1:],
        past_key_values=prefix.past_key_values,
        instruction_embeddings=batch["instruction_embeddings"],
    ).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-4 * full.abs().max().item(), rtol=1e-4)


# 1b. gates written in every way a training loop or utility writes them: no stale normalised gates


def write_gates(model: GliderT5ForConditionalGeneration, how: str) -> None:
    gates = [m.router_gate for m in model.modules() if isinstance(m, GliderLinear) and m.num_experts]
    new = [torch.randn(g.shape, generator=torch.Generator().manual_seed(i)) for i, g in enumerate(gates)]
    if how == "data.copy_":
        for g, v in zip(gates, new):
            g.data.copy_(v)
    elif how == "data assignment":
        for g, v in zip(gates, new):
            g.data = v
    elif how == "in-place under no_grad":
        with torch.no_grad():
            for g, v in zip(gates, new):
                g.mul_(0).add_(v)
    elif how == "load_state_dict":
        state = model.state_dict()
        names = [n for n, m in model.named_modules() if isinstance(m, GliderLinear) and m.num_experts]
        model.load_state_dict({**state, **{f"{n}.router_gate": v for n, v in zip(names, new)}})
    elif how == ".to(float64) and back":
        model.to(torch.float64)
        for g, v in zip(gates, new):
            g.data.copy_(v)
        model.to(torch.float32)
    elif how == "optimizer":
        for p in model.parameters():
            p.requires_grad_(False)
        for g in gates:
            g.requires_grad_(True)
        optimizer = torch.optim.SGD(gates, lr=50.0)
        model(**local_only(inputs(seed=5))).logits.square().mean().backward()
        optimizer.step()
        for g in gates:
            g.requires_grad_(False)


@pytest.mark.parametrize(
    "how",
    [
        "data.copy_",
        "data assignment",
        "in-place under no_grad",
        "load_state_dict",
        ".to(float64) and back",
        "optimizer",
    ],
)
def test_gates_written_any_way_route_at_once(library, how):
    model, batch = build(library), local_only(inputs())  # the gates alone decide the routing
    with torch.no_grad():
        before = model(**batch).logits  # a call that would have filled any cache of the gates
    write_gates(model, how)
    with torch.no_grad():
        after = model(**batch).logits
        fresh = build(library)  # never ran: nothing cached; holds the written tensors
        fresh.load_state_dict(model.state_dict())
        expected = fresh(**batch).logits
    assert not torch.allclose(before, expected, atol=1e-3)  # the new gates change routing
    torch.testing.assert_close(after, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)


# 1c. what router_gate holds is recorded with the model


def test_local_router_cannot_reinterpret_saved_gates(saved):
    before = digest(saved)
    with pytest.raises(ValueError, match="local_router='arrow' was given.*local_router='phatgoose'"):
        GliderT5ForConditionalGeneration.from_pretrained(saved, local_router="arrow")
    model = GliderT5ForConditionalGeneration.from_pretrained(saved)
    with pytest.raises(ValueError, match="local_router describes the tensors"):
        model.config.local_router = "arrow"
    assert model.config.local_router == "phatgoose"
    assert digest(saved) == before


@pytest.mark.parametrize(
    "field, value",
    [("experts", []), ("instruction_embedding_dim", 4), ("instruction_embedding_model", "other-embedder")],
)
def test_library_fields_are_fixed_on_a_built_model(library, saved, field, value):
    model = build(library)
    with pytest.raises(ValueError, match=field):
        setattr(model.config, field, value)
    with pytest.raises(ValueError, match=field):
        GliderT5ForConditionalGeneration.from_pretrained(saved, **{field: value})


def test_expert_entries_cannot_change_in_place(library):
    model = build(library)
    with pytest.raises(TypeError, match="cannot change in place"):
        model.config.experts[0]["lora_alpha"] = 16
    with pytest.raises(TypeError, match="cannot change in place"):
        model.config.experts[0]["rank_pattern"]["q"] = 2
    with pytest.raises(TypeError, match="cannot change in place"):
        model.config.experts[0].update(r=2)
    model.config.experts[0]["source"] = "somewhere else"  # descriptive texts may change
    assert model.config.to_dict()["experts"][0]["source"] == "somewhere else"


# Knobs out of range, set on a loaded model's config: refused where they enter, the old value kept


@pytest.mark.parametrize(
    "field, value",
    [
        ("router_top_k", 0),
        ("router_top_k", 4),  # more than the 3 experts
        ("router_top_k", True),
        ("router_top_k", 1.5),
        ("router_top_p", 0),
        ("router_top_p", 1.5),
        ("router_top_p", math.nan),
        ("global_routing_scale", math.nan),
        ("global_routing_scale", math.inf),
        ("global_routing_scale_unmatched", -math.inf),
        ("global_routing_threshold", 1.5),
        ("global_routing_threshold", math.nan),
        ("global_routing_policy", "adaptive"),
        ("arrow_temperature", 0),
        ("arrow_temperature", math.inf),
        ("lora_implementation", "fastest"),
    ],
)
def test_knobs_set_after_loading_are_checked(saved, field, value):
    model = GliderT5ForConditionalGeneration.from_pretrained(saved)
    old = getattr(model.config, field)
    with pytest.raises((ValueError, TypeError, StrictDataclassError), match=field):
        setattr(model.config, field, value)
    assert getattr(model.config, field) == old or (
        old != old and getattr(model.config, field) != getattr(model.config, field)
    )


# Saved files whose config disagrees with the weights, or whose weights hold NaN: refused, naming the field/tensor


def edit_config(c, change):
    change(c)
    return c


CONFIG_EDITS = {
    "rank": (lambda c: c["experts"][0].update(r=2), r"rank 2 in config.json \(r, rank_pattern\)"),
    "target_modules": (lambda c: c["experts"][0].update(target_modules=["q"]), r"target_modules"),
    "embedding width": (lambda c: c.update(instruction_embedding_dim=4), r"instruction_embedding_dim"),
    "no global router": (lambda c: c.update(instruction_embedding_dim=None), r"instruction_embedding_dim"),
    "one expert more": (lambda c: c["experts"].append({**c["experts"][0], "name": "extra"}), r"experts"),
    "d_ff": (lambda c: c.update(d_ff=40), r"d_ff"),
    "NaN lora_alpha": (lambda c: c["experts"][1].update(lora_alpha=math.nan), r"'task1': 'lora_alpha'"),
    "string use_rslora": (lambda c: c["experts"][1].update(use_rslora="false"), r"'task1': 'use_rslora'"),
    "blank name": (lambda c: c["experts"][2].update(name="  "), r"Expert #2 needs a non-empty string 'name'"),
    "top_k zero": (lambda c: c.update(router_top_k=0), r"router_top_k"),
    "top_p zero": (lambda c: c.update(router_top_p=0.0), r"router_top_p"),
    "NaN alpha": (lambda c: c.update(global_routing_scale=math.nan), r"global_routing_scale"),
    "unknown local router": (lambda c: c.update(local_router="arow"), r"local_router"),
}


@pytest.mark.parametrize("edit", sorted(CONFIG_EDITS))
def test_config_that_disagrees_with_the_weights_is_refused(saved, tmp_path, edit):
    change, message = CONFIG_EDITS[edit]
    folder = tmp_path / "model"
    folder.mkdir()
    for file in saved.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit_config(config, change)))
    before = digest(folder)
    with pytest.raises(ValueError, match=message):
        GliderT5ForConditionalGeneration.from_pretrained(folder)
    assert digest(folder) == before


@pytest.mark.parametrize(
    "tensor",
    ["encoder.block.0.layer.0.SelfAttention.q.router_gate", "global_router.expert_embeddings", "shared.weight"],
)
def test_saved_nan_is_refused_naming_the_tensor(saved, tmp_path, tensor):
    folder = tmp_path / "model"
    folder.mkdir()
    for file in saved.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    weights = load_file(folder / "model.safetensors")
    weights[tensor][0, 0] = math.nan
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    before = digest(folder)
    with pytest.raises(ValueError, match=f"tensor {tensor} holds NaN or inf"):
        GliderT5ForConditionalGeneration.from_pretrained(folder)
    assert digest(folder) == before


# 1e. half precision keeps PEFT's LoRA scalings (Python floats), not their bf16/fp16 rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_exact_lora_scalings(library, saved, dtype):
    expected = 8 / 3  # make_expert's lora_alpha / r, as PEFT computes it; not representable in half precision
    assert torch.tensor(expected, dtype=dtype).item() != expected
    for model in (build(library).to(dtype), GliderT5ForConditionalGeneration.from_pretrained(saved, dtype=dtype)):
        scalings = [m.lora_scaling for m in model.modules() if isinstance(m, GliderLinear) and m.num_experts]
        assert scalings and all(s.dtype == torch.float32 for s in scalings)
        assert all(torch.allclose(s.double(), torch.full_like(s.double(), expected), rtol=1e-7) for s in scalings)


# 1f. routing records fold rows onto queries only when they divide


def test_routing_record_refuses_rows_that_do_not_fold_onto_the_batch():
    record = RoutingRecord()
    record.add("encoder.block.0.layer.0.SelfAttention.q", torch.ones(3, 2, 1), torch.zeros(3, 2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"SelfAttention.q routed 3 rows.*batch_size = 2"):
        record.module_usage(num_experts=2, batch_size=2)


# add_expert: all or nothing; and safe while other threads generate


def test_add_expert_failing_halfway_changes_nothing(library, monkeypatch):
    model = build(library)
    batch = inputs()
    with torch.no_grad():
        logits = model(**batch).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    experts = [dict(e) for e in model.config.experts]
    calls = {"n": 0}
    original = GliderLinear.set_experts

    def fails_on_the_fifth_linear(self, tensors=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise MemoryError("out of memory")
        original(self, tensors)

    monkeypatch.setattr(GliderLinear, "set_experts", fails_on_the_fifth_linear)
    with pytest.raises(MemoryError):
        model.add_expert(library[2][3])
    monkeypatch.setattr(GliderLinear, "set_experts", original)
    assert [dict(e) for e in model.config.experts] == experts
    assert [dict(e) for e in model.encoder.config.experts] == experts
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, logits, atol=0, rtol=0)  # the very same tensors
    model.add_expert(library[2][3])  # and the model still grows
    assert model.config.expert_names[-1] == "task3"


@torch.no_grad()
def test_library_changes_while_threads_generate(library):
    model = build(library)
    jobs = [inputs(rows=1, seed=s) for s in range(6)]
    common = dict(max_new_tokens=5, do_sample=False)

    def run(job):
        return model.generate(
            input_ids=job["input_ids"], instruction_embeddings=job["instruction_embeddings"], **common
        )

    three = [run(j) for j in jobs]
    model.add_expert(library[2][3])
    four = [run(j) for j in jobs]
    model.remove_expert("task3")

    stop = threading.Event()

    def churn():
        while not stop.is_set():
            model.add_expert(library[2][3])
            model.remove_expert("task3")

    changer = threading.Thread(target=churn)
    changer.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(run, jobs * 3))
    finally:
        stop.set()
        changer.join()
    for i, got in enumerate(results):
        options = (three[i % len(jobs)], four[i % len(jobs)])
        assert any(got.shape == o.shape and torch.equal(got, o) for o in options)
    assert model.config.expert_names == ["task0", "task1", "task2"]


# Precomputed global routing logits: one row per query and a logit per expert, finite


@pytest.mark.parametrize(
    "logits, error, message",
    [
        (torch.zeros(1, 3), ValueError, r"global_routing_logits must be \[rows, experts\] = \(2, 3\)"),
        (torch.zeros(2, 4), ValueError, r"global_routing_logits must be \[rows, experts\] = \(2, 3\)"),
        (torch.zeros(2, 3, 1), ValueError, r"global_routing_logits must be"),
        (torch.tensor([[0.0, math.nan, 0.0], [0.0, 0.0, 0.0]]), RuntimeError, r"global_routing_logits hold NaN or inf"),
        (torch.tensor([[0.0, 0.0, 0.0], [math.inf, 0.0, 0.0]]), RuntimeError, r"global_routing_logits hold NaN or inf"),
    ],
)
@torch.no_grad()
def test_bad_global_routing_logits_are_refused(library, logits, error, message):
    model, batch = build(library), local_only(inputs())
    with pytest.raises(error, match=message):
        model(**batch, global_routing_logits=logits)
    with pytest.raises(error, match=message):
        model.generate(input_ids=batch["input_ids"], global_routing_logits=logits, max_new_tokens=2)
