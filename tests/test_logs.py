"""dinfer_async.logs: DINFER_LOG_LEVEL sets our loggers' level, and log lines written while a
progress bar is active land on a line of their own (through tqdm.write), never inside the bar."""

from __future__ import annotations

import logging
import re
import sys

import pytest
from tqdm import tqdm

from dinfer_async.logs import OURS, TqdmHandler, debug_enabled, setup_logging


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    ours = {name: logging.getLogger(name).level for name in OURS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in ours.items():
        logging.getLogger(name).setLevel(old)


def test_level_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("DINFER_LOG_LEVEL", "DEBUG")
    assert setup_logging() == logging.DEBUG and debug_enabled()
    assert logging.getLogger("workers.engine").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("urllib3").isEnabledFor(logging.INFO)  # others stay quiet
    monkeypatch.setenv("DINFER_LOG_LEVEL", "error")
    assert setup_logging() == logging.ERROR and not debug_enabled()
    assert not logging.getLogger("dinfer_async.batch").isEnabledFor(logging.INFO)
    monkeypatch.delenv("DINFER_LOG_LEVEL")
    assert setup_logging() == logging.INFO
    assert setup_logging("warning") == logging.WARNING
    with pytest.raises(ValueError, match="verbose"):
        setup_logging("verbose")


def test_a_bad_level_falls_back_to_info_and_says_so(monkeypatch, capsys):
    monkeypatch.setenv("DINFER_LOG_LEVEL", "loud")
    assert setup_logging() == logging.INFO
    assert "DINFER_LOG_LEVEL='loud' is not a level" in capsys.readouterr().err


def test_setting_up_twice_installs_one_handler():
    setup_logging()
    setup_logging()
    assert sum(isinstance(h, TqdmHandler) for h in logging.getLogger().handlers) == 1


def test_a_line_logged_under_a_progress_bar_is_a_line_of_its_own(monkeypatch, capsys):
    monkeypatch.delenv("DINFER_LOG_LEVEL", raising=False)
    setup_logging()
    bar = tqdm(total=10, file=sys.stderr, ascii=True, mininterval=0)
    bar.update(3)
    logging.getLogger("workers.worker").info("serving dinfer-bundled")
    bar.update(3)
    bar.close()
    lines = re.split(r"[\r\n]", capsys.readouterr().err)
    own = re.compile(r"^\d\d:\d\d:\d\d INFO workers\.worker: serving dinfer-bundled$")
    assert any(own.match(line) for line in lines), lines
