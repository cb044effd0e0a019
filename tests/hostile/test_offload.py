"""Offloaded experts (`expert_offload`, `expert_cache_size`) against hostile files, knobs and calls: a bad expert is
reported when a call needs it, naming the expert, tensor and file, and the cache stays usable; bad files and knobs are
refused naming the key or field; files on disk never change."""

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file, save_file

from modeling_glider import GliderT5ForConditionalGeneration
from tests.conftest import EMBED_DIM, make_base, make_expert

TARGETS = ("q", "k", "v", "wi_0", "wi_1", "wo")  # `o` is adapted by no expert
RANKS = (4, 3, 2, 2)  # e3 has a smaller rank than the largest: its rows of lora_A/lora_B are zero-padded
NAMES = tuple(f"e{i}" for i in range(len(RANKS)))
KEY = "encoder.block.1.layer.1.DenseReluDense.wo"  # a routed linear every expert adapts
TIMEOUT = 120


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def embeddings() -> torch.Tensor:
    """e0, e1 close together, e2, e3 close together, the pairs orthogonal: with router_candidates = 2 a query at e0
    uses e0 and e1 only, one at e2 uses e2 and e3 only."""
    G = torch.zeros(len(RANKS), EMBED_DIM)
    G[0, 0], G[1, 0], G[1, 1] = 1.0, 1.0, 0.5
    G[2, 2], G[3, 2], G[3, 3] = 1.0, 1.0, 0.5
    return G


def build(root: Path, base, seed: int) -> Path:
    G = embeddings()
    dirs = [
        make_expert(root, base, name, r=r, lora_alpha=2 * r, targets=TARGETS, seed=seed + i, embedding=G[i])
        for i, (name, r) in enumerate(zip(NAMES, RANKS))
    ]
    return GliderT5ForConditionalGeneration.from_experts(base, dirs, top_k=2, router_candidates=2)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-offload")
    base = make_base(seed=4)
    folder = root / "saved"
    build(root / "experts", base, seed=30).save_pretrained(folder)
    other = root / "other"  # the same library's names and shapes, other weights
    build(root / "other-experts", base, seed=70).save_pretrained(other)
    sharded = root / "sharded"
    build(root / "experts", base, seed=30).save_pretrained(sharded, max_shard_size="40KB")
    return folder, other, sharded


