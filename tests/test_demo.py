"""The demo runs end to end (short) and the CLI reports errors on one line."""

from adapterlab.cli import main
from adapterlab.demo import run


def test_demo_trains_saves_reloads_and_merges(tmp_path, capsys):
    result = run(tmp_path / "demo", steps=40)
    assert result["loss_after"] < result["loss_before"]
    assert result["reload_diff"] == 0.0 and result["merged_diff"] <= 1e-4
    out = capsys.readouterr().out
    assert "adapter_model.safetensors" in out and "trainable params" in out


def test_cli_demo_and_usage_errors(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "20"]) == 0
    try:
        main(["nosuch"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("argparse should exit 2 on a usage error")


def test_cli_inspect(tmp_path, capsys):
    import json

    import torch

    import adapterlab as al

    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
    al.inject(model, "lora", r=2)
    al.save(model, tmp_path / "ad")
    assert main(["inspect", str(tmp_path / "ad"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "lora" and info["config"]["r"] == 2 and info["targets"] == 2
    assert info["parameters"] == 2 * (6 + 5) + 2 * (5 + 4)
    assert info["bytes_on_disk"] > 0 and len(info["fingerprint"]) == 64
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
