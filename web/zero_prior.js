// Qwen-Image zero-prior node pack: status text on the nodes, and a live loss chart on the training node.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const STATUS_NODES = new Set([
  "ZeroPriorLoadArchive",
  "ZeroPriorRegisterToken",
  "ZeroPriorApplyQwenLoRA",
  "ZeroPriorApplyQwenLoRAFile",
  "ZeroPriorTrain",
]);
const TRAIN_NODE = "ZeroPriorTrain";
const CHART_HEIGHT = 140;

function showText(node, lines) {
  const text = (lines || []).join("\n");
  let w = node.widgets?.find((x) => x.name === "zero_prior_status");
  if (!w) {
    const made = app.widgets?.STRING?.(node, "zero_prior_status", ["STRING", { multiline: true }], app);
    w = made?.widget;
    if (!w) return;
    if (w.inputEl) w.inputEl.readOnly = true;
    w.serialize = false;
  }
  w.value = text;
  node.setDirtyCanvas?.(true, true);
}

// A canvas widget: the loss per step (thin) and its running mean (thick), with step / total and last value.
function lossChartWidget(node) {
  return {
    name: "zero_prior_loss_chart",
    type: "zero_prior_loss_chart",
    serialize: false,
    losses: [],
    total: 0,
    computeSize(width) {
      return [width, CHART_HEIGHT];
    },
    draw(ctx, _node, width, y) {
      const pad = 10;
      const x0 = pad, y0 = y + 4, w = width - 2 * pad, h = CHART_HEIGHT - 12;
      ctx.save();
      ctx.fillStyle = "#1b1b1f";
      ctx.fillRect(x0, y0, w, h);
      ctx.strokeStyle = "#444";
      ctx.strokeRect(x0, y0, w, h);
      const losses = this.losses;
      ctx.fillStyle = "#bbb";
      ctx.font = "11px sans-serif";
      if (!losses.length) {
        ctx.fillText("loss: waiting for the first step", x0 + 6, y0 + 16);
        ctx.restore();
        return;
      }
      const n = Math.max(this.total || losses.length, losses.length);
      let lo = Infinity, hi = -Infinity;
      for (const v of losses) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
      if (hi - lo < 1e-12) { hi = lo + 1e-6; }
      const px = (i) => x0 + 4 + (w - 8) * (n > 1 ? i / (n - 1) : 0);
      const py = (v) => y0 + h - 18 - (h - 34) * ((v - lo) / (hi - lo));
      ctx.strokeStyle = "rgba(120,170,255,0.45)";
      ctx.lineWidth = 1;
      ctx.beginPath();
      losses.forEach((v, i) => (i ? ctx.lineTo(px(i), py(v)) : ctx.moveTo(px(i), py(v))));
      ctx.stroke();
      const k = Math.max(1, Math.floor(losses.length / 20));
      ctx.strokeStyle = "#ffb14a";
      ctx.lineWidth = 2;
      ctx.beginPath();
      let acc = 0;
      losses.forEach((v, i) => {
        acc += v;
        if (i >= k) acc -= losses[i - k];
        const m = acc / Math.min(i + 1, k);
        i ? ctx.lineTo(px(i), py(m)) : ctx.moveTo(px(i), py(m));
      });
      ctx.stroke();
      ctx.fillStyle = "#ddd";
      const last = losses[losses.length - 1];
      ctx.fillText(`step ${losses.length}/${n}   loss ${last.toFixed(4)}   min ${lo.toFixed(4)}`, x0 + 6, y0 + h - 5);
      ctx.restore();
    },
  };
}

function chartOf(node) {
  let w = node.widgets?.find((x) => x.name === "zero_prior_loss_chart");
  if (!w) {
    w = node.addCustomWidget(lossChartWidget(node));
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  }
  return w;
}

app.registerExtension({
  name: "qwen.zero_prior",
  // read at start-up by prestartup_script.py (the allocator is chosen before torch is imported): off by default
  settings: [
    {
      id: "QwenZeroPrior.NativeAllocator",
      category: ["Qwen Zero-Prior", "Training", "Native CUDA allocator"],
      name: "Native CUDA allocator for training speed (restart ComfyUI to apply)",
      tooltip:
        "Starts ComfyUI with PyTorch's native CUDA allocator, as --disable-cuda-malloc does, so the training node's " +
        "compiled steps replay torch.compile's own CUDA graphs. Under ComfyUI's default (cudaMallocAsync) the " +
        "node captures its own graphs instead, about as fast (0.35 s/step on an H200 at 1024² either way); this " +
        "is the way back if that capture fails. Applies to every workflow in this ComfyUI (with --multi-user, the " +
        "default user's setting counts).",
      type: "boolean",
      defaultValue: false,
    },
  ],
  async setup() {
    api.addEventListener("zero_prior.loss", ({ detail }) => {
      const node = app.graph?.getNodeById?.(Number(detail?.node)) ?? app.graph?.getNodeById?.(detail?.node);
      if (!node) return;
      const chart = chartOf(node);
      if (detail.step === 0 || detail.step < chart.losses.length) chart.losses = chart.losses.slice(0, detail.step);
      if (detail.loss !== null && detail.loss !== undefined) chart.losses[detail.step - 1] = detail.loss;
      chart.total = detail.total;
      node.setDirtyCanvas(true, true);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!STATUS_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text) showText(this, message.text);
      if (nodeData.name === TRAIN_NODE && Array.isArray(message?.loss)) {
        const chart = chartOf(this);
        chart.losses = message.loss.slice();
        chart.total = Math.max(chart.total, chart.losses.length);
        this.setDirtyCanvas(true, true);
      }
    };
    if (nodeData.name === TRAIN_NODE) {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        onNodeCreated?.apply(this, arguments);
        chartOf(this);
      };
    }
  },
});
