// motionhook dashboard: live updates from the session-authenticated event streams.
"use strict";

function setStatus(element, status) {
  if (!element) return;
  element.textContent = status;
  element.className = "status status-" + status;
}

// A delivery's attempts are not events: refresh its table on every event, and every
// second while one of its deliveries is still pending.
function liveDeliveries() {
  const box = document.getElementById("deliveries");
  let timer = null;
  let busy = false;
  let again = false;
  const refresh = async () => {
    busy = true;
    again = false;
    try {
      const response = await fetch(box.dataset.refresh, { credentials: "same-origin" });
      if (response.ok) box.innerHTML = await response.text();
    } catch (error) {
      // The server is away for a moment: the next round tries again.
    }
    busy = false;
    timer = null;
    if (again) schedule(0);
    else if (box.querySelector(".status-pending")) schedule(1000);
  };
  const schedule = (delay) => {
    if (busy) again = true;
    else if (timer === null) timer = setTimeout(refresh, delay);
  };
  if (box.querySelector(".status-pending")) schedule(1000);
  return () => schedule(0);
}

function deliveriesPage(body) {
  const refresh = liveDeliveries();
  const source = new EventSource(body.dataset.stream);
  for (const type of ["job.processing", "job.completed", "job.failed", "test.ping"]) {
    source.addEventListener(type, refresh);
  }
}

function jobsPage(body) {
  const tbody = document.querySelector("#jobs tbody");
  const source = new EventSource(body.dataset.stream);
  const onJob = (message) => {
    const job = JSON.parse(message.data).data;
    let row = tbody.querySelector(`tr[data-job="${CSS.escape(job.id)}"]`);
    if (!row) {
      tbody.querySelector("tr.empty")?.remove();
      row = document.createElement("tr");
      row.dataset.job = job.id;
      const link = document.createElement("a");
      link.href = body.dataset.jobUrl.replace("JOB_ID", encodeURIComponent(job.id));
      link.textContent = job.id;
      const cells = [link, document.createElement("span"), (job.input || {}).prompt || "", job.created_at];
      for (const content of cells) {
        const cell = document.createElement("td");
        cell.append(content);
        row.append(cell);
      }
      row.children[1].firstChild.dataset.status = "";
      tbody.prepend(row);
    }
    setStatus(row.querySelector("[data-status]"), job.status);
  };
  for (const type of ["job.processing", "job.completed", "job.failed"]) {
    source.addEventListener(type, onJob);
  }
}

function jobPage(body) {
  const timeline = document.getElementById("timeline");
  const video = document.getElementById("video");
  const refreshDeliveries = liveDeliveries();
  const source = new EventSource(body.dataset.stream);
  const onEvent = (message) => {
    refreshDeliveries();
    const envelope = JSON.parse(message.data);
    const job = envelope.data;
    if (!timeline.querySelector(`li[data-event="${CSS.escape(envelope.id)}"]`)) {
      const item = document.createElement("li");
      item.dataset.event = envelope.id;
      const time = document.createElement("time");
      time.textContent = envelope.created_at;
      const code = document.createElement("code");
      code.textContent = envelope.type;
      item.append(time, " ", code);
      timeline.append(item);
    }
    setStatus(document.querySelector("h1 [data-status]"), job.status);
    const stored = (job.outputs || []).filter((output) => output.url);
    if (stored.length && video.getAttribute("src") !== stored[0].url) {
      video.src = stored[0].url;
      video.hidden = false;
      document.querySelector("[data-video-pending]").hidden = true;
    }
    if (job.error) {
      const error = document.querySelector("[data-job-error]");
      error.textContent = job.error.message;
      error.hidden = false;
    }
  };
  for (const type of ["job.processing", "job.completed", "job.failed"]) {
    source.addEventListener(type, onEvent);
  }
  // The server ends a job stream after its last event: do not reconnect then.
  source.addEventListener("job.completed", () => source.close());
  source.addEventListener("job.failed", () => source.close());
}

function deliveryPage(body) {
  const status = document.querySelector("h1 [data-status]");
  const poll = async () => {
    if (status.textContent !== "pending") return;
    const response = await fetch(body.dataset.poll, { credentials: "same-origin" });
    if (response.ok) {
      const delivery = await response.json();
      setStatus(status, delivery.status);
      if (delivery.status !== "pending") {
        window.location.reload(); // show the new attempt in the table
        return;
      }
    }
    setTimeout(poll, 1000);
  };
  poll();
}

document.addEventListener("DOMContentLoaded", () => {
  const body = document.body;
  const pages = { jobs: jobsPage, job: jobPage, deliveries: deliveriesPage, delivery: deliveryPage };
  (pages[body.dataset.page] || (() => {}))(body);
});
