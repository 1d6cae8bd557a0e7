"""LEVI: a frozen backbone, heads on chosen layers fed [h_l; g(x)], a learned ensemble; save/load."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterlab as al
from adapterlab.methods.levi import LEVI

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_bert(layers: int = 3, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=3,
        )
    )


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (8, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[:3, 6:] = 0
    labels = ids[:, 0] % 3  # learnable from the raw input
    return ids, mask, labels


def fit(levi: nn.Module, inputs: dict, labels: torch.Tensor, steps: int = 15) -> list[float]:
    opt = torch.optim.Adam([p for p in levi.parameters() if p.requires_grad], lr=1e-2)
    levi.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(levi(**inputs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_backbone_is_bit_identical_after_training_and_the_rest_learns():
    bert = tiny_bert()
    bert.train()  # LEVI puts the backbone in eval mode (dropout off) whatever it was
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    levi = LEVI(bert, num_classes=3)
    assert levi.taps == [f"bert.encoder.layer.{i}" for i in range(3)]
    trained = {n for n, p in levi.named_parameters() if p.requires_grad}
    assert trained and not any(n.startswith("backbone.") for n in trained)
    ids, mask, labels = batch()
    mix_before = levi.mix.detach().clone()
    losses = fit(levi, {"input_ids": ids, "attention_mask": mask}, labels)
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(levi.mix, mix_before)  # the ensemble weights learn too
    assert not bert.training
    for k, v in bert.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in bert.parameters())


def test_ensemble_is_the_softmax_weighted_sum_of_the_heads():
    levi = LEVI(tiny_bert(), num_classes=3, layers=[0, 2], head_hidden=0)
    assert levi.taps == ["bert.encoder.layer.0", "bert.encoder.layer.2"]
    with torch.no_grad():
        levi.mix.copy_(torch.tensor([0.3, -1.0]))
        ids, mask, _ = batch(1)
        logits, heads = levi(input_ids=ids, attention_mask=mask, return_heads=True)
    w = torch.softmax(torch.tensor([0.3, -1.0]), 0)
    assert heads.shape == (2, 8, 3)
    assert torch.allclose(logits, w[0] * heads[0] + w[1] * heads[1], atol=1e-6)


def test_the_backbone_stops_after_the_last_tapped_layer():
    bert = tiny_bert()
    calls = []
    bert.bert.encoder.layer[2].register_forward_hook(lambda *a: calls.append("layer2"))
    bert.classifier.register_forward_hook(lambda *a: calls.append("classifier"))
    levi = LEVI(bert, num_classes=3, layers=[0, 1])
    levi(input_ids=batch()[0])
    assert calls == []


def test_save_load_reproduces_outputs_and_checks_the_backbone(tmp_path):
    levi = LEVI(tiny_bert(), num_classes=3, layers=[1, 2], side_dim=16)
    ids, mask, labels = batch()
    fit(levi, {"input_ids": ids, "attention_mask": mask}, labels, steps=3)
    levi.eval()
    with torch.no_grad():
        expected = levi(input_ids=ids, attention_mask=mask)
    al.levi.save(levi, tmp_path / "levi")
    loaded = al.levi.load(tiny_bert(), tmp_path / "levi")
    assert loaded.config == levi.config
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask), expected)
    with pytest.raises(al.FingerprintMismatchError, match="bert.encoder.layer.2.*missing"):
        al.levi.load(tiny_bert(layers=2), tmp_path / "levi")
    lora_model = al.inject(tiny_bert(), "lora", r=2, targets=["query"])
    al.save(lora_model, tmp_path / "lora")
    with pytest.raises(al.AdapterFileError, match="'lora' adapter, not LEVI"):
        al.levi.load(tiny_bert(), tmp_path / "lora")


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_plain_module_with_layer_names(tmp_path):
    torch.manual_seed(0)
    net = Plain()
    x = torch.randn(6, 1, 5, 5)
    levi = LEVI(net, layer_names=["stem", "block.1"], num_classes=2, input_dim=25, example=x)
    assert levi.config.layer_dims == [4, 6]  # found by a probe forward
    labels = (x.flatten(1).sum(1) > 0).long()
    fit(levi, {"x": x}, labels, steps=5)
    levi.eval()
    al.levi.save(levi, tmp_path / "plain")
    torch.manual_seed(0)
    loaded = al.levi.load(Plain(), tmp_path / "plain")
    with torch.no_grad():
        assert torch.equal(loaded(x), levi(x))


def test_al_load_points_to_levi_load(tmp_path):
    al.levi.save(LEVI(tiny_bert(), num_classes=3), tmp_path / "levi")
    with pytest.raises(al.AdapterFileError, match=r"al.levi.load"):
        al.load(tiny_bert(), tmp_path / "levi")


def test_not_mergeable_and_bad_input():
    levi = LEVI(tiny_bert(), num_classes=3)
    with pytest.raises(al.MergeError, match="cannot be merged.*al.levi.save"):
        al.merge(levi)
    with pytest.raises(al.MergeError, match="cannot be merged"):
        al.unload(levi, merge=True)
    with pytest.raises(al.ConfigError, match="side network.*al.levi.LEVI"):
        al.inject(tiny_bert(), "levi")
    with pytest.raises(al.TargetError, match="'blok.1' matches no module.*closest: 'block.1'"):
        LEVI(Plain(), layer_names=["blok.1"], input_dim=25)
    with pytest.raises(al.ConfigError, match="layer_names="):
        LEVI(nn.Linear(3, 3), input_dim=3)
    with pytest.raises(al.ConfigError, match="layers=.*out of range.*0..2"):
        LEVI(tiny_bert(), layers=[5])
    with pytest.raises(al.ConfigError, match="layer_dims=.*or example="):
        LEVI(Plain(), layer_names=["stem"], input_dim=25)
    with pytest.raises(al.ConfigError, match="vocab_size=.*input_dim="):
        LEVI(Plain(), layer_names=["stem"], layer_dims=[4])
    with pytest.raises(al.ConfigError, match="pool="):
        LEVI(tiny_bert(), pool="max")
