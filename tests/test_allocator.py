"""The allocator setting runs apply on CPU (glibc)."""
import ctypes
import sys

import pytest

from geffect.engine import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_is_accepted_once_and_idempotent():
    if not hasattr(ctypes.CDLL(None), "mallopt"):
        pytest.skip("libc without mallopt")
    assert allocator.keep_freed_memory() is True
    assert allocator.keep_freed_memory() is True


def test_a_run_applies_it_only_when_asked(monkeypatch):
    from geffect.config import UnlearnConfig
    from geffect.session import prepare
    calls = []
    monkeypatch.setattr("geffect.session.keep_freed_memory", lambda: calls.append(1) or True)
    cfg = UnlearnConfig(method="ga", model="tiny-llama", memorize="no", progress=False, device="cpu")
    prepare(UnlearnConfig(**{**cfg.__dict__, "keep_freed_memory": False}))
    assert calls == []
    prepare(cfg)
    assert calls == [1]

