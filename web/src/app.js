// The clinic's page: attests the enclave and encrypts to it in this browser; the parent host
// only relays ciphertext. Page contract (tests and tools rely on it): #images,
// #attestation[data-state, data-check], [data-testid=result][data-file, data-code |
// data-error, data-confidence, data-malignant, data-refer, data-refer-reason]. See docs/WEB.md.
import "reflect-metadata"; // before anything loads @peculiar/x509 (tsyringe needs it)
import { fromBase64, hex, sha256 } from "./bytes.js";
import { AWS_NITRO_ROOT_G1_SHA256 } from "./attestation.js";
import { MAX_IMAGE_BYTES, Relay, attest, classifyMany, establish } from "./client.js";
import { CODES, NOTICE, resultsCsv, round6, summaryOf } from "./csv.js";

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
};

// The relay (and config.json) live where the page came from, or, for a copy saved and
// opened from disk (docs/WEB.md, "Trust"), at ?relay=https://host/.
const RELAY_BASE = new URL(new URLSearchParams(location.search).get("relay") || location.href, location.href);

const page = { config: null, trustedRoots: null, connection: null, attestation: null, rows: [], started: null, chain: Promise.resolve() };

async function trustedRoots(config) {
  const roots = new Map([[AWS_NITRO_ROOT_G1_SHA256, "AWS Nitro Enclaves root"]]);
  for (const pem of config.dev_roots) roots.set(hex(await sha256(fromBase64(pem))), "development root (--dev-root)");
  return roots;
}

function showPolicy(config) {
  const policy = config.policy;
  $("policy-source").textContent = config.policy_provenance.policy;
  const table = $("pcrs");
  table.replaceChildren(el("tr", {}, el("th", { textContent: "PCR" }), el("th", { textContent: "pinned by the policy" }), el("th", { textContent: "attested" })));
  const pinned = policy.any_pcrs ? {} : policy.allowed_pcrs[0];
  for (const i of [0, 1, 2]) {
    table.append(el("tr", { id: `pcr${i}` }, el("td", { textContent: `PCR${i}` }),
      el("td", { className: "hex", textContent: pinned[`PCR${i}`] || "NOT CHECKED (--insecure-any-enclave)" }),
      el("td", { className: "hex attested", textContent: "-" })));
  }
  $("dev-root").hidden = config.dev_roots.length === 0;
}

function showAttestation(state, text, check) {
  const box = $("attestation");
  box.dataset.state = state;
  if (check) box.dataset.check = check; else delete box.dataset.check;
  $("attestation-text").textContent = text;
}

/** A verified, open session to the enclave (a new one when the last was closed). */
async function connection() {
  const open = page.connection?.relay;
  // An idle session hears nothing; anything queued (the enclave's idle TIMEOUT) means stale.
  if (open && !open.closed && open.frames.length === 0) return page.connection;
  if (open) open.ws.close();
  showAttestation("checking", "Checking the enclave's attestation...");
  const url = `${RELAY_BASE.protocol === "https:" ? "wss:" : "ws:"}//${RELAY_BASE.host}/ws`;
  const relay = await Relay.open(url);
  try {
    const attested = await attest(relay, { policy: page.config.policy, trustedRoots: page.trustedRoots });
    page.attestation = attested.result;
    const r = attested.result;
    for (const i of [0, 1, 2]) $(`pcr${i}`).querySelector(".attested").textContent = hex(r.pcrs.get(i));
    showAttestation("verified", `Verified: enclave ${r.moduleId}, attested ${new Date(r.timestamp).toISOString()}, `
      + `chain to the ${r.rootIsAws ? "AWS Nitro Enclaves root" : "DEVELOPMENT root (proves nothing about hardware)"}, `
      + `PCRs ${r.matchedPcrSet >= 0 ? "match the policy" : "NOT checked"}, fresh nonce, key sha256 ${hex(await sha256(r.publicKey)).slice(0, 16)}...`);
    document.body.dataset.attestedMs = Math.round(performance.now());
    const cipher = await establish(relay, attested);
    page.connection = { relay, cipher };
    return page.connection;
  } catch (error) {
    relay.ws.close(); // nothing more is sent on this connection
    throw error;
  }
}

function failed(error) {
  const check = error.check || error.name || "Error";
  showAttestation("failed", `Attestation failed: ${check}: ${error.message}. Nothing was sent.`, check);
}

function bars(probabilities) {
  const chart = el("div", { className: "bars" });
  for (const code of CODES) {
    const p = probabilities[code] ?? 0;
    const fill = el("span", { className: "fill" });
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    chart.append(el("div", { className: "bar" },
      el("span", { className: "code", textContent: code }),
      el("span", { className: "track" }, fill),
      el("span", { className: "p", textContent: p.toFixed(3) })));
    chart.lastChild.dataset.class = code;
    chart.lastChild.dataset.p = String(p);
  }
  return chart;
}

