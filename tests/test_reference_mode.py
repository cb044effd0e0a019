"""`routing_compatibility="reference"` against the GLIDER authors' forward, re-implemented here from its description
(GLIDER.md): checkpoints in their formats (`<task>_best.pt`, `{task: tensor}` embedding files for both sides), gates
layer-normed when gathered, `embedding[:-1]` on both sides, cosine, alpha, top-p over all experts (top-k ignored) or
top-k renormalised with +1e-6. The same re-implementation with those three details switched off is the default mode."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from configuration_glider import GliderConfig
from modeling_glider import GliderT5ForConditionalGeneration
from modeling_glider.convert import convert_checkpoints
from modeling_glider.hub import render_model_card
from tests.conftest import EMBED_DIM, assert_decisive, make_base, make_expert
from tests.test_convert import glider_best_pt
from tests.test_hub import markdown_table

TASKS = ("p3paws", "p3qqp", "p3agnews", "p3wiqa")
PREFIX = "base_model.model."


class OfficialMoLoRALinear(nn.Module):
    """One routed linear as the authors' MoLoRA layer computes it (per-token logits, one routing bias per task)."""

    def __init__(self, linear, lora_A, lora_B, gates, scaling, settings):
        super().__init__()
        self.linear, self.lora_A, self.lora_B, self.scaling, self.settings = linear, lora_A, lora_B, scaling, settings
        self.gates = F.layer_norm(gates, gates.shape[-1:])  # their gather step normalises the gate rows once

    @property
    def weight(self):  # T5 reads `wo.weight.dtype`
        return self.linear.weight

    def forward(self, x):
        s = self.settings
        logits = F.layer_norm(x, x.shape[-1:]) @ self.gates.T * math.sqrt(1 / x.shape[-1])
        if s["routing_bias"] is not None:
            logits = logits + s["routing_bias"] * s["alpha"]
        if s["top_p"] is not None and s["top_p_over_all"]:
            # ascending sort; drop experts whose cumulative mass from the bottom stays within 1 - p; keep the best
            sorted_logits, order = logits.sort(dim=-1)
            remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - s["top_p"]
            remove[..., -1] = False
            remove = remove.scatter(-1, order, remove)
            weights = logits.masked_fill(remove, -math.inf).softmax(dim=-1).masked_fill(remove, 0)
        else:
            probs = logits.softmax(dim=-1)
            top, index = probs.topk(s["top_k"], dim=-1)
            if s["top_p"] is not None:  # this project's default: top-p inside the top-k
                top = top * ((top.cumsum(dim=-1) - top) < s["top_p"])
            top = top / (top.sum(dim=-1, keepdim=True) + s["eps"])
            weights = torch.zeros_like(probs).scatter(-1, index, top)
        lora = torch.einsum("btd,erd->bter", x, self.lora_A)
        return self.linear(x) + torch.einsum("bter,bte,eor->bto", lora, weights, self.lora_B) * self.scaling


def official_model(base, checkpoints, router_table, settings):
    """The base T5 with every adapted linear replaced by `OfficialMoLoRALinear`, read from the `<task>_best.pt` files."""
    model = copy.deepcopy(base)
    states = [torch.load(path, weights_only=True) for path in checkpoints]
    paths = [k[len(PREFIX) : -len(".lora_A.default.weight")] for k in states[0] if k.endswith(".lora_A.default.weight")]
    for path in paths:
        A = torch.stack([s[f"{PREFIX}{path}.lora_A.default.weight"] for s in states])
        B = torch.stack([s[f"{PREFIX}{path}.lora_B.default.weight"] for s in states])
        gates = torch.stack([s[f"{PREFIX}{path}.lora_gate.default"] for s in states])
        parent, name = path.rsplit(".", 1)
        routed = OfficialMoLoRALinear(model.get_submodule(path), A, B, gates, 1 / A.shape[1], settings)
        setattr(model.get_submodule(parent), name, routed)
    settings["router_embeddings"] = torch.stack([router_table[task] for task in TASKS])
    return model


