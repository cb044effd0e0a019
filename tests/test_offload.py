"""Offloaded experts (`expert_offload`, `expert_cache_size`): a model loaded with its experts left in the safetensors
files ("disk") or in CPU memory ("cpu") answers like the naive per-token reference of `test_candidates.py`, built from
the expert files alone, while its cache holds at most `expert_cache_size` experts and reads only the experts that the
calls' candidates name."""

import threading

import pytest
import torch
from safetensors.torch import load_file

from modeling_glider import GliderLinear, GliderT5ForConditionalGeneration
from modeling_glider.offload import ExpertStore
from tests.conftest import assert_decisive
from tests.test_candidates import ALPHA, glider_model, library, naive_global_logits, naive_model, token_inputs  # noqa: F401

M = 2  # router_candidates


@pytest.fixture(scope="module")
def saved(library, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("offload") / "model"
    glider_model(library, router_candidates=M).save_pretrained(folder)
    return folder


def task_queries(G: torch.Tensor, tasks: list[int], seed: int = 3) -> torch.Tensor:
    """One query per task: that expert's instruction embedding plus noise."""
    noise = torch.randn(len(tasks), G.shape[1], generator=torch.Generator().manual_seed(seed))
    return G[tasks] + 0.3 * noise


def offloaded(folder, offload: str = "disk", cache: int | None = 3, **kwargs) -> GliderT5ForConditionalGeneration:
    model = GliderT5ForConditionalGeneration.from_pretrained(
        folder, expert_offload=offload, expert_cache_size=cache, **kwargs
    )
    return model.eval()


def candidates(dirs, u: torch.Tensor) -> set[int]:
    return set(naive_global_logits(dirs, u, ALPHA).topk(M, dim=-1).indices.flatten().tolist())


def count_reads(monkeypatch) -> list[tuple[str, int]]:
    """Every (tensor, expert slot) the stores read from their files from now on."""
    reads = []
    original = ExpertStore._read

    def recording(store, key, first, count):
        reads.extend((key, slot) for slot in range(first, first + count))
        return original(store, key, first, count)

    monkeypatch.setattr(ExpertStore, "_read", recording)
    return reads


def assert_like_naive(library, model, u, ids, dec, m=M):  # noqa: F811
    base, dirs, _ = library
    settings = {"global_logits": naive_global_logits(dirs, u, ALPHA), "m": m, "top_k": 2, "top_p": None}
    expected = naive_model(base, dirs, settings)(input_ids=ids, decoder_input_ids=dec).logits
    got = model(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u).logits
    torch.testing.assert_close(got, expected, atol=2e-4 * expected.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("offload", ["disk", "cpu"])
@pytest.mark.parametrize("implementation", ["dense", "gather", "grouped"])
@torch.no_grad()
def test_offloaded_model_equals_the_naive_reference(library, saved, offload, implementation):  # noqa: F811
    _, dirs, G = library
    model = offloaded(saved, offload, cache=4, lora_implementation=implementation)
    u = task_queries(G, [0, 4])
    ids, dec = token_inputs(rows=2)
    assert_like_naive(library, model, u, ids, dec)
    # only the candidates' experts came in, and no expert tensor is a parameter of the model
    assert set(model.expert_cache.resident()) == candidates(dirs, u)
    assert not [name for name, _ in model.named_parameters() if name.endswith(("lora_A", "lora_B", "router_gate"))]


@torch.no_grad()
def test_calls_read_only_the_experts_they_lease_and_evict_the_least_recently_used(library, saved, monkeypatch):  # noqa: F811
    _, dirs, G = library
    model = offloaded(saved, cache=3)
    reads = count_reads(monkeypatch)
    ids, dec = token_inputs(rows=1)
    last_used: dict[int, int] = {}
    for call, task in enumerate([0, 0, 4, 0, 3, 5, 1, 4]):
        u = task_queries(G, [task], seed=task)
        needed = candidates(dirs, u)
        before = set(model.expert_cache.resident())
        reads.clear()
        assert_like_naive(library, model, u, ids, dec)
        # each expert read once per linear tensor it has, and only those that were not in the cache
        assert set(experts_of_reads(model, reads)) == needed - before
        after = set(model.expert_cache.resident())
        assert needed <= after and len(after) <= 3
        # the experts that left had been used no later than any expert kept besides this call's
        kept = [last_used[e] for e in after - needed]
        assert all(last_used[e] <= min(kept, default=call) for e in before - after)
        last_used.update({e: call for e in needed})
    assert len(last_used) > 3  # the calls did need more experts than the cache holds


def experts_of_reads(model, reads: list[tuple[str, int]]) -> list[int]:
    """The expert ids (the model's numbering) of the (tensor key, slot) pairs read."""
    linears = {m.module_path: m for m in model.modules() if isinstance(m, GliderLinear)}
    return [linears[key.rsplit(".", 1)[0]].expert_ids[slot] for key, slot in reads]


@pytest.mark.parametrize("num_beams", [1, 3])
@torch.no_grad()
def test_generate_equals_the_naive_reference(library, saved, num_beams):  # noqa: F811
    base, dirs, G = library
    u = task_queries(G, [0, 2, 5])
    settings = {"global_logits": naive_global_logits(dirs, u, ALPHA), "m": M, "top_k": 2, "top_p": None}
    naive = naive_model(base, dirs, settings)
    model = offloaded(saved, cache=6)
    ids, _ = token_inputs(rows=3)
    options = dict(max_new_tokens=5, num_beams=num_beams, do_sample=False, output_scores=True)
    options.update(return_dict_in_generate=True, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    expected = naive.generate(input_ids=ids, **options)
    assert_decisive(expected, num_beams=num_beams)
    got = model.generate(ids, instruction_embeddings=u, **options)
    assert torch.equal(got.sequences, expected.sequences)
    assert set(model.expert_cache.resident()) == candidates(dirs, u)


@torch.no_grad()
def test_threads_sharing_a_small_cache_answer_like_the_reference(library, saved):  # noqa: F811
    """Four threads, each with its own tasks, on a cache that cannot hold all their experts at once: calls wait for
    slots others hold, never read an expert another call replaced."""
    base, dirs, G = library
    model = offloaded(saved, cache=3)
    ids, dec = token_inputs(rows=1)
    tasks = [[0, 4], [5], [3, 1], [2]]
    expected = {}
    for task_list in tasks:
        for task in task_list:
            u = task_queries(G, [task], seed=task)
            settings = {"global_logits": naive_global_logits(dirs, u, ALPHA), "m": M, "top_k": 2, "top_p": None}
            expected[task] = naive_model(base, dirs, settings)(input_ids=ids, decoder_input_ids=dec).logits
    errors, results = [], {}

    def serve(task_list):
        try:
            with torch.no_grad():
                for _ in range(3):
                    for task in task_list:
                        u = task_queries(G, [task], seed=task)
                        logits = model(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u).logits
                        results.setdefault(task, []).append(logits)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(task_list,)) for task_list in tasks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a call waited forever for cache slots"
    assert not errors, errors
    for task, outputs in results.items():
        for got in outputs:
            torch.testing.assert_close(got, expected[task], atol=2e-4 * expected[task].abs().max().item(), rtol=1e-4)
    assert len(model.expert_cache.resident()) <= 3


@torch.no_grad()
def test_without_candidates_a_cache_of_the_whole_library_reads_each_expert_once(library, tmp_path, monkeypatch):  # noqa: F811
    """No router_candidates: every call may use every expert (the paper's routing), so the cache must hold them all;
    each is read on the first call only. Also from shards, in the model's dtype given at load."""
    base, dirs, G = library
    glider_model(library).save_pretrained(tmp_path / "model", max_shard_size="20KB")
    assert (tmp_path / "model" / "model.safetensors.index.json").is_file()
    model = offloaded(tmp_path / "model", cache=None)
    reads = count_reads(monkeypatch)
    u = task_queries(G, [1, 3])
    ids, dec = token_inputs(rows=2)
    for _ in range(2):
        assert_like_naive(library, model, u, ids, dec, m=None)
    linears = [m for m in model.modules() if isinstance(m, GliderLinear) and m.num_experts]
    assert len(reads) == 3 * sum(m.num_experts for m in linears)  # A, B and gate of every expert, once
    assert model.expert_cache.resident() == list(range(len(dirs)))


def test_the_saved_folder_holds_the_full_library_and_no_serving_field(library, saved):  # noqa: F811
    stored = load_file(saved / "model.safetensors")
    assert any(key.endswith("lora_A") for key in stored)
    model = offloaded(saved)
    assert "expert_offload" not in model.config.to_dict() and "expert_cache_size" not in model.config.to_dict()
