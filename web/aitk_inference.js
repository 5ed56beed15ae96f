// AITK Inference front end:
// 1. When the model changes on "Load AITK Pipeline", every "AITK Sample" downstream (through any chain of
//    "Apply AITK LoRA") takes that model's defaults: steps, guidance, width, height and, for video models, frames/fps.
// 2. "AITK Sample" shows, in a status line under its widgets, the size that will really run (floored to 8, min 64,
//    then to the model's divisor) and, after a run, the effective size and seed it reported. Its seed control starts
//    at "fixed" (ai-toolkit's previews use fixed seeds), and what does not apply to the connected model is hidden:
//    num_frames/fps for image models, the control image inputs beyond what the model takes.
// 3. "Load AITK Pipeline" says in a status line where its base comes from (local folder or Hugging Face repo) and
//    how large it is, so that the first run's download is no surprise.
// 4. The pack's example workflows are listed in Browse Templates: the training-job ones first, then the models' in
//    registry order (the server lists files in directory order).
// The model facts come from GET /aitk_inference/models (the Python registry); without it nothing changes.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

let MODELS = {};
const PACK_FOLDER = decodeURIComponent(new URL(import.meta.url).pathname.split("/").at(-2));
const VIDEO_WIDGETS = ["num_frames", "fps"];
const CONTROL_INPUTS = ["control_image", "control_image_2", "control_image_3"];
// the training-job workflows come first, in this order, then one per model id
const JOB_TEMPLATES = ["reproduce_training_previews_flux", "training_job_checkpoint_grid"];

const widget = (node, name) => node.widgets?.find((w) => w.name === name);

function downstreamSamples(node, seen = new Set()) {
  if (seen.has(node.id)) return [];
  seen.add(node.id);
  const found = [];
  for (const next of node.getOutputNodes?.(0) ?? []) {
    if (next.type === "AITKSample") found.push(next);
    else if (next.type === "AITKApplyLoRA") found.push(...downstreamSamples(next, seen));
  }
  return found;
}

function upstreamModelId(node) {
  let current = node;
  for (let hops = 0; current && hops < 64; hops++) {
    if (current.type === "AITKLoadPipeline") return widget(current, "model")?.value;
    const slot = current.inputs?.findIndex((input) => input.name === "pipeline") ?? -1;
    current = slot >= 0 ? current.getInputNode(slot) : null;
  }
  return undefined;
}

function applyDefaults(loadNode, modelId) {
  const defaults = MODELS[modelId];
  if (!defaults) return;
  const values = {
    steps: defaults.steps,
    guidance: defaults.guidance,
    width: defaults.width,
    height: defaults.height,
    num_frames: defaults.is_video_model ? defaults.num_frames : 0,
    fps: defaults.is_video_model ? defaults.fps : 0,
  };
  for (const sample of downstreamSamples(loadNode)) {
    for (const [name, value] of Object.entries(values)) {
      const w = widget(sample, name);
      if (w && value !== undefined) w.value = value;
    }
  }
  app.graph.setDirtyCanvas(true, true);
}

const snap = (value, divisor) => {
  const floored = Math.max(64, value - (value % 8));
  return floored - (floored % divisor);
};

const byteSize = (bytes) => (bytes >= 1e9 ? `${(bytes / 1e9).toFixed(1)} GB` : `${Math.max(1, Math.round(bytes / 1e6))} MB`);

// ------------------------------------------------------------------------------------------------ status line widget
const STATUS_FONT = "11px sans-serif";
const STATUS_LINE_HEIGHT = 14;
const STATUS_MARGIN = 12;
const measureContext = document.createElement("canvas").getContext("2d");

// Long words (paths) are cut where they reach the width.
function splitLongWord(word, width) {
  const pieces = [];
  let piece = "";
  for (const char of word) {
    if (piece && measureContext.measureText(piece + char).width > width) {
      pieces.push(piece);
      piece = "";
    }
    piece += char;
  }
  return [...pieces, piece];
}

function wrapText(text, width) {
  measureContext.font = STATUS_FONT;
  const lines = [];
  let line = "";
  for (const word of text.split(" ").flatMap((w) => splitLongWord(w, width))) {
    const candidate = line ? `${line} ${word}` : word;
    if (line && measureContext.measureText(candidate).width > width) {
      lines.push(line);
      line = word;
    } else {
      line = candidate;
    }
  }
  if (line) lines.push(line);
  return lines;
}

