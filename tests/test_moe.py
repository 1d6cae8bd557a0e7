"""Mixture-of-experts models: adapters on the stacked expert weights (experts.py, lora_experts.py)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import adapterlab as al
from adapterlab.experts import legacy_pieces, pieces_mismatch
from adapterlab.files.adapter_dir import AdapterFile

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_qwen3_moe():
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return transformers.Qwen3MoeForCausalLM(cfg)


def tiny_mixtral():
    cfg = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    return transformers.MixtralForCausalLM(cfg)


def tiny_gpt_oss():
    cfg = transformers.GptOssConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )
    return transformers.GptOssForCausalLM(cfg)


def tiny_deepseek_v3():
    cfg = transformers.DeepseekV3Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        moe_intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        q_lora_rank=8,
        kv_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=4,
    )
    return transformers.DeepseekV3ForCausalLM(cfg)


ARCHS = {
    "qwen3_moe": tiny_qwen3_moe,
    "mixtral": tiny_mixtral,
    "gpt_oss": tiny_gpt_oss,
    "deepseek_v3": tiny_deepseek_v3,
}
X = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def build(arch, seed=0):
    torch.manual_seed(seed)
    model = ARCHS[arch]().eval()
    with torch.no_grad():  # gpt-oss initialises its expert biases to zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0, 0.1)
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=X).logits


def randomize(model, std=0.2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A" in name or ".lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * std)


def expert_params(model):
    return sorted(n for n, p in model.named_parameters() if p.dim() == 3)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_lora_on_experts_trains_merges_saves(tmp_path, arch):
    model = build(arch)
    keys, base_out, stacked = list(model.state_dict()), logits(model), expert_params(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    al.inject(model, "lora", targets="all-experts", r=2, alpha=4)
    targets = sorted(p for p, _, _ in al.model.deltas(model, "default"))
    assert targets == stacked and len(targets) == 2 * model.config.num_hidden_layers
    # a training step moves only the adapter's tensors
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=X, labels=X).loss.backward()
    opt.step()
    model.eval()
    now = {n.replace(".base_layer.weight", ""): p for n, p in model.named_parameters()}
    assert all(torch.equal(now[n], p) for n, p in before.items())  # the base did not move
    assert all(now[n].abs().sum() > 0 for n in now if ".lora_B" in n)  # every B (zero at start) did
    randomize(model)
    out = logits(model)
    assert (out - base_out).abs().max() > 1e-3
    al.merge(model)
    assert (logits(model) - out).abs().max() <= 1e-5
    al.unmerge(model)
    for path, layer, _ in al.model.deltas(model, "default"):
        assert torch.allclose(layer.base_layer.weight, before[path], atol=1e-6, rtol=0)
    assert (logits(model) - out).abs().max() <= 1e-6
    al.save(model, tmp_path / "a")
    al.unload(model)
    assert list(model.state_dict()) == keys
    assert (logits(model) - base_out).abs().max() <= 1e-5
    al.load(model, tmp_path / "a")
    assert torch.equal(logits(model), out)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_peft_target_parameters_loads_in_ours(tmp_path, arch):
    names = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    theirs = peft.get_peft_model(
        build(arch), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=names)
    )
    randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ours = al.load(build(arch), tmp_path)
    assert (logits(ours) - logits(build(arch))).abs().max() > 1e-3
    assert (logits(ours) - logits(theirs)).abs().max() <= 1e-5
    with pytest.raises(al.AdapterFileError, match="needs the model"):  # the CLI cannot tell the nesting
        AdapterFile.open(tmp_path)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_our_expert_lora_loads_in_peft(tmp_path, arch):
    ours = al.inject(
        build(arch),
        "lora",
        targets=["experts.gate_up_proj", "experts.down_proj", "o_proj"],
        layers=[1],
        r=2,
        alpha=4,
    )
    randomize(ours)
    al.save(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(arch), tmp_path)
    assert (logits(ours) - logits(build(arch))).abs().max() > 1e-3
    assert (logits(ours) - logits(theirs)).abs().max() <= 1e-5


class MyExperts(nn.Module):
    """Experts of a layout adapterlab does not know: y[e] = x @ w[e]ᵀ for the routed expert."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, 6))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x, expert):
        return nn.functional.linear(x, self.w[expert]) * self.scale[expert]


