"""The Hub round trip against a Hub-compatible server on 127.0.0.1 (tests/hub_server.py), driven by the real
huggingface_hub client: push (model.push_to_hub, save_pretrained(push_to_hub=True), `glider push`), the model card,
loading by repo id with the package and in a fresh interpreter without it, experts as Hub repos, and failures.

References are independent of the code under test: the model pushed (its own logits, state dict and generations),
the files on disk, the experts' own JSON files, PEFT loading the expert repos, and the server's stored commits."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import pytest
import torch
import transformers.utils.hub
from huggingface_hub import HfApi, ModelCard, constants, hf_api
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import _http
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

from configuration_glider import GliderConfig
from modeling_glider import GliderT5ForConditionalGeneration, cli
from modeling_glider.experts import load_expert
from modeling_glider.hub import push_folder, render_model_card
from modeling_glider.packaging import code_files
from tests.conftest import EMBED_DIM, make_base, make_expert
from tests.hub_server import HubServer

TOKEN = "hf_test_write_token"
CODE_FILES = {path.name for path in code_files()}
INSTRUCTIONS = ["Reverse the given word.", "Sort the letters | alphabetically.", "Answer yes or no."]
EVAL_RESULTS = {
    "source": {"name": "glider-t5 benchmark", "url": "https://example.org/glider-benchmark"},
    "results": [
        {"task": "Held-in tasks", "dataset": "glider-mini/held-in", "dataset_name": "glider-mini held-in",
         "split": "test", "metric": "accuracy", "metric_name": "Average accuracy", "value": 0.8125},
        {"dataset": "glider-mini/held-out", "metric": "exact_match", "value": 0.4},
    ],
}  # fmt: skip
GENERATION = {"max_new_tokens": 6, "min_new_tokens": 6, "suppress_tokens": [0, 2]}  # no pad/unk: text to compare
QUERIES = ["reverse the word apple", "sort the letters of banana", "is the sentence positive"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The server, with this process's huggingface_hub and transformers pointed at it (they read HF_ENDPOINT at
    import time, so the in-process client is redirected through the same constants), every request timed out."""
    with HubServer(tokens={TOKEN: "alice"}) as server, pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "ENDPOINT", server.url)
        patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
        patch.setattr(hf_api.api, "endpoint", server.url)  # the module-level HfApi behind `create_repo` & co.
        patch.setattr(transformers.utils.hub, "_hf_api", None)  # rebuilt on first use, with the new endpoint
        patch.setenv("HF_TOKEN", TOKEN)
        _http.set_client_factory(
            lambda: httpx2.Client(
                event_hooks={"request": [_http.hf_request_event_hook]},
                follow_redirects=True,
                timeout=30,
                trust_env=False,  # no proxy between the client and 127.0.0.1
            )
        )
        try:
            yield server
        finally:
            _http.set_client_factory(_http.default_client_factory)


@pytest.fixture(scope="module")
def library(tmp_path_factory, tokenizer):
    """A GliderT5 of three experts with instruction embeddings, and the expert directories it was built from."""
    root = tmp_path_factory.mktemp("experts")
    base = make_base(vocab_size=len(tokenizer))
    embeddings = torch.eye(EMBED_DIM)[:3]
    dirs = [
        make_expert(root, base, f"task{i}", r=2 + 2 * i, seed=i, embedding=embeddings[i], instruction=INSTRUCTIONS[i])
        for i in range(3)
    ]
    model = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2, global_routing_scale=5.0)
    return base, dirs, model.eval()


@pytest.fixture(scope="module")
def pushed(hub, library, tokenizer):
    _, _, model = library
    return model.push_to_hub("org/glider-t5", tokenizer=tokenizer, eval_results=EVAL_RESULTS)


def model_inputs(tokenizer):
    batch = tokenizer(QUERIES, return_tensors="pt", padding=True)
    decoder_input_ids = torch.tensor([[0, 5, 9, 3]] * len(QUERIES))
    u = torch.eye(EMBED_DIM)[[0, 1, 2]] + 0.1  # one instruction embedding per query
    return batch, decoder_input_ids, u


