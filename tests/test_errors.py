"""Bad input gets a clear error naming the culprit, before anything is built."""

import copy
import json

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from configuration_glider import GliderConfig
from modeling_glider import GliderT5ForConditionalGeneration
from tests.conftest import EMBED_DIM, make_base, make_expert


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    base = make_base(seed=8)
    dirs = [make_expert(root, base, f"e{i}", seed=i, embedding=torch.randn(EMBED_DIM)) for i in range(3)]
    return root, base, dirs


@pytest.fixture(scope="module")
def model(library):
    _, base, dirs = library
    return GliderT5ForConditionalGeneration.from_experts(base, dirs)


IDS = torch.tensor([[5, 6, 7, 1], [8, 9, 10, 1]])
DEC = torch.zeros(2, 1, dtype=torch.long)


@pytest.mark.parametrize(
    "u, message",
    [
        (torch.randn(2, EMBED_DIM + 1), rf"\[batch, {EMBED_DIM}\]"),
        (torch.randn(EMBED_DIM), rf"\[batch, {EMBED_DIM}\]"),
        (torch.tensor([[float("nan")] * EMBED_DIM, [0.5] * EMBED_DIM]), r"rows \[0\] hold NaN or inf"),
        (torch.tensor([[1.0] * EMBED_DIM, [float("inf")] * EMBED_DIM]), r"rows \[1\] hold NaN or inf"),
        (torch.ones(2, EMBED_DIM, dtype=torch.long), "float"),
        (torch.randn(3, EMBED_DIM), "3 rows but the batch has 2"),
    ],
)
def test_bad_instruction_embeddings(model, u, message):
    with pytest.raises(ValueError, match=message):
        model(input_ids=IDS, decoder_input_ids=DEC, instruction_embeddings=u)
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=IDS, instruction_embeddings=u, max_new_tokens=2)


def test_instruction_embeddings_without_global_router(tmp_path):
    base = make_base()
    model = GliderT5ForConditionalGeneration.from_experts(base, [make_expert(tmp_path, base, "plain")], top_k=1)
    with pytest.raises(ValueError, match="no global router"):
        model(input_ids=IDS, decoder_input_ids=DEC, instruction_embeddings=torch.randn(2, EMBED_DIM))


@pytest.mark.parametrize("top_k, message", [(0, "must be an integer >= 1"), (4, "exceeds the number of experts")])
def test_top_k_out_of_range(library, top_k, message):
    _, base, dirs = library
    with pytest.raises(ValueError, match=rf"top_k.*{message}"):
        GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=top_k)


@pytest.mark.parametrize(
    "field, value",
    [("router_top_p", 0.0), ("router_top_p", 1.5), ("local_router", "random"), ("global_routing_scale", float("nan"))],
)
def test_bad_routing_knobs(library, field, value):
    _, base, dirs = library
    with pytest.raises(ValueError, match=field):
        GliderT5ForConditionalGeneration.from_experts(base, dirs, **{field: value})


def test_expert_made_for_another_base(library, tmp_path):
    _, base, dirs = library
    other = make_base(seed=1, d_model=48)
    with pytest.raises(
        ValueError, match=r"Expert 'alien'.*SelfAttention\.q has LoRA A \(4, 48\).*32 -> 32.*another base"
    ):
        GliderT5ForConditionalGeneration.from_experts(
            base, dirs + [make_expert(tmp_path, other, "alien", targets=("q",))]
        )
    deeper = make_base(seed=1, num_layers=3, num_decoder_layers=3)
    with pytest.raises(ValueError, match=r"Expert 'deep'.*adapts '(en|de)coder\.block\.2\..*another base"):
        GliderT5ForConditionalGeneration.from_experts(base, [make_expert(tmp_path, deeper, "deep", targets=("wo",))])


