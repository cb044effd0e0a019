"""Global routing end to end with the real all-MiniLM-L6-v2: expert descriptions, the text2text-generation pipeline
(in memory, from a folder, from a Hub id without the package), instruction generators and the CLI.

References are independent of the code under test: cosine similarities computed here with sentence-transformers
itself, `generate` on single rows, local-only runs, and explicit instructions."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import T5Tokenizer, pipeline

from modeling_glider import GliderT5ForConditionalGeneration
from modeling_glider.cli import main
from modeling_glider.describe import describe_experts
from modeling_glider.embedding import DEFAULT_EMBEDDING_MODEL, InstructionEmbedder, load_embedder, packaged_model_path
from modeling_glider.instructions import InstructionFallbackWarning, embed_query_instructions
from tests.conftest import assert_decisive, make_base, make_expert
from tests.hub_server import HubServer, Repo
from tests.llm_server import INSTRUCTIONS

TASKS = {
    "sentiment": "Decide whether the movie review is positive or negative and answer positive or negative.",
    "translation": "Translate the English sentence into French.",
    "arithmetic": "Solve the arithmetic problem and answer with a number.",
}
QUERIES = {
    "sentiment": ["Review: I loved this film, the acting was wonderful. Positive or negative?",
                  "The plot was dull and the actors were terrible. What is the sentiment of this review?"],
    "translation": ["Translate to French: The cat is sleeping on the chair.",
                    "How do you say 'good morning, my friend' in French?"],
    "arithmetic": ["What is 17 plus 25?", "Compute 6 times 7 and give the number."],
}  # fmt: skip
GENERATE = {"max_new_tokens": 4, "do_sample": False}


@pytest.fixture(scope="module")
def reference() -> SentenceTransformer:
    return SentenceTransformer(str(packaged_model_path(DEFAULT_EMBEDDING_MODEL)), device="cpu")


@pytest.fixture(scope="module")
def library(tmp_path_factory, tokenizer):
    """Three experts described (human-written instructions embedded by MiniLM) and built into a GliderT5."""
    root = tmp_path_factory.mktemp("library")
    base = make_base(seed=5)
    dirs = [make_expert(root, base, name, seed=i) for i, name in enumerate(TASKS)]
    describe_experts(dirs, instructions=TASKS)
    model = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2, global_routing_scale=100.0)
    return model, dirs, root


@pytest.fixture(scope="module")
def pipe(library, tokenizer):
    return pipeline("text2text-generation", model=library[0], tokenizer=tokenizer)


def top_expert(output) -> str:
    return output["experts"][0]["name"]


def test_describe_records_the_embedder(library, reference):
    model, dirs, _ = library
    assert model.config.instruction_embedding_model == DEFAULT_EMBEDDING_MODEL
    assert model.config.instruction_embedding_dim == 384
    assert [e["instruction"] for e in model.config.experts] == list(TASKS.values())
    expected = reference.encode(list(TASKS.values()), convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(model.global_router.expert_embeddings, expected, atol=1e-5, rtol=1e-5)


def test_queries_route_to_their_own_expert(pipe, reference):
    names = list(TASKS)
    experts = reference.encode(list(TASKS.values()), convert_to_tensor=True, normalize_embeddings=True)
    for task, queries in QUERIES.items():
        cosine = reference.encode(queries, convert_to_tensor=True, normalize_embeddings=True) @ experts.T
        assert [names[i] for i in cosine.argmax(dim=-1)] == [task] * len(queries)  # the setup is sound
        for output in pipe(queries, return_experts=True, **GENERATE):
            assert top_expert(output[0]) == task and output[0]["experts"][0]["weight"] > 0.99
            assert output[0]["instruction"] in queries  # "query" mode: the query is its own instruction


def test_mixed_batch_is_routed_row_by_row(library, pipe, tokenizer):
    model = library[0]
    queries = [QUERIES["arithmetic"][0], QUERIES["sentiment"][1], QUERIES["translation"][0]]
    u, instructions = embed_query_instructions(queries, load_embedder(DEFAULT_EMBEDDING_MODEL))
    assert instructions == queries
    assert model.global_routing_logits(u).argmax(dim=-1).tolist() == [2, 0, 1]
    batch = tokenizer(queries, return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = model.generate(**batch, instruction_embeddings=u, **GENERATE)
        for row, query in enumerate(queries):
            single = model.generate(**tokenizer(query, return_tensors="pt"), instruction_embeddings=u[row : row + 1], output_scores=True, return_dict_in_generate=True, **GENERATE)  # fmt: skip
            assert_decisive(single)  # so the batched rows, and the pipeline's below, may be compared exactly
            assert generated[row, : single.sequences.shape[1]].tolist() == single.sequences[0].tolist()
    together = pipe(queries, return_experts=True, batch_size=3, **GENERATE)
    alone = [pipe(query, return_experts=True, **GENERATE)[0] for query in queries]
    assert [o[0]["generated_text"] for o in together] == [o["generated_text"] for o in alone]
    assert [top_expert(o[0]) for o in together] == ["arithmetic", "sentiment", "translation"]


def test_instruction_override(pipe):
    query = QUERIES["arithmetic"][0]
    assert top_expert(pipe(query, return_experts=True, **GENERATE)[0]) == "arithmetic"
    overridden = pipe(query, instruction=TASKS["translation"], return_experts=True, **GENERATE)[0]
    assert top_expert(overridden) == "translation" and overridden["instruction"] == TASKS["translation"]
    per_input = pipe(
        [query, {"text": query, "instruction": TASKS["sentiment"]}], return_experts=True, **GENERATE
    )  # an instruction in the input dict
    assert [top_expert(o[0]) for o in per_input] == ["arithmetic", "sentiment"]
    listed = pipe([query, query], instruction=[TASKS["sentiment"], TASKS["translation"]], return_experts=True, **GENERATE)  # fmt: skip
    assert [top_expert(o[0]) for o in listed] == ["sentiment", "translation"]
    with pytest.raises(ValueError, match="instruction has 1 entries for 2 inputs"):
        pipe([query, query], instruction=[TASKS["sentiment"]])


def test_empty_and_very_long_queries(library, tokenizer, pipe):
    model = library[0]
    local = pipeline("text2text-generation", model=model, tokenizer=tokenizer, instruction_generator=None)
    with pytest.warns(InstructionFallbackWarning, match="the query is empty"):
        empty = pipe("", return_experts=True, **GENERATE)[0]
    assert empty["instruction"] is None
    assert empty == {**local("", return_experts=True, **GENERATE)[0], "instruction": None}
    long_query = QUERIES["translation"][0] + " " + "the cat is sleeping " * 3000  # ~12k tokens for MiniLM
    tokenizer_limit = tokenizer.model_max_length
    tokenizer.model_max_length = 64  # the T5 side truncates on request; the embedder always does
    try:
        output = pipe(long_query, return_experts=True, truncation=True, **GENERATE)[0]
    finally:
        tokenizer.model_max_length = tokenizer_limit
    assert top_expert(output) == "translation"


def test_endpoint_generator_in_the_pipeline(library, tokenizer, server):
    model = library[0]
    llm_pipe = pipeline("text2text-generation", model=model, tokenizer=tokenizer, instruction_generator=server.base_url)
    explicit = pipeline("text2text-generation", model=model, tokenizer=tokenizer, instruction_generator=None)
    queries = ["Was that film any good? I could not stop yawning.", "ALWAYS500 what is 2 plus 2"]
    with pytest.warns(InstructionFallbackWarning, match="HTTP 500"):
        outputs = llm_pipe(queries, return_experts=True, **GENERATE)
    assert outputs[0][0]["instruction"] == INSTRUCTIONS["film"]  # the generated instruction is what routes
    assert outputs[0] == explicit(queries[0], instruction=INSTRUCTIONS["film"], return_experts=True, **GENERATE)
    assert top_expert(outputs[0][0]) == "sentiment"
    assert outputs[1][0]["instruction"] is None  # fell back to local routing, and the batch went on
    assert outputs[1] == [{**explicit(queries[1], return_experts=True, **GENERATE)[0], "instruction": None}]


def test_embedder_checks_in_the_pipeline(library, tokenizer, tmp_path):
    model, dirs, _ = library
    other = InstructionEmbedder(DEFAULT_EMBEDDING_MODEL, model_id="intfloat/e5-small")
    with pytest.raises(ValueError, match="embedded with 'sentence-transformers/all-MiniLM-L6-v2'.*e5-small"):
        pipeline("text2text-generation", model=model, tokenizer=tokenizer, instruction_embedder=other)
    by_alias = pipeline(
        "text2text-generation", model=model, tokenizer=tokenizer, instruction_embedder="all-MiniLM-L6-v2"
    )
    assert top_expert(by_alias("What is 2 plus 2?", return_experts=True, **GENERATE)[0]) == "arithmetic"
    # a library embedded by an unknown model
    unnamed = GliderT5ForConditionalGeneration.from_experts(make_base(seed=5), dirs, instruction_embedding_model=None)
    unknown = pipeline("text2text-generation", model=unnamed, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="does not record which model embedded"):
        unknown("What is 2 plus 2?")
    local_only = pipeline("text2text-generation", model=unnamed, tokenizer=tokenizer, instruction_generator=None)
    assert local_only("What is 2 plus 2?", return_experts=True, **GENERATE)[0]["instruction"] is None


def test_plain_t5_is_untouched(tokenizer):
    base = make_base(seed=5)
    t5_pipe = pipeline("text2text-generation", model=base, tokenizer=tokenizer)
    expected = base.generate(**tokenizer("What is 2 plus 2?", return_tensors="pt"), **GENERATE)
    out = t5_pipe("What is 2 plus 2?", **GENERATE)
    assert out == [{"generated_text": tokenizer.decode(expected[0], skip_special_tokens=True)}]
    with pytest.raises(ValueError, match="no global router"):
        t5_pipe("What is 2 plus 2?", instruction="Add the numbers.")
    with pytest.raises(ValueError, match="needs a GliderT5"):
        t5_pipe("What is 2 plus 2?", return_experts=True)


BLOCKED_IMPORTS_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("configuration_glider", "modeling_glider"):
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Blocker())
    import torch
    from transformers import pipeline

    torch.set_num_threads(1)  # as the tests: the same computation as the in-process reference

    pipe = pipeline("text2text-generation", model=sys.argv[1], trust_remote_code=True)
    queries = json.loads(sys.argv[2])
    print(json.dumps(pipe(queries, return_experts=True, max_new_tokens=4, do_sample=False)))
    """
)


