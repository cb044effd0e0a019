"""Hostile and careless expert files and builder arguments: each is refused with an error naming the culprit (expert,
file, field, keyword), and no file changes. Adapters whose meaning PEFT changes are refused; those it does not are
checked against PEFT itself."""

import copy
import hashlib
import json
import math
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from modeling_glider import GliderT5ForConditionalGeneration
from modeling_glider.convert import convert_checkpoints
from modeling_glider.embedding import InstructionEmbedder
from modeling_glider.experts import load_expert
from modeling_glider.instructions import EndpointInstructionGenerator, TransformersInstructionGenerator
from modeling_glider.library import build_library
from modeling_glider.training import train_expert
from tests.conftest import make_base, make_expert

BAD_NAMES = ["../x", "../../etc", "/abs/x", "a/b", "a\\b", ".", "..", "", "   ", "x\0y", " padded "]


def tree_hashes(root) -> dict:
    """sha256 of every file under `root`, by relative path: equal before and after means nothing was written."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def base():
    return make_base(seed=0)


@pytest.fixture
def expert(tmp_path, base):
    return make_expert(tmp_path, base, "good", r=2, targets=("q", "wo"), seed=1)


def edit_json(path, **changes):
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content))  # NaN and Infinity are written as JSON's extensions, as Python reads them


def assert_refused(base, directory, root, error, *culprits):
    before = tree_hashes(root)
    with pytest.raises(error) as caught:
        GliderT5ForConditionalGeneration.from_experts(base, [directory], top_k=1)
    for culprit in culprits:
        assert culprit in str(caught.value), (culprit, str(caught.value))
    assert tree_hashes(root) == before


# Names that would become paths


@pytest.mark.parametrize("name", BAD_NAMES)
def test_expert_names_that_are_not_one_folder_name_are_refused(tmp_path, base, expert, name):
    edit_json(expert / "glider_expert.json", name=name)
    assert_refused(base, expert, tmp_path, ValueError, repr(name), "glider_expert.json")


@pytest.mark.parametrize("name", ["../evil", "/abs/evil", "a/b", ".."])
def test_train_expert_refuses_a_name_that_is_a_path(tmp_path, base, name):
    (tmp_path / "data.jsonl").write_text(json.dumps({"input": "a", "target": "b"}) + "\n")
    before = tree_hashes(tmp_path)
    with pytest.raises(ValueError, match="name"):
        train_expert(base, tmp_path / "data.jsonl", tmp_path / "out", name=name, tokenizer="unused", steps=1)
    assert tree_hashes(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("stem", ["_best", ".._best"])
def test_checkpoint_file_names_that_make_bad_task_names_are_refused(tmp_path, expert, stem):
    from safetensors.torch import load_file

    state = {
        k.replace(".weight", ".default.weight"): v for k, v in load_file(expert / "adapter_model.safetensors").items()
    }
    torch.save(state, tmp_path / f"{stem}.pt")
    before = tree_hashes(tmp_path)
    with pytest.raises(ValueError, match=rf"{stem}\.pt.*name"):
        convert_checkpoints([tmp_path / f"{stem}.pt"], tmp_path / "out", gates=False)
    assert tree_hashes(tmp_path) == before and not (tmp_path / "out").exists()


def test_plain_adapter_whose_folder_name_is_dot_dot_is_refused(tmp_path, base, expert):
    (expert / "glider_expert.json").unlink()  # a plain PEFT adapter, named after its folder
    (expert / "sub").mkdir()
    before = tree_hashes(tmp_path)
    with pytest.raises(ValueError, match=r"'\.\.'"):
        build_library(base, [f"{expert}/sub/.."], tmp_path / "built", local_router="arrow", top_k=1)
    assert tree_hashes(tmp_path) == before and not (tmp_path / "built").exists()


# adapter_config.json entries that change what the adapter means, or are not valid numbers

NAN, INF = math.nan, math.inf
ADAPTER_CASES = [
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4'"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ({"init_lora_weights": "corda"}, "init_lora_weights='corda'"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq'"),
    ({"init_lora_weights": "lora_ga"}, "init_lora_weights='lora_ga'"),
    ({"init_lora_weights": "something_new"}, "init_lora_weights='something_new'"),
    ({"loftq_config": {"loftq_bits": 4}}, "loftq_config"),
    ({"use_dora": True}, "use_dora"),
    ({"use_qalora": True}, "use_qalora"),
    ({"lora_bias": True}, "lora_bias"),
    ({"bias": "all"}, "bias"),
    ({"use_bdlora": {"nblocks": 2}}, "use_bdlora"),
    ({"arrow_config": {"top_k": 1}}, "arrow_config"),
    ({"kasa_config": {"beta": 1.0}}, "kasa_config"),
    ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"megatron_config": {"tensor_model_parallel_size": 2}}, "megatron_config"),
    ({"peft_type": "IA3"}, "'IA3'"),
    ({"use_rslora": "true"}, "use_rslora"),
    ({"use_rslora": "false"}, "use_rslora"),
    ({"use_rslora": 1}, "use_rslora"),
    ({"r": "2"}, "'r' must be"),
    ({"r": 0}, "'r' must be"),
    ({"r": 2.5}, "'r' must be"),
    ({"lora_alpha": NAN}, "lora_alpha"),
    ({"lora_alpha": INF}, "lora_alpha"),
    ({"lora_alpha": -4}, "lora_alpha"),
    ({"lora_alpha": 0}, "lora_alpha"),
    ({"lora_alpha": "8"}, "lora_alpha"),
    ({"rank_pattern": {"q": 0}}, "rank_pattern['q']"),
    ({"rank_pattern": {"q": NAN}}, "rank_pattern['q']"),
    ({"rank_pattern": {"(q": 2}}, "rank_pattern key '(q'"),
    ({"alpha_pattern": {"wo": INF}}, "alpha_pattern['wo']"),
    ({"alpha_pattern": {"wo": "2"}}, "alpha_pattern['wo']"),
    ({"alpha_pattern": ["wo"]}, "alpha_pattern"),
]


@pytest.mark.parametrize("changes, culprit", ADAPTER_CASES, ids=[c for _, c in ADAPTER_CASES])
def test_adapter_configs_that_change_the_meaning_or_are_invalid_are_refused(tmp_path, base, expert, changes, culprit):
    edit_json(expert / "adapter_config.json", **changes)
    assert_refused(base, expert, tmp_path, ValueError, "'good'", "adapter_config.json", culprit)


@pytest.mark.parametrize(
    "changes, culprit",
    [
        ({"instruction": 123}, "'instruction'"),
        ({"instruction": ["a", "b"]}, "'instruction'"),
        ({"embedding_model": {"id": "x"}}, "'embedding_model'"),
        ({"embedding_prefix": 5}, "'embedding_prefix'"),
        ({"embedding_prefix": ["search_query: "]}, "'embedding_prefix'"),
        ({"name": 5}, "5"),
        ({"name": None}, "None"),
    ],
)
def test_glider_expert_json_with_values_of_the_wrong_type_is_refused(tmp_path, base, expert, changes, culprit):
    edit_json(expert / "glider_expert.json", **changes)
    assert_refused(base, expert, tmp_path, ValueError, "glider_expert.json", culprit)


def peft_logits(base, directory, ids):
    with torch.no_grad():
        return (
            PeftModel.from_pretrained(copy.deepcopy(base), directory)
            .eval()(input_ids=ids, decoder_input_ids=ids)
            .logits
        )


def save_initialised_adapter(base, directory, init):
    """An adapter initialised by PEFT with `init`, then 'trained' (A and B moved), saved as PEFT saves it."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "wo"],
                                                           init_lora_weights=init))  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(directory)
    (directory / "glider_expert.json").write_text(json.dumps({"name": directory.name}))
    return directory


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pissa_adapter_saved_without_conversion_is_refused_and_differs_from_plain_lora(tmp_path, base):
    pissa = save_initialised_adapter(base, tmp_path / "pissa", "pissa")
    # What the refusal protects against: PEFT's own output (base rewritten on load) against W + s B A on the base
    plain = shutil.copytree(pissa, tmp_path / "as_plain")
    edit_json(plain / "adapter_config.json", init_lora_weights=True)
    ids = torch.randint(2, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    difference = (peft_logits(base, pissa, ids) - peft_logits(base, plain, ids)).abs().max()
    assert difference > 1e-2 * peft_logits(base, plain, ids).abs().max()
    assert_refused(base, pissa, tmp_path, ValueError, "'pissa'", "init_lora_weights='pissa'")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("init", ["eva", "orthogonal", "gaussian", "mica"])
def test_initialisations_that_keep_the_base_are_accepted_and_match_peft(tmp_path, base, init):
    directory = save_initialised_adapter(base, tmp_path / init, init)
    ids = torch.randint(2, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    expected = peft_logits(base, directory, ids)
    model = GliderT5ForConditionalGeneration.from_experts(base, [directory], top_k=1, local_router="arrow").eval()
    with torch.no_grad():
        got = model(input_ids=ids, decoder_input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)


# Unknown keywords


@pytest.mark.parametrize(
    "keyword, message",
    [
        ("router_topk", "did you mean 'router_top_k'"),
        ("topk", "did you mean 'top_k'"),
        ("global_scale", "did you mean 'global_routing_scale'"),
        ("local_routr", "did you mean 'local_router'"),
        ("arrow_temp", "did you mean 'arrow_temperature'"),
        ("instruction_embedding_dim", "'instruction_embedding_dim': it is derived"),
    ],
)
def test_unknown_or_derived_keywords_are_refused_with_a_suggestion(tmp_path, base, expert, keyword, message):
    with pytest.raises(TypeError, match=message):
        GliderT5ForConditionalGeneration.from_experts(base, [expert], top_k=1, **{keyword: 1})
    before = tree_hashes(tmp_path)
    with pytest.raises(TypeError, match=message):
        build_library(base, [expert], tmp_path / "built", top_k=1, **{keyword: 1})
    assert tree_hashes(tmp_path) == before and not (tmp_path / "built").exists()


def test_build_library_takes_top_k_not_router_top_k(tmp_path, base, expert):
    with pytest.raises(TypeError, match="top_k=, not router_top_k="):
        build_library(base, [expert], tmp_path / "built", router_top_k=1)
    assert not (tmp_path / "built").exists()


# convert's inputs


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        ({"names": "task"}, "names must be a list"),
        ({"lora_alpha": NAN}, "lora_alpha"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"embedding_dim": 2.5}, "embedding_dim"),
        ({"instructions": {"good": 7}}, "'good'"),
        ({"instructions": {"good": [{"text": "x"}]}}, "'good'"),
    ],
)
def test_convert_arguments_are_checked(tmp_path, expert, kwargs, culprit):
    from safetensors.torch import load_file

    state = {
        k.replace(".weight", ".default.weight"): v for k, v in load_file(expert / "adapter_model.safetensors").items()
    }
    torch.save(state, tmp_path / "good_best.pt")
    before = tree_hashes(tmp_path)
    with pytest.raises((ValueError, TypeError), match=culprit):
        convert_checkpoints([tmp_path / "good_best.pt"], tmp_path / "out", gates=False, **kwargs)
    assert tree_hashes(tmp_path) == before and not (tmp_path / "out").exists()


