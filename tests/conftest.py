"""Shared fixtures: tiny random-weight pipelines built once per test run (or reused from AITK_TINY_CACHE)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

#: golden files made by ai-toolkit's own code (see goldens/MANIFEST.md); part of the checkout
GOLDENS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "goldens")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> str:
    """Folder holding the tiny pipelines; AITK_TINY_CACHE keeps them between runs."""
    folder = os.environ.get("AITK_TINY_CACHE") or str(tmp_path_factory.mktemp("tiny_models"))
    os.environ["AITK_TINY_CACHE"] = folder
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tiny_cache):
    """``tiny_dir(model_id)`` -> the saved tiny pipeline folder of that id (built on first use)."""
    from aitk_inference.tiny import tiny_model_dir

    return lambda model_id: tiny_model_dir(model_id, tiny_cache)


@pytest.fixture(scope="session")
def load_tiny(tiny_dir):
    """``load_tiny(model_id, **kw)`` -> a fresh AITKPipeline on the tiny model (CPU, float32)."""
    from aitk_inference.pipelines import load_pipeline

    def load(model_id, **kwargs):
        kwargs.setdefault("device", "cpu")
        kwargs.setdefault("dtype", "fp32")
        return load_pipeline(model_id, base=tiny_dir(model_id), **kwargs)

    return load


@pytest.fixture(scope="module")
def pipes(load_tiny):
    """``pipes(model_id, **load_kwargs)`` -> one tiny pipeline per id and load options, shared by the tests of a
    module (tests leave it LoRA-free)."""
    loaded = {}

    def get(model_id, **load_kwargs):
        key = (model_id, tuple(sorted(load_kwargs.items())))
        if key not in loaded:
            loaded[key] = load_tiny(model_id, **load_kwargs)
        return loaded[key]

    return get


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine spinning OpenMP threads are much slower. A
    module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep a screenshot of the browser tests' page when one fails (next to their other screenshots)."""
    outcome = yield
    report = outcome.get_result()
    browser = item.funcargs.get("browser") if report.when == "call" and report.failed else None
    if browser is not None and hasattr(browser, "shot"):
        browser.shot(f"failed_{item.name}")
