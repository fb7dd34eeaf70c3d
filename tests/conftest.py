"""Test-wide settings: never touch the network, keep caches inside a temp dir, few threads."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads; one thread per process keeps the suite fast and
# stable on 2 cores (subprocesses started by tests inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    os.environ.setdefault("GAIN_CACHE_DIR", str(root / "gain"))
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf_datasets")
    os.environ["HF_HOME"] = str(root / "hf_home")
    yield
