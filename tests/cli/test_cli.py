import builtins
import subprocess
import sys

import pytest
import structlog

from pdxfer import cli


@pytest.fixture(autouse=True)
def _restore_logging():
    """cli.main() configures structlog to print to the sys.stderr of that moment, which
    under pytest is this test's capture file, closed once the test ends: every later
    log line in the session would then fail with 'I/O operation on closed file'."""
    yield
    structlog.reset_defaults()


def test_every_command_is_listed():
    out = subprocess.run([sys.executable, "-m", "pdxfer", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for name in ("demo", "receiver", "bench", "proxy"):
        assert name in out.stdout


def test_missing_optional_dependency_names_the_package(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "pdxfer.pack.bench", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_torch)
    assert cli.main(["bench", "pack"]) == 2
    assert "'torch'" in capsys.readouterr().err


def test_bad_size_is_a_clear_usage_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["receiver", "--capacity", "lots"])
    assert "not a byte size: 'lots'" in capsys.readouterr().err


def test_out_of_range_receiver_setting_is_named_without_a_traceback(capsys):
    assert cli.main(["receiver", "--recv-piece", "1KiB"]) == 2
    err = capsys.readouterr().err
    assert "recv_piece_bytes must be >= 4096" in err and "Traceback" not in err


def test_receiver_nixl_nice_reaches_the_config_and_is_checked_there(capsys):
    assert cli.main(["receiver", "--nixl-nice", "20"]) == 2
    err = capsys.readouterr().err
    assert "nixl_nice" in err and "Traceback" not in err


def test_a_gpu_receiver_setting_that_cannot_work_is_named(capsys):
    assert cli.main(["receiver", "--device", "cuda"]) == 2  # default backends include tcp
    assert "needs backends=('nixl',)" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert cli.main(["receiver", "--device", "cuda:0", "--backends", "nixl"]) == 2
        err = capsys.readouterr().err
        assert "0 CUDA devices" in err and "Traceback" not in err
