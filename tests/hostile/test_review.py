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
from peft import PeftModel
from safetensors.torch import load_file, save_file

from modeling_glider import GliderConfig, GliderLinear, GliderT5ForConditionalGeneration
from modeling_glider.convert import convert_checkpoints
from modeling_glider.describe import describe_experts
from modeling_glider.embedding import InstructionEmbedder
from modeling_glider.experts import load_expert
from modeling_glider.training import train_expert, train_gates
from tests.conftest import EMBED_DIM, make_base, make_expert
from tests.hostile.test_cli import run_failing
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


# --- references: PEFT for one expert at top-1, plain T5 for zero-B experts ------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"rank_pattern": {"encoder.block.0.layer.0.SelfAttention.q": 5, "wo": 1}},
        {"rank_pattern": {"decoder.*SelfAttention\\.(q|v)": 6}, "use_rslora": True},
        {"targets": ("wo",), "layers": [1]},
        {"gated": False, "targets": ("wi", "o")},
    ],
    ids=["rank_pattern", "regex rank_pattern + rslora", "one layer's wo", "relu base wi"],
)
@torch.no_grad()
def test_one_expert_at_top_1_equals_peft(tmp_path, options):
    options = dict(options)
    base = make_base(seed=7, gated=options.pop("gated", True))
    directory = make_expert(tmp_path, base, "solo", r=3, lora_alpha=5, seed=3, **options)
    model = GliderT5ForConditionalGeneration.from_experts(base, [directory], top_k=1).eval()
    reference = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    data = batch(embeddings=False)
    expected, plain = reference(**data).logits, base(**data).logits
    assert (expected - plain).abs().max() > 1e-2  # the expert changes the output
    # 1e-4 of the largest logit, as for the other whole-model comparisons: this toy T5 amplifies fp32 rounding (the
    # dense path, in PEFT's own order of operations, is 2.4e-5 of it away), while a wrong scaling or rank is > 1e-2
    torch.testing.assert_close(model(**data).logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


@pytest.mark.parametrize(
    "overrides",
    [{"router_top_p": 0.3}, {"local_router": "arrow"}, {"global_routing_policy": "threshold", "top_k": 3}],
)
@torch.no_grad()
def test_zero_B_experts_equal_plain_t5(tmp_path, overrides):
    base = make_base(seed=8, gated=False)
    dirs = [
        make_expert(tmp_path, base, f"z{i}", zero_B=True, seed=i, embedding=torch.randn(EMBED_DIM)) for i in range(3)
    ]
    model = GliderT5ForConditionalGeneration.from_experts(base, dirs, **overrides).eval()
    data = batch()
    expected = base(**{k: v for k, v in data.items() if k != "instruction_embeddings"}).logits
    torch.testing.assert_close(model(**data).logits, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


# --- loading paths: device_map, dtype, inference mode ----------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"device_map": "cpu"}, {"device_map": "auto"}, {"low_cpu_mem_usage": True}])
@torch.no_grad()
def test_loading_paths_route_as_the_saved_model(world, kwargs):
    saved = world[0] / "saved"
    expected = GliderT5ForConditionalGeneration.from_pretrained(saved).eval()
    loaded = GliderT5ForConditionalGeneration.from_pretrained(saved, **kwargs).eval()
    data = batch()
    for module in loaded.modules():
        if isinstance(module, GliderLinear) and module.num_experts:
            assert module.expert_index.tolist() == module.expert_ids and module.lora_scaling.dtype == torch.float32
    # the same weights, but maybe at another memory alignment, which some CPU kernels round differently
    reference = expected(**data).logits
    torch.testing.assert_close(loaded(**data).logits, reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item())


@torch.no_grad()
def test_generate_in_inference_mode_equals_no_grad(world):
    model = build(world)
    data = batch()
    data.pop("decoder_input_ids")
    expected = model.generate(**data, max_new_tokens=4, do_sample=False)
    with torch.inference_mode():
        got = model.generate(**data, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)


@torch.no_grad()
def test_bf16_model_with_fp32_inputs_embeds_behaves_like_t5(world):
    _, base, _ = world
    model = build(world).to(torch.bfloat16)
    t5 = copy.deepcopy(base).to(torch.bfloat16)
    data = batch()
    embeds = t5.shared(data["input_ids"]).float()
    t5_error = model_error = None
    try:
        t5(inputs_embeds=embeds, decoder_input_ids=data["decoder_input_ids"])
    except Exception as error:  # noqa: BLE001 - whatever T5 does, GliderT5 does
        t5_error = type(error)
    try:
        model(inputs_embeds=embeds, decoder_input_ids=data["decoder_input_ids"])
    except Exception as error:  # noqa: BLE001
        model_error = type(error)
    assert model_error == t5_error


# --- the text2text-generation pipeline -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(world, tokenizer):
    from transformers import pipeline

    return pipeline("text2text-generation", model=build(world), tokenizer=tokenizer, instruction_generator=None)


@pytest.mark.parametrize(
    "call, culprit",
    [
        (lambda p: p("a b", instruction_embeddings=torch.tensor(1.0)), "instruction_embeddings"),
        (lambda p: p(["a", "b"], instruction_embeddings=torch.zeros(3, EMBED_DIM)), "instruction_embeddings"),
        (lambda p: p("a", instruction_embeddings=torch.zeros(EMBED_DIM + 1)), "instruction_embeddings"),
        (lambda p: p("a", instruction_embeddings=torch.full((EMBED_DIM,), math.nan)), "NaN"),
        (lambda p: p(["a", "b"], instruction=["x"]), "instruction"),
        (lambda p: p(5), "input"),
        (lambda p: p([{"txt": "a"}]), "text"),
    ],
)
def test_pipeline_refuses_bad_call_arguments_by_name(pipe, call, culprit):
    with pytest.raises((ValueError, TypeError)) as caught:
        call(pipe)
    assert culprit in str(caught.value), str(caught.value)


@torch.no_grad()
def test_pipeline_batched_equals_one_by_one_and_generate(pipe, tokenizer):
    texts = ["reverse the word apple", "sort the letters", "the quick brown fox jumps over"]
    u = torch.randn(3, EMBED_DIM, generator=torch.Generator().manual_seed(1))
    one = [pipe(t, instruction_embeddings=row, max_new_tokens=5)[0]["generated_text"] for t, row in zip(texts, u)]
    batched = pipe(texts, instruction_embeddings=u, max_new_tokens=5, batch_size=3)
    assert [b[0]["generated_text"] for b in batched] == one
    ids = tokenizer(texts[0], return_tensors="pt")
    expected = pipe.model.generate(**ids, instruction_embeddings=u[:1], max_new_tokens=5)
    assert one[0] == tokenizer.decode(expected[0], skip_special_tokens=True)


# --- convert, describe, training arguments ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(world):
    root, _, dirs = world
    state = {
        k.replace(".weight", ".default.weight"): v for k, v in load_file(dirs[0] / "adapter_model.safetensors").items()
    }
    torch.save(state, root / "task_best.pt")
    return root / "task_best.pt"


def _convert_case(tmp_path, checkpoint, **kwargs):
    convert_checkpoints([checkpoint], tmp_path / "out", gates=False, **kwargs)


CONVERT_CASES = {
    "embedding table with int keys": (lambda p: torch.save({1: torch.ones(4)}, p), "embeddings", "task"),
    "embedding_dim wider than the embeddings": (lambda p: torch.save({"task": torch.ones(4)}, p), "embedding_dim", "4"),
}


@pytest.mark.parametrize("case", sorted(CONVERT_CASES))
def test_convert_refuses_embedding_tables_by_name(tmp_path, checkpoint, case):
    write, *culprits = CONVERT_CASES[case]
    write(tmp_path / "emb.pt")
    before = tree_hashes(tmp_path)
    with pytest.raises((ValueError, TypeError)) as caught:
        convert_checkpoints(
            [checkpoint], tmp_path / "out", gates=False, embeddings=tmp_path / "emb.pt", embedding_dim=6
        )
    for culprit in culprits:
        assert culprit in str(caught.value), str(caught.value)
    assert tree_hashes(tmp_path) == before and not (tmp_path / "out").exists()


def test_convert_of_no_checkpoints_is_refused(tmp_path):
    with pytest.raises(ValueError, match="checkpoints"):
        convert_checkpoints([], tmp_path / "out")
    assert not (tmp_path / "out").exists()


class LetterEmbedder(InstructionEmbedder):
    def __init__(self):
        self.model_id, self.dim, self.prefix = "letter-counts", 8, ""

    def embed(self, texts):
        counts = torch.tensor([[1.0 + text.lower().count(c) for c in "abcdefgh"] for text in texts])
        return counts / counts.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("instruction", [5, "", "   ", ["a list"]])
def test_describe_refuses_instructions_that_are_not_text(world, tmp_path, instruction):
    expert = copy_folder(world[2][0], tmp_path / "e0")
    meta = json.loads((expert / "glider_expert.json").read_text())
    (expert / "glider_expert.json").write_text(json.dumps({**meta, "instruction": "The old instruction."}))
    before = tree_hashes(tmp_path)
    with pytest.raises((ValueError, TypeError)) as caught:
        describe_experts([expert], instructions={"e0": instruction}, embedder=LetterEmbedder())
    assert "'e0'" in str(caught.value) and "instruction" in str(caught.value), str(caught.value)
    assert tree_hashes(tmp_path) == before


TRAINING_CASES = [
    (train_expert, {"target_modules": "wo"}, "target_modules"),
    (train_expert, {"trainer_args": {"max_steps": 50}}, "max_steps"),
    (train_expert, {"trainer_args": {"output_dir": "/tmp/elsewhere"}}, "output_dir"),
    (train_expert, {"trainer_args": "fast"}, "trainer_args"),
    (train_expert, {"seed": "x"}, "seed"),
    (train_expert, {"seed": True}, "seed"),
    (train_expert, {"bf16": "no"}, "bf16"),
    (train_expert, {"instruction_embedding": torch.tensor([math.nan, 1.0])}, "instruction_embedding"),
    (train_expert, {"instruction_embedding": torch.ones(2, 2)}, "instruction_embedding"),
    (train_expert, {"embedding_model": 5}, "embedding_model"),
    (train_gates, {"trainer_args": {"learning_rate": 1.0}}, "learning_rate"),
    (train_gates, {"seed": 1.5}, "seed"),
]


@pytest.mark.parametrize(
    "function, kwargs, culprit",
    TRAINING_CASES,
    ids=[f"{f.__name__}-{list(k)[0]}={k[list(k)[0]]!r}" for f, k, _ in TRAINING_CASES],
)
def test_training_arguments_are_checked_before_training(
    world, tmp_path, tokenizer, monkeypatch, function, kwargs, culprit
):
    root, base, dirs = world
    monkeypatch.setattr("modeling_glider.training._fit", lambda *a, **k: pytest.fail("trained with a bad argument"))
    expert = copy_folder(dirs[0], tmp_path / "expert")
    data = [{"input": "a b c", "target": "c b a"}]
    before = tree_hashes(tmp_path)
    with pytest.raises((ValueError, TypeError)) as caught:
        if function is train_expert:
            train_expert(base, data, tmp_path / "new", name="new", tokenizer=tokenizer, steps=1, **kwargs)
        else:
            train_gates(base, expert, data, tokenizer=tokenizer, steps=1, **kwargs)
    assert culprit in str(caught.value), str(caught.value)
    assert tree_hashes(tmp_path) == before and not (tmp_path / "new").exists()


# --- the command line: one line naming the culprit, nothing written --------------------------------------------


@pytest.fixture(scope="module")
def cli_world(world, checkpoint, tokenizer):
    root = world[0]
    cli = root / "cli"
    cli.mkdir()
    for name in ("model", "no-tokenizer", "bad-json", "truncated"):
        copy_folder(root / "saved", cli / name)
    for name in ("model", "bad-json", "truncated"):
        tokenizer.save_pretrained(cli / name)
    (cli / "bad-json" / "config.json").write_text('{"model_type": "glider_t5",')
    data = (cli / "truncated" / "model.safetensors").read_bytes()
    (cli / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 3])
    copy_folder(root / "base", cli / "t5")
    tokenizer.save_pretrained(cli / "t5")
    torch.save({1: torch.ones(4)}, cli / "int-keys.pt")
    (cli / "a-file").write_text("not a folder")
    (cli / "empty-folder").mkdir()
    return cli


CLI_CASES = [
    (
        ["convert", "{r}/task_best.pt", "--out", "{c}/out", "--no-gates", "--embeddings", "{c}/int-keys.pt"],
        "int-keys.pt",
    ),
    (["convert", "{r}/task_best.pt", "--out", "{c}/a-file", "--no-gates"], "a-file"),
    (["convert", "{c}/empty-folder", "--out", "{c}/out"], "empty-folder"),
    (["generate", "{c}/no-tokenizer", "q"], "no-tokenizer"),
    (["generate", "{c}/t5", "q"], "GliderT5"),
    (["generate", "{c}/bad-json", "q"], "config.json"),
    (["generate", "{c}/truncated", "q"], "truncated"),
    (["generate", "{c}/model", "q", "--embedder", "{c}/nowhere"], "nowhere"),
    (["generate", "{c}/model", "q", "--instruction", "  "], "nstruction"),
    (["build", "--base", "{c}/empty-folder", "--experts", "{r}/e0", "--out", "{c}/out"], "empty-folder"),
    (["build", "--base", "{r}/base", "--experts", "{r}/e0", "--out", "{c}/a-file/sub", "--top-k", "1"], "a-file"),
    (["build", "--base", "{r}/base", "--experts", "{r}/e0", "{r}/e0", "--out", "{c}/out"], "'e0'"),
    (
        ["build", "--base", "{r}/base", "--experts", "{r}/e0", "--out", "{c}/out", "--tokenizer", "{c}/nowhere"],
        "nowhere",
    ),
    (["describe-experts", "{r}/e0", "--instruction", "e0="], "'e0'"),
    (["describe-experts", "{c}/nowhere"], "nowhere"),
    (["push", "{c}/model", "not a repo id!"], "not a repo id!"),
    (["push", "{c}/model", "org/x", "--card", "{c}/empty-folder"], "empty-folder"),
    (["demo", "--out", "{c}/a-file"], "a-file"),
]


@pytest.mark.parametrize("argv, culprit", CLI_CASES, ids=[f"{a[0]}-{c}" for a, c in CLI_CASES])
def test_cli_failures_are_one_line_naming_the_culprit(world, cli_world, capsys, argv, culprit):
    argv = [arg.format(r=world[0], c=cli_world) for arg in argv]
    before = tree_hashes(world[0])
    code, line = run_failing(argv, capsys)
    assert code != 0 and culprit in line, line
    assert tree_hashes(world[0]) == before


# --- add_expert / remove_expert, forward and generate arguments: refused by name, the model unchanged -----------


def _expert_variant(world, tmp_path, change):
    directory = copy_folder(world[2][2], tmp_path / "variant")
    change(directory)
    return directory


def _json_edit(file, **changes):
    return lambda d: (d / file).write_text(json.dumps({**json.loads((d / file).read_text()), **changes}))


def _tensors_edit(file, change):
    def edit(d):
        tensors = load_file(d / file)
        change(tensors)
        save_file(tensors, d / file)

    return edit


ADD_CASES = {
    "same name": (_json_edit("glider_expert.json", name="e0"), "'e0'"),
    "NaN gate": (
        _tensors_edit(
            "glider_expert.safetensors", lambda t: t["gate.encoder.block.0.layer.0.SelfAttention.q"].fill_(math.nan)
        ),
        "NaN",
    ),
    "narrower embedding": (
        _tensors_edit("glider_expert.safetensors", lambda t: t.update(instruction_embedding=torch.ones(4))),
        "instruction_embedding",
    ),
    "no embedding": (
        _tensors_edit("glider_expert.safetensors", lambda t: t.pop("instruction_embedding")),
        "instruction_embedding",
    ),
    "no glider_expert.json": (lambda d: (d / "glider_expert.json").unlink(), "glider_expert.json"),
    "embedded with a prefix": (_json_edit("glider_expert.json", embedding_prefix="search_query: "), "'search_query: '"),
    "lora_A of another width": (
        _tensors_edit(
            "adapter_model.safetensors",
            lambda t: t.update(
                {"base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.ones(4, 16)}
            ),
        ),
        "SelfAttention.q",
    ),
    "module the base lacks": (
        _tensors_edit(
            "adapter_model.safetensors",
            lambda t: t.update(
                {
                    "base_model.model.encoder.block.9.layer.0.SelfAttention.q.lora_A.weight": torch.ones(4, 32),
                    "base_model.model.encoder.block.9.layer.0.SelfAttention.q.lora_B.weight": torch.ones(32, 4),
                }
            ),
        ),
        "encoder.block.9",
    ),
    "unicode name": (_json_edit("glider_expert.json", name="задача/../x"), "задача/../x"),
}


@pytest.mark.parametrize("case", sorted(ADD_CASES))
@torch.no_grad()
def test_add_expert_refuses_by_name_and_changes_nothing(world, tmp_path, case):
    change, culprit = ADD_CASES[case]
    model, data = build(world, n=2), batch()
    expected, names = model(**data).logits, model.config.expert_names
    directory = _expert_variant(world, tmp_path, change)
    before = tree_hashes(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as caught:
        model.add_expert(directory)
    assert culprit in str(caught.value), str(caught.value)
    assert model.config.expert_names == names and tree_hashes(tmp_path) == before
    torch.testing.assert_close(model(**data).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name, culprit", [("nope", "'nope'"), (0, "0"), (None, "None")])
@torch.no_grad()
def test_remove_expert_refuses_unknown_names(world, name, culprit):
    model, data = build(world), batch()
    expected = model(**data).logits
    with pytest.raises(ValueError, match=culprit):
        model.remove_expert(name)
    assert model.config.expert_names == ["e0", "e1", "e2"]
    torch.testing.assert_close(model(**data).logits, expected, rtol=0, atol=0)


@torch.no_grad()
def test_remove_then_add_routes_like_a_fresh_build(world, tmp_path):
    model, data = build(world), batch()
    model.remove_expert("e0")
    model.add_expert(world[2][0])
    _, base, dirs = world
    fresh = GliderT5ForConditionalGeneration.from_experts(base, [dirs[1], dirs[2], dirs[0]], top_k=2).eval()
    expected = fresh(**data).logits
    torch.testing.assert_close(model(**data).logits, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    model.save_pretrained(tmp_path / "m")
    loaded = GliderT5ForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(loaded(**data).logits, model(**data).logits, rtol=0, atol=0)


FORWARD_CASES = [
    ({"instruction_embeddings": [[0.0] * EMBED_DIM] * 2}, ValueError, "instruction_embeddings"),
    ({"instruction_embeddings": torch.ones(2, EMBED_DIM, dtype=torch.long)}, ValueError, "float"),
    ({"instruction_embeddings": torch.ones(2, EMBED_DIM, 1)}, ValueError, "instruction_embeddings"),
    (
        {"instruction_embeddings": torch.ones(2, EMBED_DIM), "global_routing_logits": torch.zeros(2, 3)},
        ValueError,
        "not both",
    ),
    ({"global_routing_logits": torch.zeros(2, 2)}, ValueError, "global_routing_logits"),
    ({"global_routing_logits": torch.full((2, 3), math.inf)}, RuntimeError, "global_routing_logits"),
]


@pytest.mark.parametrize("extra, error, culprit", FORWARD_CASES, ids=[c for *_, c in FORWARD_CASES])
@torch.no_grad()
def test_forward_refuses_bad_routing_inputs(world, extra, error, culprit):
    model = build(world)
    with pytest.raises(error, match=culprit):
        model(**batch(embeddings=False), **extra)


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        ({"output_routing": True}, "return_dict_in_generate"),
        ({"instruction_embeddings": torch.ones(3, EMBED_DIM)}, "instruction_embeddings"),
        ({"global_routing_logits": torch.zeros(2, 4)}, "global_routing_logits"),
    ],
)
@torch.no_grad()
def test_generate_refuses_bad_routing_inputs(world, kwargs, culprit):
    model = build(world)
    with pytest.raises(ValueError, match=culprit):
        model.generate(batch(embeddings=False)["input_ids"], max_new_tokens=2, **kwargs)


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        ({"experts": [{"name": "a"}]}, "target_modules"),
        ({"experts": {"a": 1}}, "experts"),
        ({"experts": [{"name": "a", "target_modules": ["q"], "r": 2}], "router_top_k": 2}, "router_top_k"),
        (
            {"experts": [{"name": "a", "target_modules": ["q"], "r": 2, "use_rslora": 1}], "router_top_k": 1},
            "use_rslora",
        ),
    ],
)
def test_config_constructor_refuses_by_name(kwargs, culprit):
    with pytest.raises((ValueError, TypeError, StrictDataclassError), match=culprit):
        GliderConfig(**kwargs)


def test_duplicate_json_keys_cannot_smuggle_a_path_name(world, tmp_path):
    directory = copy_folder(world[2][0], tmp_path / "dup")
    (directory / "glider_expert.json").write_text('{"name": "ok", "name": "../evil"}')
    with pytest.raises(ValueError, match="'../evil'"):
        load_expert(directory)


def test_convert_unicode_names_stay_inside_out(tmp_path, checkpoint):
    out = tmp_path / "out"
    written = convert_checkpoints([checkpoint], out, gates=False, names=["задача ✓"])
    assert written == [out / "задача ✓"] and sorted(p.name for p in out.iterdir()) == ["задача ✓"]
    assert load_expert(written[0]).name == "задача ✓"


# --- save_pretrained and links: nothing outside the target changes ---------------------------------------------


@pytest.mark.parametrize("layout", ["target is a link", "file link inside", "folder link inside"])
def test_save_pretrained_never_writes_through_links(world, tmp_path, layout):
    outside, target = tmp_path / "outside", tmp_path / "target"
    outside.mkdir()
    (outside / "notes.txt").write_text("keep me")
    (outside / "model.safetensors").write_bytes(b"someone else's file")
    if layout == "target is a link":
        real = tmp_path / "real"
        shutil.copytree(world[0] / "saved", real)
        target.symlink_to(real, target_is_directory=True)
    else:
        shutil.copytree(world[0] / "saved", target)
        if layout == "file link inside":
            (target / "notes.txt").symlink_to(outside / "notes.txt")
            (target / "model.safetensors").unlink()
            (target / "model.safetensors").symlink_to(outside / "model.safetensors")
        else:
            (target / "linked").symlink_to(outside, target_is_directory=True)
    before = tree_hashes(outside)
    model = build(world, n=2)
    model.save_pretrained(target)
    assert tree_hashes(outside) == before
    assert target.resolve().is_dir() and (target / "config.json").is_file()
    if layout == "target is a link":
        assert target.is_symlink()
    elif layout == "file link inside":
        assert (target / "notes.txt").read_text() == "keep me" and not (target / "model.safetensors").is_symlink()
    loaded = GliderT5ForConditionalGeneration.from_pretrained(target)
    assert loaded.config.expert_names == ["e0", "e1"]