def unchanged(model, keys):
    hooks = [m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks]
    return list(model.state_dict()) == keys and not hooks and not al.adapters(model)


@pytest.mark.parametrize(
    "arch, options, words",
    [
        ("gpt_oss", {"targets": ["mlp.experts.gate_up_proj_bias"]}, "not a weight matrix or a stack"),
        ("qwen3_moe", {"targets": ["self_attn.q_norm.weight"]}, "target the module"),
        ("qwen3_moe", {"targets": "all-experts", "r": 9}, "exceeds"),  # down_proj is (4, 16, 8)
        ("mixtral", {"targets": "all-experts", "dropout": 0.1}, "dropout"),
    ],
)
def test_bad_expert_targets_are_refused_before_anything_changes(arch, options, words):
    model = build(arch)
    keys = list(model.state_dict())
    with pytest.raises(al.UnsupportedModuleError, match=words):
        al.inject(model, "lora", **options)
    assert unchanged(model, keys)


def test_unknown_layout_is_refused_until_registered():
    model = nn.Sequential(MyExperts())
    keys, x = list(model.state_dict()), torch.randn(5, 6)
    with pytest.raises(al.UnsupportedModuleError, match="register_layout"):
        al.inject(model, "lora", targets=["w"], r=2)
    assert unchanged(model, keys)
    with pytest.raises(al.TargetError):
        al.inject(model, "lora", targets="all-experts", r=2)
    al.experts.register_layout("MyExperts", transposed=False)
    try:
        al.inject(model, "lora", targets=["0.w"], r=2)
    finally:
        del al.experts.LAYOUTS["MyExperts"]
    randomize(model)
    ((_, layer, delta),) = al.model.deltas(model, "default")
    want = [
        x @ (layer.base_layer.weight[e] + delta.delta_weight()[e]).T * model[0].scale[e] for e in range(3)
    ]
    for e in range(3):
        assert torch.allclose(model[0](x, e), want[e], atol=1e-6)
    assert delta.lora_A.weight.shape == (3, 2, 6) and delta.lora_B.weight.shape == (3, 4, 2)


def test_exclude_and_layers_apply_to_expert_weights():
    model = al.inject(
        build("qwen3_moe"), "lora", targets="all-experts", exclude=["down_proj"], layers=[1], r=2
    )
    assert [p for p, _, _ in al.model.deltas(model, "default")] == ["model.layers.1.mlp.experts.gate_up_proj"]
    model = al.inject(build("qwen3_moe"), "lora", targets=r".*experts\.down_proj", r=2)
    assert len(al.model.deltas(model, "default")) == 2


def test_routing_refuses_expert_weights():
    model = al.inject(build("qwen3_moe"), "lora", targets="all-experts", r=2)
    with pytest.raises(al.RoutingError, match="expert weight"), al.routing(model, ["default", None]):
        model(input_ids=X)
    assert all(not m.__dict__.get("gate_up_proj") for m in model.modules())  # nothing left in place


@given(
    experts=st.integers(1, 4),
    rank=st.integers(1, 3),
    dims=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3),
)
def test_peft_layout_round_trip(experts, rank, dims):
    from adapterlab.methods.lora_experts import from_peft_tensors, to_peft_tensors

    gen = torch.Generator().manual_seed(0)
    modules, tensors = {}, {}
    for i, (n_out, n_in) in enumerate(dims):
        path = f"m.experts.p{i}"
        modules[path] = {"type": "ExpertWeights", "shape": [experts, n_out, n_in], "index": i}
        tensors[f"{path}.lora_A.weight"] = torch.randn(experts, rank, n_in, generator=gen)
        tensors[f"{path}.lora_B.weight"] = torch.randn(experts, n_out, rank, generator=gen)
    tensors["m.q.lora_A.weight"] = torch.randn(rank, 3, generator=gen)
    peft_side = to_peft_tensors(tensors, modules)
    assert len(peft_side) == len(tensors)
    assert sum(".base_layer." in k for k in peft_side) == 2 * (len(dims) - 1)
    back = from_peft_tensors(peft_side, modules, "test")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def train(model, steps=2, lr=0.5):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        opt.zero_grad()
        model(input_ids=X, labels=X).loss.backward()
        al.before_step(model, step)
        opt.step()
        al.after_step(model, step, opt)
    model.eval()


