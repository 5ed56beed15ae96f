"""What a user sees: the pack in a real ComfyUI, through its real frontend in headless Chromium.

One ComfyUI (``COMFYUI_DIR``, see ``comfyui_harness.py``) with the pack installed as a user gets it (the published
files copied into ``custom_nodes/aitk-inference``, then ``install.py``), the tiny FLUX and LTX-2 models and a LoRA;
one Chromium page (Playwright driving the system browser: ``AITK_CHROMIUM`` or ``chromium`` on PATH) shared by the
tests below, which run in order. Screenshots and the browser's console go to ``$AITK_ARTIFACTS_DIR/comfyui-browser``
(default ``artifacts/comfyui-browser`` in the checkout).
"""

import json
import os
import re
import shutil
import subprocess
import time

import pytest
from comfyui_harness import ROOT, ComfyServer, comfy_python, make_base_dir, needs_comfyui

PACK_FOLDER = "aitk-inference"
CHROMIUM = os.environ.get("AITK_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = os.path.join(os.environ.get("AITK_ARTIFACTS_DIR") or os.path.join(ROOT, "artifacts"), "comfyui-browser")
#: as root on a machine without outside network: no sandbox, and none of Chromium's background connections
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
#: ComfyUI core nodes of the examples that ComfyUI registers only when torchaudio imports (comfy_extras/nodes_audio.py)
TORCHAUDIO_CORE_NODES = {"SaveAudio"}
#: the node search dialog, its result rows and its preview of the highlighted node: frontend 1.27's search box, or the
#: one that replaced it (1.4x: a combobox input, ``result-item`` rows, a ``node-preview-card`` beside the list)
NODE_SEARCH_INPUT = ".comfy-vue-node-search-box input, [role=dialog] input[role=combobox][aria-controls=results-list]"
NODE_SEARCH_RESULTS = ".comfy-vue-node-search-box .option-container, [data-testid=result-item]"
NODE_SEARCH_PREVIEW = "._sb_node_preview, [data-testid=node-preview-card]"
#: the Browse Templates dialog's cards, in both frontends tagged ``template-workflow-<name>``
TEMPLATE_CARDS = "[data-testid=template-workflows-content] [data-testid^=template-workflow-]"
EXAMPLES = sorted(name[:-len(".json")] for name in os.listdir(os.path.join(ROOT, "example_workflows"))
                  if name.endswith(".json"))

pytestmark = [
    pytest.mark.comfyui,
    needs_comfyui,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: install Debian's chromium (apt-get install "
                                                "chromium) or set AITK_CHROMIUM to a Chromium/Chrome binary"),
]


def _is_from_pack(text: str) -> bool:
    text = text.lower()
    return "aitk" in text or PACK_FOLDER in text


