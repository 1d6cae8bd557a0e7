"""torch.compile: no graph breaks for any method (training and inference), compiled training
equals eager, and hot-swap keeps the compiled graphs (docs/_compile_section.md).

Backends "eager" and "aot_eager" only (no inductor C++ builds); `fullgraph=True` makes any graph
break an error, and a counting backend shows how many graphs were compiled."""

from __future__ import annotations

import pytest
import torch
from conftest import conv_net, randomize_lora, tiny_llama
from torch import nn

import adapterlab as al
from adapterlab.layer import AdapterLayer


@pytest.fixture(autouse=True)
def fresh_dynamo(single_thread):
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Counter:
    """A dynamo backend that counts the graphs it is given and runs them as they are."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward


def aot_counting(counter: Counter):
    """aot_eager (forward and backward traced, run as traced), counting its graphs."""
    from torch._dynamo.backends.common import aot_autograd

    return aot_autograd(fw_compiler=counter, bw_compiler=counter)


def tiny_gpt2_1():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=96, n_embd=32, n_layer=1, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": lambda: tiny_llama(layers=1), "gpt2": tiny_gpt2_1}
IDS = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(3))


def with_support(model: nn.Module, name: str = "default") -> None:
    """SFT without a schedule starts with empty supports: give every delta a random 10% one."""
    gen = torch.Generator().manual_seed(4)
    for _, module in model.named_modules():
        if isinstance(module, AdapterLayer) and name in module.deltas:
            delta = module.deltas[name]
            idx = torch.randperm(delta.numel, generator=gen)[: delta.numel // 10].sort().values
            delta.set_support(idx, torch.randn(idx.numel(), generator=gen) * 0.01)


def adapt(model: nn.Module, case: str, kind: str) -> None:
    """One case's adapters. The stacks put several methods on one model (each as its own adapter,
    all trained, overlapping on shared modules), so one compilation covers them all."""
    if case == "lora":
        al.inject(model, "lora", r=4)
        randomize_lora(model)
        return
    if case == "lora_dropout":
        al.inject(model, "lora", r=4, dropout=0.1)
        randomize_lora(model)
        return
    if case == "stack_sparse":  # low-rank + SaRA + SFT with a support set, on the same modules
        al.inject(model, "lora", name="low_rank", r=4)
        randomize_lora(model)
        al.inject(model, "sara", name="sara", density=0.1)
        al.inject(model, "sft", name="sft")
        with_support(model, "sft")
    elif case == "stack_dense":  # SaRA with progressive_step + HFT + LocFT + scheduled SFT + dense
        al.inject(model, "sara", name="sara", density=0.1, progressive_step=3)
        al.inject(model, "hft", name="hft")
        al.inject(
            model, "locft", name="locft", layer=0, module="mlp.down_proj" if kind == "llama" else "mlp.c_proj"
        )
        al.inject(model, "sft", name="sft", density=0.1, full_steps=3)
        al.inject(model, "dense", name="dense", targets="all-linear")
    else:
        raise AssertionError(case)
    for n, p in model.named_parameters():  # inject trains only the newest adapter: train them all
        p.requires_grad_(".deltas." in n)


def loss_of(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    out = model(inputs)
    out = out.logits if hasattr(out, "logits") else out
    return out.float().pow(2).mean()


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def check_compiles(model: nn.Module, inputs: torch.Tensor, exact: bool) -> None:
    """Training: forward + loss in one graph (fullgraph: a break would raise), backward through the
    aot_eager graph, loss and gradients as eager's (`exact`: no dropout RNG involved). Inference:
    one graph under no_grad, outputs as eager's."""
    model.train()
    torch.manual_seed(0)
    eager_loss = loss_of(model, inputs)
    eager_loss.backward()
    eager_grads = grads(model)
    model.zero_grad(set_to_none=True)
    counter = Counter()
    compiled = torch.compile(loss_of, backend=aot_counting(counter), fullgraph=True)
    torch.manual_seed(0)
    loss = compiled(model, inputs)
    loss.backward()
    assert counter.graphs == 2  # one forward graph and its backward
    got = grads(model)
    assert got.keys() == eager_grads.keys() and got
    if exact:
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        for n in got:
            torch.testing.assert_close(got[n], eager_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    else:  # dropout: other masks than eager's; it trains, in the same two graphs
        params = [p for p in model.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in params]
        opt = torch.optim.SGD(params, lr=0.1)
        for _ in range(3):
            opt.step()
            opt.zero_grad()
            step_loss = compiled(model, inputs)
            step_loss.backward()
            assert torch.isfinite(step_loss) and all(torch.isfinite(p.grad).all() for p in params)
        assert counter.graphs == 2 and any(
            not torch.equal(p, p0) for p, p0 in zip(params, start, strict=True)
        )
    model.zero_grad(set_to_none=True)

    model.eval()
    counter = Counter()
    with torch.no_grad():
        want = loss_of(model, inputs)
        assert torch.compile(loss_of, backend=counter, fullgraph=True)(model, inputs).item() == pytest.approx(
            want.item(), rel=1e-5
        )
    assert counter.graphs == 1


CASES = ["lora", "lora_dropout", "stack_sparse", "stack_dense"]


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("case", CASES)
def test_no_graph_breaks_and_compiled_training_equals_eager(case, kind):
    model = MODELS[kind]()
    adapt(model, case, kind)
    check_compiles(model, IDS, exact=case != "lora_dropout")


@pytest.mark.parametrize(
    "options", [dict(conv_mode="reshape"), dict(conv_mode="kernel"), dict(conv_mode="reshape", dropout=0.1)]
)
def test_convlora_compiles_without_graph_breaks(options):
    model = conv_net()
    al.inject(model, "convlora", r=2, **options)
    randomize_lora(model)
    check_compiles(
        model,
        torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
        exact="dropout" not in options,
    )


def test_explain_counts_no_breaks():
    """What the counts in docs/_compile_section.md use: dynamo's own graph-break count (here for
    the two former offenders, LoRA dropout and the sparse gradient, stacked on one model)."""
    model = tiny_llama(layers=1)
    al.inject(model, "lora", r=4, dropout=0.1, targets=["q_proj", "v_proj"])
    al.inject(model, "sara", name="sparse", density=0.1, targets=["k_proj", "o_proj"])
    model.train()
    assert torch._dynamo.explain(loss_of)(model, IDS).graph_break_count == 0


def test_lora_under_autocast_compiles_without_graph_breaks():
    model = tiny_llama(layers=1)
    al.inject(model, "lora", r=4, dropout=0.1)
    randomize_lora(model)
    model.train()

    def step(model, inputs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_of(model, inputs)

    counter = Counter()
    torch.compile(step, backend=counter, fullgraph=True)(model, IDS).backward()
    assert counter.graphs == 1
    assert model.model.layers[0].self_attn.q_proj.deltas["default"].lora_A.weight.grad.abs().sum() > 0


# -- hot-swap -----------------------------------------------------------------------------------------
def saved_lora(tmp_path, tag: str, r: int, alpha: float, seed: int, targets=("q_proj", "v_proj")) -> str:
    model = tiny_llama(layers=1)
    al.inject(model, "lora", r=r, alpha=alpha, targets=list(targets))
    randomize_lora(model, seed=seed)
    return str(al.save(model, tmp_path / tag))


def eager_output(directory: str) -> torch.Tensor:
    model = tiny_llama(layers=1)
    al.load(model, directory)
    with torch.no_grad():
        return model(IDS).logits


def assert_swaps_without_recompiling(model: nn.Module, loaded: str, swaps: list[str]) -> None:
    """Compile `model` (holding adapter `loaded`) once with a counting backend, then hot-swap each
    of `swaps` in turn: every output equals that adapter loaded into a fresh model, and no graph is
    compiled again."""
    counter = Counter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        torch.testing.assert_close(compiled(IDS).logits, eager_output(loaded), rtol=0, atol=1e-5)
        graphs = counter.graphs
        for directory in swaps:
            al.hotswap(model, directory)
            torch.testing.assert_close(compiled(IDS).logits, eager_output(directory), rtol=0, atol=1e-5)
    assert counter.graphs == graphs


def test_hotswap_does_not_recompile_and_matches_a_fresh_load(tmp_path):
    a = saved_lora(tmp_path, "a", r=8, alpha=16, seed=1)
    b = saved_lora(tmp_path, "b", r=8, alpha=4, seed=2)  # same rank, other scaling
    c = saved_lora(tmp_path, "c", r=4, alpha=12, seed=3)  # lower rank
    d = saved_lora(tmp_path, "d", r=16, alpha=16, seed=4)  # the declared maximum
    model = tiny_llama(layers=1)
    al.load(model, a)
    al.prepare_hotswap(model, max_rank=16)
    assert_swaps_without_recompiling(model, a, [b, c, d, a])


def test_hotswap_up_to_the_adapter_s_own_rank_needs_no_prepare(tmp_path):
    a, b, c = (
        saved_lora(tmp_path, "a", 8, 16, 1),
        saved_lora(tmp_path, "b", 8, 4, 2),
        saved_lora(tmp_path, "c", 4, 4, 3),
    )
    model = tiny_llama(layers=1)
    al.load(model, a)
    assert_swaps_without_recompiling(
        model, a, [b, c]
    )  # the same rank (another alpha), then rank 4 padded into 8


def test_naive_replacement_recompiles(tmp_path):
    """The counter can fail: delete + load (new tensors, another scaling) makes dynamo recompile."""
    a, b = saved_lora(tmp_path, "a", 8, 16, 1), saved_lora(tmp_path, "b", 4, 4, 2)
    model = tiny_llama(layers=1)
    al.load(model, a)
    counter = Counter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        compiled(IDS)
        graphs = counter.graphs
        al.delete(model, "default")
        al.load(model, b)
        torch.testing.assert_close(compiled(IDS).logits, eager_output(b), rtol=0, atol=1e-5)
    assert counter.graphs > graphs


def test_prepare_hotswap_keeps_delta_weight_and_saves_it(tmp_path):
    model = tiny_llama(layers=1)
    al.load(model, saved_lora(tmp_path, "a", 4, 8, 1))
    with torch.no_grad():
        before = model(IDS).logits
    al.prepare_hotswap(model, max_rank=12)
    delta = model.model.layers[0].self_attn.q_proj.deltas["default"]
    assert delta.lora_A.weight.shape[0] == 12 and delta.config.r == 12
    assert delta.config.scaling == pytest.approx(delta.scaling)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        eager_output(str(al.save(model, tmp_path / "padded"))), before, rtol=0, atol=1e-6
    )


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_hotswap_refuses_bad_input_before_changing_anything(tmp_path):
    a = saved_lora(tmp_path, "a", 8, 16, 1)
    high = saved_lora(tmp_path, "high", 16, 16, 2)
    other_targets = saved_lora(tmp_path, "targets", 8, 16, 3, targets=("q_proj", "k_proj"))
    fewer = saved_lora(tmp_path, "fewer", 8, 16, 3, targets=("q_proj",))
    sara_model = tiny_llama(layers=1)
    al.inject(sara_model, "sara", density=0.1, targets=["q_proj", "v_proj"])
    sara_dir = str(al.save(sara_model, tmp_path / "sara"))
    model = tiny_llama(layers=1)
    al.load(model, a)
    before = state(model)
    cases = [
        (
            high,
            r"rank r=16 in the file, above the adapter's r=8; call al.prepare_hotswap\(model, max_rank=16\)",
        ),
        (other_targets, r"target modules differ \(the file adapts 'model.layers.0.self_attn.k_proj'"),
        (fewer, r"the file has nothing for 'model.layers.0.self_attn.v_proj'"),
        (sara_dir, r"holds a 'sara' adapter, 'default' is 'lora'; load it as a new adapter"),
    ]
    for directory, message in cases:
        with pytest.raises(al.HotswapError, match=message):
            al.hotswap(model, directory)
        assert_unchanged(model, before)
    with pytest.raises(al.AdapterNameError, match="no adapter named 'other'"):
        al.hotswap(model, a, name="other")
    with pytest.raises(al.HotswapError, match="max_rank=4 must be an integer >= adapter 'default'"):
        al.prepare_hotswap(model, max_rank=4)
    with pytest.raises(al.HotswapError, match="prepare_hotswap pads LoRA ranks; adapter 'default' is 'sara'"):
        al.prepare_hotswap(sara_model, max_rank=16)
    al.merge(model)
    with pytest.raises(al.MergeError, match="unmerge"):
        al.hotswap(model, a)


def test_hotswap_refuses_a_shape_mismatch_and_changes_nothing(tmp_path):
    """A file whose last module does not fit must not leave the first modules swapped."""
    from safetensors.torch import load_file, save_file

    b = saved_lora(tmp_path, "b", 8, 16, 2)
    weights = f"{b}/adapter_model.safetensors"
    from conftest import read_weights

    tensors, metadata = read_weights(weights)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, weights, metadata=metadata)
    assert load_file(weights)[key].shape[0] == 17
    model = tiny_llama(layers=1)
    al.inject(model, "lora", r=8, targets=["q_proj", "v_proj"])
    before = state(model)
    with pytest.raises(al.AdapterlabError, match="v_proj"):
        al.hotswap(model, b)
    assert_unchanged(model, before)


