"""tests/_sanitize_ops.py (the op set tests/sanitize.sh runs under compute-sanitizer) on the CPU interpreter: the
script and its reference comparisons stay runnable where CI can run them. The sanitizer itself needs a GPU."""
import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _load():
    spec = importlib.util.spec_from_file_location("_sanitize_ops", HERE / "_sanitize_ops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sanitize_ops_names_are_runnable():
    mod = _load()
    assert len(set(mod.NAMES)) == len(mod.NAMES)
    assert set(mod.NAMES) == set(mod._ops("cpu")), "NAMES and the op table must list the same ops"


@pytest.mark.parametrize("ops", ["permute,permute_fp8,permute_blocks,unpermute",
                                 "grouped_gemm_fp8_pair,mla_decode_variants"])
def test_sanitize_ops_pass_on_cpu(ops, capsys):
    assert _load().main(["--device", "cpu", "--ops", ops]) == 0, capsys.readouterr().out
    assert "FAIL" not in capsys.readouterr().out


def test_sanitize_ops_unknown_name():
    assert _load().main(["--device", "cpu", "--ops", "no_such_op"]) == 2
