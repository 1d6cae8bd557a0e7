"""diffusers interop, both ways, on a tiny random UNet: our LoRA loads through diffusers'
`load_lora_adapter` / the pipeline loader with identical outputs, diffusers' LoRA files load
through `al.load`, and `adapterlab merge` / `validate` take diffusers model directories."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import randomize_lora
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import adapterlab as al
from adapterlab.checkpoint import plan_merge, run_merge
from adapterlab.cli import main
from adapterlab.errors import AdapterFileError, ConfigError, FingerprintMismatchError

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]  # Linear and Conv2d (3x3, 1x1)
TOL = 1e-5


def tiny_unet(seed: int = 0, width: int = 32):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        cross_attention_dim=32,
        sample_size=8,
        norm_num_groups=8,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.randn(2, 5, 32, generator=g)


def run(unet) -> torch.Tensor:
    x, t, cond = inputs()
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=cond).sample


def ours(r: int = 4, alpha: float = 12.0, **kw):
    unet = al.inject(tiny_unet(), "lora", r=r, alpha=alpha, targets=TARGETS, **kw)
    randomize_lora(unet, std=0.2)
    return unet


def theirs(r: int = 4, alpha: float = 12.0, **kw):
    unet = tiny_unet()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False, **kw)
    unet.add_adapter(config)
    return unet


def differ(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def pipeline_load(unet, directory) -> None:
    """What `StableDiffusionPipeline.load_lora_weights(directory)` does to its UNet."""
    loader = diffusers.StableDiffusionPipeline
    state, alphas, metadata = loader.lora_state_dict(str(directory), return_lora_metadata=True)
    loader.load_lora_into_unet(state, alphas, unet, metadata=metadata)


# -- ours -> diffusers ----------------------------------------------------------------------------
@pytest.mark.parametrize(("alpha", "rslora"), [(4.0, False), (12.0, False), (3.0, True)])  # α = r, α ≠ r
def test_our_save_loads_in_diffusers(tmp_path, alpha, rslora):
    model = ours(alpha=alpha, rslora=rslora)
    want = run(model)
    assert differ(want, run(tiny_unet())) > 1e-3  # the adapter changes the output
    al.save(model, tmp_path, format="diffusers")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytorch_lora_weights.safetensors"]
    with safe_open(tmp_path / "pytorch_lora_weights.safetensors", "pt") as f:
        assert all(not k.startswith("base_model.") for k in f.keys())
        assert json.loads(f.metadata()["lora_adapter_metadata"])["lora_alpha"] == alpha
    loaded = tiny_unet()
    loaded.load_lora_adapter(str(tmp_path), prefix=None, use_safetensors=True)
    assert differ(run(loaded), want) <= TOL


def test_pipeline_prefix_loads_through_load_lora_weights(tmp_path):
    model = ours()
    al.save(model, tmp_path, format="diffusers", prefix="unet")
    with safe_open(tmp_path / "pytorch_lora_weights.safetensors", "pt") as f:
        assert all(k.startswith("unet.") for k in f.keys())
        assert "unet.lora_alpha" in json.loads(f.metadata()["lora_adapter_metadata"])
    loaded = tiny_unet()
    pipeline_load(loaded, tmp_path)
    assert differ(run(loaded), run(model)) <= TOL
    back = al.load(tiny_unet(), tmp_path)  # and back again
    assert differ(run(back), run(model)) == 0.0


def test_export_cli_writes_diffusers(tmp_path):
    model = ours(alpha=6.0)
    al.save(model, tmp_path / "ours")
    assert (
        main(["export", str(tmp_path / "ours"), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    )
    loaded = tiny_unet()
    loaded.load_lora_adapter(str(tmp_path / "d"), prefix=None, use_safetensors=True)
    assert differ(run(loaded), run(model)) <= TOL
    out = tmp_path / "dp"
    assert (
        main(
            ["export", str(tmp_path / "ours"), "--format", "diffusers", "--prefix", "unet", "--out", str(out)]
        )
        == 0
    )
    loaded = tiny_unet()
    pipeline_load(loaded, out)
    assert differ(run(loaded), run(model)) <= TOL


def test_diffusers_format_refuses_what_peft_cannot_hold(tmp_path):
    sparse = al.inject(tiny_unet(), "sara", density=0.1, targets=["to_q"])
    with pytest.raises(ConfigError, match="diffusers loads LoRA"):
        al.save(sparse, tmp_path / "s", format="diffusers")
    assert not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="format="):
        al.save(ours(), tmp_path / "x", format="kohya")
    with pytest.raises(ConfigError, match="prefix"):
        al.save(ours(), tmp_path / "x", prefix="unet")


def test_saving_one_format_drops_the_other(tmp_path):
    model = ours()
    al.save(model, tmp_path)
    al.save(model, tmp_path, format="diffusers")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytorch_lora_weights.safetensors"]
    al.save(model, tmp_path)
    assert "pytorch_lora_weights.safetensors" not in {p.name for p in tmp_path.iterdir()}


# -- diffusers -> ours ----------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [4, 12])
def test_save_lora_adapter_loads_in_ours(tmp_path, alpha):
    unet = theirs(alpha=alpha)
    unet.save_lora_adapter(str(tmp_path))
    model = al.load(tiny_unet(), tmp_path)
    assert differ(run(model), run(unet)) <= TOL
    assert al.adapters(model)["default"].alpha == alpha


def test_save_lora_weights_loads_in_ours(tmp_path):
    unet = theirs(alpha=8)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(tmp_path),
        unet_lora_layers=peft.utils.get_peft_model_state_dict(unet),
        # a second component: al.load picks by name
        text_encoder_lora_layers={
            "q_proj.lora_A.weight": torch.zeros(4, 8),
            "q_proj.lora_B.weight": torch.ones(8, 4),
        },
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    with pytest.raises(AdapterFileError, match=r"\['text_encoder', 'unet'\].*component="):
        al.load(tiny_unet(), tmp_path)
    model = al.load(tiny_unet(), tmp_path, component="unet")
    assert differ(run(model), run(unet)) <= TOL
    with pytest.raises(AdapterFileError, match="no LoRA for component 'transformer'"):
        al.load(tiny_unet(), tmp_path, component="transformer")


def _plain_file(tmp_path, unet, alphas: dict[str, float] | None = None):
    """A diffusers LoRA file without lora_adapter_metadata (older trainers), optional network alphas."""
    state = {k: v.contiguous() for k, v in peft.utils.get_peft_model_state_dict(unet).items()}
    for module, a in (alphas or {}).items():
        state[f"{module}.alpha"] = torch.tensor(a)
    save_file(state, tmp_path / "pytorch_lora_weights.safetensors", metadata={"format": "pt"})
    return state


def test_file_without_metadata_is_scale_one(tmp_path):
    unet = theirs(alpha=4)  # α = r: what diffusers assumes without metadata
    _plain_file(tmp_path, unet)
    model = al.load(tiny_unet(), tmp_path)
    assert differ(run(model), run(unet)) <= TOL
    loaded = tiny_unet()  # diffusers agrees
    loaded.load_lora_adapter(str(tmp_path), prefix=None, use_safetensors=True)
    assert differ(run(loaded), run(model)) <= TOL
    out = tmp_path.parent / "as-peft"  # and it converts to PEFT's directory
    assert main(["export", str(tmp_path), "--format", "peft", "--out", str(out)]) == 0
    assert differ(run(al.load(tiny_unet(), out)), run(model)) == 0.0


def test_network_alphas_give_the_scale(tmp_path):
    unet = theirs(alpha=10)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in peft.utils.get_peft_model_state_dict(unet)})
    _plain_file(tmp_path, unet, {m: 10.0 for m in modules})
    model = al.load(tiny_unet(), tmp_path)
    assert al.adapters(model)["default"].alpha == 10.0
    assert differ(run(model), run(unet)) <= TOL
    # per-module alphas: the odd module goes into alpha_pattern, outputs as diffusers computes them
    _plain_file(tmp_path, unet, {modules[0]: 3.0, **{m: 10.0 for m in modules[1:]}})
    model = al.load(tiny_unet(), tmp_path)
    assert list(al.adapters(model)["default"].alpha_pattern.values()) == [3.0]
    truth = theirs(alpha=10, alpha_pattern={modules[0]: 3.0})  # the same factors, PEFT's pattern
    truth.load_state_dict(unet.state_dict())
    assert differ(run(model), run(truth)) <= TOL
    assert differ(run(model), run(unet)) > TOL  # the pattern changed the scale of that module
    _plain_file(tmp_path, unet, {modules[0]: 10.0})  # alphas for some modules only
    with pytest.raises(AdapterFileError, match=rf"{modules[1]}.*no network alpha"):
        al.load(tiny_unet(), tmp_path)


def test_mixed_ranks_load_as_rank_pattern(tmp_path):
    unet = theirs()
    state = _plain_file(tmp_path, unet)
    key = sorted(k for k in state if k.endswith("lora_A.weight"))[0]
    module = key[: -len(".lora_A.weight")]
    state[key] = state[key][:2].contiguous()
    state[f"{module}.lora_B.weight"] = state[f"{module}.lora_B.weight"][:, :2].contiguous()
    save_file(state, tmp_path / "pytorch_lora_weights.safetensors")
    model = al.load(tiny_unet(), tmp_path)
    assert list(al.adapters(model)["default"].rank_pattern.values()) == [2]
    loaded = tiny_unet()
    loaded.load_lora_adapter(str(tmp_path), prefix=None, use_safetensors=True)
    assert differ(run(model), run(loaded)) <= TOL


def test_dora_magnitude_without_metadata_is_refused(tmp_path):
    unet = theirs()
    state = _plain_file(tmp_path, unet)
    module = sorted(k for k in state if k.endswith("lora_A.weight"))[0][: -len(".lora_A.weight")]
    state[f"{module}.lora_magnitude_vector"] = torch.ones(state[f"{module}.lora_B.weight"].shape[0])
    save_file(state, tmp_path / "pytorch_lora_weights.safetensors")
    with pytest.raises(AdapterFileError, match=rf"{module}.lora_magnitude_vector.*use_dora"):
        al.load(tiny_unet(), tmp_path)


def test_file_for_another_unet_is_refused(tmp_path):
    theirs().save_lora_adapter(str(tmp_path / "d"))
    model = tiny_unet(width=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=r"module 'down_blocks\.0\.[\w.]+'.*shape"):
        al.load(model, tmp_path / "d")
    assert al.adapters(model) == {}  # nothing half-applied
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    al.save(ours(), tmp_path / "o", format="diffusers")  # ours carries a fingerprint
    with pytest.raises(FingerprintMismatchError, match="down_blocks"):
        al.load(tiny_unet(width=16), tmp_path / "o")


# -- merge into diffusers model directories -------------------------------------------------------
def _pipeline_dir(tmp_path):
    """A diffusers pipeline directory with only its UNet (all `merge` reads)."""
    root = tmp_path / "pipe"
    tiny_unet().save_pretrained(root / "unet")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.mark.parametrize("method", ["lora", "sara"])
@pytest.mark.parametrize("where", ["pipeline", "unet"])
def test_merge_into_diffusers_dir(tmp_path, method, where):
    pipe = _pipeline_dir(tmp_path)
    kw = {"r": 4, "alpha": 12} if method == "lora" else {"density": 0.05}
    model = al.inject(tiny_unet(), method, targets=TARGETS, **kw)
    if method == "lora":
        randomize_lora(model, std=0.2)
    else:
        with torch.no_grad():  # the sparse values start at zero
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.5)
    al.save(model, tmp_path / "adapter")
    base = pipe if where == "pipeline" else pipe / "unet"
    assert main(["validate", str(tmp_path / "adapter"), "--base", str(base)]) == 0
    assert (
        main(
            [
                "merge",
                "--base",
                str(base),
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "m" / "config.json").is_file()
    merged = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "m").eval()
    want = run(model)
    assert differ(want, run(tiny_unet())) > 1e-3
    assert differ(run(merged), want) <= TOL


def test_merge_takes_the_pipelines_component_of_a_pipeline_file(tmp_path):
    pipe = _pipeline_dir(tmp_path)
    unet = theirs(alpha=8)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "lora"),
        unet_lora_layers=peft.utils.get_peft_model_state_dict(unet),
        text_encoder_lora_layers={
            "q_proj.lora_A.weight": torch.ones(4, 8),
            "q_proj.lora_B.weight": torch.ones(8, 4),
        },
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    run_merge(plan_merge(pipe, [tmp_path / "lora"]), tmp_path / "m", progress=False)
    merged = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "m").eval()
    assert differ(run(merged), run(unet)) <= TOL


def test_merge_sharded_diffusers_unet(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "unet", max_shard_size="300KB")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    theirs(alpha=8).save_lora_adapter(str(tmp_path / "lora"))
    plan = plan_merge(tmp_path / "unet", [tmp_path / "lora"], shard_size=300_000)
    assert len(plan.outputs) > 1
    run_merge(plan, tmp_path / "m", progress=False)
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    merged = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "m").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert differ(run(merged), run(theirs(alpha=8))) <= TOL


def test_diffusers_model_dirs_stay_strict(tmp_path):
    pipe = _pipeline_dir(tmp_path)
    al.save(ours(), tmp_path / "a")
    (pipe / "transformer").mkdir()
    index = json.loads((pipe / "model_index.json").read_text())
    (pipe / "model_index.json").write_text(json.dumps({**index, "transformer": ["diffusers", "X"]}))
    with pytest.raises(AdapterFileError, match="both unet and transformer"):
        plan_merge(pipe, [tmp_path / "a"])
    (pipe / "model_index.json").write_text("[1]")
    with pytest.raises(AdapterFileError, match="not a JSON object"):
        plan_merge(pipe, [tmp_path / "a"])
    unet = pipe / "unet"
    (unet / "model.safetensors").write_bytes((unet / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(AdapterFileError, match="both"):
        plan_merge(unet, [tmp_path / "a"])
    (unet / "model.safetensors").unlink()
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="diffusion_pytorch_model"):
        plan_merge(unet, [tmp_path / "a"])


# -- invariants -----------------------------------------------------------------------------------
@given(
    r=st.integers(1, 6),
    alpha=st.floats(0.25, 64.0, allow_nan=False),
    rslora=st.booleans(),
    prefix=st.sampled_from([None, "unet", "transformer"]),
)
def test_diffusers_round_trip_keeps_config_and_outputs(tmp_path_factory, r, alpha, rslora, prefix):
    """al.save(format="diffusers") → al.load: the same config (so the same scale) and outputs, and
    the header's LoraConfig fields carry that α, r and rsLoRA (what diffusers builds its scale from)."""

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.Flatten(), torch.nn.Linear(6 * 9, 5))

    model = al.inject(build(), "lora", r=r, alpha=alpha, rslora=rslora, targets=["0", "2"])
    randomize_lora(model)
    out = tmp_path_factory.mktemp("d")
    al.save(model, out, format="diffusers", prefix=prefix)
    lead = f"{prefix}." if prefix else ""
    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as f:
        fields = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (fields[lead + "r"], fields[lead + "lora_alpha"], fields[lead + "use_rslora"]) == (
        r,
        alpha,
        rslora,
    )
    back = al.load(build(), out)
    assert al.adapters(back)["default"] == al.adapters(model)["default"]
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_a_model_whose_top_module_is_named_like_a_component_round_trips(tmp_path):
    """GPT-2's modules live under `transformer.`: the file's unprefixed LoraConfig fields say the
    keys are module paths, not a pipeline's `transformer` component."""
    from conftest import tiny_gpt2

    model = al.inject(tiny_gpt2(), "lora", r=2, alpha=5, targets=["c_attn"])
    randomize_lora(model)
    al.save(model, tmp_path, format="diffusers")
    back = al.load(tiny_gpt2(), tmp_path)
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