def logits(model, tokenizer) -> dict[str, torch.Tensor]:
    batch, decoder_input_ids, u = model_inputs(tokenizer)
    with torch.no_grad():
        return {
            "local": model(**batch, decoder_input_ids=decoder_input_ids).logits,
            "global": model(**batch, decoder_input_ids=decoder_input_ids, instruction_embeddings=u).logits,
        }


@pytest.fixture(scope="module")
def expected(library, tokenizer) -> tuple[dict[str, torch.Tensor], list]:
    """What the pushed model itself computes: logits with and without the global router, a generation, and the
    pipeline's answers with per-query instruction embeddings."""
    _, _, model = library
    batch, _, u = model_inputs(tokenizer)
    outputs = logits(model, tokenizer)
    outputs["generate"] = model.generate(**batch, instruction_embeddings=u, **GENERATION)
    assert not torch.equal(outputs["generate"], model.generate(**batch, **GENERATION))  # the global router matters
    generator = pipeline("text2text-generation", model=model, tokenizer=tokenizer)
    answers = generator(QUERIES, instruction_embeddings=u, **GENERATION)
    assert all(answer[0]["generated_text"] for answer in answers)  # non-empty texts get compared
    return outputs, answers


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def markdown_table(text: str, heading: str) -> list[list[str]]:
    """The rows of the first table under `## heading`, cells unescaped."""
    lines = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [line for line in lines if line.startswith("|")][2:]  # skip the header and the separator
    split = [[cell.strip() for cell in row.replace("\\|", "\0").strip("|").split("|")] for row in rows]
    return [[cell.replace("\0", "|") for cell in row] for row in split]


# Pushing


def test_push_uploads_weights_code_config_tokenizer_and_card(hub, library, tokenizer, pushed, tmp_path):
    _, _, model = library
    files = hub.files("org/glider-t5")
    assert pushed.oid == hub.commits("org/glider-t5")[-1].oid
    assert len(hub.commits("org/glider-t5")) == 2  # the repo's initial commit, then everything in one commit
    assert CODE_FILES <= set(files)
    expected_files = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "README.md",
        "tokenizer_config.json",
    }
    assert expected_files <= set(files)
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    for source in code_files():
        assert files[source.name] == source.read_bytes(), source.name

    (tmp_path / "model.safetensors").write_bytes(files["model.safetensors"])
    weights = load_file(tmp_path / "model.safetensors")
    expected = {k: v for k, v in model.state_dict().items() if k in weights}
    assert set(weights) >= {k for k in model.state_dict() if "lora_" in k or "router_gate" in k}
    assert all(torch.equal(weights[k], expected[k]) for k in expected)

    config = json.loads(files["config.json"])
    assert config["model_type"] == "glider_t5"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_glider.GliderConfig",
        "AutoModel": "modeling_glider.GliderT5ForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_glider.GliderT5ForConditionalGeneration",
    }
    assert config["custom_pipelines"]["text2text-generation"]["impl"] == "pipeline_glider.Text2TextGenerationPipeline"

    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    for name, content in files.items():
        if name.startswith("tokenizer") or name in ("spiece.model", "special_tokens_map.json"):
            (tokenizer_dir / name).write_bytes(content)
    assert AutoTokenizer.from_pretrained(tokenizer_dir)(QUERIES[0]).input_ids == tokenizer(QUERIES[0]).input_ids


def test_model_card_parses_and_lists_experts_routing_and_results(hub, library, pushed):
    _, dirs, _ = library
    card = ModelCard.load("org/glider-t5")
    assert card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "text2text-generation"
    assert card.data.library_name == "transformers"

    rows = markdown_table(card.text, "Experts")
    assert len(rows) == len(dirs)
    for row, directory in zip(rows, dirs):
        meta = json.loads((directory / "glider_expert.json").read_text())
        adapter = json.loads((directory / "adapter_config.json").read_text())
        samples = load_expert(directory).sample_embeddings
        samples = 0 if samples is None else len(samples)
        assert row[1:] == [meta["name"], str(adapter["r"]), meta["instruction"], str(samples), str(directory)]

    routing = dict(markdown_table(card.text, "Routing"))
    assert routing["Experts kept per token (`router_top_k`)"] == "2"
    assert routing["Global routing scale alpha (`global_routing_scale`)"] == "5.0"
    assert "width 8" in routing["Instruction embeddings"]

    results = card.data.eval_results  # parsed back from the model-index by huggingface_hub
    assert [(r.dataset_type, r.metric_type, r.metric_value, r.dataset_split) for r in results] == [
        ("glider-mini/held-in", "accuracy", 0.8125, "test"),
        ("glider-mini/held-out", "exact_match", 0.4, None),
    ]
    assert results[0].task_name == "Held-in tasks" and results[0].source_url == EVAL_RESULTS["source"]["url"]
    assert [row[4] for row in markdown_table(card.text, "Evaluation")] == ["0.8125", "0.4"]
    assert 'AutoModel.from_pretrained("org/glider-t5")' in card.text
    assert 'pipeline("text2text-generation", model="org/glider-t5", trust_remote_code=True)' in card.text
    assert "2410.07172" in card.text and "2402.05859" in card.text and "EMNLP" in card.text


