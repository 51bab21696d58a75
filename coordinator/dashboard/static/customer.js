"use strict";
(() => {
  const { API, getJSON, el, short, fmt, ethAmount, lineChart, verifyMerkleProof } = window.crowdfl;

  async function checkProof(c, cell) {
    cell.textContent = "checking…";
    try {
      const p = await getJSON(API.proof(c.task_id, c.round, c.customer));
      const ok = await verifyMerkleProof(p.update_hash, p.proof, p.merkle_root);
      cell.className = ok ? "ok proof-result" : "bad proof-result";
      cell.textContent = ok ? `yes: proof checked here against root ${short(p.merkle_root)}` : "NO: the proof does not lead to the anchored root";
    } catch (err) {
      cell.className = "bad proof-result";
      cell.textContent = `cannot check: ${err.message}`;
    }
  }

  async function load() {
    const key = document.getElementById("device-key").value.trim().toLowerCase();
    const summary = document.getElementById("summary");
    if (!/^[0-9a-f]{64}$/.test(key)) { summary.className = "bad"; summary.textContent = "a device key is 64 hexadecimal characters"; return; }
    history.replaceState(null, "", `?device=${key}`);
    try {
      const c = await getJSON(API.customer(key));
      summary.className = "";
      summary.replaceChildren(`reputation ${fmt(c.reputation)} · ${c.contributions.length} contributions · rewards `, ethAmount(c.rewards_wei));
      lineChart(document.getElementById("customer-reputation-chart"), [{ name: "you", points: c.reputation_history.map((p) => ({ x: p.round, y: p.reputation })) }], { yLabel: "reputation" });
      document.querySelector("#budget-table tbody").replaceChildren(...c.budget.map((b) => el("tr", {},
        el("td", { class: "hash" }, short(b.task_id)), el("td", {}, `${b.samples} samples used at epsilon ${fmt(b.epsilon, 2)} each`))));
      const rows = c.contributions.map((u) => {
        const cell = el("td", { class: "proof-result muted" }, "");
        const btn = el("button", { class: "proof-button", onclick: () => checkProof(u, cell) }, "check proof");
        cell.append(btn);
        return el("tr", {}, el("td", { class: "hash" }, short(u.task_id)), el("td", {}, String(u.round)), el("td", { class: "num" }, String(u.num_samples)),
          el("td", { class: u.status === "rejected" ? "bad" : "ok" }, u.status), el("td", {}, u.reason || ""), el("td", { class: "num" }, ethAmount(u.reward_wei ?? 0)), cell);
      });
      document.querySelector("#contributions-table tbody").replaceChildren(...rows);
      document.getElementById("live").textContent = new Date().toLocaleTimeString();
    } catch (err) {
      summary.className = "bad";
      summary.textContent = err.message;
    }
  }

  document.getElementById("load-button").addEventListener("click", load);
  const q = new URLSearchParams(location.search).get("device");
  if (q) { document.getElementById("device-key").value = q; load(); }
})();
