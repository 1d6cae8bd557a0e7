"""The CLI against checkpoints that transformers 5 renames at load (issue #16 item 3): an adapter
trained on the model `from_pretrained` gives (ViT's `vit.layers.0.attention.q_proj`) validates and
merges into the very directory it was loaded from (ViT's `vit.encoder.layer.0.attention.attention.
query.weight` on disk), and the merged directory loads with the adapted model's outputs. A weight
transformers builds by a conversion (Dinov2's SwiGLU `weights_in`, chunked into gate/up) is refused
with the conversion named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora
from safetensors import safe_open

import adapterlab as al
from adapterlab.cli import main
from adapterlab.errors import MergeError
from adapterlab.files.adapter_dir import AdapterFile
from adapterlab.files.checkpoint_dir import open_checkpoint
from adapterlab.keymap import KeyMap, key_map
from adapterlab.locate import locate, locate_adapter, located

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.conversion_mapping")  # transformers 5: load-time renaming

IMAGES = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def vit_dir(root: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        image_size=16, patch_size=8, num_labels=3,
    )  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(root / "vit")
    return root / "vit"


def dinov2_dir(root: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=16,
        patch_size=8, use_swiglu_ffn=True,
    )  # fmt: skip
    transformers.Dinov2Model(config).save_pretrained(root / "dinov2")
    return root / "dinov2"


def keys_of(directory: Path) -> set[str]:
    with safe_open(directory / "model.safetensors", "pt") as f:
        return set(f.keys())


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values=IMAGES)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def adapt_validate_merge(tmp_path: Path, base: Path, model_class: type, targets: list[str], capsys) -> None:
    """Inject LoRA on the model loaded from `base`, save it, then `adapterlab validate` and `merge`
    against `base`: both succeed, the merged directory keeps `base`'s key names and loads (with
    `from_pretrained`) with the adapted model's outputs."""
    model = model_class.from_pretrained(base).eval()
    renamed = [n for n, _ in model.named_modules() if any(n.endswith(t) for t in targets)]
    assert renamed and not any(f"{n}.weight" in keys_of(base) for n in renamed)  # the setup
    al.inject(model, "lora", r=4, alpha=8, targets=targets)
    randomize_lora(model)
    al.save(model, tmp_path / "adapter")
    assert main(["validate", str(tmp_path / "adapter"), "--base", str(base)]) == 0, capsys.readouterr()
    out = tmp_path / "merged"
    assert (
        main(["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    )
    assert keys_of(out) == keys_of(base)
    merged = model_class.from_pretrained(out).eval()
    assert (outputs(merged) - outputs(model)).abs().max().item() <= 1e-5
    with al.disabled(model):  # the merge changed the targeted weights, not others
        assert (outputs(merged) - outputs(model)).abs().max().item() > 1e-3


def test_vit_adapter_validates_merges_and_exports_against_its_own_checkpoint(tmp_path, capsys):
    base = vit_dir(tmp_path)
    adapt_validate_merge(
        tmp_path, base, transformers.ViTForImageClassification, ["q_proj", "v_proj", "fc1", "fc2"], capsys
    )
    # export --format dense --base: each ΔW under the checkpoint key it adds to (merged − base there)
    dense = tmp_path / "delta.safetensors"
    args = ["export", str(tmp_path / "adapter"), "--format", "dense", "--out", str(dense)]
    assert main([*args, "--base", str(base)]) == 0
    assert main([*args[:-1], str(tmp_path / "d.safetensors"), "--format", "peft", "--base", str(base)]) == 1
    merged = tmp_path / "merged" / "model.safetensors"
    with (
        safe_open(dense, "pt") as d,
        safe_open(base / "model.safetensors", "pt") as b,
        safe_open(merged, "pt") as m,
    ):
        assert len(list(d.keys())) == 8 and set(d.keys()) < set(b.keys())
        assert "vit.encoder.layer.1.attention.attention.query.weight" in set(d.keys())
        for key in d.keys():
            change = m.get_tensor(key) - b.get_tensor(key)
            assert (change - d.get_tensor(key)).abs().max().item() <= 1e-6


def test_dinov2_renamed_weights_merge_and_a_chunked_one_is_refused_by_name(tmp_path, capsys):
    base = dinov2_dir(tmp_path)
    adapt_validate_merge(tmp_path, base, transformers.Dinov2Model, ["q_proj", "o_proj", "down_proj"], capsys)
    model = transformers.Dinov2Model.from_pretrained(base)
    al.inject(model, "lora", r=2, targets=["up_proj"])
    al.save(model, tmp_path / "up")
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "up"), "--base", str(base)]) == 1
    report = capsys.readouterr().out
    assert (
        "FAIL  modules" in report and "'encoder.layer.0.mlp.up_proj'" in report and "Chunk(dim=0)" in report
    )
    with pytest.raises(MergeError, match=r"up_proj'.*conversion.*Chunk\(dim=0\) of 'encoder\.layer\.0\.mlp"):
        locate_adapter(AdapterFile.open(tmp_path / "up"), open_checkpoint(base))
    assert main(
        ["merge", "--base", str(base), "--adapter", str(tmp_path / "up"), "--out", str(tmp_path / "x")]
    )
    assert "weights_in" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_an_adapter_from_the_head_class_maps_through_the_renaming_and_a_prefix(tmp_path):
    """ViTModel's checkpoint (no `vit.` prefix, old names) and an adapter with the head class's
    paths: the renamed name matched by dotted suffix, mapped back to the on-disk key."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=37, image_size=16, patch_size=8)  # fmt: skip
    transformers.ViTModel(config).save_pretrained(tmp_path / "b")
    base = open_checkpoint(tmp_path / "b")
    found = locate(["vit.layers.0.attention.q_proj", "vit.layers.0.mlp.fc2"], base.tensors,
                   key_map(base.root, base.tensors))  # fmt: skip
    assert found.keys == {
        "vit.layers.0.attention.q_proj": "encoder.layer.0.attention.attention.query.weight",
        "vit.layers.0.mlp.fc2": "encoder.layer.0.output.dense.weight",
    }
    # an adapter that names the keys as they are on disk (trained where transformers did not rename)
    old_names = ["vit.encoder.layer.0.attention.attention.query", "encoder.layer.0.output.dense"]
    assert located([*old_names, "vit.layers.0.attention.k_proj"], base).keys == {
        old_names[0]: "encoder.layer.0.attention.attention.query.weight",
        old_names[1]: "encoder.layer.0.output.dense.weight",
        "vit.layers.0.attention.k_proj": "encoder.layer.0.attention.attention.key.weight",
    }


def test_no_config_an_unknown_type_custom_code_or_a_bad_config_keep_the_keys(tmp_path):
    keys = ["encoder.layer.0.attention.attention.query.weight"]
    assert key_map(tmp_path, keys) == KeyMap.identity(keys)  # no config.json
    for config in (
        {"model_type": "not-a-model"},
        {"model_type": "vit", "architectures": ["MyOwnViT"], "auto_map": {"AutoModel": "x.MyOwnViT"}},
        {"model_type": "vit", "hidden_size": "thirty-two"},  # transformers cannot build it
    ):
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert key_map(tmp_path, keys) == KeyMap.identity(keys), config
    # an architecture transformers does not name: AutoModel's class for the type, with its renaming
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["Gone"]}))
    assert key_map(tmp_path, keys).names == {"layers.0.attention.q_proj.weight": keys[0]}


def test_a_config_out_of_proportion_to_the_checkpoint_is_not_built(tmp_path):
    """A hostile config.json (a billion layers) over a one-tensor checkpoint: the meta build stops
    at a bound proportional to the checkpoint's tensors, and the keys keep their names."""
    config = {"model_type": "vit", "num_hidden_layers": 10**9, "hidden_size": 8, "num_attention_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    keys = ["encoder.layer.0.attention.attention.query.weight"]
    assert key_map(tmp_path, keys) == KeyMap.identity(keys)


def test_two_keys_loaded_under_one_name_are_ambiguous_and_identity_is_the_default():
    names = KeyMap(names={"b.weight": "b.weight"}, clashes={"a.q.weight": ["a.x.weight", "a.y.weight"]})
    found = locate(["a.q", "b"], ["a.x.weight", "a.y.weight", "b.weight"], names)
    assert found.ambiguous == {"a.q": ["a.x.weight", "a.y.weight"]} and found.keys == {"b": "b.weight"}
    assert locate(["a.x"], ["m.a.x.weight"]).keys == {"a.x": "m.a.x.weight"}