def test_folder_and_hub_id(library, tokenizer, pipe, tmp_path):
    model = library[0]
    folder = tmp_path / "glider"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    queries = [QUERIES["sentiment"][0], QUERIES["arithmetic"][1]]
    expected = pipe(queries, return_experts=True, **GENERATE)

    from_folder = pipeline("text2text-generation", model=str(folder))
    assert_same_outputs(from_folder(queries, return_experts=True, **GENERATE), expected)

    # A Hub id, served over HTTP by the Hub stand-in, loaded in a fresh interpreter without this package
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS", "PYTHONPATH"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    with HubServer() as hub:
        hub.repos["org/routed"] = Repo("org/routed", private=False)
        hub.repos["org/routed"].commit("Upload", {file.name: file.read_bytes() for file in folder.iterdir()})
        result = subprocess.run(
            [sys.executable, "-c", BLOCKED_IMPORTS_SCRIPT, "org/routed", json.dumps(queries)],
            cwd=tmp_path, env={**env, "HF_ENDPOINT": hub.url}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    served = {path.rsplit("/", 1)[-1] for method, path, status in hub.requests if method == "GET" and status == 200}
    assert {"config.json", "model.safetensors", "pipeline_glider.py", "embedding.py", "instructions.py"} <= served
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_outputs(json.loads(result.stdout.strip().splitlines()[-1]), expected)


def assert_same_outputs(outputs, expected):
    """Texts, instructions and experts equal; usage weights to fp32 rounding (a loaded model's tensors lie elsewhere
    in memory, and the CPU's kernels may round differently with another alignment)."""
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected):
        assert got[0]["generated_text"] == want[0]["generated_text"]
        assert got[0]["instruction"] == want[0]["instruction"]
        assert [e["name"] for e in got[0]["experts"]] == [e["name"] for e in want[0]["experts"]]
        for e_got, e_want in zip(got[0]["experts"], want[0]["experts"]):
            assert e_got["weight"] == pytest.approx(e_want["weight"], rel=1e-5, abs=1e-12)


