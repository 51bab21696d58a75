"use strict";
(() => {
  const { API, getJSON, el, short, fmt, ethAmount, lineChart, verifyMerkleProof, sha256, hexToBytes } = window.crowdfl;
  // CrowdTasks view selectors (tests/coordinator/test_dashboard_chain.py checks them against the artifacts)
  const SEL = { roundAnchor: "0xa012d60a", settlement: "0x6ebfcf12", isClaimed: "0x214ed264" };
  let chain = { rpc_url: "", addresses: {} };

  const word = (n) => BigInt(n).toString(16).padStart(64, "0");
  const rpcUrl = () => document.getElementById("rpc-url").value.trim();

  async function ethCall(data) {
    const url = rpcUrl();
    if (!url) throw new Error("set a JSON-RPC URL to check against the chain");
    const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ jsonrpc: "2.0", id: 1, method: "eth_call", params: [{ to: chain.addresses.CrowdTasks, data }, "latest"] }) });
    const j = await r.json();
    if (j.error) throw new Error(`chain: ${j.error.message}`);
    const hex = j.result.slice(2);
    return Array.from({ length: hex.length / 64 }, (_, i) => hex.slice(64 * i, 64 * i + 64));
  }

  async function checkProof(c, cell) {
    cell.textContent = "checking…";
    try {
      const p = await getJSON(API.proof(c.task_id, c.round, c.customer));
      // the root comes from the chain through the customer's own RPC URL, never from the coordinator
      const anchor = await ethCall(SEL.roundAnchor + c.task_id + word(c.round));
      if (BigInt("0x" + anchor[5]) === 0n) throw new Error("the round is not anchored on chain");
      const ok = await verifyMerkleProof(p.update_hash, p.proof, anchor[0]);
      cell.className = ok ? "ok proof-result" : "bad proof-result";
      cell.textContent = ok ? `yes: checked against root ${short(anchor[0])} read from ${rpcUrl()}` : "NO: the proof does not lead to the root on chain";
    } catch (err) {
      cell.className = "bad proof-result";
      cell.textContent = `cannot check: ${err.message}`;
    }
  }

  async function checkClaim(c, cell) {
    cell.textContent = "checking…";
    cell.className = "claim-result";
    try {
      const leaf = await getJSON(`/api/v1/tasks/${c.task_id}/rounds/${c.round}/claims/${c.customer}`);
      const st = await ethCall(SEL.settlement + c.task_id + word(c.round));
      if (BigInt("0x" + st[0]) === 0n) throw new Error("the round is not settled on chain");
      const packed = hexToBytes(c.task_id + word(c.round).slice(56) + c.customer + word(leaf.reputation_milli).slice(56) + word(leaf.amount_wei));
      const leafHash = Array.from(await sha256(packed), (b) => b.toString(16).padStart(2, "0")).join("");
      const ok = await verifyMerkleProof(leafHash, leaf.proof, st[0]);
      const claimed = BigInt("0x" + (await ethCall(SEL.isClaimed + c.task_id + word(c.round) + c.customer))[0]) === 1n;
      cell.className = ok ? "ok claim-result" : "bad claim-result";
      cell.textContent = ok ? `${leaf.amount_wei} wei ${claimed ? "claimed" : "claimable"} (settled root ${short(st[0])})`
        : `NO: ${leaf.amount_wei} wei is not what the chain settled`;
    } catch (err) {
      cell.className = "bad claim-result";
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
      summary.replaceChildren(`reputation ${fmt(c.reputation)} · ${c.contributions.length} contributions · rewards `, ethAmount(c.rewards_wei), " (as the coordinator says; check each on chain below)");
      lineChart(document.getElementById("customer-reputation-chart"), [{ name: "you", points: c.reputation_history.map((p) => ({ x: p.round, y: p.reputation })) }], { yLabel: "reputation" });
      document.getElementById("budget-summary").textContent = c.budget.length
        ? `Over these tasks, any one hour of your household's usage carries at most epsilon ${fmt(c.budget_per_hour_bound, 2)}, any one day at most ${fmt(c.budget_per_day_bound, 2)}.`
        : "No samples released yet.";
      document.querySelector("#budget-table tbody").replaceChildren(...c.budget.map((b) => el("tr", {},
        el("td", { class: "hash" }, short(b.task_id)), el("td", { class: "num" }, String(b.samples)),
        el("td", { class: "num" }, fmt(b.epsilon, 2) + (b.label_epsilon > 0 ? ` + ${fmt(b.label_epsilon, 2)} (labels)` : " (labels in clear)")),
        el("td", {}, `${b.window_hours} h, every ${b.window_stride_hours} h`),
        el("td", { class: "num budget-hour" }, fmt(b.per_hour_epsilon, 2)), el("td", { class: "num budget-day" }, fmt(b.per_day_epsilon, 2)))));
      const rows = c.contributions.map((u) => {
        const cell = el("td", { class: "proof-result muted" }, "");
        cell.append(el("button", { class: "proof-button", onclick: () => checkProof(u, cell) }, "check on chain"));
        const claimCell = el("td", { class: "claim-result muted" }, "");
        claimCell.append(el("button", { class: "claim-button", onclick: () => checkClaim(u, claimCell) }, "check reward"));
        return el("tr", {}, el("td", { class: "hash" }, short(u.task_id)), el("td", {}, String(u.round)), el("td", { class: "num" }, String(u.num_samples)),
          el("td", { class: u.status === "rejected" ? "bad" : "ok" }, u.status), el("td", {}, u.reason || ""), el("td", { class: "num" }, ethAmount(u.reward_wei ?? 0)), cell, claimCell);
      });
      document.querySelector("#contributions-table tbody").replaceChildren(...rows);
      document.getElementById("live").textContent = new Date().toLocaleTimeString();
    } catch (err) {
      summary.className = "bad";
      summary.textContent = err.message;
    }
  }

  async function init() {
    try { chain = await getJSON("/api/v1/chain"); } catch (err) { /* the page still works; chain checks say why they cannot run */ }
    const saved = localStorage.getItem("crowdfl-rpc-url");
    document.getElementById("rpc-url").value = saved || chain.rpc_url || "";
    document.getElementById("rpc-source").textContent = saved ? "(yours)" : chain.rpc_url ? "(default: the one the manufacturer's coordinator names)" : "";
    document.getElementById("rpc-url").addEventListener("change", () => {
      localStorage.setItem("crowdfl-rpc-url", rpcUrl());
      document.getElementById("rpc-source").textContent = "(yours)";
    });
    document.getElementById("load-button").addEventListener("click", load);
    const q = new URLSearchParams(location.search).get("device");
    if (q) { document.getElementById("device-key").value = q; load(); }
  }
  init();
})();
