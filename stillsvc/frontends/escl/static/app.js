// The scan page: the exported scanners, live from the service's events, and a scan
// form for each built from that device's own valid values. Plain JavaScript, no
// build step and nothing fetched from anywhere but this server.
"use strict";

(function () {
  const MODE_LABELS = { color: "Colour", gray: "Greyscale", lineart: "Black and white" };
  const FORMAT_LABELS = { pdf: "PDF", jpeg: "JPEG", png: "PNG" };
  const PRESETS = [
    { value: "a4", label: "A4", width: 210, height: 297 },
    { value: "letter", label: "Letter", width: 215.9, height: 279.4 },
    { value: "a5", label: "A5", width: 148, height: 210 },
  ];
  // A preset up to this much larger than the bed is clipped to the bed, not left out.
  const FIT_MM = 1;
  const PREFERRED_DPI = 300;
  const ACTIVE = new Set(["waiting", "scanning"]);
  const FINAL = new Set(["done", "cancelled", "failed"]);
  const RECONNECT_MS = 5000;
  const KEEP_SEEN = 64;

  const app = {
    token: "",
    cards: new Map(), // device id -> card
    jobs: new Map(), // job id -> card
    seen: new Map(), // job id -> its latest event (one may come before the POST's answer)
    stream: null,
    lostStream: false,
  };

  // -- small helpers ---------------------------------------------------------------------

  function mm(value) {
    return (Math.round(value * 10) / 10).toLocaleString("en", { maximumFractionDigits: 1 });
  }

  function plural(n, word) {
    return `${n} ${word}${n === 1 ? "" : "s"}`;
  }

  function safeId(text) {
    return String(text).replace(/[^A-Za-z0-9_-]/g, "_");
  }

  async function readJson(response) {
    const text = await response.text();
    try {
      const data = JSON.parse(text);
      return data && typeof data === "object" ? data : { error: String(data) };
    } catch (_) {
      return { error: text.trim() || `${response.status} ${response.statusText}` };
    }
  }

  function setConnection(state, text) {
    const node = document.getElementById("connection");
    node.dataset.state = state;
    node.textContent = text;
  }

  async function loadDevices() {
    const response = await fetch("/api/devices", { cache: "no-store", credentials: "same-origin" });
    const data = await readJson(response);
    if (!response.ok) {
      throw new Error(data.error || `${response.status} ${response.statusText}`);
    }
    app.token = data.token || "";
    return data.devices || [];
  }

  // A POST with this page's token; if the service has a new token (it was restarted),
  // the request is sent once more with it.
  async function post(path, body) {
    for (let attempt = 0; ; attempt++) {
      const token = app.token;
      const response = await fetch(path, {
        method: "POST",
        credentials: "same-origin",
        cache: "no-store",
        headers: { "Content-Type": "application/json", "X-Stillsvc-Token": token },
        body: JSON.stringify(body === undefined ? {} : body),
      });
      const data = await readJson(response);
      if (response.status === 403 && attempt === 0) {
        try {
          await loadDevices();
        } catch (_) {
          // answered with the first refusal below
        }
        if (app.token && app.token !== token) {
          continue;
        }
      }
      return { response, data };
    }
  }

  function fillSelect(select, items, preferred) {
    const previous = preferred !== undefined ? String(preferred) : select.value;
    select.replaceChildren(...items.map((item) => new Option(item.label, String(item.value))));
    const values = items.map((item) => String(item.value));
    if (values.includes(previous)) {
      select.value = previous;
    }
    select.disabled = items.length === 0;
  }

  // -- a device's card -------------------------------------------------------------------------

  function createCard(device) {
    const template = document.getElementById("device-template");
    const node = template.content.firstElementChild.cloneNode(true);
    const prefix = `device-${safeId(device.id)}`;
    node.dataset.device = device.id;
    for (const field of node.querySelectorAll("[data-field]")) {
      field.id = `${prefix}-${field.dataset.field}`;
    }
    for (const label of node.querySelectorAll("label[data-for]")) {
      label.htmlFor = `${prefix}-${label.dataset.for}`;
    }
    for (const field of node.querySelectorAll("[data-describe]")) {
      field.setAttribute("aria-describedby", `${prefix}-${field.dataset.describe}`);
    }
    const parts = {};
    for (const part of node.querySelectorAll("[data-part]")) {
      parts[part.dataset.part] = part;
    }
    parts.name.id = `${prefix}-name`;
    node.setAttribute("aria-labelledby", parts.name.id);
    const form = parts.form;
    form.setAttribute("aria-label", `Scan with ${device.name || device.id}`);

    const card = { id: device.id, device, node, parts, form, signature: "", job: null, jobData: null,
                   lastBody: null, downloaded: new Set(), starting: false, previewCount: 0 };

    form.addEventListener("submit", (event) => {
      event.preventDefault();
      startScan(card, false);
    });
    form.elements.source.addEventListener("change", () => updateOptions(card));
    form.elements.area.addEventListener("change", () => updateArea(card));
    parts.cancel.addEventListener("click", () => cancelJob(card));
    parts.wait.addEventListener("click", () => startScan(card, true));
    return card;
  }

  function currentSource(card) {
    const sources = card.device.sources || [];
    return sources.find((s) => s.value === card.form.elements.source.value) || sources[0] || null;
  }

  // The form's choices: only what this device's chosen source accepts.
  function updateOptions(card) {
    const device = card.device;
    const elements = card.form.elements;
    const sources = device.sources || [];
    fillSelect(elements.source, sources.map((s) => ({ value: s.value, label: s.name })));
    const source = currentSource(card);
    if (!source) {
      for (const name of ["mode", "resolution", "format", "area"]) {
        fillSelect(elements[name], []);
      }
      card.parts.formatHint.textContent = "";
      card.parts.areaHint.textContent = "";
      updateArea(card);
      updateScanButton(card);
      return;
    }
    fillSelect(elements.mode, (source.modes || []).map((m) => ({ value: m, label: MODE_LABELS[m] || m })));

    // the one chosen before if this source has it, else the nearest (the first time: 300 dpi)
    const resolutions = source.resolutions || [];
    const wanted = elements.resolution.value ? Number(elements.resolution.value) : PREFERRED_DPI;
    const nearest = resolutions.reduce((best, r) => (Math.abs(r - wanted) < Math.abs(best - wanted) ? r : best),
                                       resolutions[0]);
    fillSelect(elements.resolution, resolutions.map((r) => ({ value: r, label: `${r} dpi` })), nearest);

    // A feeder's pages come as one PDF: an image format is one page, so only the flatbed has it.
    const formats = (device.formats || []).filter((f) => !source.feeder || f === "pdf");
    fillSelect(elements.format, formats.map((f) => ({ value: f, label: FORMAT_LABELS[f] || f.toUpperCase() })));
    card.parts.formatHint.textContent = source.feeder ? "Every page of the feeder goes into one PDF." : "";

    const maxW = source.max_width_mm;
    const maxH = source.max_height_mm;
    const areas = [{ value: "bed", label: `Whole bed (${mm(maxW)} × ${mm(maxH)} mm)` }];
    for (const preset of PRESETS) {
      if (preset.width <= maxW + FIT_MM && preset.height <= maxH + FIT_MM) {
        areas.push({ value: preset.value, label: `${preset.label} (${mm(preset.width)} × ${mm(preset.height)} mm)` });
      }
    }
    areas.push({ value: "custom", label: "Custom size" });
    fillSelect(elements.area, areas);
    card.parts.areaHint.textContent = `Up to ${mm(maxW)} × ${mm(maxH)} mm.`;
    for (const [name, max] of [["width", maxW], ["height", maxH]]) {
      const input = elements[name];
      input.max = String(max);
      if (input.value === "" || Number(input.value) > max) {
        input.value = String(max);
      }
    }
    updateArea(card);
    updateScanButton(card);
  }

  function updateArea(card) {
    const custom = card.form.elements.area.value === "custom";
    card.parts.custom.hidden = !custom;
    // disabled when hidden: a hidden field is not checked, nor sent
    card.form.elements.width.disabled = !custom;
    card.form.elements.height.disabled = !custom;
  }

  function usable(card) {
    const state = card.device.state;
    return !card.gone && state !== "failed" && state !== "disconnected" && currentSource(card) !== null
      && card.form.elements.format.options.length > 0;
  }

  function jobActive(card) {
    return card.starting || (card.jobData !== null && ACTIVE.has(card.jobData.state));
  }

  function updateScanButton(card) {
    card.parts.scan.disabled = jobActive(card) || !usable(card);
  }

  function stateText(device) {
    let text;
    switch (device.state) {
      case "ready":
        text = device.holder ? `in use by ${device.holder}` : "ready";
        break;
      case "busy":
        text = device.holder ? `scanning for ${device.holder}` : "scanning";
        break;
      case "held-by-program":
        text = "held by another program";
        break;
      case "failed":
        text = device.state_reason ? `failed: ${device.state_reason}` : "failed";
        break;
      case "disconnected":
        text = "disconnected";
        break;
      default:
        text = device.state_reason ? `${device.state}: ${device.state_reason}` : String(device.state);
    }
    if (device.waiters > 0) {
      text += ` · ${device.waiters} waiting`;
    }
    return text;
  }

  function updateCard(card, device) {
    card.device = device;
    card.gone = false;
    const parts = card.parts;
    parts.name.textContent = device.name || device.id;
    const model = device.model || "";
    parts.model.textContent = device.vendor && !model.startsWith(device.vendor) ? `${device.vendor} ${model}` : model;
    card.node.dataset.state = device.state;
    parts.state.textContent = stateText(device);
    const signature = JSON.stringify([device.sources, device.formats]);
    if (signature !== card.signature) {
      card.signature = signature;
      updateOptions(card);
    }
    updateScanButton(card);
  }

  function renderDevices(devices) {
    const list = document.getElementById("device-list");
    const placeholder = document.getElementById("placeholder");
    const ids = new Set();
    let previous = null;
    for (const device of devices) {
      ids.add(device.id);
      let card = app.cards.get(device.id);
      if (!card) {
        card = createCard(device);
        app.cards.set(device.id, card);
      }
      updateCard(card, device);
      // in the service's order
      const expected = previous ? previous.nextElementSibling : list.firstElementChild;
      if (card.node !== expected) {
        list.insertBefore(card.node, expected);
      }
      previous = card.node;
    }
    for (const [id, card] of app.cards) {
      if (ids.has(id)) {
        continue;
      }
      if (jobActive(card) || !card.parts.result.hidden) {
        // keep its job and result in view
        card.gone = true;
        card.node.dataset.state = "disconnected";
        card.parts.state.textContent = "no longer available";
        updateScanButton(card);
      } else {
        card.node.remove();
        app.cards.delete(id);
      }
    }
    placeholder.hidden = app.cards.size > 0;
    placeholder.textContent = "No scanner is shared here right now.";
    list.setAttribute("aria-busy", "false");
  }

  // -- messages ---------------------------------------------------------------------------

  function showMessage(card, text) {
    card.parts.message.textContent = text;
    card.parts.message.hidden = !text;
  }

  function announce(card, text) {
    if (card.parts.status.textContent !== text) {
      card.parts.status.textContent = text;
    }
  }

  // -- scanning ---------------------------------------------------------------------------

  function scanRequest(card) {
    const elements = card.form.elements;
    const source = currentSource(card);
    const body = {
      device: card.id,
      source: source.value,
      mode: elements.mode.value,
      resolution: Number(elements.resolution.value),
      format: elements.format.value,
      wait: false,
    };
    const area = elements.area.value;
    let width = null;
    let height = null;
    if (area === "custom") {
      width = Number(elements.width.value);
      height = Number(elements.height.value);
    } else {
      const preset = PRESETS.find((p) => p.value === area);
      if (preset) {
        width = preset.width;
        height = preset.height;
      }
    }
    if (width !== null) {
      body.area = { x: 0, y: 0, width: Math.min(width, source.max_width_mm),
                    height: Math.min(height, source.max_height_mm) };
    }
    return body;
  }

  function resetJobView(card) {
    const parts = card.parts;
    card.job = null;
    card.jobData = null;
    card.previewCount = 0;
    parts.previews.replaceChildren();
    parts.result.hidden = true;
    parts.progressBox.hidden = true;
    parts.progress.value = 0;
    parts.progressText.textContent = "";
    showMessage(card, "");
    parts.wait.hidden = true;
  }

  function moveFocus(from, to) {
    if (document.activeElement === from && !to.hidden && !to.disabled) {
      to.focus();
    }
  }

  async function startScan(card, wait) {
    if (jobActive(card) || !usable(card)) {
      return;
    }
    let body;
    if (wait && card.lastBody) {
      body = { ...card.lastBody, wait: true };
    } else {
      if (!card.form.reportValidity()) {
        return;
      }
      body = scanRequest(card);
    }
    const focused = document.activeElement;
    resetJobView(card);
    card.lastBody = { ...body, wait: false };
    card.starting = true;
    updateScanButton(card);
    announce(card, wait ? "Asking to wait in line…" : "Starting the scan…");
    let result;
    try {
      result = await post("/api/scan", body);
    } catch (error) {
      result = { response: null, data: { error: `The service could not be reached (${error.message}).` } };
    }
    card.starting = false;
    const { response, data } = result;
    if (response && response.status === 201) {
      const id = String(data.job !== undefined ? data.job : data.id);
      card.job = id;
      app.jobs.set(id, card);
      applyJob(card, app.seen.get(id) || { ...data, id });
      moveFocus(focused, card.parts.cancel);
      return;
    }
    updateScanButton(card);
    const status = response ? response.status : 0;
    showMessage(card, data.error || `The service answered ${status}.`);
    announce(card, status === 503 ? "The scanner is busy." : "The scan did not start.");
    if (status === 503) {
      card.parts.wait.hidden = false;
      moveFocus(focused, card.parts.wait);
    }
  }

  function applyJob(card, job) {
    if (card.job !== job.id) {
      return;
    }
    const previous = card.jobData;
    if (previous && FINAL.has(previous.state) && !FINAL.has(job.state)) {
      return; // an older answer after the end
    }
    card.jobData = job;
    const parts = card.parts;
    const active = ACTIVE.has(job.state);
    const focused = document.activeElement;
    parts.cancel.hidden = !active;
    if (!active) {
      parts.cancel.disabled = false;
    }
    updateScanButton(card);
    if (!active) {
      moveFocus(focused, parts.scan);
    }

    parts.progressBox.hidden = false;
    const pages = job.pages || 0;
    const percent = Math.max(0, Math.min(100, job.percent || 0));
    const done = pages ? ` · ${plural(pages, "page")} done` : "";
    let status;
    switch (job.state) {
      case "waiting":
        parts.progress.removeAttribute("value"); // still: the scanner is not ours yet
        parts.progressText.textContent = "Waiting in line for the scanner…";
        status = "Waiting in line: the scan starts when the scanner is free.";
        break;
      case "scanning":
        parts.progress.value = percent;
        parts.progressText.textContent = `Page ${job.page || pages + 1} · ${percent} %${done}`;
        status = pages ? `Scanning: ${plural(pages, "page")} done.` : "Scanning…";
        break;
      case "done":
        parts.progress.value = 100;
        parts.progressText.textContent = `${plural(pages, "page")} · 100 %`;
        status = `Done: ${plural(pages, "page")} in ${job.filename}.`;
        break;
      case "cancelled":
        parts.progressText.textContent = `Cancelled${done}`;
        status = "The scan was cancelled.";
        break;
      default:
        parts.progressText.textContent = `Failed${done}`;
        status = job.error ? `The scan failed: ${job.error}` : "The scan failed.";
    }
    announce(card, status);
    if (job.state === "failed") {
      showMessage(card, job.error || "The scan failed.");
    }
    if (job.state === "cancelled" && job.error && job.error !== "cancelled" && !/cancelled from the page/.test(job.error)) {
      showMessage(card, job.error);
    }

    // a preview of each page as it arrives
    while (card.previewCount < pages) {
      card.previewCount += 1;
      const item = document.createElement("li");
      const image = document.createElement("img");
      image.alt = `Preview of page ${card.previewCount}`;
      image.decoding = "async";
      image.src = `/api/jobs/${encodeURIComponent(job.id)}/pages/${card.previewCount}`;
      item.appendChild(image);
      parts.previews.appendChild(item);
    }

    if (job.state === "done") {
      const link = parts.link;
      link.href = job.result || `/api/jobs/${encodeURIComponent(job.id)}/result`;
      link.download = job.filename || "";
      link.textContent = `Download ${job.filename || "the scan"}`;
      parts.result.hidden = false;
      if (!card.downloaded.has(job.id)) {
        card.downloaded.add(job.id);
        link.click();
      }
    }
  }

  function remember(job) {
    app.seen.delete(job.id);
    app.seen.set(job.id, job);
    while (app.seen.size > KEEP_SEEN) {
      app.seen.delete(app.seen.keys().next().value);
    }
  }

  async function cancelJob(card) {
    const id = card.job;
    if (!id || !jobActive(card)) {
      return;
    }
    card.parts.cancel.disabled = true;
    announce(card, "Cancelling…");
    let result;
    try {
      result = await post(`/api/jobs/${encodeURIComponent(id)}/cancel`);
    } catch (error) {
      result = { response: null, data: { error: `The service could not be reached (${error.message}).` } };
    }
    const { response, data } = result;
    if (response && response.ok) {
      remember(data.id ? data : { ...data, id });
      applyJob(card, app.seen.get(id));
      return;
    }
    card.parts.cancel.disabled = false;
    showMessage(card, data.error || "The scan could not be cancelled.");
  }

  // After the event stream was lost, a job's end may have been missed: ask once for each.
  async function resyncJobs() {
    for (const card of app.cards.values()) {
      if (!card.job || !jobActive(card)) {
        continue;
      }
      try {
        const response = await fetch(`/api/jobs/${encodeURIComponent(card.job)}`, { cache: "no-store" });
        const data = await readJson(response);
        if (response.ok) {
          remember(data);
          applyJob(card, data);
        }
      } catch (_) {
        // the stream's next events will tell
      }
    }
  }

  // -- live events --------------------------------------------------------------------------

  function connect() {
    const stream = new EventSource("/api/events");
    app.stream = stream;
    stream.addEventListener("open", () => {
      setConnection("live", "Live");
      if (app.lostStream) {
        app.lostStream = false;
        resyncJobs();
      }
    });
    stream.addEventListener("error", () => {
      app.lostStream = true;
      if (stream.readyState === EventSource.CLOSED) {
        setConnection("lost", "Connection lost: trying again shortly…");
        setTimeout(() => {
          if (app.stream === stream) {
            connect();
          }
        }, RECONNECT_MS);
      } else {
        setConnection("lost", "Connection lost: reconnecting…");
      }
    });
    stream.addEventListener("devices", (event) => {
      const data = JSON.parse(event.data);
      renderDevices(data.devices || []);
    });
    stream.addEventListener("job", (event) => {
      const job = JSON.parse(event.data);
      remember(job);
      const card = app.jobs.get(job.id);
      if (card) {
        applyJob(card, job);
      }
    });
  }

  // The page's icon, made here: the service serves no icon file, and the policy of the
  // page allows images from this server and blob: only.
  function setIcon() {
    const svg = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
      + '<rect x="2" y="12" width="28" height="14" rx="3" fill="#0b57d0"/>'
      + '<rect x="6" y="6" width="20" height="8" rx="1" fill="#8ab4f8"/>'
      + '<rect x="6" y="19" width="20" height="2" fill="#ffffff"/></svg>';
    const link = document.createElement("link");
    link.rel = "icon";
    link.type = "image/svg+xml";
    link.href = URL.createObjectURL(new Blob([svg], { type: "image/svg+xml" }));
    document.head.appendChild(link);
  }

  async function start() {
    setIcon();
    try {
      renderDevices(await loadDevices());
    } catch (error) {
      setConnection("lost", `The scanners could not be listed: ${error.message}`);
      document.getElementById("placeholder").textContent = "The scanners could not be listed. Waiting for the service…";
    }
    connect();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
