// The live dashboard: polls dashboard/data every POLL_MS and redraws the figures in place.
// No framework and no external assets; the page's CSP allows only this origin.
"use strict";

(() => {
  const POLL_MS = 2000;
  // A poll that has not answered by then is abandoned and counts as a failure.
  const FETCH_TIMEOUT_MS = 5000;
  const SVG = "http://www.w3.org/2000/svg";
  // The chart's geometry, in viewBox units (the svg's viewBox is 0 0 760 190).
  const CHART = { width: 760, height: 190, left: 40, right: 8, top: 12, bottom: 26 };
  const DELIVERED = new Set(["delivered", "answered", "spoken"]);
  // Only early media, then the ring timer: maybe rang behind a ringback tone, maybe not.
  const UNCERTAIN = new Set(["progress_only"]);

  const count = new Intl.NumberFormat("en-US");
  const percent = new Intl.NumberFormat("en-US", {
    style: "percent",
    minimumFractionDigits: 1,
    maximumFractionDigits: 1,
  });
  const clock = new Intl.DateTimeFormat("en-GB", {
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
  });
  const hourMinute = new Intl.DateTimeFormat("en-GB", { hour: "2-digit", minute: "2-digit" });
  const dayTime = new Intl.DateTimeFormat("en-GB", {
    day: "numeric",
    month: "short",
    hour: "2-digit",
    minute: "2-digit",
  });
  // A pool's state for a carrier: new calls may use it, do not, or one call tries it again.
  const POOL_TAGS = { active: "tag good", quarantined: "tag bad", probing: "tag unsure" };

  const byId = (id) => document.getElementById(id);
  let lastUpdated = null; // generated_at of the figures shown

  function setText(id, text) {
    const element = byId(id);
    if (element.textContent !== text) element.textContent = text;
  }

  function rate(value) {
    return value === null || value === undefined ? "—" : percent.format(value);
  }

  function element(tag, attributes = {}, text = null, namespace = null) {
    const made = namespace ? document.createElementNS(namespace, tag) : document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) made.setAttribute(name, String(value));
    if (text !== null) made.textContent = text;
    return made;
  }

  function svg(tag, attributes = {}, text = null) {
    return element(tag, attributes, text, SVG);
  }

  // The smallest of 1, 2, 5 times a power of ten that is at least `value`.
  function niceCeiling(value) {
    if (value <= 1) return 1;
    const power = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
    return 10 * power;
  }

  function renderChart(minutes) {
    const chart = byId("calls-chart");
    const plotWidth = CHART.width - CHART.left - CHART.right;
    const plotHeight = CHART.height - CHART.top - CHART.bottom;
    const top = niceCeiling(Math.max(0, ...minutes.map((m) => m.calls)));
    const slot = plotWidth / Math.max(1, minutes.length);
    const baseline = CHART.top + plotHeight;
    const parts = [];

    for (const fraction of [0, 0.5, 1]) {
      const y = baseline - fraction * plotHeight;
      parts.push(svg("line", { class: "grid", x1: CHART.left, x2: CHART.width - CHART.right, y1: y, y2: y }));
      const value = top * fraction;
      if (Number.isInteger(value)) {
        parts.push(svg("text", { class: "axis", x: CHART.left - 6, y: y + 4, "text-anchor": "end" }, count.format(value)));
      }
    }
    minutes.forEach((minute, index) => {
      const height = (minute.calls / top) * plotHeight;
      const at = new Date(minute.minute);
      const current = index === minutes.length - 1;
      const bar = svg("rect", {
        class: current ? "bar current" : "bar",
        x: (CHART.left + index * slot + slot * 0.15).toFixed(2),
        y: (baseline - height).toFixed(2),
        width: (slot * 0.7).toFixed(2),
        height: height.toFixed(2),
        "data-minute": minute.minute,
        "data-calls": minute.calls,
      });
      const calls = `${count.format(minute.calls)} call${minute.calls === 1 ? "" : "s"}`;
      bar.append(svg("title", {}, `${hourMinute.format(at)}${current ? " (now)" : ""}: ${calls}`));
      parts.push(bar);
      // A time label every 15 minutes, and on the current minute.
      if (current || (minutes.length - 1 - index) % 15 === 0) {
        parts.push(svg("text", {
          class: current ? "axis now" : "axis",
          x: (CHART.left + index * slot + slot / 2).toFixed(2),
          y: CHART.height - 8,
          "text-anchor": current ? "end" : "middle",
        }, current ? "now" : hourMinute.format(at)));
      }
    });
    chart.replaceChildren(...parts);
  }

  function meter(value) {
    const box = svg("svg", { class: "meter", viewBox: "0 0 100 8", "aria-hidden": "true" });
    box.append(svg("rect", { class: "meter-track", x: 0, y: 0, width: 100, height: 8, rx: 4 }));
    if (value !== null) {
      box.append(svg("rect", { class: "meter-fill", x: 0, y: 0, width: (value * 100).toFixed(1), height: 8, rx: 4 }));
    }
    return box;
  }

  function emptyRow(columns, text) {
    const row = element("tr", { class: "empty" });
    row.append(element("td", { colspan: columns }, text));
    return row;
  }

  function renderCarriers(carriers) {
    const rows = carriers.map((carrier) => {
      const row = element("tr", { "data-carrier": carrier.carrier });
      row.append(
        element("td", { "data-field": "carrier" }, carrier.carrier),
        element("td", { class: "num", "data-field": "calls" }, count.format(carrier.calls)),
        element("td", { class: "num", "data-field": "delivered" }, count.format(carrier.delivered)),
        element("td", { class: "num", "data-field": "delivery-rate" }, rate(carrier.delivery_rate)),
      );
      const bar = element("td", { class: "meter-col" });
      bar.append(meter(carrier.delivery_rate));
      row.append(bar);
      return row;
    });
    byId("carriers").tBodies[0].replaceChildren(...(rows.length ? rows : [emptyRow(5, "No calls ended in the last hour")]));
  }

  // A flash call delivers when the phone rings; a voice call when the code is said.
  function renderChannels(channels) {
    const rows = channels.map((channel) => {
      const row = element("tr", { "data-channel": channel.channel });
      row.append(
        element("td", { "data-field": "channel" }, channel.channel === "flashcall" ? "flash call" : "voice call"),
        element("td", { class: "num", "data-field": "calls" }, count.format(channel.calls)),
        element("td", { class: "num", "data-field": "delivered" }, count.format(channel.delivered)),
        element("td", { class: "num", "data-field": "delivery-rate" }, rate(channel.delivery_rate)),
        element("td", { class: "num", "data-field": "approved" }, count.format(channel.approved)),
        element("td", { class: "num", "data-field": "approval-rate" }, rate(channel.approval_rate)),
      );
      return row;
    });
    byId("channels").tBodies[0].replaceChildren(...rows);
  }

  function renderCauses(causes, total) {
    const rows = causes.map((entry) => {
      const cause = entry.hangup_cause === null ? "none" : String(entry.hangup_cause);
      const row = element("tr", { "data-outcome": entry.outcome, "data-cause": cause });
      const outcome = element("td", { "data-field": "outcome" });
      const tag = DELIVERED.has(entry.outcome) ? "tag good" : UNCERTAIN.has(entry.outcome) ? "tag unsure" : "tag bad";
      outcome.append(element("span", { class: tag }, entry.outcome.replaceAll("_", " ")));
      const label = entry.hangup_cause === null
        ? "—"
        : `${entry.hangup_cause}${entry.cause_name ? ` · ${entry.cause_name}` : ""}`;
      row.append(
        outcome,
        element("td", { "data-field": "cause" }, label),
        element("td", { class: "num", "data-field": "calls" }, count.format(entry.calls)),
        element("td", { class: "num", "data-field": "share" }, rate(total ? entry.calls / total : null)),
      );
      return row;
    });
    byId("causes").tBodies[0].replaceChildren(...(rows.length ? rows : [emptyRow(4, "No calls ended in the last hour")]));
  }

  function renderInstances(instances) {
    const rows = instances.map((instance) => {
      const row = element("tr", { "data-instance": instance.name, "data-state": instance.state });
      const name = element("td", { "data-field": "name" }, instance.name);
      if (instance.this) name.append(element("span", { class: "muted" }, " (this one)"));
      const tag = { running: "tag good", stopped: "tag unsure", lost: "tag bad" }[instance.state];
      const state = element("td", { "data-field": "state" });
      state.append(element("span", { class: tag }, instance.state));
      row.append(
        name,
        state,
        element("td", { "data-field": "started" }, clock.format(new Date(instance.started_at))),
        element("td", { class: "num", "data-field": "live-calls" }, count.format(instance.live_calls)),
      );
      return row;
    });
    byId("instances").tBodies[0].replaceChildren(...(rows.length ? rows : [emptyRow(4, "No gateway has started")]));
  }

  function renderNodes(nodes) {
    const rows = nodes.map((node) => {
      const up = node.connected;
      const row = element("tr", { "data-node": node.name, "data-state": up ? "connected" : "down" });
      const state = element("td", { "data-field": "state" });
      const label = up ? "logged in" : `down for ${count.format(Math.round(node.down_seconds))} s`;
      state.append(element("span", { class: up ? "tag good" : "tag bad" }, label));
      row.append(
        element("td", { "data-field": "name" }, node.name),
        state,
        element("td", { class: "num", "data-field": "calls-live" }, count.format(node.calls_live)),
        element("td", { class: "num", "data-field": "ringing" }, count.format(node.calls_ringing)),
        element(
          "td",
          { class: "num", "data-field": "channels" },
          `${count.format(node.calls_live)} / ${count.format(node.max_concurrent)}`,
        ),
        element("td", { class: "num", "data-field": "calls-placed" }, count.format(node.calls_placed)),
      );
      return row;
    });
    byId("nodes").tBodies[0].replaceChildren(...(rows.length ? rows : [emptyRow(6, "No Asterisk node configured")]));
  }

  // A time today as its clock time; an earlier one with its day.
  function since(value) {
    if (value === null || value === undefined) return "—";
    const at = new Date(value);
    return at.toDateString() === new Date().toDateString() ? clock.format(at) : dayTime.format(at);
  }

  // One row per pool and carrier its calls reached; a pool no call judged yet, one row.
  function renderPools(pools) {
    const rows = pools.flatMap((pool) => {
      const name = () => element("td", { "data-field": "pool", title: `trunk ${pool.trunk}` }, pool.name);
      if (!pool.carriers.length) {
        const row = element("tr", { class: "idle", "data-pool": pool.name, "data-state": "none" });
        row.append(name(), element("td", { colspan: 6, "data-field": "carrier" }, "no calls yet"));
        return [row];
      }
      return pool.carriers.map((entry) => {
        const carrier = entry.carrier ?? "unknown";
        const row = element("tr", { "data-pool": pool.name, "data-carrier": carrier, "data-state": entry.state });
        const state = element("td", { "data-field": "state" });
        const tag = element("span", { class: POOL_TAGS[entry.state] || "tag unsure" }, entry.state);
        if (entry.next_probe_at) tag.title = `next probe ${since(entry.next_probe_at)}`;
        state.append(tag);
        if (entry.held) {
          state.append(" ", element("span", {
            class: "tag warn",
            "data-field": "held",
            title: "failing, kept active: no other pool delivers to this carrier",
          }, "held"));
        }
        row.append(
          name(),
          element("td", { "data-field": "carrier" }, carrier),
          state,
          element("td", { class: "num", "data-field": "calls" }, count.format(entry.calls)),
          element("td", { class: "num", "data-field": "delivered" }, count.format(entry.delivered)),
          element("td", { class: "num", "data-field": "delivery-rate" }, rate(entry.rate)),
          element("td", { "data-field": "since" }, since(entry.since)),
        );
        return row;
      });
    });
    byId("pools").tBodies[0].replaceChildren(...(rows.length ? rows : [emptyRow(7, "No pool configured")]));
  }

  // Counts only: an alert's target (a number's block) never reaches the page.
  function renderAlerts(alerts) {
    const total = alerts.reduce((sum, entry) => sum + entry.count, 0);
    const blocking = alerts.filter((entry) => entry.mode === "block").reduce((sum, entry) => sum + entry.count, 0);
    setText("open-alerts", count.format(total));
    setText("open-alerts-blocking", count.format(blocking));
    const card = byId("alerts-card");
    card.dataset.state = blocking ? "block" : total ? "report" : "none";
    card.title = alerts
      .filter((entry) => entry.count)
      .map((entry) => `${entry.kind}, ${entry.mode} mode: ${count.format(entry.count)}`)
      .join("\n");
  }

  function setAmi(state) {
    const pill = byId("ami-status");
    pill.dataset.state = state;
    pill.textContent = { connected: "AMI connected", disconnected: "AMI disconnected", unknown: "AMI unknown" }[state];
  }

  function render(data) {
    const minutes = data.calls_per_minute;
    const thisMinute = minutes[minutes.length - 1];
    setAmi(data.pbx_connected ? "connected" : "disconnected");
    setText("calls-last-minute", count.format(data.calls_last_minute));
    setText("calls-this-minute", count.format(thisMinute.calls));
    setText("this-minute-start", hourMinute.format(new Date(thisMinute.minute)));
    setText("in-flight", count.format(data.in_flight));
    setText("queued", count.format(data.queued));
    setText("delivery-rate", rate(data.window.delivery_rate));
    setText("delivered", count.format(data.window.delivered));
    setText("uncertain", count.format(data.window.uncertain));
    setText("calls-window", count.format(data.window.calls));
    renderChart(minutes);
    renderCarriers(data.window.by_carrier);
    renderChannels(data.window.by_channel);
    renderCauses(data.window.by_cause, data.window.calls);
    renderPools(data.pools);
    renderAlerts(data.open_alerts);
    renderNodes(data.nodes);
    renderInstances(data.instances);
    document.body.classList.remove("stale");
    lastUpdated = new Date(data.generated_at);
    setText("updated", `Updated ${clock.format(lastUpdated)}`);
  }

  async function poll() {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
    try {
      const response = await fetch("dashboard/data", { cache: "no-store", signal: controller.signal });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      render(await response.json());
    } catch (error) {
      // Keep the last figures, but say they are old and that AMI's state is unknown.
      document.body.classList.add("stale");
      setAmi("unknown");
      const shown = lastUpdated ? `figures from ${clock.format(lastUpdated)}` : "no figures yet";
      setText("updated", `Gateway unreachable (${error.message || error}); ${shown}`);
    } finally {
      clearTimeout(timer);
      setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
