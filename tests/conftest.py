import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module imports
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

# Kernel tests run interpreted on CPU; with TRITON_INTERPRET=0 on a CUDA machine they run compiled there.
DEVICE = torch.device(
    "cuda" if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1" else "cpu"
)

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci")


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval()


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))


def conv_net(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet().eval()


def randomize_lora(model: nn.Module, std: float = 0.1, seed: int = 1, adapter: str = "") -> None:
    """LoRA B starts at zero; give every factor (of `adapter`, or all) values so outputs change."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (".lora_A." in name or ".lora_B." in name) and f".deltas.{adapter}" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * std)


def read_weights(path) -> tuple[dict, dict]:
    """An adapter_model.safetensors file's tensors and header metadata, for tests that damage it."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def ids():
    return torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def single_thread():
    """One intra-op thread for tests of tiny models: their ops are too small to split, and on a
    busy machine OpenMP's waiting threads make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