def test_cli_describe_experts_and_generate(tmp_path, tokenizer, server, reference, capsys):
    base = make_base(seed=6)
    dirs = [make_expert(tmp_path, base, name, seed=i) for i, name in enumerate(TASKS)]
    json_path = dirs[2] / "glider_expert.json"
    json_path.write_text(json.dumps({"name": "arithmetic", "instruction": TASKS["arithmetic"], "note": "kept"}))
    gates_before = load_file(dirs[0] / "glider_expert.safetensors")
    data = tmp_path / "reviews.jsonl"
    data.write_text("\n".join(json.dumps({"input": f"The film was {w}.", "target": w}) for w in ("great", "awful")))

    # a generator that fails for an expert: an error, and nothing written
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text(json.dumps({"input": "ALWAYS500 film"}) + "\n")
    files_before = {p: p.read_bytes() for d in dirs for p in d.iterdir()}
    with pytest.warns(InstructionFallbackWarning):
        assert main(["describe-experts", *map(str, dirs), "--data", f"sentiment={bad_data}",
                     "--generator", f"{server.base_url}#tiny-llm", "--instruction", f"translation={TASKS['translation']}"]) == 1  # fmt: skip
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r"glider describe-experts: error: .*'sentiment'.*nothing written", error)
    assert {p: p.read_bytes() for d in dirs for p in d.iterdir()} == files_before

    assert main(["describe-experts", *map(str, dirs), "--data", f"sentiment={data}",
                 "--generator", f"{server.base_url}#tiny-llm", "-k", "2",
                 "--instruction", f"translation={TASKS['translation']}"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"sentiment: {INSTRUCTIONS['film']}" in printed  # written by the LLM from the expert's samples
    assert "The film was great." in server.requests[-1]["payload"]["messages"][1]["content"]
    instructions = [INSTRUCTIONS["film"], TASKS["translation"], TASKS["arithmetic"]]
    expected = reference.encode(instructions, convert_to_tensor=True, normalize_embeddings=True)
    for directory, instruction, embedding in zip(dirs, instructions, expected):
        meta = json.loads((directory / "glider_expert.json").read_text())
        assert meta["instruction"] == instruction and meta["embedding_model"] == DEFAULT_EMBEDDING_MODEL
        tensors = load_file(directory / "glider_expert.safetensors")
        torch.testing.assert_close(tensors.pop("instruction_embedding"), embedding, atol=1e-5, rtol=1e-5)
        assert all(key.startswith("gate.") for key in tensors)
    assert json.loads(json_path.read_text())["note"] == "kept"
    after = load_file(dirs[0] / "glider_expert.safetensors")
    assert all(torch.equal(after[key], gate) for key, gate in gates_before.items())

    model = GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2)
    model.save_pretrained(tmp_path / "model")
    T5Tokenizer.from_pretrained(tokenizer.name_or_path).save_pretrained(tmp_path / "model")
    assert main(["generate", str(tmp_path / "model"), QUERIES["arithmetic"][0], "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"instruction: {QUERIES['arithmetic'][0]!r}" in printed and "experts: arithmetic 100%" in printed
    assert main(["generate", str(tmp_path / "model"), "hello", "--instruction", TASKS["translation"]]) == 0
    assert "experts: translation 100%" in capsys.readouterr().out


def test_describe_errors(tmp_path):
    base = make_base()
    directory = make_expert(tmp_path, base, "lonely")
    with pytest.raises(ValueError, match="Expert 'lonely'.*has no instruction"):
        describe_experts([directory])
    with pytest.raises(ValueError, match="unknown experts \\['ghost'\\]"):
        describe_experts([directory], instructions={"ghost": "Boo."})
    with pytest.raises(ValueError, match="'query' mode writes no expert instructions"):
        describe_experts([directory], generator="query")
    with pytest.raises(ValueError, match="Samples were given for \\['lonely'\\], but no instruction generator"):
        describe_experts([directory], data={"lonely": [{"input": "abc"}]})