def test_card_of_an_arrow_library_with_rank_patterns():
    experts = [
        {"name": "qa", "instruction": "Answer | briefly.", "source": "org/qa", "target_modules": ["q", "v"], "r": 4,
         "rank_pattern": {"v": 8}},
        {"name": "nli", "target_modules": ["q"], "r": 2},
    ]  # fmt: skip
    config = GliderConfig(
        experts=experts, local_router="arrow", arrow_temperature=10.0, router_top_p=0.5, router_candidates=2
    )
    card = ModelCard(str(render_model_card(config, "org/arrow", license=None)))
    assert markdown_table(card.text, "Experts") == [
        ["1", "qa", "4 (v: 8)", "Answer | briefly.", "0", "org/qa"],
        ["2", "nli", "2", "-", "0", "-"],
    ]
    routing = dict(markdown_table(card.text, "Routing"))
    assert routing["Local router (`local_router`)"] == "Arrow: |x . v_e| / T, T = 10.0"
    assert routing["Top-p (`router_top_p`)"] == "0.5"
    assert routing["Candidate experts per query (`router_candidates`)"] == "2"
    assert routing["Instruction embeddings"] == "none (local routing only)"
    assert card.data.license is None and card.data.eval_results is None and "## Evaluation" not in card.text
    assert "instruction_embeddings=u" not in card.text  # no global router to switch on


def test_save_pretrained_push_to_hub_uploads_the_complete_folder(hub, library, tmp_path):
    _, _, model = library
    folder = tmp_path / "glider-saved"
    model.save_pretrained(folder, push_to_hub=True, repo_id="org/glider-saved")
    files = hub.files("org/glider-saved")
    local = {p.name for p in folder.iterdir()}
    assert CODE_FILES <= local
    assert local <= set(files)  # everything written locally, code included, went up
    assert all(files[name] == (folder / name).read_bytes() for name in local)
    assert "README.md" in files and "README.md" not in local  # the card is uploaded, not written into the folder

    model.save_pretrained(tmp_path / "default-name", push_to_hub=True)  # repo id from the folder, user namespace
    assert CODE_FILES <= set(hub.files("alice/default-name"))


def test_glider_push_cli(hub, library, tokenizer, tmp_path, capsys):
    _, _, model = library
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save({"step": 3}, folder / "training_args.bin")  # pickles never go up
    (folder / "checkpoint-1").mkdir()
    (tmp_path / "eval.json").write_text(json.dumps(EVAL_RESULTS))
    before = snapshot(folder)

    argv = ["push", str(folder), "org/glider-cli", "--eval-results", str(tmp_path / "eval.json"), "--private"]
    with pytest.warns(UserWarning, match="training_args.bin"):
        assert cli.main(argv) == 0
    assert "org/glider-cli" in capsys.readouterr().out
    files = hub.files("org/glider-cli")
    assert {name: content for name, content in files.items() if name not in ("README.md", ".gitattributes")} == {
        name: content for name, (content, _) in before.items() if name != "training_args.bin"
    }
    assert len(ModelCard.load("org/glider-cli").data.eval_results) == 2
    assert hub.repos["org/glider-cli"].private
    with pytest.raises(HfHubHTTPError, match="Repository Not Found"):
        HfApi().model_info("org/glider-cli", token=False)  # private: invisible without a token
    assert snapshot(folder) == before  # bytes and modification times


