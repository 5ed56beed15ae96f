// AITK Inference front end:
// 1. When the model changes on "Load AITK Pipeline", every "AITK Sample" downstream (through any chain of
//    "Apply AITK LoRA") takes that model's defaults: steps, guidance, width, height and, for video models, frames/fps.
// 2. "AITK Sample" shows the size that will really run (floored to 8, min 64, then to the model's divisor) and, after
//    a run, the effective size and seed it reported.
// The defaults come from GET /aitk_inference/models (the Python registry); without it nothing changes.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

let MODELS = {};

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

function upstreamModel(node) {
  let current = node;
  for (let hops = 0; current && hops < 64; hops++) {
    if (current.type === "AITKLoadPipeline") return MODELS[widget(current, "model")?.value];
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

app.registerExtension({
  name: "aitk_inference.defaults",
  async setup() {
    try {
      const response = await api.fetchApi("/aitk_inference/models");
      if (response.ok) MODELS = await response.json();
    } catch (error) {
      console.warn("AITK Inference: model defaults unavailable", error);
    }
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "AITKLoadPipeline") {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = onNodeCreated?.apply(this, arguments);
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
    }
    if (nodeData.name === "AITKSample") {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        this.aitkEffective = message?.aitk_effective?.[0];
        this.setDirtyCanvas(true, true);
      };
      const onDrawForeground = nodeType.prototype.onDrawForeground;
      nodeType.prototype.onDrawForeground = function (ctx) {
        onDrawForeground?.apply(this, arguments);
        if (this.flags?.collapsed) return;
        const model = upstreamModel(this);
        const width = widget(this, "width")?.value;
        const height = widget(this, "height")?.value;
        let text = "";
        if (model && width && height) {
          text = `runs at ${snap(width, model.divisor)}×${snap(height, model.divisor)} (÷${model.divisor})`;
        }
        const ran = this.aitkEffective;
        if (ran) text += `${text ? " · " : ""}last: ${ran.width}×${ran.height}, seed ${ran.seed}`;
        if (!text) return;
        ctx.save();
        ctx.font = "11px sans-serif";
        ctx.fillStyle = "#8a8";
        ctx.textAlign = "left";
        ctx.fillText(text, 10, this.size[1] - 6);
        ctx.restore();
      };
    }
  },
});