def test_hotswap_sparse_and_dense_adapters_of_equal_shapes(tmp_path):
    """SaRA with the same density on the same base has the same support size; its values (and
    indices) are copied. Dense deltas swap at equal shapes."""
    dirs = {}
    for method, options in [("sara", dict(density=0.1)), ("dense", dict(targets=["q_proj"]))]:
        for tag, seed in (("x", 1), ("y", 2)):
            model = tiny_llama(layers=1)
            al.inject(model, method, **options)
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            dirs[method, tag] = str(al.save(model, tmp_path / f"{method}-{tag}"))
        model = tiny_llama(layers=1)
        al.load(model, dirs[method, "x"])
        assert_swaps_without_recompiling(model, dirs[method, "x"], [dirs[method, "y"]])
        torch._dynamo.reset()


@pytest.mark.parametrize("conv_mode", ["reshape", "kernel"])
def test_hotswap_convlora_ranks_up_to_the_prepared_maximum(tmp_path, conv_mode):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    dirs, want = [], []
    for r, alpha, seed in ((2, 4, 1), (4, 2, 2), (1, 3, 3)):
        model = conv_net()
        al.inject(model, "convlora", r=r, alpha=alpha, conv_mode=conv_mode)
        randomize_lora(model, seed=seed)
        dirs.append(str(al.save(model, tmp_path / f"{conv_mode}-{r}")))
        with torch.no_grad():
            want.append(model(x))
    model = conv_net()
    al.load(model, dirs[0])
    al.prepare_hotswap(model, max_rank=4)
    counter = Counter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), want[0], rtol=0, atol=1e-5)
        graphs = counter.graphs
        for directory, expected in zip(dirs[1:], want[1:], strict=True):
            al.hotswap(model, directory)
            torch.testing.assert_close(compiled(x), expected, rtol=0, atol=1e-5)
    assert counter.graphs == graphs


def test_hotswap_checks_a_sparse_file_s_indices(tmp_path):
    from conftest import read_weights
    from safetensors.torch import save_file

    model = tiny_llama(layers=1)
    al.inject(model, "sara", density=0.1, targets=["q_proj"])
    directory = str(al.save(model, tmp_path / "sara"))
    weights = f"{directory}/adapter_model.safetensors"
    tensors, metadata = read_weights(weights)
    key = "base_model.model.model.layers.0.self_attn.q_proj.indices"
    tensors[key] = tensors[key].flip(0).contiguous()  # unsorted
    save_file(tensors, weights, metadata=metadata)
    before = state(model)
    with pytest.raises(al.HotswapError, match="q_proj.indices in the file must be strictly increasing"):
        al.hotswap(model, directory)
    assert_unchanged(model, before)
