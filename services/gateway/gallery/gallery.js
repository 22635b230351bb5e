// pigment gallery: plain JS against the HTTP/JSON face (/v1, protobuf JSON). No build step.
"use strict";

const KEY_STORE = "pigment.apiKey";  // sessionStorage: gone when the tab closes
const $ = (id) => document.getElementById(id);
let nextPage = "";
let references = [];  // {itemId, url} for the next generate request (the "use as reference" buttons)
let sent = [];  // the references of the request in flight, for its result's cards
const notes = {};  // generationId -> what this tab's generate/edit responses said of it (ListGenerations has none)

function headers(json) {
  const h = {};
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h["Authorization"] = "Bearer " + key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

function say(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

// Errors arrive as google.rpc.Status JSON: {code, message, details}
async function api(path, body) {
  const init = body === undefined ? { headers: headers(false) }
    : { method: "POST", headers: headers(true), body: JSON.stringify(body) };
  const resp = await fetch(path, init);
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const wait = resp.headers.get("Retry-After");
    throw new Error(`${resp.status}: ${data.message || resp.statusText}${wait ? ` (retry in ${wait}s)` : ""}`);
  }
  return data;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => (k === "class" ? (node.className = v) : node.setAttribute(k, v)));
  children.flat().forEach((c) => node.append(c));
  return node;
}

function imageSrc(image) {
  if (!image) return "";
  return image.url || (image.png ? "data:image/png;base64," + image.png : "");
}

async function sendFeedback(gen, kind, button, others) {
  const body = {
    feedbackId: "web-" + crypto.randomUUID(), userId: gen.userId, generationId: gen.generationId,
    kind: "FEEDBACK_KIND_" + kind.toUpperCase(), otherGenerationIds: others || [],
  };
  try {
    await api("/v1/feedback", body);
    button.classList.add("done");
    say(`${kind} recorded for ${gen.generationId}`);
  } catch (err) {
    say(`feedback failed: ${err.message}`, true);
  }
}

// What a response says of its images: the written prompt, the reference count, the edit plan.
function remember(result, extra) {
  const c = result.conditioning || {};
  (result.images || []).forEach((i) => (notes[i.generationId] = {
    writtenPrompt: c.writtenPrompt || "", referenceImages: c.referenceImages || 0, ...extra,
  }));
}

function noteLines(note) {
  if (!note) return [];
  const lines = [];
  if (note.edit) {
    const e = note.edit;
    lines.push(el("div", { class: "edit-plan", title: "edited from " + note.source },
      `edit: ${e.attribute} → ${e.value} (region ${e.region})`));
  }
  if (note.writtenPrompt) lines.push(el("div", { class: "written" }, `written prompt: “${note.writtenPrompt}”`));
  if (note.referenceImages) {
    lines.push(el("div", { class: "refs" }, `from ${note.referenceImages} reference image${note.referenceImages > 1 ? "s" : ""}`,
      (note.references || []).map((r) => el("img", { class: "thumb", src: r.url, alt: r.itemId, title: r.itemId }))));
  }
  return lines;
}

async function editImage(gen, input, button) {
  const instruction = input.value.trim();
  if (!instruction) return say("say what to change, e.g. “make the background light”", true);
  button.disabled = true;
  say(`editing ${gen.generationId}: ${instruction} ...`);
  try {
    const out = await api("/v1/edit", {
      requestId: "web-" + crypto.randomUUID(), userId: gen.userId, generationId: gen.generationId, instruction,
    });
    remember(out.result, { edit: out.edit, source: out.sourceGenerationId });
    await loadGenerations(false);  // newest first: the edit is at the top
    const e = out.edit;
    say(`edited: ${e.attribute} → ${e.value} (region ${e.region})`);
  } catch (err) {
    say(`edit failed: ${err.message}`, true);
  } finally {
    button.disabled = false;
  }
}

function editForm(gen) {
  const input = el("input", { class: "edit-instruction", placeholder: "e.g. make the background light", maxlength: "300" });
  const button = el("button", { type: "submit", class: "edit" }, "Edit");
  const form = el("form", { class: "edit-form" }, input, button);
  form.onsubmit = (ev) => {
    ev.preventDefault();
    editImage(gen, input, button);
  };
  return form;
}

function generationCard(gen, siblings) {
  const source = (gen.source || "").replace("RESULT_SOURCE_", "");
  const actions = el("div", { class: "actions" });
  for (const kind of ["like", "dislike"]) {
    const b = el("button", { type: "button", "data-kind": kind }, kind);
    b.onclick = () => sendFeedback(gen, kind, b);
    actions.append(b);
  }
  const others = siblings.filter((g) => g.generationId !== gen.generationId).map((g) => g.generationId);
  if (others.length) {  // a pick: this one over the other images of the same request
    const b = el("button", { type: "button", "data-kind": "pick" }, "pick");
    b.onclick = () => sendFeedback(gen, "pick", b, others);
    actions.append(b);
  }
  const note = notes[gen.generationId];
  const edited = gen.method === "METHOD_EDIT";
  return el("div", { class: "card generation" + (edited ? " edited" : ""), "data-generation-id": gen.generationId },
    el("img", { src: imageSrc(gen.image), alt: gen.prompt || "generated image", loading: "lazy" }),
    el("div", {}, el("span", { class: "badge " + source }, source), edited ? el("span", { class: "badge EDIT" }, "EDIT") : "",
      " ", gen.prompt ? `“${gen.prompt}”` : ""),
    el("div", { class: "keywords" }, (gen.keywords || []).length ? "keywords: " + gen.keywords.join(", ") : "no keywords"),
    el("div", {}, (gen.flags || []).map((f) => el("span", { class: "flag" }, f))),
    noteLines(note),
    el("div", {}, new Date(Number(gen.createTimeMs)).toLocaleString()),
    actions, source === "GENERATED" ? editForm(gen) : "");  // edits are offered on rendered images
}

