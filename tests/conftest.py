import os

os.environ.setdefault("BREWSLM_BUDGET", "ci")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
