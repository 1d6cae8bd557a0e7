"""Tiny random models of the architecture families the library is tested on (hidden 32, 2 layers),
each with a fixed input and a function that runs it to one output tensor. Used by
test_architectures.py and test_hft_anywhere.py; nothing is downloaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

TRANSFORMERS = ["llama", "qwen2", "mistral", "gpt2", "bert", "t5", "vit", "clip", "whisper"]
CONV = ["cnn_bn", "unet", "timm_resnet", "timm_convnext"]
FAMILIES = TRANSFORMERS + CONV
TIMM_SKIP = "timm is not installed here: it pulls torchvision, which pulls a CUDA build of torch"


@dataclass
class Family:
    model: nn.Module
    inputs: dict
    run: Callable[[nn.Module, dict], torch.Tensor]


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def _decoder(name: str, seed: int) -> nn.Module:
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[name]
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return model_class(config)


def build(name: str, seed: int = 0) -> Family:
    """The family's tiny model (in eval mode, weights from `seed`), its input and runner."""
    import transformers

    gen = torch.Generator().manual_seed(1)
    ids = {"input_ids": torch.randint(3, 64, (2, 8), generator=gen)}
    pixels = {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}
    torch.manual_seed(seed)
    if name in ("llama", "qwen2", "mistral"):
        return Family(_decoder(name, seed).eval(), ids, _logits)
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
        return Family(transformers.GPT2LMHeadModel(config).eval(), ids, _logits)
    if name == "bert":
        config = transformers.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        )
        return Family(transformers.BertForSequenceClassification(config).eval(), ids, _logits)
    if name == "t5":
        config = transformers.T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4
        )
        inputs = {**ids, "decoder_input_ids": ids["input_ids"][:, :4]}
        return Family(transformers.T5ForConditionalGeneration(config).eval(), inputs, _logits)
    if name == "vit":
        config = transformers.ViTConfig(
            image_size=16,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=3,
        )
        return Family(transformers.ViTForImageClassification(config).eval(), pixels, _logits)
    if name == "clip":
        config = transformers.CLIPConfig(
            text_config=dict(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=16,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            ),
            vision_config=dict(
                image_size=16,
                patch_size=8,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
            ),
            projection_dim=16,
        )
        return Family(transformers.CLIPModel(config).eval(), {**ids, **pixels}, _clip)
    if name == "whisper":
        config = transformers.WhisperConfig(
            vocab_size=64,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=8,
            max_source_positions=8,
            max_target_positions=16,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        )
        inputs = {
            "input_features": torch.randn(2, 8, 16, generator=gen),
            "decoder_input_ids": ids["input_ids"][:, :4],
        }
        return Family(transformers.WhisperForConditionalGeneration(config).eval(), inputs, _logits)
    if name == "cnn_bn":
        return Family(CNN().eval(), {"x": torch.randn(4, 3, 8, 8, generator=gen) * 2 + 1}, _plain)
    if name == "unet":
        return _unet(gen)
    if name.startswith("timm_"):
        timm = pytest.importorskip("timm", reason=TIMM_SKIP)
        arch = {"timm_resnet": "resnet18", "timm_convnext": "convnext_atto"}[name]
        model = timm.create_model(arch, pretrained=False, num_classes=3)
        return Family(model.eval(), {"x": torch.randn(2, 3, 32, 32, generator=gen)}, _plain)
    raise AssertionError(name)


def _clip(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits_per_image


def _plain(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(inputs["x"])


class CNN(nn.Module):
    """A small ResNet-style block with BatchNorm (what timm's ResNet is made of), always available."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h))))))
        return self.head(h.mean((2, 3)))


def _unet(gen: torch.Generator) -> Family:
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    inputs = {
        "sample": torch.randn(1, 4, 8, 8, generator=gen),
        "timestep": torch.tensor([3]),
        "encoder_hidden_states": torch.randn(1, 4, 16, generator=gen),
    }
    return Family(model.eval(), inputs, lambda m, i: m(**i).sample)