def test_missing_gate(library, tmp_path):
    _, base, _ = library
    directory = make_expert(tmp_path, base, "gateless_one")
    gates = load_file(directory / "glider_expert.safetensors")
    del gates["gate.decoder.block.1.layer.1.EncDecAttention.k"]
    save_file(gates, directory / "glider_expert.safetensors")
    with pytest.raises(
        ValueError,
        match=r"'gateless_one'.*no Phatgoose gate for decoder\.block\.1\.layer\.1\.EncDecAttention\.k.*train-gates.*arrow",
    ):
        GliderT5ForConditionalGeneration.from_experts(base, [directory], top_k=1)
    no_file = make_expert(tmp_path, base, "gateless", gates=False)
    with pytest.raises(ValueError, match="'gateless'.*no Phatgoose gate"):
        GliderT5ForConditionalGeneration.from_experts(base, [no_file], top_k=1)
    # Arrow needs no gates
    model = GliderT5ForConditionalGeneration.from_experts(base, [no_file], top_k=1, local_router="arrow")
    assert model.config.local_router == "arrow"


def _save_peft(base, peft_config, directory):
    get_peft_model(copy.deepcopy(base), peft_config).save_pretrained(directory)
    (directory / "glider_expert.json").write_text(json.dumps({"name": directory.name}))
    return directory


@pytest.mark.parametrize(
    "peft_config, message",
    [
        (IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]), "adapter is 'IA3'"),
        (LoraConfig(r=4, target_modules=["q", "v"], use_dora=True), "use_dora=True"),
        (LoraConfig(r=4, target_modules=["q", "v"], modules_to_save=["lm_head"]), "modules_to_save"),
    ],
)
def test_adapters_that_are_not_plain_lora(library, tmp_path, peft_config, message):
    _, base, dirs = library
    directory = _save_peft(base, peft_config, tmp_path / "odd")
    with pytest.raises(ValueError, match=rf"Expert 'odd'.*{message}.*plain LoRA"):
        GliderT5ForConditionalGeneration.from_experts(base, dirs + [directory])


@pytest.mark.parametrize("missing", ["adapter_model.safetensors", "adapter_config.json", "glider_expert.json"])
def test_missing_file(library, tmp_path, missing):
    _, base, _ = library
    directory = make_expert(tmp_path, base, "holey")
    (directory / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"missing {missing}"):
        GliderT5ForConditionalGeneration.from_experts(base, [directory])
    with pytest.raises(FileNotFoundError, match="no such directory"):
        GliderT5ForConditionalGeneration.from_experts(base, [tmp_path / "nowhere"])


def test_library_level_errors(library, tmp_path):
    _, base, dirs = library
    with pytest.raises(ValueError, match="non-empty list"):
        GliderT5ForConditionalGeneration.from_experts(base, [])
    twin = make_expert(tmp_path, base, "e0", seed=99, embedding=torch.randn(EMBED_DIM))
    with pytest.raises(ValueError, match=r"Duplicate expert names \['e0'\]"):
        GliderT5ForConditionalGeneration.from_experts(base, dirs + [twin])
    bare = make_expert(tmp_path, base, "bare")  # no instruction embedding
    with pytest.raises(ValueError, match=r"\['bare'\] have no instruction_embedding"):
        GliderT5ForConditionalGeneration.from_experts(base, dirs + [bare])
    wide = make_expert(tmp_path, base, "wide", embedding=torch.randn(EMBED_DIM + 2))
    with pytest.raises(ValueError, match="differ in width"):
        GliderT5ForConditionalGeneration.from_experts(base, dirs + [wide])


def test_config_checks_experts():
    with pytest.raises(ValueError, match="Duplicate expert names"):
        GliderConfig(experts=[{"name": "a", "target_modules": ["q"], "r": 2}] * 2, router_top_k=1)
    with pytest.raises(ValueError, match="Expert 'a': 'r' must be a positive integer"):
        GliderConfig(experts=[{"name": "a", "target_modules": ["q"], "r": 0}], router_top_k=1)
    with pytest.raises(ValueError, match="Expert 'a': unknown keys"):
        GliderConfig(experts=[{"name": "a", "target_modules": ["q"], "r": 2, "rnak": 3}], router_top_k=1)
