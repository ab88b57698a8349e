// Outbox: counts refresh every few seconds; a retried dead letter leaves the list.
"use strict";

(() => {
  document.addEventListener("admin:done", (event) => {
    const { button } = event.detail;
    if (button.dataset.kind === "retry") {
      button.closest("tr").remove();
    } else if (button.dataset.kind === "retry-all") {
      setTimeout(() => location.reload(), 800);
    }
  });

  async function refresh() {
    try {
      const outbox = await admin.getJSON("/api/outbox");
      for (const topic of outbox.topics) {
        const tr = document.querySelector(`tr[data-topic="${CSS.escape(topic.topic)}"]`);
        if (!tr) continue;
        for (const field of ["pending", "published", "dead"]) {
          tr.querySelector(`[data-field="${field}"]`).textContent = admin.number(topic[field]);
        }
        tr.querySelector('[data-field="oldest_pending_age"]').textContent = admin.age(topic.oldest_pending_age);
      }
    } catch (error) {
      admin.flash(error.message, "error");
    }
  }

  setInterval(refresh, 5000);
})();