// A read-only widget drawing wrapped text under the node's other widgets; never saved in the workflow.
function addStatusWidget(node, name) {
  const status = {
    name,
    type: "aitk_status",
    value: "",
    color: "#8a8",
    serialize: false,
    options: { serialize: false },
    lines: [],
    draw(ctx, _node, widgetWidth, y) {
      if (!this.lines.length) return;
      ctx.save();
      ctx.font = STATUS_FONT;
      ctx.fillStyle = this.color;
      ctx.textAlign = "left";
      this.lines.forEach((line, i) => ctx.fillText(line, STATUS_MARGIN, y + STATUS_LINE_HEIGHT * (i + 1)));
      ctx.restore();
    },
    computeSize(width) {
      return [width ?? node.size[0], this.lines.length ? this.lines.length * STATUS_LINE_HEIGHT + 6 : 0];
    },
  };
  node.addCustomWidget(status);
  return status;
}

function setStatus(node, status, text, color = "#8a8") {
  const lines = text ? wrapText(text, node.size[0] - 2 * STATUS_MARGIN) : [];
  if (text === status.value && color === status.color && lines.length === status.lines.length) return;
  status.value = text;
  status.color = color;
  status.lines = lines;
  fitHeight(node);
}

function fitHeight(node) {
  const height = node.computeSize()[1];
  if (node.size[1] !== height) node.setSize([node.size[0], height]);
  node.setDirtyCanvas(true, true);
}

// ------------------------------------------------------------------------------------------------ AITK Sample
function sampleStatusText(node, model) {
  const width = widget(node, "width")?.value;
  const height = widget(node, "height")?.value;
  let text = "";
  if (model && width && height) {
    text = `runs at ${snap(width, model.divisor)}×${snap(height, model.divisor)} (÷${model.divisor})`;
  }
  const ran = node.aitkEffective;
  if (ran) text += `${text ? " · " : ""}last: ${ran.width}×${ran.height}, seed ${ran.seed}`;
  return text;
}

// Hide what the connected model does not use: video widgets on image models, control inputs it does not take.
// LiteGraph still lays out a hidden widget at its full height; a height of 0 (-4 plus the 4 it adds) removes the gap.
const collapsedSize = () => [0, -4];

function setHidden(w, hidden) {
  if (!w || !!w.hidden === hidden) return;
  w.hidden = hidden;
  if (hidden) {
    w.aitkComputeSize = w.computeSize;
    w.computeSize = collapsedSize;
  } else if (w.aitkComputeSize) {
    w.computeSize = w.aitkComputeSize;
  } else {
    delete w.computeSize;
  }
}

function showApplicable(node, model) {
  for (const name of VIDEO_WIDGETS) setHidden(widget(node, name), !model.is_video_model);
  const maxControls = model.control_images?.[1] ?? 0;
  CONTROL_INPUTS.forEach((name, i) => {
    const slot = node.findInputSlot(name);
    if (i >= maxControls && slot >= 0 && !node.isInputConnected(slot)) node.removeInput(slot);
    if (i < maxControls && slot < 0) node.addInput(name, "IMAGE", { shape: 7 });
  });
  fitHeight(node);
}

function refreshSample(node) {
  const modelId = upstreamModelId(node);
  const model = MODELS[modelId];
  if (model && node.aitkModelId !== modelId) {
    node.aitkModelId = modelId;
    showApplicable(node, model);
  }
  setStatus(node, node.aitkStatus, sampleStatusText(node, model));
}