function render(card, file, result, error) {
  card.dataset.testid = "result";
  card.dataset.file = file;
  card.replaceChildren(el("h3", { textContent: file }));
  if (error) {
    card.dataset.error = error[0];
    card.classList.add("error");
    card.append(el("p", { className: "message", textContent: `${error[0]}: ${error[1]}` }));
    return;
  }
  card.dataset.code = result.code;
  card.dataset.confidence = String(result.confidence);
  card.dataset.probabilities = JSON.stringify(result.probabilities);
  card.append(el("p", { className: "label" }, el("strong", { textContent: result.name }),
    ` (${result.code}), confidence ${(100 * result.confidence).toFixed(1)} %`));
  // Triage (client.js checked the fields): refer_reason is null exactly when refer is false.
  card.dataset.refer = String(result.refer);
  card.dataset.malignant = String(result.malignant);
  if (result.refer) card.dataset.referReason = result.refer_reason;
  const why = { malignant: "possible malignancy", not_a_lesion: "this may not be a skin lesion" }[result.refer_reason];
  card.append(el("p", { className: result.refer ? "refer yes" : "refer" },
    result.refer ? `Refer to a dermatologist: ${why}` : "No referral flag",
    ` (malignant ${(100 * result.malignant).toFixed(1)} %)`));
  card.append(bars(result.probabilities));
}

async function readItem(file) {
  if (file.size > MAX_IMAGE_BYTES) return { error: ["TOO_LARGE", `file is ${file.size} bytes; at most ${MAX_IMAGE_BYTES}`] };
  try {
    return { bytes: new Uint8Array(await file.arrayBuffer()) };
  } catch (e) {
    return { error: ["UNREADABLE", "cannot read file"] };
  }
}

async function runBatch(files) {
  const cards = files.map((file) => {
    const card = el("article", { className: "result pending", textContent: `${file.name}: waiting` });
    card.dataset.testid = "pending";
    return card;
  });
  $("results").prepend(...cards);
  const progress = $("progress");
  progress.max = files.length;
  progress.value = 0;
  $("progress-text").textContent = `0 / ${files.length}`;
  page.started ??= new Date();
  const first = page.rows.length; // rows keep the order the files were chosen in, as classify's
  page.rows.push(...files.map(() => null));
  const items = await Promise.all(files.map(readItem));
  const answer = (index, result, error) => {
    const file = files[index].name;
    render(cards[index], file, result, error);
    cards[index].classList.remove("pending");
    page.rows[first + index] = result ? {
      file, code: result.code, label: result.name, confidence: round6(result.confidence),
      probabilities: Object.fromEntries(CODES.map((c) => [c, round6(result.probabilities[c] ?? 0)])),
      malignant: round6(result.malignant), refer: result.refer, refer_reason: result.refer_reason,
    } : { file, error: { code: error[0], message: error[1] } };
    progress.value += 1;
    $("progress-text").textContent = `${progress.value} / ${files.length}`;
    document.body.dataset.firstResultMs ??= Math.round(performance.now());
    $("download").disabled = false;
  };
  let session;
  try {
    session = await connection();
  } catch (error) {
    failed(error);
    cards.forEach((card, i) => render(card, files[i].name, null, ["NOT_SENT", `attestation failed (${error.check || error.name}): nothing was sent`]));
    return;
  }
  const done = new Set();
  try {
    await classifyMany(session.relay, session.cipher, items, (i, r, e) => { done.add(i); answer(i, r, e); });
  } catch (error) {
    session.relay.ws.close();
    page.connection = null;
    files.forEach((file, i) => { if (!done.has(i)) answer(i, null, [error.code || error.check || "ERROR", error.message]); });
  }
}

function provenance() {
  const r = page.attestation;
  const iso = (date) => date.toISOString().slice(0, 19) + "+00:00";
  const cfg = page.config;
  return {
    notice: NOTICE, tool: "nitrolesion web page (parent.py web)", tool_version: cfg.version,
    started_utc: iso(page.started), finished_utc: iso(new Date()),
    model_file_local: cfg.model_file_local, model_sha256_local: cfg.model_sha256_local,
    model_note: "SHA-256 of this machine's copy of the shipped model file; the model the enclave ran is part of its image, proven by the attested PCRs",
    ...(r ? {
      enclave_module_id: r.moduleId, enclave_attested_utc: iso(new Date(r.timestamp)),
      enclave_pcr0: hex(r.pcrs.get(0)), enclave_pcr1: hex(r.pcrs.get(1)), enclave_pcr2: hex(r.pcrs.get(2)),
      pcrs_checked: r.matchedPcrSet >= 0, enclave_debug_mode: r.debug,
      attestation_root: r.rootIsAws ? "AWS Nitro Enclaves root" : "development root given with --dev-root (not a real enclave)",
    } : {}),
    ...cfg.policy_provenance,
  };
}

function download() {
  const seconds = (Date.now() - page.started.getTime()) / 1000;
  const done = page.rows.filter((row) => row !== null); // a batch may still be running
  const text = resultsCsv(done, provenance(), summaryOf(done, seconds, page.rows.length));
  const link = el("a", { href: URL.createObjectURL(new Blob([text], { type: "text/csv" })), download: "results.csv" });
  document.body.append(link);
  link.click();
  link.remove();
}

function take(files) {
  const list = Array.from(files);
  if (list.length) page.chain = page.chain.then(() => runBatch(list));
}

async function boot() {
  $("notice").textContent = NOTICE;
  const response = await fetch(new URL("config.json", RELAY_BASE), { cache: "no-store" });
  page.config = await response.json();
  page.trustedRoots = await trustedRoots(page.config);
  showPolicy(page.config);
  $("images").addEventListener("change", (event) => { take(event.target.files); event.target.value = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => { event.preventDefault(); drop.classList.remove("over"); take(event.dataTransfer.files); });
  $("download").addEventListener("click", download);
  try {
    await connection();
  } catch (error) {
    failed(error);
  }
}

boot();
