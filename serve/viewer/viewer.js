// kdray's viewer: posts one file to /predict?explain=true and shows the answer. No build step, no CDN.
// The token is read from its field for each request and never stored (no cookie, no storage API).
"use strict";

// Each reason code in plain words: kdray.reason_words, written into the page by the server.
const REASONS = JSON.parse(document.getElementById("reason-words").textContent);
const MAX_RETRIES = 3;
const $ = (id) => document.getElementById(id);
let lastFile = null;
let objectUrl = null;
let card = null;  // the model card's essentials, once GET /model answered

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

function say(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", Boolean(isError));
}

function sentence(words) {
  return words.charAt(0).toUpperCase() + words.slice(1) + ".";
}

function plainWords(reason, detail) {
  const words = sentence(REASONS[reason] || "the server refused the file");
  return reason ? `${words} (${reason}${detail ? ": " + detail : ""})` : words;
}

async function loadCard() {
  const response = await fetch("model", { headers: authHeaders() });
  if (!response.ok) {
    if (response.status === 401) say(sentence(REASONS.auth_required + ": enter it above"), true);
    return;
  }
  card = await response.json();
  $("card-name").textContent = card.name;
  $("card-version").textContent = card.version;
  $("card-id").textContent = card.model_id;
  $("card-use").textContent = card.intended_use;
  $("card-biases").textContent = card.known_biases;
  $("intended-use").textContent = `Intended use: ${card.intended_use}.`;
}

function thresholdText() {
  if (!card || card.covid_threshold === null) return "This model has no COVID-19 threshold: covid_suspect is not given.";
  const p = card.covid_threshold.toFixed(3);
  const fitted = card.target_sensitivity === null ? "" :
    ` It was fitted to find ${Math.round(card.target_sensitivity * 100)}% of COVID-19 cases` +
    (card.threshold_fitted_on ? ` on the ${card.threshold_fitted_on}` : "") + ", so some suspects will be false alarms.";
  return `covid_suspect means P(covid) ≥ ${p}, the model's operating point.${fitted}`;
}

function showResult(file, answer) {
  $("label").textContent = answer.label;
  const suspect = $("suspect");
  suspect.className = "suspect";
  if (answer.covid_suspect === null) {
    suspect.textContent = "";
  } else {
    suspect.textContent = answer.covid_suspect ? "covid_suspect: yes" : "covid_suspect: no";
    suspect.classList.add(answer.covid_suspect ? "yes" : "no");
  }
  $("threshold").textContent = thresholdText();
  const rows = $("probabilities").tBodies[0];
  rows.replaceChildren();
  for (const [name, p] of Object.entries(answer.probabilities)) {
    const row = rows.insertRow();
    row.dataset.class = name;
    row.insertCell().textContent = name;
    const value = row.insertCell();
    value.textContent = (100 * p).toFixed(1) + "%";
    value.className = "probability";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.round(200 * p) + "px";
    bar.setAttribute("role", "img");
    bar.setAttribute("aria-label", `${name}: ${(100 * p).toFixed(1)} percent`);
    row.insertCell().append(bar);
  }
  const explanation = answer.explanation;
  const image = $("image");
  if (objectUrl) URL.revokeObjectURL(objectUrl);
  objectUrl = null;
  if (/^image\/(png|jpeg)$/.test(file.type)) {
    objectUrl = URL.createObjectURL(file);
    image.src = objectUrl;
    $("image-caption").textContent = "The X-ray as uploaded";
  } else if (explanation && explanation.image_png) {
    image.src = "data:image/png;base64," + explanation.image_png;
    $("image-caption").textContent = "The X-ray as the model saw it (a browser cannot draw DICOM itself)";
  }
  image.alt = `The uploaded chest X-ray, ${file.name}`;
  const overlay = $("overlay");
  if (explanation) {
    overlay.src = "data:image/png;base64," + explanation.overlay_png;
    overlay.alt = `Grad-CAM heat map over the X-ray: where the model found evidence for ${explanation.explained_class}`;
    $("agreement").textContent = explanation.agrees ? "" :
      `The heat map comes from the model's torch weights, whose own top class here is ${explanation.torch_class}; it still explains ${explanation.explained_class}.`;
  }
  overlay.hidden = !explanation;
  $("result").hidden = false;
  say(`Done: ${answer.label}.`);
}

async function predict(file, attempt = 0) {
  lastFile = file;
  $("retry").hidden = true;
  say(`Sending ${file.name}…`);
  let response;
  try {
    response = await fetch("predict?explain=true", {
      method: "POST", body: file,
      headers: { "Content-Type": file.type || "application/octet-stream", ...authHeaders() },
    });
  } catch (error) {
    say("The server cannot be reached.", true);
    $("retry").hidden = false;
    return;
  }
  if (response.ok) {
    if (!card) await loadCard();
    showResult(file, await response.json());
    return;
  }
  let refusal = {};
  try { refusal = await response.json(); } catch (error) { /* not JSON: the status says enough */ }
  if (response.status === 503) {
    const wait = Math.min(30, Number(response.headers.get("Retry-After")) || 1);
    if (attempt < MAX_RETRIES) {
      say(`${plainWords(refusal.reason || "overloaded")} Trying again in ${wait} s…`, true);
      setTimeout(() => predict(file, attempt + 1), wait * 1000);
      return;
    }
    say(`${plainWords(refusal.reason || "overloaded")} (503; tried ${MAX_RETRIES + 1} times.)`, true);
    $("retry").hidden = false;
    return;
  }
  say(`${plainWords(refusal.reason, refusal.detail)} [HTTP ${response.status}]`, true);
  if (response.status === 401) $("token").focus();
}

function pick(files) {
  if (files && files.length) predict(files[0]);
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => {
    pick(event.target.files);
    event.target.value = "";  // so that picking the same file again (with a token now) sends it again
  });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("dragging"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    pick(event.dataTransfer.files);
  });
  $("retry").addEventListener("click", () => lastFile && predict(lastFile));
  $("token").addEventListener("change", loadCard);
  loadCard();
});
