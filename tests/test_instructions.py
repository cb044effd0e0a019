"""Instruction generators: an OpenAI-compatible server on 127.0.0.1 driven by the real InferenceClient, and local
Transformers models checked against transformers' own text-generation pipeline and `generate`."""

import socket
import time
from contextlib import nullcontext

import huggingface_hub.constants
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, pipeline

from modeling_glider.instructions import (
    SYSTEM_PROMPT,
    EndpointInstructionGenerator,
    InstructionFallbackWarning,
    QueryInstructions,
    TransformersInstructionGenerator,
    clean_instruction,
    instruction_messages,
    load_instruction_generator,
)
from tests.conftest import assert_decisive, make_base
from tests.llm_server import INSTRUCTIONS


def fallbacks(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, InstructionFallbackWarning)]


def test_endpoint_writes_instructions(server):
    generator = EndpointInstructionGenerator(server.base_url, "tiny-llm", timeout=5)
    queries = ["Review: a wonderful film.", "Put into French: the cat sleeps.", "What is 2 plus 3?"]
    assert generator(queries) == [INSTRUCTIONS["film"], INSTRUCTIONS["French"], INSTRUCTIONS["plus"]]
    assert len(server.requests) == 3
    for request in server.requests:
        payload = request["payload"]
        assert request["path"] == "/v1/chat/completions" and payload["model"] == "tiny-llm"
        assert payload["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert payload["temperature"] == 0.0 and payload["max_tokens"] == 64
        assert request["auth"] == "Bearer EMPTY"  # never the user's Hugging Face token
    assert any("Input: What is 2 plus 3?" in r["payload"]["messages"][1]["content"] for r in server.requests)


def test_endpoint_retries_server_errors_then_falls_back(server):
    generator = EndpointInstructionGenerator(server.base_url, timeout=5, max_retries=2, retry_backoff=0.01)
    with pytest.warns(InstructionFallbackWarning) as record:
        got = generator(["FLAKY film review", "ALWAYS500 film", "BAD400 film"])
    assert got == [INSTRUCTIONS["film"], None, None]
    attempts = {key: n for key, n in server.attempts.items()}
    assert sorted(attempts.values()) == [1, 2, 3]  # 400: not retried; flaky: once; 500: 1 + 2 retries
    messages = fallbacks(record)
    assert any("HTTP 500" in m and "after 3 attempts" in m and "ALWAYS500" in m for m in messages)
    assert any("HTTP 400" in m and "BAD400" in m for m in messages)


@pytest.mark.parametrize("marker", ["NOTJSON", "NOCHOICES", "EMPTY", "SYMBOLS"])
def test_endpoint_garbage_replies_fall_back(server, marker):
    generator = EndpointInstructionGenerator(server.base_url, timeout=5, retry_backoff=0.01)
    with pytest.warns(InstructionFallbackWarning) as record:
        assert generator([f"{marker} film", "a film"]) == [None, INSTRUCTIONS["film"]]
    assert len(fallbacks(record)) == 1 and marker in fallbacks(record)[0]


def test_endpoint_timeouts_are_bounded(server):
    generator = EndpointInstructionGenerator(server.base_url, timeout=0.5, max_retries=1, retry_backoff=0.01)
    start = time.monotonic()
    with pytest.warns(InstructionFallbackWarning) as record:
        assert generator(["SLOW film", "TRICKLE film", "a film"]) == [None, None, INSTRUCTIONS["film"]]
    elapsed = time.monotonic() - start
    assert elapsed < generator.time_budget(3) + 0.5 < 4.0  # the trickling server alone would take 20 s
    assert any("TimeoutError" in m for m in fallbacks(record))
    assert any("within the time budget" in m for m in fallbacks(record))


def test_endpoint_unreachable_and_offline(server, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    generator = EndpointInstructionGenerator(f"http://127.0.0.1:{closed_port}/v1", timeout=1, retry_backoff=0.01)
    with pytest.warns(InstructionFallbackWarning, match="after 3 attempts"):
        assert generator(["a film"]) == [None]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.warns(InstructionFallbackWarning, match="HF_HUB_OFFLINE"):
        assert EndpointInstructionGenerator(server.base_url)(["a film"]) == [None]
    assert server.requests == []


def test_long_query_is_cut_in_the_request(server):
    generator = EndpointInstructionGenerator(server.base_url, timeout=5, max_sample_chars=1000)
    assert generator(["a film " + "x" * 200_000]) == [INSTRUCTIONS["film"]]
    assert server.requests[0]["size"] < 3000


def test_clean_instruction():
    assert clean_instruction('  **Instruction:** "Sort the letters."\nbecause...') == "Sort the letters."
    assert clean_instruction("Task instruction - Reverse the word.") == "Reverse the word."
    assert clean_instruction("\n\nTranslate it into French.") == "Translate it into French."
    for garbage in (None, "", "  \n ", "!!! 42", "x" * 600, {"content": "Sort."}):
        assert clean_instruction(garbage) is None


def test_prompt_and_query_mode():
    messages = instruction_messages([{"input": "abc", "target": "cba"}, "xyz"])
    assert messages[0]["content"] == SYSTEM_PROMPT
    assert "Input: abc\nOutput: cba\n\nInput: xyz" in messages[1]["content"]
    with pytest.raises(ValueError, match="'input' string"):
        instruction_messages([{"text": "abc"}])
    assert QueryInstructions()(["reverse the word apple", "  "]) == ["reverse the word apple", None]


def test_load_instruction_generator():
    assert isinstance(load_instruction_generator("query"), QueryInstructions)
    endpoint = load_instruction_generator("http://127.0.0.1:9/v1#my-model")
    assert isinstance(endpoint, EndpointInstructionGenerator)
    assert (endpoint.base_url, endpoint.model) == ("http://127.0.0.1:9/v1", "my-model")
    assert load_instruction_generator(None) is None
    query = QueryInstructions()
    assert load_instruction_generator(query) is query
    with pytest.raises(TypeError, match="instruction_generator"):
        load_instruction_generator(3)


@pytest.fixture(scope="module")
def tiny_llm(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_local_causal_lm_matches_text_generation_pipeline(tiny_llm, tokenizer):
    generator = TransformersInstructionGenerator(tiny_llm, tokenizer, max_new_tokens=12, batch_size=2)
    queries = ["reverse the word apple", "sort the letters of banana", "uppercase the word cherry"]
    reference = pipeline("text-generation", model=tiny_llm, tokenizer=tokenizer)
    settings = {"max_new_tokens": 12, "do_sample": False, "return_full_text": False, "add_special_tokens": True}
    expected = [clean_instruction(reference(generator.prompt([q]), **settings)[0]["generated_text"]) for q in queries]
    for query in queries:  # the generator pads a batch of two: the same texts only if no choice is a near tie
        inputs = tokenizer(generator.prompt([query]), return_tensors="pt")
        alone = tiny_llm.generate(
            **inputs, max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        assert_decisive(alone, eos_token_id=tiny_llm.config.eos_token_id)
    assert any(expected)  # the random model writes something instruction-like for some query
    with pytest.warns(InstructionFallbackWarning) if None in expected else nullcontext():
        assert generator(queries) == expected


def test_local_seq2seq_model_and_failures(tokenizer, monkeypatch):
    t5 = make_base()
    generator = TransformersInstructionGenerator(t5, tokenizer, max_new_tokens=8)
    prompt = generator.prompt(["reverse the word apple"])
    ids = t5.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=8, do_sample=False)
    expected = clean_instruction(tokenizer.decode(ids[0], skip_special_tokens=True))
    with pytest.warns(InstructionFallbackWarning) if expected is None else nullcontext():
        assert generator(["reverse the word apple"]) == [expected]

    def broken_generate(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(t5, "generate", broken_generate)
    with pytest.warns(InstructionFallbackWarning, match="local generator failed.*out of memory"):
        assert generator(["a", "b"]) == [None, None]
