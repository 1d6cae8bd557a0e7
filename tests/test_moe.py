"""Mixture-of-experts models: adapters on the stacked expert weights (experts.py, lora_experts.py)."""

import pytest
import torch

import adapterlab as al

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