async function loadGenerations(append) {
  const user = $("user").value;
  if (!user) return;
  const q = new URLSearchParams({ pageSize: "24", pageToken: append ? nextPage : "" });
  const page = await api(`/v1/users/${encodeURIComponent(user)}/generations?${q}`);
  const gens = page.generations || [];
  const byRequest = {};
  gens.forEach((g) => (byRequest[g.requestId] = [...(byRequest[g.requestId] || []), g]));
  if (!append) $("generations").replaceChildren();
  gens.forEach((g) => $("generations").append(generationCard(g, byRequest[g.requestId])));
  nextPage = page.nextPageToken || "";
  $("more").hidden = !nextPage;
}

async function loadHistory() {
  const user = $("user").value;
  if (!user) return;
  const data = await api(`/v1/users/${encodeURIComponent(user)}/history?pageSize=50`);
  $("history").replaceChildren(...(data.entries || []).map((e) => {
    const use = el("button", { type: "button", class: "use-reference" }, "use as reference");
    use.onclick = () => addReference(e.item.itemId, e.item.imageUrl);
    return el("div", { class: "card", "data-item-id": e.item.itemId },
      e.item.imageUrl ? el("img", { src: e.item.imageUrl, alt: e.item.caption }) : "",
      el("div", {}, el("b", {}, e.interaction.kind || "view"), " ", e.item.caption || e.item.itemId),
      el("div", { class: "actions" }, use));
  }));
}

// References: chips above the Generate button; the next generate request sends them, then they clear.
function addReference(itemId, url) {
  if (!references.some((r) => r.itemId === itemId)) references.push({ itemId, url });
  showReferences();
}

function showReferences() {
  $("references").replaceChildren(...references.map((ref) => {
    const drop = el("button", { type: "button", title: "remove" }, "×");
    drop.onclick = () => {
      references = references.filter((r) => r.itemId !== ref.itemId);
      showReferences();
    };
    return el("span", { class: "chip", "data-item-id": ref.itemId },
      ref.url ? el("img", { class: "thumb", src: ref.url, alt: "" }) : "", "reference: " + ref.itemId, drop);
  }));
}

async function loadUser() {
  try {
    say("loading ...");
    await Promise.all([loadGenerations(false), loadHistory()]);
    say(`user ${$("user").value}`);
  } catch (err) {
    say(err.message, true);
  }
}

async function loadUsers() {
  try {
    const data = await api("/v1/users");
    const ids = data.userIds || [];
    const current = new URLSearchParams(location.search).get("user") || $("user").value;
    $("user").replaceChildren(...ids.map((id) => el("option", { value: id }, id)));
    if (ids.includes(current)) $("user").value = current;
    if (!ids.length) say("no users yet: log interactions first (LogInteractions)");
    else await loadUser();
  } catch (err) {
    say(err.message, true);
  }
}

// Server-Sent Events over fetch (EventSource cannot POST or send a key): progress, then the result.
async function generate(ev) {
  ev.preventDefault();
  const body = { requestId: "web-" + crypto.randomUUID(), userId: $("user").value, prompt: $("prompt").value };
  // optional fields: left out when empty, so the server's defaults apply
  const images = Number($("num-images").value), steps = Number($("steps").value);
  if (images) body.numImages = images;
  if (steps) body.numInferenceSteps = steps;
  if (references.length) body.references = references.map((r) => ({ itemId: r.itemId }));
  sent = references.slice();
  $("generate").disabled = true;
  $("progress").hidden = false;
  $("progress").value = 0;
  try {
    const resp = await fetch("/v1/generate/stream", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    if (!resp.ok) {
      const data = await resp.json().catch(() => ({}));
      throw new Error(`${resp.status}: ${data.message || resp.statusText}`);
    }
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        onEvent(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
      }
    }
    references = [];
    showReferences();
    await loadGenerations(false);
  } catch (err) {
    say(`generate failed: ${err.message}`, true);
  } finally {
    $("generate").disabled = false;
  }
}

function onEvent(block) {
  const kind = (block.match(/^event: (.*)$/m) || [])[1];
  const data = JSON.parse((block.match(/^data: (.*)$/m) || [])[1] || "{}");
  if (kind === "progress") {
    $("progress").max = data.totalSteps || 1;
    $("progress").value = data.step || 0;
    $("progress-text").textContent = `${data.status} ${data.step || 0}/${data.totalSteps || 0}`;
  } else if (kind === "result") {
    remember(data, { references: sent });
    const refs = (data.conditioning || {}).referenceImages || 0;
    $("progress").value = $("progress").max;
    $("progress-text").textContent = `done: ${(data.images || []).length} images` +
      (refs ? `, ${refs} reference${refs > 1 ? "s" : ""}` : "") +
      ((data.flags || []).length ? ` (${data.flags.join(", ")})` : "");
  } else if (kind === "error") {
    throw new Error(data.message || "generation failed");
  }
}

$("key-form").onsubmit = (ev) => {
  ev.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
  $("api-key").value = "";
  $("api-key").placeholder = key ? "key set for this tab" : "pgm_...";
  loadUsers();
};
$("user").onchange = loadUser;
$("reload").onclick = loadUser;
$("more").onclick = () => loadGenerations(true).catch((err) => say(err.message, true));
$("generate-form").onsubmit = generate;
if (sessionStorage.getItem(KEY_STORE)) $("api-key").placeholder = "key set for this tab";
loadUsers();