class Browser:
    """The page plus everything the browser reported: console messages, page errors and failed requests."""

    def __init__(self, page):
        self.page = page
        self.messages: list[dict] = []
        page.on("console", lambda m: self.messages.append(
            {"kind": m.type, "text": m.text, "url": (m.location or {}).get("url", "")}))
        page.on("pageerror", lambda e: self.messages.append(
            {"kind": "pageerror", "text": f"{e.message}\n{e.stack or ''}", "url": ""}))
        page.on("response", lambda r: r.status >= 400 and self.messages.append(
            {"kind": "http", "text": f"{r.status} {r.url}", "url": r.url}))

    def shot(self, name: str) -> str:
        path = os.path.join(ARTIFACTS, f"{name}.png")
        self.page.screenshot(path=path)
        return path

    def js(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def pack_problems(self) -> list[dict]:
        """Errors and warnings the pack caused: mentioning it, coming from its files, or failed requests for them."""
        return [m for m in self.messages if m["kind"] in ("error", "warning", "pageerror", "http")
                and (_is_from_pack(m["text"]) or _is_from_pack(m["url"]))]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, tiny_dir):
    base = make_base_dir(tmp_path_factory.mktemp("comfy_browser"), tiny_dir, pack_folder=PACK_FOLDER)
    # The user's install step: with everything present it installs nothing and prints nothing
    installed = subprocess.run([comfy_python(), "install.py"], cwd=base / "custom_nodes" / PACK_FOLDER,
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0 and installed.stdout + installed.stderr == "", installed
    server = ComfyServer(str(base), {}, extra_args=("--preview-method", "latent2rgb"))  # live step previews on
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(comfy):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python (pip install "
                                                                 "playwright; it drives the system Chromium)")
    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = chromium.new_page(viewport={"width": 1600, "height": 1000})
        watched = Browser(page)
        page.goto(comfy.url)
        page.wait_for_function("window.app?.graph && window.app.extensionManager && "
                               "window.app.extensions?.some((e) => e.name === 'aitk_inference.defaults')",
                               timeout=120_000)
        page.locator('[data-testid="queue-button"]').first.wait_for()
        page.wait_for_timeout(1000)  # the first frames settle the graph and the dialogs of a first visit
        page.keyboard.press("Escape")
        watched.js("""() => {
            window.aitkSeen = {progress: [], titles: [], done: 0, previews: [], previewNodes: []};
            const api = window.comfyAPI.api.api;
            api.addEventListener("progress", (e) => window.aitkSeen.progress.push(e.detail));
            const preview = (blob) => createImageBitmap(blob).then((bitmap) => window.aitkSeen.previews.push(
                {type: blob.type, width: bitmap.width, height: bitmap.height}));
            api.addEventListener("b_preview", (e) => preview(e.detail));
            api.addEventListener("b_preview_with_metadata", (e) => window.aitkSeen.previewNodes.push(
                String(e.detail.displayNodeId)));
            api.addEventListener("execution_success", () => window.aitkSeen.done++);
            setInterval(() => { if (/\\d+%/.test(document.title)) window.aitkSeen.titles.push(document.title); }, 10);
        }""")
        yield watched
        with open(os.path.join(ARTIFACTS, "console.json"), "w") as f:
            json.dump(watched.messages, f, indent=1)
        chromium.close()


def _node(browser, node_type: str) -> dict:
    """What the canvas holds for the first node of ``node_type``: widgets (name, value, hidden, y, height), inputs,
    size, and the status line's text."""
    return browser.js("""(type) => {
        const node = app.graph.nodes.find((n) => n.type === type);
        const widgets = (node.widgets ?? []).map((w) => ({
            name: w.name, value: w.value, hidden: !!w.hidden, y: w.y,
            height: w.computeSize ? w.computeSize(node.size[0])[1] : 20, tooltip: w.tooltip ?? null}));
        return {id: node.id, size: node.size, widgets, inputs: node.inputs.map((i) => i.name),
                status: widgets.find((w) => w.name.startsWith("aitk_"))?.value ?? null};
    }""", node_type)


def _widget(node: dict, name: str) -> dict:
    return next(w for w in node["widgets"] if w["name"] == name)


def _set_widgets(browser, node_type: str, values: dict) -> None:
    browser.js("""([type, values]) => {
        const node = app.graph.nodes.find((n) => n.type === type);
        for (const [name, value] of Object.entries(values)) node.widgets.find((w) => w.name === name).value = value;
        app.graph.setDirtyCanvas(true, true);
    }""", [node_type, values])


def _load_example(browser, name: str) -> None:
    browser.js("""async (url) => {
        const workflow = await (await fetch(url)).json();
        await app.loadGraphData(workflow, true, true, null);
        app.canvas.draw(true, true);
    }""", f"/api/workflow_templates/{PACK_FOLDER}/{name}.json")
    time.sleep(0.3)  # the status lines are filled on the next frames


def _run(browser, timeout: float = 240) -> None:
    """Press Run and wait until the prompt succeeded."""
    done = browser.js("window.aitkSeen.done")
    browser.page.locator('[data-testid="queue-button"]').first.click()
    browser.page.wait_for_function(f"window.aitkSeen.done > {done}", timeout=timeout * 1000)
    time.sleep(0.5)


def test_node_search_shows_the_nodes_with_widgets_and_tooltips(browser):
    page = browser.page
    browser.js("app.graph.clear()")
    box = page.locator("#graph-canvas").bounding_box()
    search = page.locator(NODE_SEARCH_INPUT).first
    for _ in range(5):  # a double click on the empty canvas opens the node search (once the canvas has settled)
        page.mouse.dblclick(box["x"] + 700, box["y"] + 400)
        try:
            search.wait_for(timeout=3000)
            break
        except Exception:
            page.keyboard.press("Escape")
    search.fill("AITK")
    options = page.locator(NODE_SEARCH_RESULTS)
    options.first.wait_for()
    page.wait_for_timeout(500)
    assert {"Load AITK Pipeline", "Apply AITK LoRA", "AITK Sample"} <= {
        text.split("\n")[0].strip() for text in options.all_inner_texts()}
    search.fill("AITK Sample")
    page.wait_for_timeout(500)
    preview = page.locator(NODE_SEARCH_PREVIEW).first.inner_text()
    for name in ("pipeline", "prompt", "width", "seed", "num_frames", "vae_tiling", "image", "audio"):
        assert name in preview
    assert "ai-toolkit" in preview  # the description
    browser.shot("01_node_search")
    page.keyboard.press("Enter")
    page.wait_for_function("app.graph.nodes.some((n) => n.type === 'AITKSample')")
    # Frontend 1.4x adds it as a ghost that follows the pointer until a click places it; 1.27 places it at once, and
    # the click lands on empty canvas
    page.wait_for_timeout(500)
    page.mouse.click(box["x"] + 1300, box["y"] + 150)
    page.wait_for_function("!app.graph.nodes.find((n) => n.type === 'AITKSample').flags?.ghost")

    sample = _node(browser, "AITKSample")
    widget_names = [w["name"] for w in sample["widgets"]]
    assert widget_names[:9] == ["prompt", "negative", "trigger_word", "width", "height", "steps", "guidance", "seed",
                                "control_after_generate"]
    assert _widget(sample, "control_after_generate")["value"] == "fixed"  # not ComfyUI's default "randomize"
    saved = browser.js("app.graph.nodes.find((n) => n.type === 'AITKSample').serialize().widgets_values")
    assert len(saved) == 14  # the status line is never saved into the workflow

    # Hovering a widget shows its tooltip from the schema (the node first moved to the top left of the view: where
    # the search placed it, its lower widgets may be below the window)
    x, y = browser.js("""() => {
        const node = app.graph.nodes.find((n) => n.type === "AITKSample");
        const seed = node.widgets.find((w) => w.name === "seed");
        const rect = app.canvas.canvas.getBoundingClientRect(), ds = app.canvas.ds;
        node.pos = [200 / ds.scale - ds.offset[0], 100 / ds.scale - ds.offset[1]];
        app.canvas.draw(true, true);
        return [rect.left + (node.pos[0] + node.size[0] / 2 + ds.offset[0]) * ds.scale,
                rect.top + (node.pos[1] + seed.y + 10 + ds.offset[1]) * ds.scale];
    }""")
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    tooltip = page.locator(".node-tooltip")
    for attempt in range(3):  # the frontend shows it after a hover delay; a busy machine can miss the first hover
        page.mouse.move(x - 40, y + 200)
        page.mouse.move(x, y, steps=8)
        try:
            tooltip.wait_for(timeout=10_000)
            break
        except PlaywrightTimeoutError:
            if attempt == 2:
                raise
    assert "walk_seed" in tooltip.inner_text()
    browser.shot("02_sample_from_search")


def test_templates_browser_lists_every_example_with_its_thumbnail(browser):
    page = browser.page
    browser.js("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    # the side list titles the pack's category by locales/en/main.json, not by its folder name
    page.get_by_role("option", name="AITK Inference", exact=True).or_(
        page.get_by_role("button", name="AITK Inference", exact=True)).first.click()
    cards = page.locator(TEMPLATE_CARDS)
    cards.first.wait_for()
    for _ in range(len(EXAMPLES)):  # the dialog shows the cards a page at a time, as the list is scrolled
        shown = cards.count()
        cards.nth(shown - 1).scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        if cards.count() == shown:
            break
    assert cards.count() == len(EXAMPLES)
    titles = [title.strip() for title in page.locator(f"{TEMPLATE_CARDS} h3").all_inner_texts()]
    models = list(comfy_models(browser))
    assert titles == ["reproduce_training_previews_flux", "training_job_checkpoint_grid"] + [
        m for m in models if m in EXAMPLES]
    # Every card's thumbnail loads (scrolled into view, since the cards load their images lazily)
    for i in range(cards.count()):
        cards.nth(i).scroll_into_view_if_needed()
        page.wait_for_function("([cards, i]) => document.querySelectorAll(cards)[i].querySelector('img')"
                               "?.naturalWidth === 320", arg=[TEMPLATE_CARDS, i], timeout=10_000)
    cards.first.scroll_into_view_if_needed()
    browser.shot("03_templates")
    _close_dialogs(page)


def _close_dialogs(page) -> None:
    """Escape, then the dialog's close button where Escape left it open (frontend 1.4x's templates dialog, at times)."""
    from playwright.sync_api import expect

    page.keyboard.press("Escape")
    dialogs = page.get_by_role("dialog")
    page.wait_for_timeout(500)
    if dialogs.count():
        dialogs.get_by_role("button", name=re.compile(r"^Close")).first.click()
    expect(dialogs).to_have_count(0)


def _frontend_own_deprecation(message: dict) -> bool:
    """Frontend 1.5x warns once, from its litegraph bundle, that ``input.link`` is deprecated: its own node
    configure and media scan read it on the first workflow loaded (the pack reads connectivity through
    ``node.isInputConnected``)."""
    return (message["kind"] == "warning" and message["text"].startswith("input.link is deprecated")
            and "/assets/litegraph" in message["url"])


def comfy_models(browser) -> dict:
    return browser.js("fetch('/aitk_inference/models').then((r) => r.json())")


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_workflow_loads(browser, example):
    with open(os.path.join(ROOT, "example_workflows", f"{example}.json")) as f:
        workflow = json.load(f)
    used_audio_nodes = sorted(TORCHAUDIO_CORE_NODES & {node["type"] for node in workflow["nodes"]})
    if browser.js("(types) => types.filter((t) => !(t in LiteGraph.registered_node_types))", used_audio_nodes):
        pytest.skip(f"{used_audio_nodes}: ComfyUI's audio nodes need torchaudio, which this ComfyUI environment lacks "
                    "(CI leaves it out: PyPI has no torchaudio for its CPU torch)")
    errors_before = len(browser.messages)
    _load_example(browser, example)
    loaded = browser.js("""() => app.graph.nodes.map((n) => ({
        id: n.id, type: n.type, known: n.type in LiteGraph.registered_node_types, errors: !!n.has_errors,
        absent_file: (n.widgets ?? []).some((w) => Array.isArray(w.options?.values)
            && String(w.value).endsWith(".safetensors") && !w.options.values.includes(w.value)),
        values: n.serialize().widgets_values ?? []}))""")
    assert [n["type"] for n in loaded] == [n["type"] for n in workflow["nodes"]]
    assert all(n["known"] for n in loaded), loaded
    # Frontend 1.4x checks the model files a loaded workflow names and flags the nodes whose file is absent (here the
    # Apply nodes' placeholder LoRA names, until the user picks a file); 1.27 flags none. No other node may be flagged.
    flagged = {n["id"] for n in loaded if n["errors"]}
    assert flagged in (set(), {n["id"] for n in loaded if n["absent_file"]}), loaded
    saved = {str(n["id"]): n["widgets_values"] for n in workflow["nodes"]}  # frontend 1.4x's node ids are strings
    for node in loaded:  # every widget value arrives unchanged
        if node["type"].startswith("AITK"):
            assert node["values"] == saved[str(node["id"])], node["type"]
    assert not [m for m in browser.messages[errors_before:] if m["kind"] in ("error", "pageerror", "warning", "http")
                and not _frontend_own_deprecation(m)]

    models = comfy_models(browser) if example in ("flux", "ltx2", "qwen_image_edit") else {}
    if example in models:
        sample = _node(browser, "AITKSample")
        spec = models[example]
        hidden = {w["name"] for w in sample["widgets"] if w["hidden"]}
        assert hidden == (set() if spec["is_video_model"] else {"num_frames", "fps"})
        controls = [name for name in sample["inputs"] if name.startswith("control_image")]
        assert len(controls) == spec["control_images"][1]
        status = _widget(sample, "aitk_sample_status")
        assert status["value"].startswith(f"runs at {spec['width']}×{spec['height']}")
        assert status["height"] > 0 and status["y"] + status["height"] <= sample["size"][1]  # inside the node
        load = _node(browser, "AITKLoadPipeline")
        assert load["status"].startswith(f"base: {spec['base_model']} from the Hugging Face hub; the first run "
                                         "downloads")
        browser.shot(f"04_example_{example}")


def test_run_button_renders_with_progress(browser):
    steps = 12
    _load_example(browser, "flux")
    _set_widgets(browser, "AITKLoadPipeline", {"base": "tiny-flux"})
    _set_widgets(browser, "AITKApplyLoRA", {"lora": "tiny_flux.safetensors"})
    _set_widgets(browser, "AITKSample", {"width": 72, "height": 64, "steps": steps})
    # The Load node's status line follows its base: now a local folder, with its size
    browser.page.wait_for_function("app.graph.nodes.find((n) => n.type === 'AITKLoadPipeline')"
                                   ".widgets.at(-1).value.includes('tiny-flux')")
    assert re.fullmatch(r"base: /\S+/models/diffusers/tiny-flux \(\d+ MB on disk\)",
                        _node(browser, "AITKLoadPipeline")["status"])
    browser.js("window.aitkSeen.progress = []; window.aitkSeen.titles = []; window.aitkSeen.previews = []; "
               "window.aitkSeen.previewNodes = []")
    _run(browser)

    sample_id = str(_node(browser, "AITKSample")["id"])
    ticks = [p["value"] for p in browser.js("window.aitkSeen.progress") if p["node"] == sample_id]
    assert ticks[-1] == steps and len(ticks) >= steps // 2, ticks  # the node's progress bar advanced per step
    # Live step previews came over the websocket (ComfyUI runs with --preview-method latent2rgb): JPEGs of the
    # square image's latent, which ComfyUI's server scales to fit --preview-size (512), as for KSampler
    browser.page.wait_for_function(f"window.aitkSeen.previews.length >= {steps // 2}", timeout=10_000)
    previews = browser.js("window.aitkSeen.previews")
    assert {(p["type"], p["width"], p["height"]) for p in previews} == {("image/jpeg", 512, 512)}, previews
    assert set(browser.js("window.aitkSeen.previewNodes")) <= {sample_id}  # shown on the Sample node
    titles = browser.js("window.aitkSeen.titles")
    assert any(re.search(r"\[\d+%\]", title) for title in titles), titles  # and the tab title showed it
    # The saved image shows on the Save Image node (loaded from /view once the node is drawn)
    browser.page.wait_for_function("app.graph.nodes.find((n) => n.type === 'SaveImage').imgs?.[0]?.naturalWidth > 0",
                                   timeout=20_000)
    image = browser.js("""() => {
        const img = app.graph.nodes.find((n) => n.type === "SaveImage").imgs[0];
        return {width: img.naturalWidth, height: img.naturalHeight, src: img.src};
    }""")
    assert (image["width"], image["height"]) == (64, 64) and "subfolder=aitk" in image["src"], image
    assert _widget(_node(browser, "AITKSample"), "aitk_sample_status")["value"] == \
        "runs at 64×64 (÷16) · last: 64×64, seed 42"
    browser.shot("05_run_flux")


def test_video_example_shows_its_player(browser):
    _load_example(browser, "ltx2")
    _set_widgets(browser, "AITKLoadPipeline", {"base": "tiny-ltx2"})
    _set_widgets(browser, "AITKSample", {"width": 64, "height": 64, "steps": 2, "num_frames": 9, "fps": 12})
    browser.js("app.graph.nodes.find((n) => n.type === 'AITKApplyLoRA').mode = 4")  # bypassed: no LoRA here
    _run(browser)
    browser.page.wait_for_function("[...document.querySelectorAll('video')].some((v) => v.src.includes('ltx2') "
                                   "&& v.readyState >= 1)", timeout=30_000)
    size = browser.js("(() => { const v = [...document.querySelectorAll('video')].find((v) => v.src.includes('ltx2'));"
                      " return [v.videoWidth, v.videoHeight]; })()")
    assert size == [64, 64]
    browser.shot("06_run_ltx2_video")


def test_no_console_errors_or_warnings_from_the_pack(browser):
    assert browser.pack_problems() == []
