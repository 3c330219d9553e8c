import os

import pytest

os.environ.setdefault("BREWSLM_BUDGET", "ci")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_llama_of(tok):
    """A tiny random Llama over the real tokenizer (stands in for the teacher): ``tiny_llama_of(n_layers)``."""
    from brewslm_helpers import models

    def build(num_layers: int):
        return models.student_from_config(tok, hidden_size=32, num_layers=num_layers, num_heads=2,
                                          num_kv_heads=1, intermediate_size=64, seed=0).eval()
    return build


@pytest.fixture(scope="session")
def tok():
    """The SmolLM2 tokenizer (shared by the teacher and every student)."""
    from brewslm_helpers import models

    return models.load_tokenizer()