def set_task(settings, query_embedding):
    """Their `update_routing_bias`: cosine of the task's input embedding with every expert's, both cut as configured."""
    G, u = settings["router_embeddings"], query_embedding
    if settings["drop_last"]:
        G, u = G[:, :-1], u[:-1]
    settings["routing_bias"] = F.cosine_similarity(G, u[None], dim=-1)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Four experts in the authors' `<task>_best.pt` format (all linears, rank 4, 1/r scaling) and the two embedding
    files; the embeddings' last value is made large so that dropping it changes the routing."""
    root = tmp_path_factory.mktemp("released")
    base = make_base(seed=2)
    g = torch.Generator().manual_seed(5)
    router_table, input_table = {}, {}
    for i, task in enumerate(TASKS):
        router_table[task] = torch.randn(EMBED_DIM, generator=g)
        router_table[task][-1] = 4.0 * (-1) ** i
        input_table[task] = router_table[task] + 0.8 * torch.randn(EMBED_DIM, generator=g)
        input_table[task][-1] = -4.0 * (-1) ** i
        directory = make_expert(root / "peft", base, task, r=4, lora_alpha=1, seed=10 + i)
        glider_best_pt(directory, base, root / f"{task}_best.pt")
    torch.save(router_table, root / "router_nomic_instruction_embedding.pt")
    torch.save(input_table, root / "input_nomic_instruction_embedding.pt")
    checkpoints = [root / f"{task}_best.pt" for task in TASKS]
    converted = convert_checkpoints(
        checkpoints, root / "experts", embeddings=root / "router_nomic_instruction_embedding.pt"
    )
    return base, checkpoints, converted, router_table, input_table, root


def inputs(seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 64, (batch, 7), generator=g), torch.randint(2, 64, (batch, 4), generator=g)


CASES = [  # (alpha, top_k, top_p) as in the authors' evaluation script
    (100.0, 2, None),
    (3.0, 2, None),
    (3.0, 1, None),
    (1000.0, 3, None),
    (3.0, 2, 0.25),
    (100.0, 2, 0.5),
    (3.0, 2, 0.75),
]


@pytest.mark.parametrize("alpha,top_k,top_p", CASES)
def test_reference_mode_equals_the_authors_forward(released, alpha, top_k, top_p):
    base, checkpoints, converted, router_table, input_table, _ = released
    official = {"alpha": alpha, "top_k": top_k, "top_p": top_p, "drop_last": True, "eps": 1e-6, "top_p_over_all": True}
    reference = official_model(base, checkpoints, router_table, official)
    ours_default = {**official, "drop_last": False, "eps": 0.0, "top_p_over_all": False}
    default_reference = official_model(base, checkpoints, router_table, ours_default)
    model = GliderT5ForConditionalGeneration.from_experts(
        base, converted, top_k=top_k, global_routing_scale=alpha, router_top_p=top_p,
        routing_compatibility="reference",
    )  # fmt: skip
    ids, dec = inputs()
    differs = 0
    with torch.no_grad():
        for task in TASKS:  # the paper's protocol: every query of a task routed by that task's input embedding
            u = input_table[task]
            set_task(official, u)
            set_task(ours_default, u)
            expected = reference(input_ids=ids, decoder_input_ids=dec).logits
            got = model(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u.expand(len(ids), -1)).logits
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))

            model.config.routing_compatibility = "glider"  # the default mode is this project's own computation
            got_default = model(input_ids=ids, decoder_input_ids=dec, instruction_embeddings=u.expand(len(ids), -1))
            expected_default = default_reference(input_ids=ids, decoder_input_ids=dec).logits
            torch.testing.assert_close(got_default.logits, expected_default, rtol=1e-4, atol=1e-4 * float(expected_default.abs().max()))  # fmt: skip
            model.config.routing_compatibility = "reference"
            differs += not torch.allclose(got_default.logits, expected, atol=1e-3)
    assert differs, "the two modes route these checkpoints alike: the comparison shows nothing"