def test_push_refuses_a_folder_that_is_not_a_glider_t5(hub, library, tmp_path):
    base, _, _ = library
    base.save_pretrained(tmp_path / "t5")
    assert cli.main(["push", str(tmp_path / "t5"), "org/not-glider"]) == 1
    with pytest.raises(ValueError, match="not a GliderT5"):
        push_folder(tmp_path / "t5", "org/not-glider")
    assert "org/not-glider" not in hub.repos

    library[2].save_pretrained(tmp_path / "glider")
    (tmp_path / "eval.json").write_text(json.dumps({"results": [{"dataset": "d", "metric": "accuracy"}]}))
    with pytest.raises(ValueError, match=r"result #0 .*lacks \['value'\]"):
        push_folder(tmp_path / "glider", "org/bad-results", eval_results=tmp_path / "eval.json")
    assert "org/bad-results" not in hub.repos  # nothing was sent


# Loading by repo id


def test_load_by_repo_id_with_the_package(hub, tokenizer, pushed, expected):
    outputs, answers = expected
    for auto_class in (AutoModel, AutoModelForSeq2SeqLM):
        loaded = auto_class.from_pretrained("org/glider-t5").eval()
        assert type(loaded) is GliderT5ForConditionalGeneration  # the package's class, no remote code
        assert all(torch.equal(tensor, outputs[key]) for key, tensor in logits(loaded, tokenizer).items())
    batch, _, u = model_inputs(AutoTokenizer.from_pretrained("org/glider-t5"))
    assert torch.equal(loaded.generate(**batch, instruction_embeddings=u, **GENERATION), outputs["generate"])
    generator = pipeline("text2text-generation", model="org/glider-t5")
    assert generator(QUERIES, instruction_embeddings=u, **GENERATION) == answers


def test_load_by_repo_id_with_offloaded_experts(hub, tokenizer, pushed, expected):
    """`expert_offload="disk"` by repo id: the experts are read from the downloaded files, not the repo's folder."""
    outputs, _ = expected
    loaded = GliderT5ForConditionalGeneration.from_pretrained("org/glider-t5", expert_offload="disk").eval()
    assert {path.parent.parent.parent.name for path in loaded.expert_cache.store.descriptors} == {
        "models--org--glider-t5"
    }  # the Hub cache's snapshot of the repo
    for key, tensor in logits(loaded, tokenizer).items():
        torch.testing.assert_close(tensor, outputs[key], atol=1e-5 * outputs[key].abs().max().item(), rtol=1e-5)
    assert loaded.expert_cache.resident() == [0, 1, 2]


FRESH_INTERPRETER = textwrap.dedent(
    """
    import sys

    for name in ("configuration_glider", "modeling_glider", "hub_cards"):
        sys.modules[name] = None  # the glider-t5 packages cannot be imported: only the repo's own code may run

    import json
    import os

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

    repo, broken, out = sys.argv[1:4]
    torch.set_num_threads(int(os.environ["TORCH_THREADS"]))
    queries = json.loads(os.environ["QUERIES"])
    GENERATION = json.loads(os.environ["GENERATION"])
    inputs = load_file(os.path.join(out, "inputs.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(repo)
    batch = tokenizer(queries, return_tensors="pt", padding=True)
    u = inputs["u"]
    results, tensors = {"config": type(AutoConfig.from_pretrained(repo, trust_remote_code=True)).__module__}, {}
    for name, auto_class in (("seq2seq", AutoModelForSeq2SeqLM), ("auto", AutoModel)):
        model = auto_class.from_pretrained(repo, trust_remote_code=True).eval()
        results[name] = type(model).__module__ + "." + type(model).__name__
        with torch.no_grad():
            tensors[name + ".local"] = model(**batch, decoder_input_ids=inputs["decoder_input_ids"]).logits
            tensors[name + ".global"] = model(
                **batch, decoder_input_ids=inputs["decoder_input_ids"], instruction_embeddings=u
            ).logits
    tensors["generate"] = model.generate(**batch, instruction_embeddings=u, **GENERATION)  # AutoModel generates
    generator = pipeline("text2text-generation", model=repo, trust_remote_code=True)
    results["pipeline_class"] = type(generator).__module__
    results["answers"] = generator(queries, instruction_embeddings=u, **GENERATION)
    try:  # pushing renders the card from the package's template: without the package, a clear error
        model.push_to_hub("org/elsewhere")
        results["push"] = None
    except ImportError as error:
        results["push"] = str(error)
    try:
        AutoModelForSeq2SeqLM.from_pretrained(broken, trust_remote_code=True)
        results["broken"] = None
    except Exception as error:
        results["broken"] = type(error).__name__ + ": " + str(error)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "outputs.safetensors"))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f)
    """
)


