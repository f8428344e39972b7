"""The allocator setting runs apply on CPU (glibc)."""
import ctypes
import sys
from pathlib import Path

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



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_huge_pages_back_large_tensors_where_the_kernel_allows(tmp_path):
    """In a fresh process: after keep_freed_memory(), a large tensor is backed by huge pages when the
    kernel's mode allows them; a 'never' mode or the user's own setting is left alone."""
    import os
    import subprocess
    mode = tmp_path / "enabled"
    mode.write_text("always madvise [never]\n")
    assert allocator.huge_pages(mode) is False
    mode.write_text("always [madvise] never\n")
    saved = os.environ.pop("THP_MEM_ALLOC_ENABLE", None)
    try:
        assert allocator.huge_pages(mode) is True and os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
        os.environ["THP_MEM_ALLOC_ENABLE"] = "0"
        assert allocator.huge_pages(mode) is False and os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
    finally:
        os.environ.pop("THP_MEM_ALLOC_ENABLE", None)
        if saved is not None:
            os.environ["THP_MEM_ALLOC_ENABLE"] = saved
    system = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not system.exists() or "[never]" in system.read_text():
        pytest.skip("the kernel allows no transparent huge pages")
    # the tensor's memory is advised for huge pages ('hg' in its mapping's VmFlags), whether or not
    # the kernel finds free huge pages at that moment
    code = ("import torch, sys\nfrom geffect.engine.allocator import keep_freed_memory\n"
            "sys.argv[1:] and keep_freed_memory()\n"
            "x = torch.empty(64 << 20, dtype=torch.uint8)\nx.fill_(1)\n"
            "print(sum(' hg' in line for line in open('/proc/self/smaps') if line.startswith('VmFlags')))")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    advised = [int(subprocess.run([sys.executable, "-c", code, *arg], capture_output=True, text=True, env=env,
                                  check=True).stdout.strip()) for arg in ([], ["on"])]
    assert advised[0] == 0 and advised[1] > 0, advised
