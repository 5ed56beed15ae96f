"""Shared fixtures: tiny random-weight pipelines built once per test run (or reused from AITK_TINY_CACHE)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

#: golden files made by ai-toolkit's own code (see goldens/MANIFEST.md); part of the checkout
GOLDENS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "goldens")


def lora_file_modules(path: str) -> set[str]:
    """The module names of a LoRA file ai-toolkit saved (``<module>.lora_A.weight``, ``<module>.alpha``, ...)."""
    from safetensors.torch import load_file

    return {key.rsplit(".", 2)[0] if key.endswith("weight") else key.rsplit(".", 1)[0] for key in load_file(path)}


def assert_lora_file_reproduces_ai_toolkit(model, forward, mode: str, model_id: str, path: str, outputs: dict,
                                           effective_weights, atol: float, lora_atol: float, component="transformer",
                                           name_mapper=None, parameter_name=lambda name: name) -> None:
    """ai-toolkit's LoRA golden sequence on ``model`` (``model_id``'s ``component``), through our ``LoraStack`` in
    ``mode``: the base output; the file at strength 1.0 with every module matched, equal to ai-toolkit's live and merged
    outputs (and in fused mode each merged weight of ``effective_weights()``, named as ai-toolkit names them:
    ``parameter_name`` maps the name onto ours); at 0.5; then removed, the base output again."""
    import torch

    from aitk_inference.pipelines.lora.stack import LoraRequest, LoraStack

    torch.testing.assert_close(forward(), outputs["base_output"], rtol=0, atol=atol)
    stack = LoraStack({component: model}, mode, component, model_id, name_mapper=name_mapper)
    assert stack.set([LoraRequest(path=path, strength=1.0)])[0]["modules"] == len(lora_file_modules(path))
    torch.testing.assert_close(forward(), outputs["lora_live_m1.0"], rtol=0, atol=lora_atol)
    torch.testing.assert_close(forward(), outputs["lora_merged_m1.0"], rtol=0, atol=lora_atol)
    if mode == "fused":
        for name, weight in effective_weights().items():
            torch.testing.assert_close(model.get_parameter(parameter_name(name)), weight, rtol=0, atol=lora_atol,
                                       msg=name)
    stack.set([LoraRequest(path=path, strength=0.5)])
    torch.testing.assert_close(forward(), outputs["lora_live_m0.5"], rtol=0, atol=lora_atol)
    stack.clear()
    torch.testing.assert_close(forward(), outputs["base_output"], rtol=0, atol=atol)


#: test modules whose tests share one costly module fixture (a ComfyUI server with a browser, a Ray cluster) or one
#: GPU: with pytest-xdist's ``--dist loadgroup`` each runs on a single worker; the other tests spread one by one
ONE_WORKER_MODULES = ("test_comfyui_browser", "test_server_ray", "test_gpu")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the marks into the test ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.stem in ONE_WORKER_MODULES:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most 8 (each holds its own tiny pipelines, about 1-2 GB)."""
    return min(os.cpu_count() or 1, 8)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> str:
    """Folder holding the tiny pipelines; AITK_TINY_CACHE keeps them between runs. Parallel workers share the run's
    folder (the kit builds each pipeline once, the other workers wait for it)."""
    folder = os.environ.get("AITK_TINY_CACHE")
    if not folder:
        worker_base = tmp_path_factory.getbasetemp()
        folder = str(worker_base.parent / "tiny_models" if os.environ.get("PYTEST_XDIST_WORKER")
                     else tmp_path_factory.mktemp("tiny_models"))
    os.environ["AITK_TINY_CACHE"] = folder
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tiny_cache):
    """``tiny_dir(model_id, **variant)`` -> the saved tiny pipeline folder of that id, or of a variant of its builder
    (built on first use)."""
    from aitk_inference.tiny import tiny_model_dir

    return lambda model_id, **variant: tiny_model_dir(model_id, tiny_cache, **variant)


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