// ------------------------------------------------------------------------------------------------ Load AITK Pipeline
function baseStatusText(info) {
  const size = info.bytes ? byteSize(info.bytes) : null;
  if (info.kind === "error") return [info.source, "#d88"];
  if (info.components) {
    const [rest, color] = baseStatusText(info.components);
    return [`file: ${info.source}${size ? ` (${size})` : ""}; the other components: ${rest.replace(/^base: /, "")}`,
            info.components.kind === "error" ? "#d88" : color];
  }
  if (info.kind === "local") return [`base: ${info.source}${size ? ` (${size} on disk)` : ""}`, "#8a8"];
  if (info.cached) return [`base: ${info.source}, Hugging Face hub, already downloaded${size ? ` (${size})` : ""}`, "#8a8"];
  const gated = info.gated ? "; gated: accept its licence on the hub and run huggingface-cli login first" : "";
  const unknown = info.offline ? "size unknown: HF_HUB_OFFLINE is set" : "size unknown: the hub did not answer";
  const download = info.partial ? "fetches the components the file lacks (not its transformer)"
    : size ? `downloads ${size}` : `downloads the repo (${unknown})`;
  return [`base: ${info.source} from the Hugging Face hub; the first run ${download} into the hub cache${gated}. ` +
          "Or put a diffusers folder under models/diffusers and name it in base.", "#cb8"];
}

async function refreshLoad(node) {
  const model = widget(node, "model")?.value;
  const base = widget(node, "base")?.value ?? "";
  const baseFile = widget(node, "base_file")?.value ?? "";
  const key = `${model}\n${base}\n${baseFile}`;
  if (node.aitkBaseKey === key) return;
  node.aitkBaseKey = key;
  try {
    const response = await api.fetchApi(`/aitk_inference/base?model=${encodeURIComponent(model)}&base=${encodeURIComponent(base)}` +
                                        `&base_file=${encodeURIComponent(baseFile)}`);
    if (!response.ok || node.aitkBaseKey !== key) return;
    const [text, color] = baseStatusText(await response.json());
    setStatus(node, node.aitkStatus, text, color);
  } catch {
    node.aitkBaseKey = undefined;
  }
}

// ------------------------------------------------------------------------------------------------ templates
function templateOrder(names) {
  const rank = (name) => {
    if (JOB_TEMPLATES.includes(name)) return JOB_TEMPLATES.indexOf(name) - JOB_TEMPLATES.length;
    const index = Object.keys(MODELS).indexOf(name);
    return index < 0 ? Infinity : index;
  };
  return [...names].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

function orderTemplates() {
  const getWorkflowTemplates = api.getWorkflowTemplates?.bind(api);
  if (!getWorkflowTemplates) return;
  api.getWorkflowTemplates = async (...args) => {
    const templates = await getWorkflowTemplates(...args);
    if (templates?.[PACK_FOLDER]) templates[PACK_FOLDER] = templateOrder(templates[PACK_FOLDER]);
    return templates;
  };
}

app.registerExtension({
  name: "aitk_inference.defaults",
  async setup() {
    try {
      const response = await api.fetchApi("/aitk_inference/models");
      if (response.ok) MODELS = await response.json();
    } catch (error) {
      console.warn("AITK Inference: model defaults unavailable", error);
    }
    orderTemplates();
    app.graph?.setDirtyCanvas(true, true);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "AITKLoadPipeline") {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = onNodeCreated?.apply(this, arguments);
        this.aitkStatus = addStatusWidget(this, "aitk_base_status");
        const model = widget(this, "model");
        if (model) {
          const callback = model.callback;
          model.callback = (value, ...rest) => {
            const out = callback?.call(model, value, ...rest);
            applyDefaults(this, value);
            return out;
          };
        }
        return result;
      };
      const onDrawForeground = nodeType.prototype.onDrawForeground;
      nodeType.prototype.onDrawForeground = function () {
        onDrawForeground?.apply(this, arguments);
        if (!this.flags?.collapsed) refreshLoad(this);
      };
    }
    if (nodeData.name === "AITKSample") {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = onNodeCreated?.apply(this, arguments);
        // A saved workflow's own value replaces this when it loads.
        const seedControl = widget(this, "seed")?.linkedWidgets?.[0];
        if (seedControl) seedControl.value = "fixed";
        this.aitkStatus = addStatusWidget(this, "aitk_sample_status");
        return result;
      };
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        this.aitkEffective = message?.aitk_effective?.[0];
        this.setDirtyCanvas(true, true);
      };
      const onDrawForeground = nodeType.prototype.onDrawForeground;
      nodeType.prototype.onDrawForeground = function () {
        onDrawForeground?.apply(this, arguments);
        if (!this.flags?.collapsed) refreshSample(this);
      };
    }
  },
});
