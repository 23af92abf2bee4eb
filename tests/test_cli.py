"""The moe-kernels command."""
import pytest

from moe_kernels import cli


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for row in ("torch", "triton", "extension moe_kernels._C", "NVSHMEM", "value checks", "MoELayer's own CUDA graphs",
                "programmatic dependent launch"):
        assert row in out


@pytest.mark.parametrize("checks,graphs,want", [("1", "1", "but not while value checks are on"),
                                                ("0", "1", "on for inference steps of <= 256 tokens\n"),
                                                ("0", "0", "off (MOE_KERNELS_CUDA_GRAPHS=0)")])
def test_info_says_whether_layers_replay_graphs(checks, graphs, want, capsys, monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_VALUE_CHECKS", checks)
    monkeypatch.setenv("MOE_KERNELS_CUDA_GRAPHS", graphs)
    assert cli.main(["info"]) == 0
    assert want in capsys.readouterr().out


def test_info_says_which_bf16_grouped_gemm_runs(capsys, monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_BF16_GLUON", "0")
    assert cli.main(["info"]) == 0
    assert "bf16 grouped GEMM kernel" in (out := capsys.readouterr().out)
    assert "Triton (MOE_KERNELS_BF16_GLUON=0)" in out


@pytest.mark.parametrize("env,want", [(None, "decode steps over the latent rows"),
                                      ("0", "every step through the expanded keys")])
def test_info_says_how_patched_mla_decodes_under_hf(env, want, capsys, monkeypatch):
    if env is None:
        monkeypatch.delenv("MOE_KERNELS_HF_LATENT_DECODE", raising=False)
    else:
        monkeypatch.setenv("MOE_KERNELS_HF_LATENT_DECODE", env)
    assert cli.main(["info"]) == 0
    assert want in capsys.readouterr().out


def test_demo_small_cpu(capsys):
    assert cli.main(["demo", "--cpu", "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "relative error" in out and "tokens/s" in out and "OK" in out


def test_unknown_command():
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


# every misuse: exit status 2, one line on stderr naming what is wrong, no traceback (issue 21)
MISUSE = {
    "demo-tokens-negative": (["demo", "--cpu", "--tokens", "-5"], "--tokens must be >= 1, got -5"),
    "demo-tokens-zero": (["demo", "--cpu", "--tokens", "0"], "--tokens must be >= 1, got 0"),
    "tune-no-gpu": (["tune", "--quick"], "needs a CUDA GPU"),
    "tune-unknown-kind": (["tune", "--kinds", "fp8,fp9"], "--kinds: unknown 'fp9'"),
    "bench-nproc-negative": (["bench", "--nproc", "-1", "placement"], "--nproc must be >= 1, got -1"),
    "bench-nproc-zero": (["bench", "--nproc", "0", "placement"], "--nproc must be >= 1, got 0"),
    "plan-results-missing": (["plan", "--results", "/nonexistent/moe-kernels"], "no such directory"),
    "plan-validate-results-missing": (["plan", "--validate", "--results", "/nonexistent/x"], "no such directory"),
    "plan-device-unknown": (["plan", "--device", "FOO", "--results", "{tmp}"], "--device 'FOO': no benchmark results"),
}


@pytest.mark.parametrize("case", list(MISUSE))
def test_misuse_is_one_line_error(case, capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # `tune` without a GPU, on any machine
    argv, words = MISUSE[case]
    assert cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moe-kernels {argv[0]}: error: ") and words in lines[0], cap.err
    assert "running:" not in cap.out  # nothing was started


def test_plan_device_known_still_runs(capsys, tmp_path):
    """--device naming a device that has results: no error (the refusal is for devices with none)."""
    from test_plan import synthetic_results  # noqa: PLC0415

    synthetic_results(str(tmp_path))
    assert cli.main(["plan", "--gpus", "16", "--results", str(tmp_path), "--device", "Test_GPU"]) == 0
    assert "Test_GPU" in capsys.readouterr().out


def test_misuse_from_the_shell_has_no_traceback():
    """The installed command itself (python -m moe_kernels.cli): one line, status 2."""
    import subprocess
    import sys

    root = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "moe_kernels.cli", "demo", "--tokens", "-5"], capture_output=True,
                       text=True, cwd=root, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_tune_keeps_a_bucket_incumbent_within_the_margin():
    from moe_kernels.tune import CHALLENGE_MARGIN, settle

    assert CHALLENGE_MARGIN == 0.02
    incumbent, near, far = (1.0, {"cfg": "incumbent"}), (0.985, {"cfg": "near"}), (0.97, {"cfg": "far"})
    assert settle(near, incumbent) is incumbent  # 1.5% faster: a tie
    assert settle(far, incumbent) is far  # 3% faster: replaces it
    assert settle(incumbent, incumbent) is incumbent
    assert settle(far, None) is far  # no incumbent timed (a new bucket, or not a challenge)
    assert settle(None, None) is None