@pytest.mark.parametrize(
    "method, options",
    [
        ("dense", {}),
        ("sara", {"density": 0.2, "nuclear_min_dim": 2}),
        ("sft", {"density": 0.1, "full_steps": 1}),
    ],
)
def test_entrywise_methods_on_expert_weights(tmp_path, method, options):
    model = build("qwen3_moe")
    base, before = logits(model), {n: p.detach().clone() for n, p in model.named_parameters()}
    al.inject(model, method, targets="all-experts", **options)
    train(model)
    if method == "sft":
        al.sft.finish(model)
    found = al.model.deltas(model, "default")
    assert len(found) == 4 and all(d.delta_weight().shape == layer.weight.shape for _, layer, d in found)
    if method != "dense":  # O(k) state: the support and its values, never a dense ΔW
        assert all(isinstance(d, al.SparseDelta) and 0 < d.k < d.numel for _, _, d in found)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # SaRA trains the smallest entries: make the change visible at the output
        for _, _, d in found:
            for p in d.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    out = logits(model)
    assert (out - base).abs().max() > 1e-3
    al.merge(model)
    assert (logits(model) - out).abs().max() <= 1e-5
    al.unmerge(model)
    for path, layer, _ in found:
        if method == "dense":
            assert torch.allclose(layer.weight, before[path], atol=1e-6, rtol=0)
        else:
            assert torch.equal(layer.weight, before[path])  # sparse deltas restore bit for bit
    al.save(model, tmp_path / "a")
    assert torch.equal(logits(al.load(build("qwen3_moe"), tmp_path / "a")), out)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_hft_categories_know_experts_and_router(tmp_path, arch):
    model = al.inject(build(arch), "hft", seed=3)
    chosen = al.adapters(model)["default"].targets
    kinds = {p.rsplit(".", 1)[1] for p in chosen}
    assert kinds & {"gate_up_proj", "down_proj"} and kinds & {"gate", "router"}
    train(model, steps=1)
    out = logits(model)
    al.merge(model)
    assert (logits(model) - out).abs().max() <= 1e-5
    al.unmerge(model)
    al.save(model, tmp_path / "a")
    assert (logits(al.load(build(arch), tmp_path / "a")) - out).abs().max() <= 1e-6


@pytest.mark.parametrize(
    "arch, method, options",
    [
        ("qwen3_moe", "lora", {"r": 2, "alpha": 4}),  # saved per expert: gate_proj, up_proj, down_proj
        ("mixtral", "sara", {"density": 0.1}),  # per expert, block_sparse_moe.experts.<e>.w1 / w3 / w2
        ("gpt_oss", "lora", {"r": 2, "alpha": 4}),  # saved fused, (E, in, out)
    ],
)
def test_cli_merge_of_a_sharded_moe_checkpoint_equals_al_merge(tmp_path, arch, method, options):
    from safetensors.torch import load_file

    from adapterlab.cli import main

    build(arch).save_pretrained(tmp_path / "base", max_shard_size="20KB")
    model = al.inject(build(arch), method, targets="all-experts", **options)
    randomize(model)
    with torch.no_grad():
        for _, _, d in al.model.deltas(model, "default"):
            if hasattr(d, "values"):
                d.values.normal_(0, 0.1)
    al.save(model, tmp_path / "adapter")
    args = ["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    assert main([*args, "--out", str(tmp_path / "out"), "--shard-size", "20KB"]) == 0
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 1
    files = {k: t for s in shards for k, t in load_file(s).items()}
    before = {
        k: t for s in sorted((tmp_path / "base").glob("*.safetensors")) for k, t in load_file(s).items()
    }
    assert files.keys() == before.keys()
    changed = {k for k in files if not torch.equal(files[k], before[k])}
    assert changed == {k for k in before if ".experts." in k and not k.endswith("_bias")}
    assert len(changed) == (4 if arch == "gpt_oss" else 2 * 4 * 3)  # fused, or layers × experts × 3
    got = type(model).from_pretrained(tmp_path / "out").state_dict()
    want = al.unload(model, merge=True).state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], w) for k, w in want.items())  # al.merge's bits


