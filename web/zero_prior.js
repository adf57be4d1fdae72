// Qwen-Image zero-prior: shows each node's status text (archive contents, LoRA keys loaded) on the node.
import { app } from "../../scripts/app.js";

const OUR_NODES = new Set([
  "ZeroPriorLoadArchive",
  "ZeroPriorRegisterToken",
  "ZeroPriorApplyQwenLoRA",
  "ZeroPriorApplyQwenLoRAFile",
]);

function showText(node, lines) {
  const text = (lines || []).join("\n");
  let w = node.widgets?.find((x) => x.name === "zero_prior_status");
  if (!w) {
    const made = app.widgets?.STRING?.(node, "zero_prior_status", ["STRING", { multiline: true }], app);
    w = made?.widget;
    if (!w) return;
    w.inputEl && (w.inputEl.readOnly = true);
    w.serialize = false;
  }
  w.value = text;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "qwen.zero_prior.status",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!OUR_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text) showText(this, message.text);
    };
  },
});
