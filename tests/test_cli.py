"""The moe-kernels command."""
import pytest

from moe_kernels import cli


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for row in ("torch", "triton", "extension moe_kernels._C", "NVSHMEM"):
        assert row in out


def test_demo_small_cpu(capsys):
    assert cli.main(["demo", "--cpu", "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "relative error" in out and "tokens/s" in out and "OK" in out


def test_unknown_command():
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])
