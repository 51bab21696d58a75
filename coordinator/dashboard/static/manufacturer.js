"use strict";
(() => {
  const { API, getJSON, el, short, fmt, ethAmount, lineChart, POLL_MS } = window.crowdfl;
  let taskId = new URLSearchParams(location.search).get("task");
  let selectedRound = null;
  let latestModel = null;

  async function refresh() {
    try {
      if (!taskId) {
        const tasks = await getJSON(API.tasks());
        if (!tasks.length) return;
        taskId = tasks[tasks.length - 1].task_id;
      }
      document.getElementById("task-label").textContent = `task ${short(taskId, 16)}`;
      const rounds = await getJSON(API.rounds(taskId));
      const done = rounds.filter((r) => r.accuracy !== null);
      lineChart(document.getElementById("accuracy-chart"), [{ name: "accuracy", points: done.map((r) => ({ x: r.round, y: r.accuracy })) }], { yLabel: "accuracy" });
      const body = document.querySelector("#rounds-table tbody");
      body.replaceChildren(...rounds.map((r) => el("tr", { "data-round": r.round, onclick: () => { selectedRound = r.round; refreshUpdates(); } },
        el("td", {}, String(r.round)), el("td", {}, r.status), el("td", { class: "num" }, fmt(r.accuracy)),
        el("td", { class: "num" }, String(r.selected)), el("td", { class: "num" }, String(r.accepted)), el("td", { class: "num" }, String(r.rejected)),
        el("td", { class: "hash" }, short(r.model_hash)), el("td", { class: "num" }, r.block_number ?? "—"),
        el("td", { class: "hash" }, short(r.tx_hash, 18)), el("td", { class: "num" }, r.gas_used ?? "—"))));
      if (done.length) {
        latestModel = done[done.length - 1].model_hash;
        const input = document.getElementById("verify-hash");
        if (!input.value) input.value = latestModel;
        if (selectedRound === null) selectedRound = done[done.length - 1].round;
      }
      await Promise.all([refreshUpdates(), refreshReputation()]);
      document.getElementById("live").textContent = `live · ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      document.getElementById("live").textContent = `offline: ${err.message}`;
    }
  }

  async function refreshUpdates() {
    if (!taskId || selectedRound === null) return;
    document.getElementById("updates-round").textContent = String(selectedRound);
    const ups = await getJSON(API.updates(taskId, selectedRound));
    document.querySelector("#updates-table tbody").replaceChildren(...ups.map((u) => el("tr", {},
      el("td", { class: "hash" }, short(u.customer)), el("td", { class: "hash" }, short(u.edge)), el("td", { class: "num" }, String(u.num_samples)),
      el("td", { class: u.status === "rejected" ? "bad" : "ok" }, u.status), el("td", {}, u.reason || ""))));
  }

  async function refreshReputation() {
    const rep = await getJSON(API.reputation(taskId));
    const series = Object.entries(rep.history || {}).map(([id, pts]) => ({ name: short(id, 8), points: pts.map((p) => ({ x: p.round, y: p.reputation })) }));
    lineChart(document.getElementById("reputation-chart"), series, { yLabel: "reputation" });
    const rewards = await getJSON(API.rewards(taskId));
    document.querySelector("#rewards-table tbody").replaceChildren(...(rewards.customers || []).map((c) => el("tr", {},
      el("td", { class: "hash" }, short(c.customer)), el("td", { class: "num" }, fmt(c.reputation)), el("td", { class: "num" }, ethAmount(c.reward_wei)))));
  }

  document.getElementById("verify-button").addEventListener("click", async () => {
    const hash = document.getElementById("verify-hash").value.trim() || latestModel;
    const out = document.getElementById("verify-result");
    const btn = document.getElementById("verify-button");
    btn.disabled = true;
    out.className = "muted";
    out.textContent = "verifying…";
    try {
      // the audit is a queued job: POST queues it, its result_url answers once it is done
      let rep = await getJSON(API.verify(hash), { method: "POST" });
      while (rep.status !== "done") {
        await new Promise((resolve) => setTimeout(resolve, 500));
        rep = await getJSON(rep.result_url || `/api/v1/audits/${rep.job_id}`);
      }
      out.className = rep.ok ? "ok" : "bad";
      out.textContent = rep.ok ? "verified: the model is the aggregate of the anchored, signed updates" : "FAILED: the provenance does not check out";
      document.getElementById("verify-report").textContent = rep.lines.join("\n");
    } catch (err) {
      out.className = "bad";
      out.textContent = `FAILED: ${err.message}`;
    } finally {
      btn.disabled = false;
    }
  });

  refresh();
  setInterval(refresh, POLL_MS);
})();
