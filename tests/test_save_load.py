"""Saving and loading: Transformers' own loaders, in this process and in a fresh one without the packages."""

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, pipeline

from configuration_glider import GliderConfig
from modeling_glider import GliderT5ForConditionalGeneration
from tests.conftest import EMBED_DIM, assert_decisive, make_base, make_expert


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer_dir):
    """A GliderT5 with three experts, saved with its tokenizer, plus reference outputs computed before saving."""
    from transformers import T5Tokenizer

    root = tmp_path_factory.mktemp("saved")
    tokenizer = T5Tokenizer.from_pretrained(tokenizer_dir)
    base = make_base(seed=4, vocab_size=len(tokenizer))
    embeddings = torch.eye(3, EMBED_DIM)
    dirs = [make_expert(root, base, f"task{i}", r=2 + i, seed=20 + i, embedding=embeddings[i]) for i in range(3)]
    model = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2, global_routing_scale=5.0)
    folder = root / "glider"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ids = tokenizer(["reverse the word apple", "sort the letters of banana"], return_tensors="pt", padding=True)
    u = embeddings[:2] + 0.05
    dec = torch.tensor([[0, 5, 9, 11], [0, 7, 3, 4]])
    with torch.no_grad():
        logits = model(**ids, decoder_input_ids=dec, instruction_embeddings=u).logits
        generated = model.generate(
            **ids, instruction_embeddings=u, max_new_tokens=6, do_sample=False, output_scores=True,
            return_dict_in_generate=True,
        )  # fmt: skip
    assert_decisive(generated)  # the pipelines below generate one text at a time: the same ids only without near ties
    generated = generated.sequences
    reference = {
        "input_ids": ids.input_ids,
        "attention_mask": ids.attention_mask,
        "decoder_input_ids": dec,
        "u": u,
        "logits": logits,
        "generated": generated,
    }
    save_file(reference, root / "reference.safetensors")
    return model, folder, reference, root / "reference.safetensors"


def test_only_safetensors_and_code_are_written(saved_model):
    _, folder, _, _ = saved_model
    names = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in names and "config.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    assert {"configuration_glider.py", "modeling_glider.py", "routing.py", "pipeline_glider.py"} <= set(names)


def test_saved_files_get_the_mode_of_any_new_file(saved_model, tmp_path):
    """Not private to their owner (Transformers stages the weights through a 0600 temporary file): every file the
    save wrote has the mode a file made here gets, whatever the umask."""
    model, folder, _, _ = saved_model
    (tmp_path / "plain").touch()
    default = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert {stat.S_IMODE((folder / "model.safetensors").stat().st_mode)} == {default}
    previous = os.umask(0o027)
    try:
        model.save_pretrained(tmp_path / "group")
    finally:
        os.umask(previous)
    modes = {entry.name: stat.S_IMODE(entry.stat().st_mode) for entry in (tmp_path / "group").iterdir()}
    assert set(modes.values()) == {0o640}, modes


@pytest.mark.parametrize("loader", [GliderT5ForConditionalGeneration, AutoModelForSeq2SeqLM, AutoModel])
def test_reload_gives_bit_identical_logits(saved_model, loader):
    _, folder, ref, _ = saved_model
    model = loader.from_pretrained(folder)
    assert type(model) is GliderT5ForConditionalGeneration
    with torch.no_grad():
        logits = model(
            input_ids=ref["input_ids"],
            attention_mask=ref["attention_mask"],
            decoder_input_ids=ref["decoder_input_ids"],
            instruction_embeddings=ref["u"],
        ).logits
    assert torch.equal(logits, ref["logits"])
    assert isinstance(AutoConfig.from_pretrained(folder), GliderConfig)


def test_config_round_trip_keeps_every_routing_knob(saved_model):
    model, folder, _, _ = saved_model
    loaded = AutoConfig.from_pretrained(folder)
    for field in (
        "experts",
        "router_top_k",
        "router_top_p",
        "global_routing_scale",
        "local_router",
        "instruction_embedding_dim",
    ):
        assert getattr(loaded, field) == getattr(model.config, field), field
    assert loaded.scale_decoder_outputs == model.config.scale_decoder_outputs


def test_pipeline_in_memory_after_import(saved_model, tokenizer_dir):
    from transformers import T5Tokenizer

    model, _, ref, _ = saved_model
    tokenizer = T5Tokenizer.from_pretrained(tokenizer_dir)
    generator = pipeline("text2text-generation", model=model, tokenizer=tokenizer)
    texts = ["reverse the word apple", "sort the letters of banana"]
    out = generator(texts, instruction_embeddings=ref["u"], max_new_tokens=6, do_sample=False)
    expected = [tokenizer.decode(ref["generated"][i], skip_special_tokens=True) for i in range(2)]
    assert [o[0]["generated_text"] for o in out] == expected
    # a model loaded from the folder passes through the registered task too
    loaded = AutoModelForSeq2SeqLM.from_pretrained(_folder(saved_model))
    single = pipeline("text2text-generation", model=loaded, tokenizer=tokenizer)(
        texts[0], instruction_embeddings=ref["u"][0], max_new_tokens=6, do_sample=False
    )
    assert single[0]["generated_text"] == expected[0]


def _folder(saved_model) -> Path:
    return saved_model[1]


FRESH_INTERPRETER = textwrap.dedent(
    """
    import sys
    sys.modules["configuration_glider"] = None  # the packages cannot be imported
    sys.modules["modeling_glider"] = None
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

    torch.set_num_threads(1)  # as the tests: logits and ids below are the reference computation replayed, bit for bit
    folder, reference = sys.argv[1], load_file(sys.argv[2])
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__name__ == "GliderConfig" and type(config).__module__.startswith("transformers_modules")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = ["reverse the word apple", "sort the letters of banana"]
    for auto_class in (AutoModelForSeq2SeqLM, AutoModel):
        model = auto_class.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model(input_ids=reference["input_ids"], attention_mask=reference["attention_mask"],
                           decoder_input_ids=reference["decoder_input_ids"], instruction_embeddings=reference["u"]).logits
            generated = model.generate(input_ids=reference["input_ids"], attention_mask=reference["attention_mask"],
                                       instruction_embeddings=reference["u"], max_new_tokens=6, do_sample=False)
        assert torch.equal(logits, reference["logits"]), auto_class
        assert torch.equal(generated, reference["generated"]), auto_class
    expected = [tokenizer.decode(reference["generated"][i], skip_special_tokens=True) for i in range(2)]
    generator = pipeline("text2text-generation", model=folder, trust_remote_code=True)
    out = generator(texts, instruction_embeddings=reference["u"], max_new_tokens=6, do_sample=False)
    assert [o[0]["generated_text"] for o in out] == expected, out
    in_memory = pipeline("text2text-generation", model=model, tokenizer=tokenizer)
    assert in_memory(texts[1], instruction_embeddings=reference["u"][1], max_new_tokens=6, do_sample=False)[0]["generated_text"] == expected[1]
    print("FRESH-OK")
    """
)


def test_folder_loads_without_the_packages_in_a_fresh_interpreter(saved_model, tmp_path):
    _, folder, _, reference_file = saved_model
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", FRESH_INTERPRETER, str(folder), str(reference_file)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "FRESH-OK" in result.stdout, result.stderr[-4000:]
