"""scripts/python-cost drives the real handler: a smoke test that it still fits the handler's API."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_script():
    loader = importlib.machinery.SourceFileLoader("python_cost", str(REPO / "scripts" / "python-cost"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def test_the_handler_answers_every_request_through_the_instant_upstream():
    script = load_script()
    run = script.build(REPO)
    try:
        run(200)  # raises RuntimeError on any answer but a 200
    finally:
        run.close()


def test_a_stand_in_that_answers_wrong_is_caught(monkeypatch):
    script = load_script()
    monkeypatch.setattr(script, "RESPONSE", b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
    run = script.build(REPO)
    try:
        run(1)
    except RuntimeError as exc:
        assert "unexpected response" in str(exc)
    else:
        raise AssertionError("a 503 through the stand-in upstream went unnoticed")
    finally:
        run.close()