def test_two_adapters_stack_on_expert_weights_and_delete_restores_the_parameter():
    model = build("qwen3_moe")
    base, keys = logits(model), list(model.state_dict())
    al.inject(model, "lora", name="a", targets="all-experts", r=2)
    al.inject(model, "lora", name="b", targets=["mlp.experts.down_proj"], r=3)
    randomize(model)
    al.set_active(model, ["a", "b"])
    both = logits(model)
    al.set_active(model, "a")
    only_a = logits(model)
    assert (both - only_a).abs().max() > 1e-3
    with al.disabled(model):
        assert torch.equal(logits(model), base)
    al.set_active(model, ["a", "b"])
    al.merge(model)
    assert (logits(model) - both).abs().max() <= 1e-5
    al.unmerge(model)
    al.delete(model, "b")  # fp32 unmerge subtracts again: within an ulp of the weights before merging
    assert (logits(model) - only_a).abs().max() <= 1e-6
    al.delete(model, "a")
    assert list(model.state_dict()) == keys and (logits(model) - base).abs().max() <= 1e-6
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_per_expert_checkpoint_keys():
    keys = {
        f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight": torch.zeros(6, 4)
        for e in range(3)
        for w in ("w1", "w3")
    }
    pieces = legacy_pieces("model.layers.0.mlp.experts.gate_up_proj", keys)
    assert [p[1:] for p in pieces] == [(e, j, 2) for e in range(3) for j in range(2)]
    assert pieces[1][0] == "model.layers.0.block_sparse_moe.experts.0.w3.weight"  # gate rows, then up rows
    assert pieces_mismatch("x", [3, 12, 4], pieces, keys) == ""
    assert "holds 6 weights [6, 4]" in pieces_mismatch("x", [3, 10, 4], pieces, keys)
    assert legacy_pieces("model.layers.0.mlp.experts.down_proj", keys) is None


def test_hotswap_and_dense_combine_of_expert_lora(tmp_path):
    source = al.inject(build("gpt_oss"), "lora", targets="all-experts", r=2, alpha=4)
    randomize(source, seed=5)
    al.save(source, tmp_path / "a")
    model = al.inject(build("gpt_oss"), "lora", targets="all-experts", r=2, alpha=8)  # another scaling
    al.hotswap(model, tmp_path / "a")
    assert (logits(model) - logits(source)).abs().max() <= 1e-6
    with pytest.raises(al.HotswapError, match="per MoE expert"):
        al.prepare_hotswap(model, 4)
    al.inject(model, "lora", name="b", targets="all-experts", r=2)
    randomize(model, seed=6)
    al.set_active(model, {"default": 1.0, "b": 0.5})
    want = logits(model)
    with pytest.raises(al.UnsupportedModuleError, match="kind='dense'"):
        al.combine(model, {"default": 1.0, "b": 0.5})
    al.combine(model, {"default": 1.0, "b": 0.5}, kind="dense")
    al.set_active(model, "combined")
    assert (logits(model) - want).abs().max() <= 1e-5


def test_gradient_checkpointing_recomputes_the_adapted_weight():
    grads = []
    for checkpointing in (False, True):
        model = al.inject(build("qwen3_moe"), "lora", targets="all-experts", r=2)
        randomize(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(input_ids=X, labels=X).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
        assert not any(m.__dict__.get("down_proj") is not None for m in model.modules())
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))
    assert all(g.abs().sum() > 0 for g in grads[0])


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_sara_deltas_on_experts_combine(kind):
    model = build("qwen3_moe")
    for name, seed in (("a", 1), ("b", 2)):
        al.inject(model, "sara", name=name, targets="all-experts", density=0.1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, _, d in al.model.deltas(model, name):
                d.values.copy_(torch.randn(d.values.shape, generator=gen) * 0.1)
    al.set_active(model, {"a": 1.0, "b": 0.5})
    want = logits(model)
    al.combine(model, {"a": 1.0, "b": 0.5}, kind=kind)
    al.set_active(model, "combined")
    assert (logits(model) - want).abs().max() <= 1e-5
    assert (want - logits(build("qwen3_moe"))).abs().max() > 1e-3
