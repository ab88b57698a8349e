// The live log: server-sent events, one message per batch of the global log. On a dropped connection
// the browser reconnects with the last message id (a log position), and the server resumes after it.
"use strict";

(() => {
  const rows = document.getElementById("log-rows");
  const state = document.getElementById("log-state");
  const count = document.getElementById("log-count");
  const pause = document.getElementById("log-pause");
  const form = document.getElementById("log-filters");
  const KEEP = 500;
  let seen = 0;
  let source = null;
  let paused = false;

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function row(e) {
    const tr = document.createElement("tr");
    tr.dataset.position = e.position;
    const position = document.createElement("td");
    position.className = "num";
    const link = document.createElement("a");
    link.href = "/event?position=" + encodeURIComponent(e.position);
    link.textContent = e.position;
    position.append(link);
    const stream = document.createElement("td");
    const streamLink = document.createElement("a");
    streamLink.href = "/stream?id=" + encodeURIComponent(e.stream_id);
    streamLink.textContent = e.stream_id;
    stream.append(streamLink);
    tr.append(position, cell(e.recorded_at.replace("T", " "), "time"), stream, cell(e.version, "num"),
              cell(e.type, "type"), cell(e.data, "data"));
    return tr;
  }

  function connect() {
    const params = new URLSearchParams(new FormData(form));
    source = new EventSource("/api/log?" + params.toString());
    source.addEventListener("open", () => { state.textContent = "following"; state.className = "state live"; });
    source.addEventListener("error", () => { state.textContent = "reconnecting…"; state.className = "state"; });
    source.addEventListener("failure", (message) => {
      state.textContent = "stopped: " + JSON.parse(message.data).error;
      state.className = "state bad";
      source.close();
    });
    source.addEventListener("events", (message) => {
      if (paused) return;
      const batch = JSON.parse(message.data);
      const fragment = document.createDocumentFragment();
      for (let i = batch.length - 1; i >= 0; i--) fragment.append(row(batch[i]));
      rows.prepend(fragment);
      while (rows.childElementCount > KEEP) rows.lastElementChild.remove();
      seen += batch.length;
      count.textContent = seen.toLocaleString("en-US");
    });
  }

  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    state.textContent = paused ? "paused (events arriving now are skipped)" : "following";
  });

  connect();
})();