def test_reference_top_p_keeps_the_mass_over_all_experts_and_ignores_top_k():
    from modeling_glider.routing import glider_routing_weights

    logits = torch.tensor([[2.0, 1.9, 1.8, 1.7, -5.0]])
    probs = logits.softmax(dim=-1)[0]
    weights, indices = glider_routing_weights(logits, None, top_k=1, top_p=0.6, reference=True)
    kept = indices[0][weights[0] > 0].tolist()
    # smallest set (best first) whose mass reaches 0.6, whatever top_k says
    expected = next(n for n in range(1, 6) if probs.sort(descending=True).values[:n].sum() >= 0.6)
    assert kept == list(range(expected)) and expected > 1
    torch.testing.assert_close(weights[0][: len(kept)], probs[kept] / probs[kept].sum())
    top, _ = glider_routing_weights(logits, None, top_k=2, reference=True)
    torch.testing.assert_close(top[0], probs[:2] / (probs[:2].sum() + 1e-6))
    assert not torch.allclose(top[0], probs[:2] / probs[:2].sum(), rtol=0, atol=1e-8)


def test_routing_compatibility_is_a_checked_recorded_knob(released, tmp_path):
    base, _, converted, _, _, _ = released
    model = GliderT5ForConditionalGeneration.from_experts(base, converted, top_k=2)
    assert model.config.routing_compatibility == "glider"
    with pytest.raises(ValueError, match="routing_compatibility must be one of .*'paper'"):
        model.config.routing_compatibility = "paper"
    assert model.config.routing_compatibility == "glider"  # the refused value was not kept
    with pytest.raises(ValueError, match="routing_compatibility must be one of"):
        GliderConfig(routing_compatibility="Reference")
    with pytest.raises(ValueError, match="instruction_embedding_dim = 1"):
        GliderConfig(routing_compatibility="reference", instruction_embedding_dim=1)
    model.config.routing_compatibility = "reference"
    model.save_pretrained(tmp_path / "saved")
    assert '"routing_compatibility": "reference"' in (tmp_path / "saved" / "config.json").read_text()
    loaded = GliderT5ForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert loaded.config.routing_compatibility == "reference"
    routing = dict(markdown_table(render_model_card(loaded.config, "org/m").text, "Routing"))
    assert routing["Routing computation (`routing_compatibility`)"].startswith("reference")


# The paper's protocol: every query of a task routed by the task's input-side embedding.


def test_the_paper_protocol_routes_every_query_of_a_task_by_its_embedding(released, tokenizer, tmp_path):
    from transformers import pipeline

    from modeling_glider.paper import task_instruction_embeddings

    base, checkpoints, converted, router_table, input_table, root = released
    model = GliderT5ForConditionalGeneration.from_experts(
        base, converted, top_k=2, global_routing_scale=100.0, routing_compatibility="reference"
    )
    path = root / "input_nomic_instruction_embedding.pt"
    tasks = ["p3paws", "p3wiqa", "p3paws"]
    rows = task_instruction_embeddings(path, tasks, model.config)
    assert torch.equal(rows, torch.stack([input_table[t] for t in tasks]))

    official = {"alpha": 100.0, "top_k": 2, "top_p": None, "drop_last": True, "eps": 1e-6, "top_p_over_all": True}
    reference = official_model(base, checkpoints, router_table, official)
    texts = ["reverse the word apple", "sort the letters of banana", "uppercase the word cherry"]
    generator = pipeline("text2text-generation", model=model, tokenizer=tokenizer, instruction_generator=None)
    got = generator(texts, instruction_embeddings=rows, max_new_tokens=4, do_sample=False)
    for text, task, output in zip(texts, tasks, got):
        set_task(official, input_table[task])
        ids = tokenizer(text, return_tensors="pt").input_ids
        expected = reference.generate(
            input_ids=ids, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        assert_decisive(expected)
        assert output[0]["generated_text"] == tokenizer.decode(expected.sequences[0], skip_special_tokens=True)

    with pytest.raises(ValueError, match=r"no entry for task 'p3pawz'; close: \['p3paws'\]"):
        task_instruction_embeddings(input_table, ["p3pawz"], model.config)
    with pytest.raises(ValueError, match=r"5 wide, the experts' 8 \(instruction_embedding_dim\)"):
        task_instruction_embeddings({"p3paws": torch.ones(5)}, ["p3paws"], model.config)
    with pytest.raises(ValueError, match="task 'p3paws' holds NaN"):
        task_instruction_embeddings({"p3paws": torch.full((8,), float("nan"))}, ["p3paws"])
    with pytest.raises(TypeError, match="one task name per query"):
        task_instruction_embeddings(input_table, "p3paws")
