"""A reviewer's hostile and careless inputs across the Python API, the CLI and saved files. Each case gives the answer
an independent reference gives (plain T5, PEFT, a naive loop), or a clear error that names the culprit and leaves files
unchanged."""

import copy
import json
import math
import shutil

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file, save_file

from modeling_glider import GliderConfig, GliderT5ForConditionalGeneration
from tests.conftest import EMBED_DIM, make_base, make_expert
from tests.hostile.test_expert_inputs import tree_hashes


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("review")
    base = make_base(seed=4)
    base.save_pretrained(root / "base")
    embeddings = torch.eye(3, EMBED_DIM)
    dirs = [
        make_expert(root, base, f"e{i}", r=2 + i, lora_alpha=4 * (i + 1), seed=20 + i, embedding=embeddings[i])
        for i in range(3)
    ]
    model = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2, global_routing_scale=3.0).eval()
    model.save_pretrained(root / "saved")
    return root, base, dirs


def copy_folder(source, target):
    shutil.copytree(source, target)
    return target


def batch(rows: int = 2, seed: int = 0, embeddings: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {
        "input_ids": torch.randint(2, 64, (rows, 6), generator=g),
        "decoder_input_ids": torch.randint(2, 64, (rows, 4), generator=g),
    }
    if embeddings:
        out["instruction_embeddings"] = torch.randn(rows, EMBED_DIM, generator=g)
    return out


# --- config.json edits -------------------------------------------------------------------------------------------


def _edit(c, path, value):
    target = c
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return c


CONFIG_EDITS = [
    (("experts", 0, "rank_pattern"), {"q": 2.5}, "rank_pattern"),
    (("experts", 0, "r"), True, "'r'"),
    (("experts", 0, "target_modules"), ["("], "target_modules"),
    (("experts", 0, "rank_pattern"), {"(q": 2}, "rank_pattern"),
    (("experts", 0, "target_modules"), "q", "target_modules"),
    (("experts",), "e0", "experts"),
    (("experts", 0, "instruction"), 5, "instruction"),
    (("experts", 0, "lora_alpha"), "8", "lora_alpha"),
    (("experts", 0, "lora_alpha"), -1, "lora_alpha"),
    (("experts", 0, "lora_alpha"), math.inf, "lora_alpha"),
    (("experts", 0, "alpha_pattern"), {"q": math.nan}, "alpha_pattern"),
    (("experts", 0, "alpha_pattern"), ["q"], "alpha_pattern"),
    (("experts", 0, "name"), "e1", "e1"),
    (("router_top_k",), True, "router_top_k"),
    (("router_top_k",), 1e9, "router_top_k"),
    (("router_top_k",), -1, "router_top_k"),
    (("router_top_p",), "0.5", "router_top_p"),
    (("router_top_p",), True, "router_top_p"),
    (("global_routing_scale",), "100", "global_routing_scale"),
    (("global_routing_scale",), None, "global_routing_scale"),
    (("global_routing_scale",), math.inf, "global_routing_scale"),
    (("global_routing_threshold",), 2.0, "global_routing_threshold"),
    (("global_routing_policy",), "Threshold", "global_routing_policy"),
    (("arrow_temperature",), True, "arrow_temperature"),
    (("arrow_temperature",), -math.inf, "arrow_temperature"),
    (("instruction_embedding_dim",), True, "instruction_embedding_dim"),
    (("instruction_embedding_dim",), 8.0, "instruction_embedding_dim"),
    (("lora_implementation",), "fast", "lora_implementation"),
    (("num_layers",), 1, "encoder.block.1"),
    (("num_decoder_layers",), 3, "decoder.block.2"),
    (("d_kv",), 4, "d_kv"),
]


@pytest.mark.parametrize(
    "path, value, culprit", CONFIG_EDITS, ids=[f"{'.'.join(map(str, p))}={v!r}" for p, v, _ in CONFIG_EDITS]
)
def test_config_json_edits_are_refused_naming_the_field(world, tmp_path, path, value, culprit):
    folder = copy_folder(world[0] / "saved", tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(_edit(config, path, value)))
    before = tree_hashes(folder)
    with pytest.raises((ValueError, TypeError, StrictDataclassError)) as caught:
        GliderT5ForConditionalGeneration.from_pretrained(folder)
    assert culprit in str(caught.value), str(caught.value)
    assert tree_hashes(folder) == before


# --- weights files -----------------------------------------------------------------------------------------------


def _drop(key):
    return lambda w: w.pop(key)


WEIGHT_EDITS = {
    "missing base q": (lambda w: w.pop("encoder.block.1.layer.0.SelfAttention.q.weight"), "SelfAttention.q.weight"),
    "missing final norm": (lambda w: w.pop("decoder.final_layer_norm.weight"), "final_layer_norm"),
    "extra base block": (
        lambda w: w.update({"encoder.block.2.layer.0.SelfAttention.q.weight": torch.zeros(32, 32)}),
        "encoder.block.2",
    ),
    "inf in lm_head": (lambda w: w["shared.weight"].__setitem__((0, 0), math.inf), "shared.weight"),
    "lora_B wrong width": (
        lambda w: w.update({"encoder.block.0.layer.0.SelfAttention.q.lora_B": torch.zeros(3, 32, 5)}),
        "lora_B",
    ),
}


@pytest.mark.parametrize("edit", sorted(WEIGHT_EDITS))
def test_weights_that_disagree_with_the_config_are_refused(world, tmp_path, edit):
    change, culprit = WEIGHT_EDITS[edit]
    folder = copy_folder(world[0] / "saved", tmp_path / "m")
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    before = tree_hashes(folder)
    with pytest.raises(ValueError) as caught:
        GliderT5ForConditionalGeneration.from_pretrained(folder)
    assert culprit in str(caught.value), str(caught.value)
    assert tree_hashes(folder) == before


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_weights_file_names_the_file(world, tmp_path, damage):
    folder = copy_folder(world[0] / "saved", tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    new = {"truncated": data[: len(data) // 2], "garbage": b"\x08\x00\x00\x00\x00\x00\x00\x00{{{{{{{{", "empty": b""}
    (folder / "model.safetensors").write_bytes(new[damage])
    before = tree_hashes(folder)
    with pytest.raises(Exception) as caught:
        GliderT5ForConditionalGeneration.from_pretrained(folder)
    assert "model.safetensors" in str(caught.value) or str(folder) in str(caught.value), repr(caught.value)
    assert tree_hashes(folder) == before


# --- the built model's library: no in-place change can leave config and tensors disagreeing ---------------------


def build(world, n=3, **overrides):
    _, base, dirs = world
    return GliderT5ForConditionalGeneration.from_experts(base, dirs[:n], top_k=2, **overrides).eval()


MUTATIONS = {
    "experts.reverse()": lambda c: c.experts.reverse(),
    "experts.append(...)": lambda c: c.experts.append(dict(c.experts[0], name="x")),
    "experts.pop()": lambda c: c.experts.pop(),
    "del experts[0]": lambda c: c.experts.__delitem__(0),
    "experts[0] = ...": lambda c: c.experts.__setitem__(0, dict(c.experts[1])),
    "experts.sort()": lambda c: c.experts.sort(key=lambda e: e["name"], reverse=True),
    "experts += [...]": lambda c: c.experts.__iadd__([dict(c.experts[0], name="x")]),
    "target_modules.append": lambda c: c.experts[0]["target_modules"].append("lm_head"),
    "target_modules.clear": lambda c: c.experts[0]["target_modules"].clear(),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_expert_list_cannot_change_in_place(world, mutation):
    model = build(world)
    before = json.dumps(model.config.to_dict()["experts"])
    with pytest.raises(TypeError, match="cannot change in place"):
        MUTATIONS[mutation](model.config)
    assert json.dumps(model.config.to_dict()["experts"]) == before


def test_copies_of_a_config_keep_their_experts(world):
    model = build(world)
    for copied in (copy.deepcopy(model.config), GliderConfig.from_dict(model.config.to_dict())):
        assert copied.to_dict()["experts"] == model.config.to_dict()["experts"]
    model.remove_expert("e1")  # still possible through the library's own methods
    assert model.config.expert_names == ["e0", "e2"]


@torch.no_grad()
def test_deepcopy_then_add_expert_leaves_the_original_alone(world):
    original = build(world, n=2)
    data = batch()
    expected = original(**data).logits
    twin = copy.deepcopy(original)
    twin.add_expert(world[2][2])
    assert original.config.expert_names == ["e0", "e1"] and twin.config.expert_names == ["e0", "e1", "e2"]
    torch.testing.assert_close(original(**data).logits, expected, rtol=0, atol=0)
    fresh = build(world, n=3)
    torch.testing.assert_close(twin(**data).logits, fresh(**data).logits, rtol=1e-5, atol=1e-5 * expected.abs().max())


@pytest.mark.parametrize(
    "change",
    [
        {"local_router": "arrow"},
        {"router_top_k": 0},
        {"router_top_p": math.nan},
        {"instruction_embedding_dim": 4},
        {"experts": []},
    ],
)
def test_config_update_is_checked(world, change):
    model = build(world)
    before = model.config.to_dict()
    with pytest.raises((ValueError, TypeError)) as caught:
        model.config.update(change)
    assert next(iter(change)) in str(caught.value)
    assert model.config.to_dict() == before


# --- builder keywords that would change the base model silently ------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        {"relative_attention_max_distance": 64},
        {"layer_norm_epsilon": 1e-2},
        {"d_model": 64},
        {"feed_forward_proj": "relu"},
        {"num_heads": 2},
        {"vocab_size": 80},
    ],
)
def test_from_experts_refuses_keywords_that_change_the_base(world, override):
    _, base, dirs = world
    with pytest.raises((TypeError, ValueError)) as caught:
        GliderT5ForConditionalGeneration.from_experts(base, dirs[:2], **override)
    assert next(iter(override)) in str(caught.value), str(caught.value)


def test_from_experts_keeps_the_experts_embedding_model(world, tmp_path):
    _, base, dirs = world
    copies = []
    for d in dirs[:2]:
        c = copy_folder(d, tmp_path / d.name)
        meta = json.loads((c / "glider_expert.json").read_text())
        (c / "glider_expert.json").write_text(json.dumps({**meta, "embedding_model": "org/embedder-a"}))
        copies.append(c)
    with pytest.raises(ValueError) as caught:
        GliderT5ForConditionalGeneration.from_experts(base, copies, instruction_embedding_model="org/embedder-b")
    assert "org/embedder-a" in str(caught.value) and "instruction_embedding_model" in str(caught.value)
    model = GliderT5ForConditionalGeneration.from_experts(base, copies, instruction_embedding_model="org/embedder-a")
    assert model.config.instruction_embedding_model == "org/embedder-a"
