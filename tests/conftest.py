import pytest
import torch

from geffect.models import tiny_model


@pytest.fixture(params=["tiny-llama", "tiny-gpt2"])
def tiny(request):
    """Tiny randomly initialised models: Llama (untied embeddings) and GPT-2 (tied)."""
    return tiny_model(request.param, seed=0)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GEFFECT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
