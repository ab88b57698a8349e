// Shared by every page: confirmation, state-changing requests with the CSRF token, messages.
// Nothing here (or in any script of the console) writes HTML: text goes in with textContent.
"use strict";

const admin = (() => {
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const flashBox = document.getElementById("flash");
  const dialog = document.getElementById("confirm");
  let flashTimer = null;

  function flash(text, kind) {
    flashBox.textContent = text;
    flashBox.className = kind || "ok";
    flashBox.hidden = false;
    clearTimeout(flashTimer);
    flashTimer = setTimeout(() => { flashBox.hidden = true; }, kind === "error" ? 12000 : 5000);
  }

  function confirmAction(question, label) {
    return new Promise((resolve) => {
      document.getElementById("confirm-text").textContent = question;
      document.getElementById("confirm-ok").textContent = label;
      dialog.returnValue = "";
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.showModal();
    });
  }

  async function post(url) {
    const response = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-CSRF-Token": csrfMeta ? csrfMeta.content : "", "Accept": "application/json" },
    });
    let body = {};
    try { body = await response.json(); } catch (_) { /* an empty or non-JSON answer */ }
    if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
    return body;
  }

  async function getJSON(url) {
    const response = await fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
    return body;
  }

  function number(value) {
    return value === null || value === undefined ? "-" : Number(value).toLocaleString("en-US");
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
    if (seconds < 60) return `${seconds.toFixed(1)} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.floor(seconds % 60)} s`;
    return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
  }

  function busy() {
    return dialog.open;
  }

  // Every button with data-action asks first, then POSTs; pages react to "admin:done".
  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    if (!(await confirmAction(button.dataset.confirm, button.textContent))) return;
    button.disabled = true;
    try {
      const result = await post(button.dataset.action);
      flash(result.message || "done", "ok");
      document.dispatchEvent(new CustomEvent("admin:done", { detail: { button, result } }));
    } catch (error) {
      flash(error.message, "error");
    } finally {
      button.disabled = false;
    }
  });

  return { flash, post, getJSON, number, age, busy };
})();
