"""The one error path of every command (utils/errors.py): one line, the right exit status, a traceback only
with --debug."""

import argparse

import pytest
import torch

from microdiff.utils.errors import UserError, first_line, run_command


class _Raises(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise UserError("data/x.png: unreadable image; remove it")


def test_first_line_of_an_error_raised_in_a_dataloader_worker_is_the_original_message():
    with pytest.raises(ValueError) as err:
        list(torch.utils.data.DataLoader(_Raises(), num_workers=1))
    assert "Original Traceback" in str(err.value)  # what torch makes of it
    assert first_line(err.value) == "data/x.png: unreadable image; remove it"


def test_first_line_of_os_and_key_errors():
    assert first_line(FileNotFoundError(2, "No such file or directory", "/x/y")) == "/x/y: No such file or directory"
    assert first_line(KeyError("caption")) == "caption"
    assert first_line(ValueError("")) == "ValueError"


def _fail(exc):
    def fn(args):
        raise exc

    return fn


@pytest.mark.parametrize("exc, code, start", [
    (UserError("--out x: is a file; pass a folder\nsecond line"), 2, "microdiff cmd: error: --out x: is a file; pass a folder"),
    (FileNotFoundError(2, "No such file or directory", "a.yaml"), 2, "microdiff cmd: error: a.yaml: No such file"),
    (ZeroDivisionError("division by zero"), 1, "microdiff cmd: internal error: ZeroDivisionError: division by zero"),
    (KeyboardInterrupt(), 130, "microdiff cmd: interrupted"),
])
def test_run_command_ends_every_exception_in_one_line(capsys, monkeypatch, exc, code, start):
    monkeypatch.delenv("MICRODIFF_DEBUG", raising=False)
    assert run_command("cmd", _fail(exc), argparse.Namespace()) == code
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(start), err
    if code == 1:
        assert "--debug" in err[0]


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.delenv("MICRODIFF_DEBUG", raising=False)
    with pytest.raises(ZeroDivisionError):
        run_command("cmd", _fail(ZeroDivisionError("x")), argparse.Namespace(debug=True))
    monkeypatch.setenv("MICRODIFF_DEBUG", "1")
    with pytest.raises(UserError):
        run_command("cmd", _fail(UserError("y")), argparse.Namespace())