def fresh_interpreter_env(hub: HubServer, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS", "PYTHONPATH"))}
    env.update(
        HF_ENDPOINT=hub.url,  # read by huggingface_hub at import time
        HF_HOME=str(home),  # a fresh cache, and a fresh transformers_modules folder for the remote code
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        TORCH_THREADS=str(torch.get_num_threads()),
        QUERIES=json.dumps(QUERIES),
        GENERATION=json.dumps(GENERATION),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def test_load_by_repo_id_without_the_package_in_a_fresh_interpreter(
    hub, library, tokenizer, pushed, expected, tmp_path
):
    _, _, model = library
    model.push_to_hub("org/broken-code", tokenizer=tokenizer)
    hub.remove_file("org/broken-code", "routing.py")  # a repo that lost one of its code files
    _, decoder_input_ids, u = model_inputs(tokenizer)
    save_file({"decoder_input_ids": decoder_input_ids, "u": u}, tmp_path / "inputs.safetensors")
    script = tmp_path / "load_from_hub.py"  # run from tmp_path: the checkout is not on sys.path
    script.write_text(FRESH_INTERPRETER)

    run = subprocess.run(
        [sys.executable, str(script), "org/glider-t5", "org/broken-code", str(tmp_path)],
        cwd=tmp_path,
        env=fresh_interpreter_env(hub, tmp_path / "hf-home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    tensors = load_file(tmp_path / "outputs.safetensors")
    for name in ("config", "seq2seq", "auto", "pipeline_class"):  # the repo's code, not the package's
        assert results[name].startswith("transformers_modules."), results[name]
    for name in ("auto", "seq2seq"):  # AutoModel gives the full model, which generates
        assert results[name].endswith(".GliderT5ForConditionalGeneration")

    outputs, answers = expected
    for name in ("auto", "seq2seq"):
        assert torch.equal(tensors[f"{name}.local"], outputs["local"]), name
        assert torch.equal(tensors[f"{name}.global"], outputs["global"]), name
    assert torch.equal(tensors["generate"], outputs["generate"])
    assert results["answers"] == answers
    assert results["broken"] is not None and "routing.py" in results["broken"]
    assert "glider-t5 package" in results["push"] and "org/elsewhere" not in hub.repos


# Experts on the Hub


def test_experts_as_hub_repos(hub, library, tokenizer):
    base, dirs, model = library
    api = HfApi()
    for directory in dirs[:2]:  # plain PEFT adapter folders plus the glider files, uploaded as they are
        api.create_repo(f"org/expert-{directory.name}")
        api.upload_folder(folder_path=directory, repo_id=f"org/expert-{directory.name}")
    revision = hub.commits(f"org/expert-{dirs[1].name}")[-1].oid

    peft_from_hub = PeftModel.from_pretrained(make_base(vocab_size=len(tokenizer)), f"org/expert-{dirs[0].name}")
    peft_local = PeftModel.from_pretrained(make_base(vocab_size=len(tokenizer)), dirs[0])
    ids = torch.tensor([[5, 8, 13, 1]])
    with torch.no_grad():
        assert torch.equal(
            peft_from_hub(input_ids=ids, decoder_input_ids=ids).logits,
            peft_local(input_ids=ids, decoder_input_ids=ids).logits,
        )

    specs = [f"org/expert-{dirs[0].name}", f"org/expert-{dirs[1].name}@{revision}", str(dirs[2])]
    from_hub = GliderT5ForConditionalGeneration.from_experts(base, specs, top_k=2, global_routing_scale=5.0).eval()
    assert [e["source"] for e in from_hub.config.experts] == specs
    assert from_hub.config.expert_names == model.config.expert_names
    batch, decoder_input_ids, u = model_inputs(tokenizer)
    with torch.no_grad():
        assert torch.equal(
            from_hub(**batch, decoder_input_ids=decoder_input_ids, instruction_embeddings=u).logits,
            model(**batch, decoder_input_ids=decoder_input_ids, instruction_embeddings=u).logits,
        )

    with pytest.raises(FileNotFoundError, match="'org/no-such-expert'"):
        GliderT5ForConditionalGeneration.from_experts(base, [str(dirs[0]), "org/no-such-expert"])
    api.create_repo("org/not-an-expert")
    with pytest.raises(FileNotFoundError, match=r"'org/not-an-expert'.*adapter_config\.json"):
        GliderT5ForConditionalGeneration.from_experts(base, ["org/not-an-expert"])


# Failures: clear errors, local model and files untouched


def test_bad_token_is_refused_and_nothing_changes(hub, library, tokenizer, tmp_path, capsys):
    _, _, model = library
    weights = state(model)
    with pytest.raises(HfHubHTTPError, match=r"(?s)401.*Invalid credentials.*HF_TOKEN"):
        model.push_to_hub("org/denied", tokenizer=tokenizer, token="hf_wrong")
    assert "org/denied" not in hub.repos
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())

    model.save_pretrained(tmp_path / "saved")
    before = snapshot(tmp_path / "saved")
    assert cli.main(["push", str(tmp_path / "saved"), "org/denied", "--token", "hf_wrong"]) == 1
    assert "401" in capsys.readouterr().err
    assert snapshot(tmp_path / "saved") == before


def test_server_error_mid_push_leaves_repo_and_local_files_as_they_were(hub, library, tokenizer, tmp_path):
    _, _, model = library
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    before, weights = snapshot(tmp_path / "saved"), state(model)
    hub.fail("commit", 500)  # after the repo was created and the upload modes were negotiated
    with pytest.raises(HfHubHTTPError, match=r"(?s)500.*no local file was changed"):
        push_folder(tmp_path / "saved", "org/flaky")
    assert [c.message for c in hub.commits("org/flaky")] == ["initial commit"]  # nothing half-committed
    assert snapshot(tmp_path / "saved") == before

    hub.fail("commit", 503)
    with pytest.raises(HfHubHTTPError, match="503"):
        model.push_to_hub("org/flaky", tokenizer=tokenizer)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())

    push_folder(tmp_path / "saved", "org/flaky")  # the same push, retried, goes through
    assert CODE_FILES | {"model.safetensors", "README.md"} <= set(hub.files("org/flaky"))


def test_missing_file_on_download_is_a_clear_error(hub, library, tokenizer, pushed):
    _, _, model = library
    model.push_to_hub("org/no-weights", tokenizer=tokenizer)
    hub.remove_file("org/no-weights", "model.safetensors")
    with pytest.raises(OSError, match=r"org/no-weights.*model\.safetensors"):
        AutoModel.from_pretrained("org/no-weights")
    cache = Path(constants.HF_HUB_CACHE)
    assert not list(cache.rglob("*.incomplete"))  # no partial download left behind


# Packaging


def test_card_template_ships_with_the_installed_package(tmp_path):
    """setuptools lays the packages out as a wheel installs them; the card renders from there, away from the
    checkout."""
    root, source = Path(__file__).resolve().parents[1], tmp_path / "src"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    for package in ("configuration_glider", "modeling_glider", "hub_cards"):
        shutil.copytree(root / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py", "-d", str(tmp_path / "site")],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    assert (tmp_path / "site" / "hub_cards" / "glider_t5.md").is_file()

    render = textwrap.dedent(
        """
        import hub_cards, modeling_glider
        from configuration_glider import GliderConfig
        from modeling_glider.hub import render_model_card

        assert hub_cards.__file__.startswith(SITE) and modeling_glider.__file__.startswith(SITE)
        config = GliderConfig(experts=[{"name": "nli", "instruction": "Say if it follows.", "target_modules": ["q"], "r": 2}], router_top_k=1)
        print(render_model_card(config, "org/installed").text)
        """
    ).replace("SITE", repr(str(tmp_path / "site")))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", render],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(tmp_path / "site")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert markdown_table(run.stdout, "Experts") == [["1", "nli", "2", "Say if it follows.", "0", "-"]]
