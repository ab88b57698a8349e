// Projections: the lag charts (uPlot), the table refreshed from the console's samples, and the
// progress of rebuilds started here.
"use strict";

(() => {
  const section = document.getElementById("lag-charts");
  const interval = Math.max(Number(section.dataset.interval) || 2, 0.5) * 1000;
  const problem = document.getElementById("projections-error");
  const COLOURS = ["#2563eb", "#db2777", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#dc2626", "#4b5563"];
  const charts = {};

  function chart(id, series, data) {
    const box = document.getElementById(id);
    const names = Object.keys(series);
    const key = names.join("\u0000");
    const values = [data.times, ...names.map((n) => series[n])];
    const existing = charts[id];
    if (existing && existing.key === key) {
      existing.plot.setData(values);
      return;
    }
    if (existing) existing.plot.destroy();
    const options = {
      width: Math.max(box.clientWidth, 300),
      height: 180,
      legend: { live: false },
      cursor: { drag: { x: false, y: false } },
      scales: { y: { range: (u, min, max) => [0, Math.max(max || 0, 1) * 1.1] } },
      axes: [{}, { size: 60 }],
      series: [{}, ...names.map((name, i) => ({ label: name, stroke: COLOURS[i % COLOURS.length], width: 2,
                                                 spanGaps: true }))],
    };
    charts[id] = { key, plot: new uPlot(options, values, box) };
  }

  async function drawCharts() {
    const data = await admin.getJSON("/api/projections/lag");
    chart("chart-events", data.events, data);
    chart("chart-seconds", data.seconds, data);
  }

  function set(tr, field, text) {
    const el = tr.querySelector(`[data-field="${field}"]`);
    if (el) el.textContent = text;
  }

  function updateRow(p) {
    const tr = document.querySelector(`tr[data-projection="${CSS.escape(p.name)}"]`);
    if (!tr) return false;
    // Failing or recovering changes what the row shows besides its numbers (the failing event's link).
    const changed = (tr.dataset.state === "failed") !== (p.state === "failed");
    tr.dataset.state = p.state;
    set(tr, "state", p.state);
    set(tr, "generation", p.generation === null ? "-" : String(p.generation));
    set(tr, "checkpoint", p.checkpoint || "-");
    set(tr, "lag_events", admin.number(p.lag_events));
    set(tr, "lag_seconds", admin.age(p.lag_seconds));
    set(tr, "runner", p.runner || "-");
    set(tr, "last_error", p.last_error || "");
    const resume = tr.querySelector('button[data-kind="resume"]');
    if (resume) resume.hidden = p.state !== "failed";
    return changed;
  }

  async function refreshTable(fresh) {
    const data = await admin.getJSON("/api/projections" + (fresh ? "?fresh=1" : ""));
    problem.hidden = !data.error;
    problem.textContent = data.error || "";
    let reload = document.querySelectorAll("tr[data-projection]").length !== data.projections.length;
    for (const p of data.projections) reload = updateRow(p) || reload;
    if (reload && !admin.busy() && !document.querySelector("tr[data-rebuilding]")) location.reload();
  }

  async function refresh() {
    try {
      await Promise.all([drawCharts(), refreshTable(false)]);
    } catch (error) {
      problem.hidden = false;
      problem.textContent = error.message;
    }
  }

  function describe(p) {
    if (p.phase === "failed") return "rebuild failed: " + p.error;
    if (p.phase === "done") return `rebuilt from ${admin.number(p.done)} events in ${p.elapsed.toFixed(1)} s`;
    if (p.phase === "starting") return "starting…";
    const eta = p.eta === null ? "" : ` · ETA ${admin.age(p.eta)}`;
    return `${p.phase} ${admin.number(p.done)} / ${admin.number(p.total)} events · ${admin.number(Math.round(p.rate))} events/s${eta}`;
  }

  async function follow(name) {
    const tr = document.querySelector(`tr[data-projection="${CSS.escape(name)}"]`);
    if (!tr) return;
    tr.dataset.rebuilding = "";
    const box = tr.querySelector(".progress");
    const bar = box.querySelector("progress");
    const text = box.querySelector(".progress-text");
    box.hidden = false;
    box.className = "progress";
    for (;;) {
      let p;
      try {
        p = await admin.getJSON(`/api/projections/${encodeURIComponent(name)}/rebuild`);
      } catch (error) {
        text.textContent = error.message;
        break;
      }
      bar.max = Math.max(p.total, p.done, 1);
      bar.value = p.done;
      text.textContent = describe(p);
      if (p.finished) {
        box.className = "progress " + (p.phase === "done" ? "finished" : "failed");
        box.dataset.phase = p.phase;
        break;
      }
      await new Promise((resolve) => setTimeout(resolve, 300));
    }
    delete tr.dataset.rebuilding;
    await refreshTable(true).catch(() => {});
  }

  document.addEventListener("admin:done", (event) => {
    const { button, result } = event.detail;
    if (button.dataset.kind === "rebuild") {
      follow(result.progress.name);
    } else {
      refreshTable(true).catch((error) => admin.flash(error.message, "error"));
    }
  });

  for (const tr of document.querySelectorAll("tr[data-rebuilding]")) follow(tr.dataset.projection);
  window.addEventListener("resize", () => {
    for (const id of Object.keys(charts)) {
      const box = document.getElementById(id);
      charts[id].plot.setSize({ width: Math.max(box.clientWidth, 300), height: 180 });
    }
  });
  refresh();
  setInterval(refresh, interval);
})();
