"""With a checkpoint key set, the offline answer cache and resumable-task records are encrypted
on disk too (real files, real AES-GCM); what stays in the clear is what the README lists."""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import pytest
from openai_stub import OpenAIStub

from kernel_ext.config import KernelExtConfig
from kernel_ext.providers.base import GenerationParams
from kernel_ext.providers.remote import RemoteProvider
from kernel_ext.resilience import attach
from kernel_ext.session import Session

SECRET_PROMPT = "What is the launch code for project NIGHTJAR?"
SECRET_ANSWER = "The code is TANGO-SEVEN-NINER."


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def _on_disk(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def _session(tmp_path: Path) -> Session:
    return Session(KernelExtConfig(retry_attempts=1), None, state_dir=tmp_path / "state")


def test_offline_cache_entries_are_encrypted_and_still_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("KERNEL_EXT_CHECKPOINT_KEY", _key())
    session = _session(tmp_path)
    hub = attach(session, sleep=lambda s: None)
    params = GenerationParams(max_new_tokens=8)
    with OpenAIStub(answer=SECRET_ANSWER) as stub:
        hub.add_provider("srv", RemoteProvider("srv", stub.url))
        first = session.infer(SECRET_PROMPT, params, model="srv")
        assert first.text and not first.cached
    cache_root = tmp_path / "state" / "offline_cache"
    assert len(list(cache_root.rglob("*.json"))) == 1
    for needle in ("NIGHTJAR", "TANGO", first.text.split()[0]):
        assert not _on_disk(cache_root, needle), needle
    # the server is gone: the encrypted answer is served
    again = session.infer(SECRET_PROMPT, params, model="srv")
    assert again.cached and again.text == first.text
    # another key (or none): the entry is not served, and the failure says why in the log
    monkeypatch.setenv("KERNEL_EXT_CHECKPOINT_KEY", _key())
    with caplog.at_level(logging.WARNING, logger="kernel_ext.providers.offline_cache"):
        with pytest.raises(Exception, match="no answer kept"):
            session.infer(SECRET_PROMPT, params, model="srv")
    assert "authentication failed" in caplog.text
    monkeypatch.delenv("KERNEL_EXT_CHECKPOINT_KEY")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kernel_ext.providers.offline_cache"):
        with pytest.raises(Exception, match="no answer kept"):
            session.infer(SECRET_PROMPT, params, model="srv")
    assert "no checkpoint key is set" in caplog.text
    session.close()


def test_without_a_key_the_offline_cache_is_plain(tmp_path: Path) -> None:
    session = _session(tmp_path)
    hub = attach(session, sleep=lambda s: None)
    with OpenAIStub(answer=SECRET_ANSWER) as stub:
        hub.add_provider("srv", RemoteProvider("srv", stub.url))
        session.infer(SECRET_PROMPT, GenerationParams(max_new_tokens=8), model="srv")
    assert _on_disk(tmp_path / "state" / "offline_cache", "NIGHTJAR")  # documented: in clear
    session.close()


def test_task_records_are_encrypted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kernel_ext import checkpoint
    from kernel_ext.checkpoint.tasks import task

    monkeypatch.setenv("KERNEL_EXT_CHECKPOINT_KEY", _key())
    session = Session(KernelExtConfig(task_checkpoint_items=1), None,
                      state_dir=tmp_path / "state")
    checkpoint.attach(session)
    t = task("nightly-batch", ["NIGHTJAR-ITEM-1", "NIGHTJAR-ITEM-2"], session=session,
             key=lambda item: item, progress=False)
    for item in t:
        t.record(f"TANGO answer for {item}")
    t.checkpoint()
    store = tmp_path / "state" / "checkpoints"
    assert list((store / "tasks").iterdir())
    assert not _on_disk(store, "NIGHTJAR") and not _on_disk(store, "TANGO")
    assert _on_disk(store, "nightly-batch")  # documented: a task's name stays in the clear
    again = task("nightly-batch", ["NIGHTJAR-ITEM-1", "NIGHTJAR-ITEM-2"], session=session,
                 key=lambda item: item, progress=False)
    assert again.done == 2 and list(again) == []
    session.close()
