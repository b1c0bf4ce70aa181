// The settings panel: system prompt and sampling (kept in localStorage, read into each request
// by app.js), the model picker filled from /v1/models, and the API key for a server started
// with --api-key.

import { listModels } from "./api.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);

// each number field's id, and its name in the settings and the request
const FIELDS = { temperature: "temperature", "top-p": "top_p", "max-tokens": "max_tokens", seed: "seed" };
const INTEGERS = new Set(["max_tokens", "seed"]);

export function setupSettings(state, { showBanner, modelName }) {
  function showSettings() {
    const s = state.settings;
    $("system").value = s.system;
    for (const [id, name] of Object.entries(FIELDS)) $(id).value = s[name] ?? "";
    $("api-key").value = state.apiKey;
  }

  function readSettings() {
    const s = state.settings;
    s.system = $("system").value;
    for (const [id, name] of Object.entries(FIELDS)) {
      const raw = $(id).value.trim();
      s[name] = raw === "" ? null : Number(raw);
    }
    // Off the arrows' step is fine for the decimals; out of range or a fraction of a token is not.
    const bad = Object.entries(FIELDS).filter(([id, name]) => {
      const v = $(id).validity;
      return v.badInput || v.rangeUnderflow || v.rangeOverflow || (v.stepMismatch && INTEGERS.has(name));
    });
    $("settings-error").textContent = bad.length
      ? `Check ${bad.map(([id]) => $(id).labels[0].textContent).join(", ")}: the server will refuse ${bad.length > 1 ? "these values" : "this value"}.`
      : "";
    store.saveSettings(s);
  }

  for (const id of ["system", ...Object.keys(FIELDS)]) $(id).addEventListener("input", readSettings);

  $("model").addEventListener("change", (e) => {
    state.settings.model = e.target.value;
    modelName.textContent = e.target.value;
    store.saveSettings(state.settings);
  });

  $("api-key").addEventListener("change", (e) => {
    state.apiKey = e.target.value.trim();
    store.saveApiKey(state.apiKey);
    loadModels();
  });

  async function loadModels() {
    const select = $("model");
    try {
      const models = await listModels(state.apiKey);
      select.replaceChildren(...models.map((id) => new Option(id, id)));
      if (!models.includes(state.settings.model)) state.settings.model = models[0] ?? "";
      select.value = state.settings.model;
      modelName.textContent = state.settings.model;
      showBanner("");
    } catch (e) {
      select.replaceChildren(new Option("(not available)", ""));
      state.settings.model = "";
      showBanner(e.message);
    }
  }

  showSettings();
  return { loadModels };
}