# Settings of the instruction generators and the embedder


@pytest.mark.parametrize(
    "make, culprit",
    [
        (lambda: EndpointInstructionGenerator("http://127.0.0.1:9/v1", timeout=NAN), "timeout"),
        (lambda: EndpointInstructionGenerator("http://127.0.0.1:9/v1", max_workers=0), "max_workers"),
        (lambda: EndpointInstructionGenerator("http://127.0.0.1:9/v1", max_retries=-1), "max_retries"),
        (lambda: EndpointInstructionGenerator("http://127.0.0.1:9/v1", retry_backoff=INF), "retry_backoff"),
        (lambda: EndpointInstructionGenerator("ftp://127.0.0.1/v1"), "base_url"),
        (lambda: TransformersInstructionGenerator("unused", max_new_tokens=0), "max_new_tokens"),
        (lambda: TransformersInstructionGenerator("unused", max_time=-1.0), "max_time"),
        (lambda: InstructionEmbedder("unused", batch_size=0), "batch_size"),
        (lambda: InstructionEmbedder("unused", max_length=0), "max_length"),
    ],
)
def test_generator_and_embedder_settings_are_checked(make, culprit):
    with pytest.raises(ValueError, match=culprit):
        make()


def test_a_good_expert_still_loads(expert):
    loaded = load_expert(expert)
    assert loaded.name == "good" and loaded.module_paths
