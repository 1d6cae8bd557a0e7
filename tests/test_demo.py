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