def copy_of(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def tamper(folder: Path, change) -> None:
    """Rewrite `folder`'s model.safetensors with safetensors itself after `change(tensors)`."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


QUERY = {"near e0": 0, "near e2": 2}


def inputs(near: str, rows: int = 2):
    g = torch.Generator().manual_seed(5)
    ids, dec = torch.randint(2, 64, (rows, 7), generator=g), torch.randint(2, 64, (rows, 5), generator=g)
    u = embeddings()[QUERY[near]].expand(rows, EMBED_DIM).clone()
    return dict(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u)


def logits(model, near: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(near)).logits


def assert_close_scaled(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def load(folder: Path, offload: str | None = "disk", size: int | None = 2, **kwargs):
    if offload is None:
        return GliderT5ForConditionalGeneration.from_pretrained(folder, **kwargs).eval()
    return GliderT5ForConditionalGeneration.from_pretrained(
        folder, expert_offload=offload, expert_cache_size=size, **kwargs
    ).eval()


def in_thread(function, timeout: float = TIMEOUT):
    """Run `function` in a thread; fail (rather than hang) if it does not end within `timeout` seconds."""
    result = {}

    def target():
        try:
            result["value"] = function()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{function} did not end within {timeout} s"
    if "error" in result:
        raise result["error"]
    return result.get("value")


# --- a bad expert in the files: reported by the call that needs it --------------------------------------------------


def nan_in_B(tensors):
    tensors[f"{KEY}.lora_B"][3, 5, 0] = float("nan")


def inf_in_gate(tensors):
    tensors[f"{KEY}.router_gate"][3, 2] = float("-inf")


def beyond_rank_in_A(tensors):
    tensors[f"{KEY}.lora_A"][3, RANKS[3]] = 0.5  # a padding row of e3 (rank 2 of 4)


def beyond_rank_in_B(tensors):
    tensors[f"{KEY}.lora_B"][3, :, RANKS[3] + 1] = 0.5


BAD_EXPERTS = {
    "NaN in lora_B": (nan_in_B, rf"'e3'.*{KEY}\.lora_B.*model\.safetensors.*NaN or inf"),
    "inf in router_gate": (inf_in_gate, rf"'e3'.*{KEY}\.router_gate.*model\.safetensors.*NaN or inf"),
    "beyond the rank in lora_A": (beyond_rank_in_A, rf"'e3'.*{KEY}\.lora_A in \S*model\.safetensors .*beyond rank 2"),
    "beyond the rank in lora_B": (beyond_rank_in_B, rf"'e3'.*{KEY}\.lora_B in \S*model\.safetensors .*beyond rank 2"),
}


@pytest.mark.parametrize("case", list(BAD_EXPERTS))
def test_cpu_offload_refuses_a_bad_expert_at_load(library, tmp_path, case):
    """ "cpu" reads every expert at load: checked there, as a model loaded whole is."""
    folder = copy_of(library[0], tmp_path)
    change, message = BAD_EXPERTS[case]
    tamper(folder, change)
    before = digest(folder)
    with pytest.raises(ValueError, match=message):
        load(folder, "cpu")
    assert digest(folder) == before


@pytest.mark.parametrize("offload", ["disk"])
@pytest.mark.parametrize("case", list(BAD_EXPERTS))
def test_a_bad_expert_is_reported_by_the_call_that_needs_it(library, tmp_path, offload, case):
    folder = copy_of(library[0], tmp_path)
    change, message = BAD_EXPERTS[case]
    tamper(folder, change)
    before = digest(folder)
    reference = load(library[0], offload=None)  # the clean files, every expert in memory
    model = load(folder, offload)  # lazy: loads although e3 is bad
    assert_close_scaled(logits(model, "near e0"), logits(reference, "near e0"))
    for call in (lambda: model(**inputs("near e2")), lambda: model.generate(**inputs("near e2"), max_new_tokens=3)):
        with pytest.raises(ValueError, match=message):
            call()
    assert 3 not in model.expert_cache.resident()  # no half-read expert is named in the cache
    # the cache stays usable: a later call that does not need e3 answers as on the clean files
    assert_close_scaled(logits(model, "near e0"), logits(reference, "near e0"))
    assert_close_scaled(logits(model, "near e0"), logits(load(library[0], offload), "near e0"))
    assert digest(folder) == before


def test_the_rank_error_names_the_file_of_the_tensor_at_fault(library, tmp_path):
    """Sharded: lora_A, lora_B and router_gate of one linear may lie in different files."""
    folder = copy_of(library[2], tmp_path)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    linear = next(
        key[: -len(".lora_A")]
        for key in weight_map
        if key.endswith(".lora_A") and weight_map[key] != weight_map[key[: -len(".lora_A")] + ".router_gate"]
    )
    shard = folder / weight_map[f"{linear}.lora_A"]
    tensors = load_file(shard)
    tensors[f"{linear}.lora_A"][3, RANKS[3]] = 0.5
    save_file(tensors, shard, metadata={"format": "pt"})
    before = digest(folder)
    model = load(folder)
    with pytest.raises(ValueError, match=rf"'e3'.*{linear}\.lora_A in \S*{shard.name} .*beyond rank 2"):
        model(**inputs("near e2"))
    assert digest(folder) == before


# --- bad files: refused at load, naming the key or file -------------------------------------------------------------


def wrong_shape(tensors):
    tensors[f"{KEY}.lora_A"] = torch.zeros(4, 5, 48)


def missing_key(tensors):
    del tensors[f"{KEY}.lora_A"]


def extra_key(tensors):  # `o` is adapted by no expert
    tensors["encoder.block.0.layer.0.SelfAttention.o.lora_A"] = torch.zeros(4, 4, 32)


def int_dtype(tensors):
    tensors[f"{KEY}.lora_B"] = tensors[f"{KEY}.lora_B"].to(torch.int32)


BAD_FILES = {
    "wrong shape": (wrong_shape, rf"{KEY}\.lora_A in model\.safetensors holds \(4, 5, 48\)"),
    "missing lora_A": (missing_key, rf"no {KEY}\.lora_A"),
    "lora_A of a linear no expert adapts": (extra_key, r"encoder\.block\.0\.layer\.0\.SelfAttention\.o\.lora_A"),
    "int dtype": (int_dtype, rf"{KEY}\.lora_B in model\.safetensors is not a float tensor"),
}


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no error left for the collector
@pytest.mark.parametrize("offload", ["disk", "cpu"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_expert_tensors_are_refused_at_load(library, tmp_path, offload, case):
    folder = copy_of(library[0], tmp_path)
    change, message = BAD_FILES[case]
    tamper(folder, change)
    before = digest(folder)
    with pytest.raises(ValueError, match=message):
        load(folder, offload)
    assert digest(folder) == before


def truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def corrupt_header(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))


def huge_header_length(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes((2**40).to_bytes(8, "little") + data[8:])


@pytest.mark.parametrize("offload", ["disk", "cpu"])
@pytest.mark.parametrize("change", [truncate, corrupt_header, huge_header_length])
def test_broken_files_are_refused_at_load_naming_the_folder(library, tmp_path, offload, change):
    folder = copy_of(library[0], tmp_path)
    change(folder)
    before = digest(folder)
    with pytest.raises(ValueError, match=rf"{folder}.*(safetensors|truncated)"):
        load(folder, offload)
    assert digest(folder) == before


@pytest.mark.parametrize("offload", ["disk", "cpu"])
@pytest.mark.parametrize("implementation", ["dense", "gather", "grouped"])
def test_a_sharded_model_is_served(library, offload, implementation):
    reference = load(library[0], offload=None, lora_implementation=implementation)
    model = load(library[2], offload, lora_implementation=implementation)
    for near in QUERY:
        assert_close_scaled(logits(model, near), logits(reference, near))


def shard_outside(folder: Path) -> str:
    """The index names one shard as '../<shard>' (a copy of it lies there, so following the name would load)."""
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = f"{KEY}.lora_A"
    shard = data["weight_map"][key]
    shutil.copyfile(folder / shard, folder.parent / shard)
    data["weight_map"][key] = f"../{shard}"
    index.write_text(json.dumps(data))
    return f"../{shard}"


def shard_missing(folder: Path) -> str:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][f"{KEY}.lora_A"]
    (folder / shard).unlink()
    return shard


@pytest.mark.parametrize("offload", ["disk", "cpu"])
@pytest.mark.parametrize("change", [shard_outside, shard_missing])
def test_bad_shard_index_is_refused_naming_the_shard(library, tmp_path, offload, change):
    folder = copy_of(library[2], tmp_path)
    shard = change(folder)
    before = digest(tmp_path)
    with pytest.raises((ValueError, OSError), match=rf"{shard.replace('.', '[.]')}"):
        load(folder, offload)
    assert digest(tmp_path) == before


# --- the cache and the knobs ----------------------------------------------------------------------------------------


def test_a_batch_needing_more_experts_than_the_cache_is_refused(library):
    model = load(library[0], size=3)
    both = {k: torch.cat([inputs("near e0")[k], inputs("near e2")[k]]) for k in inputs("near e0")}
    for call in (lambda: model(**both), lambda: model.generate(**both, max_new_tokens=2)):
        with pytest.raises(ValueError, match=r"can use 4 experts .*expert_cache_size = 3"):
            call()
    reference = load(library[0], offload=None)
    assert_close_scaled(logits(model, "near e2"), logits(reference, "near e2"))  # still serves


@pytest.mark.parametrize("how", ["no instruction_embeddings", "a zero instruction embedding"])
def test_a_query_without_instruction_on_a_small_cache_says_so(library, how):
    model = load(library[0], size=3)
    kwargs = inputs("near e0")
    if how == "no instruction_embeddings":
        del kwargs["instruction_embeddings"]
    else:
        kwargs["instruction_embeddings"][1] = 0.0
    for call in (lambda: model(**kwargs), lambda: model.generate(**kwargs, max_new_tokens=2)):
        with pytest.raises(ValueError, match=r"can use 4 experts .*instruction.*expert_cache_size = 3"):
            call()


def test_a_cache_of_every_expert_serves_queries_without_instruction(library):
    model, reference = load(library[0], size=None), load(library[0], offload=None)
    kwargs = inputs("near e0")
    del kwargs["instruction_embeddings"]
    with torch.no_grad():
        assert_close_scaled(model(**kwargs).logits, reference(**kwargs).logits)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(expert_cache_size=2), r"expert_cache_size = 2 was given without expert_offload"),
        (dict(expert_offload="gpu"), r"expert_offload must be None or one of \('cpu', 'disk'\), got 'gpu'"),
        (dict(expert_offload="Disk"), r"expert_offload must be .*got 'Disk'"),
        (dict(expert_offload=True), r"expert_offload"),
        (dict(expert_offload="disk", expert_cache_size=0), r"expert_cache_size must be an integer >= 1, got 0"),
        (dict(expert_offload="disk", expert_cache_size=-1), r"expert_cache_size must be an integer >= 1, got -1"),
        (dict(expert_offload="disk", expert_cache_size=True), r"expert_cache_size"),
        (dict(expert_offload="disk", expert_cache_size=2.5), r"expert_cache_size"),
        (dict(expert_offload="disk", expert_cache_size="2"), r"expert_cache_size"),
        (dict(expert_offload="disk", expert_cache_size=1), r"expert_cache_size = 1 .*router_candidates = 2"),
        (dict(expert_offload="cpu", expert_cache_size=2, router_candidates=None), r"expert_cache_size = 2 .*all 4"),
        (dict(expert_offload="disk", variant="x"), r"variant"),
    ],
)
def test_bad_loading_options_are_refused_naming_the_field(library, kwargs, message):
    before = digest(library[0])
    with pytest.raises((ValueError, StrictDataclassError), match=message):
        GliderT5ForConditionalGeneration.from_pretrained(library[0], **kwargs)
    assert digest(library[0]) == before


@pytest.mark.parametrize("offload", ["disk", None])
@pytest.mark.parametrize(
    "field, value", [("expert_cache_size", 3), ("expert_cache_size", None), ("expert_offload", "cpu"),
                     ("expert_offload", None), ("expert_offload", "disk")],
)  # fmt: skip
def test_serving_fields_cannot_change_after_loading(library, offload, field, value):
    model = load(library[0], offload, size=2 if offload else None)
    old = getattr(model.config, field)
    if value == old:
        return
    with pytest.raises(ValueError, match=rf"{field} .*cannot change"):
        setattr(model.config, field, value)
    assert getattr(model.config, field) == old


def test_router_candidates_cannot_be_dropped_below_the_cache(library):
    model = load(library[0], size=2)
    with pytest.raises(ValueError, match=r"expert_cache_size = 2 .*router_candidates"):
        model.config.router_candidates = None
    assert model.config.router_candidates == 2
    with pytest.raises(ValueError, match=r"expert_cache_size = 2 .*router_candidates = 3"):
        model.config.router_candidates = 3
    assert model.config.router_candidates == 2


def test_serving_fields_are_not_saved(library, tmp_path):
    config = load(library[0]).config
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "expert_offload" not in saved and "expert_cache_size" not in saved


# --- leases passed by hand ------------------------------------------------------------------------------------------


def stale_lease(model, other, held):
    """The lease of a call of this model (of another, if this one does not offload) that has ended."""
    with (model if model.expert_cache is not None else other).leased_experts(torch.tensor([[0, 1]])) as lease:
        pass
    return lease


def other_models_lease(model, other, held):
    context = other.leased_experts(torch.tensor([[0, 1]]))
    held.append(context)  # released when the test ends
    return context.__enter__()


LEASES = {
    "stale lease": stale_lease,
    "a running lease of another model": other_models_lease,
    "an object": lambda model, other, held: object(),
    "a dict": lambda model, other, held: {0: 0, 1: 1},
    "a tensor": lambda model, other, held: torch.tensor([0, 1, -1, -1]),
}


@pytest.mark.parametrize("offload", ["disk", None])
@pytest.mark.parametrize("case", list(LEASES))
@pytest.mark.parametrize("method", ["forward", "generate"])
def test_a_lease_passed_by_hand_is_refused(library, offload, case, method):
    model, other, held = load(library[0], offload), load(library[0]), []  # `other` offloads
    lease = LEASES[case](model, other, held)
    kwargs = inputs("near e0")
    call = model if method == "forward" else lambda **k: model.generate(**k, max_new_tokens=2)
    with pytest.raises(ValueError, match="expert_lease must be the lease of a running call of this model"):
        call(**kwargs, expert_lease=lease)
    for context in held:
        context.__exit__(None, None, None)
    assert_close_scaled(logits(model, "near e0"), logits(load(library[0], offload=None), "near e0"))


# --- refused operations ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offload", ["disk", "cpu"])
def test_operations_that_need_the_experts_in_memory_are_refused(library, tmp_path, offload):
    folder = copy_of(library[0], tmp_path, "model")
    model = load(folder, offload)
    before, config = digest(tmp_path), model.config.to_dict()
    with pytest.raises(ValueError, match=r"save_pretrained needs the experts in memory.*expert_offload"):
        model.save_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match=r"save_pretrained needs the experts in memory"):
        model.save_pretrained(folder)  # over its own files
    with pytest.raises(ValueError, match=r"push_to_hub needs the experts in memory"):
        model.push_to_hub("someone/model")
    with pytest.raises(ValueError, match=r"add_expert needs the experts in memory"):
        model.add_expert(tmp_path)
    with pytest.raises(ValueError, match=r"remove_expert needs the experts in memory"):
        model.remove_expert("e0")
    assert digest(tmp_path) == before and model.config.to_dict() == config
    assert not (tmp_path / "out").exists()


def test_library_changes_still_wait_for_running_calls(library, monkeypatch):
    """add_expert / remove_expert run while the library lock is held (no call routes meanwhile)."""
    import modeling_glider.experts as experts

    model = load(library[0], offload=None)
    seen = []
    monkeypatch.setattr(experts, "add_expert", lambda m, e: seen.append(m.library_lock.writing))
    monkeypatch.setattr(experts, "remove_expert", lambda m, n: seen.append(m.library_lock.writing))
    model.add_expert("x")
    model.remove_expert("e0")
    assert seen == [True, True]


@pytest.mark.parametrize("key, value", [("expert_offload", "disk"), ("expert_cache_size", 2)])
def test_from_experts_refuses_offloading(library, tmp_path, key, value):
    base = make_base(seed=4)
    expert = make_expert(tmp_path, base, "one", targets=TARGETS, embedding=embeddings()[0])
    before = digest(tmp_path)
    with pytest.raises(TypeError, match=rf"'{key}'.*loading option"):
        GliderT5ForConditionalGeneration.from_experts(base, [expert], **{key: value})
    assert digest(tmp_path) == before


# --- files replaced, calls at once ----------------------------------------------------------------------------------


def test_files_replaced_after_loading_do_not_change_the_answers(library, tmp_path):
    folder = copy_of(library[0], tmp_path, "model")
    reference = load(folder, offload=None)
    expected = {near: logits(reference, near) for near in QUERY}
    model = load(folder, "disk", size=2)
    assert_close_scaled(logits(model, "near e0"), expected["near e0"])  # e0, e1 read; e2, e3 not yet
    load(library[1], offload=None).save_pretrained(folder)  # other weights, same names and shapes
    changed = load(folder, offload=None)
    assert not torch.allclose(logits(changed, "near e2"), expected["near e2"])  # the files did change
    for near in ("near e2", "near e0", "near e2"):  # read after the replacement, then evicted and read again
        assert_close_scaled(logits(model, near), expected[near])


def test_a_file_rewritten_in_place_after_loading_is_refused_when_read(library, tmp_path):
    """Not replaced by a rename but rewritten (same inode, same size): the experts not yet read are not served from
    the new bytes; those in the cache still answer as before."""
    folder = copy_of(library[0], tmp_path, "model")
    reference = load(folder, offload=None)
    expected = logits(reference, "near e0")
    model = load(folder, "disk", size=2)
    assert_close_scaled(logits(model, "near e0"), expected)
    shutil.copyfile(library[1] / "model.safetensors", folder / "model.safetensors")  # writes into the same file
    before = digest(folder)
    assert_close_scaled(logits(model, "near e0"), expected)  # in the cache: nothing read
    with pytest.raises(ValueError, match=rf"{folder / 'model.safetensors'} was rewritten since the model was loaded"):
        model(**inputs("near e2"))
    assert digest(folder) == before


def test_a_call_waits_for_the_rows_another_call_holds(library):
    model, reference = load(library[0], size=2), load(library[0], offload=None)
    expected = {near: logits(reference, near) for near in QUERY}
    entered, release = threading.Event(), threading.Event()

    def hold(module, args):
        if not entered.is_set():
            entered.set()
            assert release.wait(TIMEOUT)

    handle = model.get_encoder().register_forward_pre_hook(hold)
    results = {}
    first = threading.Thread(target=lambda: results.update(e0=logits(model, "near e0")), daemon=True)
    first.start()
    assert entered.wait(TIMEOUT)
    second = threading.Thread(target=lambda: results.update(e2=logits(model, "near e2")), daemon=True)
    second.start()
    second.join(1.0)
    assert second.is_alive() and model.expert_cache.resident() == [0, 1]  # e0, e1 held: the second call waits
    release.set()
    first.join(TIMEOUT)
    second.join(TIMEOUT)
    handle.remove()
    assert not first.is_alive() and not second.is_alive()
    assert_close_scaled(results["e0"], expected["near e0"])
    assert_close_scaled(results["e2"], expected["near e2"])


def test_a_call_inside_a_call_that_cannot_get_rows_is_refused_not_a_hang(library):
    """A forward hook calling the model again needs rows its own outer call holds: waiting would never end."""
    model = load(library[0], size=2)
    inner = {}

    def nested(module, args):
        if not inner:
            inner["started"] = True
            try:
                model(**inputs("near e2"))
            except ValueError as error:
                inner["error"] = error

    handle = model.get_encoder().register_forward_pre_hook(nested)
    try:
        in_thread(lambda: logits(model, "near e0"), timeout=30)
    finally:
        handle.remove()
    assert "expert_cache_size = 2" in str(inner.get("error")), inner


def test_calls_at_once_on_a_cache_of_one_query_each_end_and_answer_right(library):
    """Four threads alternate the two groups of experts on a cache that holds one group: each call waits its turn."""
    model, reference = load(library[0], size=2), load(library[0], offload=None)
    expected = {near: logits(reference, near) for near in QUERY}
    answers, errors = [], []

    def serve(first: int):
        try:
            for step in range(3):
                near = list(QUERY)[(first + step) % 2]
                answers.append((near, logits(model, near)))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(i,), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads) and not errors, errors
    assert len(answers) == 12
    for near, got in answers:
        assert_close_scaled(got, expected[near])
