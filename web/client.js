// ticket-api client: JSON-RPC 2.0 over WebSocket (`/ws`) with a long-poll fallback (`/lp`).
// A dependency-free ES module served by the server at `/client.js`; the API is described in
// `protocol/client.md`.
//
//   import { connect } from "/client.js";
//   const client = connect({ transport: "auto" });
//   const sub = client.subscribe(eventId);
//   sub.addEventListener("pools", (e) => console.log(e.detail.pools));
//   const r = await client.call("tickets.reserve", { items: [{ ticket_type_id, quantity: 2 }] });

const STANDARD = {
  "-32700": "PARSE_ERROR", "-32600": "INVALID_REQUEST", "-32601": "METHOD_NOT_FOUND",
  "-32602": "INVALID_PARAMS", "-32603": "INTERNAL_ERROR",
};

/** An error answered by the server (`code`, `message`, `data.reason`) or made by this client
 * (`code` 0, `data.reason` `DISCONNECTED`, `TIMEOUT`, `HTTP_ERROR` or `CLOSED`). */
export class RpcError extends Error {
  constructor(code, message, data) {
    super(message || "Error");
    this.name = "RpcError";
    this.code = code;
    this.data = data && typeof data === "object" ? data : {};
    this.reason = this.data.reason || STANDARD[String(code)] || "ERROR";
    if (!this.data.reason) this.data.reason = this.reason;
  }
}
const clientError = (reason, message) => new RpcError(0, message, { reason });

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
/** Exponential backoff with jitter: 0.5 s, 1 s, 2 s … capped, each ±50 %. */
export function backoff(attempt, baseMs = 500, capMs = 15000) {
  return Math.min(capMs, baseMs * 2 ** attempt) * (0.5 + Math.random());
}

function pageOrigin() {
  if (typeof location === "undefined") throw new TypeError("connect() needs a url outside a page");
  return location.origin;
}

/** One subscription to an event's availability that survives reconnects. Events: `pools`
 * (`detail.pools`: the entries newer than what it held, `detail.snapshot`: true after a
 * (re)subscribe), `live` (`detail.live`: whether the server is currently sending updates). */
export class Subscription extends EventTarget {
  constructor(client, eventId) {
    super();
    this.client = client;
    this.eventId = eventId;
    this.versions = new Map(); // ticket_type_id -> {available, version}
    this.closed = false;
    this.live = false;
  }
  /** The latest known `{available, version}` of a ticket type, or undefined. */
  pool(ticketTypeId) { return this.versions.get(ticketTypeId); }
  _apply(pools, snapshot) {
    const fresh = [];
    for (const p of pools || []) {
      const held = this.versions.get(p.ticket_type_id);
      if (held && p.version <= held.version) continue; // not newer: dropped
      this.versions.set(p.ticket_type_id, { available: p.available, version: p.version });
      fresh.push(p);
    }
    if (fresh.length || snapshot) this.dispatchEvent(new CustomEvent("pools", { detail: { pools: fresh, snapshot: !!snapshot } }));
  }
  _setLive(live) {
    if (this.live === live) return;
    this.live = live;
    this.dispatchEvent(new CustomEvent("live", { detail: { live } }));
  }
  /** Stops following the event; resolves once the server confirmed (or the link is down). */
  async unsubscribe() {
    if (this.closed) return;
    this.closed = true;
    this.client._subs.delete(this);
    this._setLive(false);
    const t = this.client.transport;
    const id = t && t.subs && [...t.subs].find(([, s]) => s === this);
    if (id) {
      t.subs.delete(id[0]);
      await this.client._send(t, "pool.unsubscribe", { subscription: id[0] }).catch(() => {});
    }
  }
  /** The server's subscription id on the current connection, or null. */
  get id() {
    const t = this.client.transport;
    const found = t && t.subs && [...t.subs].find(([, s]) => s === this);
    return found ? found[0] : null;
  }
}

// ---------- transports ----------
// Each transport: send(text) -> Promise (rejects when the text could not be delivered),
// close(), and the callbacks onmessage(msg object) and onclose(). `kind` names it.

function openWebSocket(base, timeoutMs) {
  const url = base.replace(/^http/, "ws") + "/ws";
  return new Promise((resolve, reject) => {
    let ws;
    try { ws = new WebSocket(url); } catch (e) { reject(e); return; }
    let opened = false;
    const timer = setTimeout(() => { if (!opened) { ws.onclose = null; ws.close(); reject(new Error("WebSocket open timed out")); } }, timeoutMs);
    const t = {
      kind: "websocket", onmessage: null, onclose: null, closed: false,
      send(text) {
        if (ws.readyState !== WebSocket.OPEN) return Promise.reject(clientError("DISCONNECTED", "Connection lost"));
        ws.send(text);
        return Promise.resolve();
      },
      close() { if (t.closed) return; t.closed = true; ws.onclose = null; try { ws.close(1000); } catch (_) { /* already closed */ } },
    };
    ws.onopen = () => { opened = true; clearTimeout(timer); resolve(t); };
    ws.onmessage = (ev) => { if (typeof ev.data === "string" && t.onmessage) t.onmessage(ev.data); };
    ws.onclose = (ev) => {
      if (!opened) { clearTimeout(timer); reject(new Error(`WebSocket closed (${ev.code})`)); return; }
      if (t.closed) return;
      t.closed = true;
      if (t.onclose) t.onclose(ev.code);
    };
  });
}

// Long-poll: the cursor advances only when a poll's body has been read, so a lost response is
// re-polled with the old cursor (the server keeps what it has not seen acknowledged).
async function openLongPoll(base, token) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const r = await fetch(`${base}/lp`, { method: "POST", headers });
  if (r.status !== 201) throw new Error(`long-poll open answered ${r.status}`);
  const info = await r.json();
  const path = `${base}/lp/${encodeURIComponent(info.session)}`;
  const abort = new AbortController();
  const t = { kind: "longpoll", session: info.session, cursor: 0, closed: false, onmessage: null, onclose: null };
  const fail = (code) => {
    if (t.closed) return;
    t.closed = true;
    abort.abort();
    if (t.onclose) t.onclose(code);
  };
  t.close = () => {
    if (t.closed) return;
    t.closed = true;
    abort.abort();
    fetch(path, { method: "DELETE", keepalive: true }).catch(() => {});
  };
  t.send = async (text) => {
    let res;
    try {
      res = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: text, signal: abort.signal });
    } catch (_) { throw clientError("DISCONNECTED", "Connection lost"); }
    if (res.status === 410) { fail(410); throw clientError("DISCONNECTED", "Long-poll session expired"); }
    if (res.status === 200) { const body = await res.text(); if (t.onmessage) t.onmessage(body); return; }
    if (res.status !== 204) throw new RpcError(0, `HTTP ${res.status}`, { reason: res.status === 413 ? "TOO_LARGE" : "HTTP_ERROR", status: res.status });
  };
  (async () => {
    let errors = 0;
    while (!t.closed) {
      let res, body;
      try {
        res = await fetch(`${path}?cursor=${t.cursor}`, { cache: "no-store", signal: abort.signal });
        if (res.status === 410) { fail(410); return; }
        if (!res.ok) throw new Error(`poll answered ${res.status}`);
        body = await res.json();
      } catch (_) {
        if (t.closed) return;
        if (++errors >= 4) { fail(0); return; }
        await sleep(backoff(errors - 1, 300, 3000));
        continue; // same cursor: nothing lost, nothing twice
      }
      errors = 0;
      for (const item of body.messages || []) {
        if (item.seq > t.cursor && t.onmessage) t.onmessage(item.message);
      }
      if (typeof body.cursor === "number" && body.cursor > t.cursor) t.cursor = body.cursor;
    }
  })();
  return t;
}

// ---------- the client ----------

/** Connects and returns a {@link Client} at once; calls made before the link is up wait for it. */
export function connect(options = {}) {
  const client = new Client(options);
  client.start();
  return client;
}

/** Events: `state` (`detail`: {state: "connecting"|"open"|"reconnecting"|"closed", transport,
 * retryInMs?}), `open` (after every (re)connection, once authenticated and re-subscribed),
 * `authenticated` (`detail.user`), `unauthenticated` (`detail.error`: the held token was
 * refused), `token` (`detail.token`, null on logout), `notification` (`detail`: {method,
 * params}) and one event per notification method (`pool.update`, `reservation.updated`). */
export class Client extends EventTarget {
  constructor({ url, token = null, transport = "auto", callTimeoutMs = 30000, connectTimeoutMs = 4000,
    probeIntervalMs = 5000, maxRateLimitRetries = 3 } = {}) {
    super();
    if (!["auto", "websocket", "longpoll"].includes(transport)) throw new TypeError(`unknown transport ${transport}`);
    this.url = (url || pageOrigin()).replace(/\/+$/, "");
    this.token = token;
    this.mode = transport;
    this.callTimeoutMs = callTimeoutMs;
    this.connectTimeoutMs = connectTimeoutMs;
    this.probeIntervalMs = probeIntervalMs;
    this.maxRateLimitRetries = maxRateLimitRetries;
    this.transport = null; // the live transport, once authenticated and re-subscribed
    this.state = "connecting";
    this.user = null;
    this._nextId = 1;
    this._pending = new Map(); // id -> {resolve, reject, transport, timer}
    this._waiters = [];
    this._subs = new Set();
    this._attempt = 0;
    this._timer = null;
    this._probeTimer = null;
    this._probeAttempt = 0;
    this._stopped = false;
    this.wsWorked = false;
  }

  /** Which transport carries calls now: "websocket", "longpoll" or null. */
  get kind() { return this.transport ? this.transport.kind : null; }

  start() {
    if (typeof window !== "undefined") {
      window.addEventListener("online", () => { if (this._timer) { clearTimeout(this._timer); this._timer = null; this._connect(); } });
      window.addEventListener("pagehide", () => { if (this.transport) this.transport.close(); });
    }
    this._connect();
  }

  /** Closes the link for good; pending calls are rejected with `CLOSED`. */
  close() {
    this._stopped = true;
    clearTimeout(this._timer);
    clearTimeout(this._probeTimer);
    const t = this.transport;
    this.transport = null;
    if (t) t.close();
    this._failPending(null, clientError("CLOSED", "Client closed"));
    this._setState("closed");
  }

  /** Calls a method; resolves with its result or rejects with an {@link RpcError}. Waits up to
   * the call timeout for a connection. `RATE_LIMITED` is retried after `data.retry_after_ms`.
   * The held token follows `auth.register`, `auth.login`, `auth.authenticate` and `auth.logout`. */
  async call(method, params = {}, { timeoutMs = this.callTimeoutMs, wait = true } = {}) {
    for (let attempt = 0; ; attempt++) {
      try {
        const result = await this._callOnce(method, params, timeoutMs, wait);
        this._observe(method, params, result);
        return result;
      } catch (e) {
        if (e.reason === "RATE_LIMITED" && attempt < this.maxRateLimitRetries) {
          await sleep(Number(e.data.retry_after_ms) || 1000);
          continue;
        }
        throw e;
      }
    }
  }

  /** Sends a batch: `calls` is `[[method, params], …]`; resolves with one entry per call,
   * `{result}` or `{error: RpcError}`, in order. */
  async batch(calls, { timeoutMs = this.callTimeoutMs } = {}) {
    await this._ready(timeoutMs);
    const t = this.transport;
    const entries = calls.map(([method, params]) => ({ jsonrpc: "2.0", id: this._nextId++, method, params: params || {} }));
    const settled = entries.map((m) => this._expect(m.id, t, timeoutMs)
      .then((result) => { this._observe(m.method, m.params, result); return { result }; }, (error) => ({ error })));
    this._deliver(t, JSON.stringify(entries), entries.map((m) => m.id));
    return Promise.all(settled);
  }

  /** Sends a JSON-RPC notification (no answer). */
  async notify(method, params = {}) {
    await this._ready(this.callTimeoutMs);
    await this.transport.send(JSON.stringify({ jsonrpc: "2.0", method, params }));
  }

  /** Follows an event's availability; re-subscribes after every reconnect. */
  subscribe(eventId) {
    const sub = new Subscription(this, eventId);
    this._subs.add(sub);
    if (this.transport) this._subscribe(sub, this.transport).catch(() => {});
    return sub;
  }

  /** Sets (or clears) the token used to authenticate each new connection and authenticates
   * the current one. */
  async authenticate(token) {
    this.token = token;
    if (!token) return null;
    const { user } = await this.call("auth.authenticate", { token });
    return user;
  }

  // ----- internals -----

  _setState(state, extra) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, transport: this.kind, ...extra } }));
  }

  _emit(name, detail) { this.dispatchEvent(new CustomEvent(name, { detail })); }

  _observe(method, params, result) {
    if ((method === "auth.register" || method === "auth.login") && result && result.token) {
      this.token = result.token;
      this.user = result.user;
      this._emit("token", { token: this.token });
      this._emit("authenticated", { user: result.user });
    } else if (method === "auth.authenticate" && result && result.user) {
      if (params && params.token && params.token !== this.token) { this.token = params.token; this._emit("token", { token: this.token }); }
      this.user = result.user;
      this._emit("authenticated", { user: result.user });
    } else if (method === "auth.logout") {
      this.token = null;
      this.user = null;
      this._emit("token", { token: null });
    }
  }

  _ready(timeoutMs) {
    if (this.transport) return Promise.resolve();
    if (this._stopped) return Promise.reject(clientError("CLOSED", "Client closed"));
    return new Promise((resolve, reject) => {
      const w = { resolve, reject };
      w.timer = setTimeout(() => {
        this._waiters = this._waiters.filter((x) => x !== w);
        reject(clientError("DISCONNECTED", "Not connected"));
      }, timeoutMs);
      this._waiters.push(w);
    });
  }

  async _callOnce(method, params, timeoutMs, wait) {
    if (!this.transport && !wait) throw clientError("DISCONNECTED", "Not connected");
    await this._ready(timeoutMs);
    return this._send(this.transport, method, params, timeoutMs);
  }

  // Sends on a given transport (also used while it is being set up, before it carries calls).
  _send(t, method, params, timeoutMs = this.callTimeoutMs) {
    const id = this._nextId++;
    const answer = this._expect(id, t, timeoutMs);
    this._deliver(t, JSON.stringify({ jsonrpc: "2.0", id, method, params: params || {} }), [id]);
    return answer;
  }

  _expect(id, t, timeoutMs) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        if (this._pending.delete(id)) reject(clientError("TIMEOUT", `No answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this._pending.set(id, { resolve, reject, transport: t, timer });
    });
  }

  _deliver(t, text, ids) {
    t.send(text).catch((e) => {
      const err = e instanceof RpcError ? e : clientError("DISCONNECTED", "Connection lost");
      for (const id of ids) this._settle(id, (p) => p.reject(err));
    });
  }

  _settle(id, how) {
    const p = this._pending.get(id);
    if (!p) return;
    this._pending.delete(id);
    clearTimeout(p.timer);
    how(p);
  }

  _failPending(t, err) {
    for (const [id, p] of [...this._pending]) if (!t || p.transport === t) this._settle(id, (q) => q.reject(err));
  }

  _incoming(t, data) {
    let msg = data;
    if (typeof data === "string") { try { msg = JSON.parse(data); } catch (_) { return; } }
    for (const m of Array.isArray(msg) ? msg : [msg]) {
      if (!m || typeof m !== "object") continue;
      if (m.method && m.id === undefined) this._notification(t, m.method, m.params || {});
      else if (m.id !== undefined && m.id !== null) {
        this._settle(m.id, (p) => (m.error ? p.reject(new RpcError(m.error.code, m.error.message, m.error.data)) : p.resolve(m.result)));
      }
    }
  }

  _notification(t, method, params) {
    if (method === "pool.update") {
      // Versions only move forward, so updates from an old link during a switch are harmless.
      const sub = t.subs && t.subs.get(params.subscription);
      if (sub && !sub.closed) sub._apply(params.pools, false);
    }
    if (method === "reservation.updated" && t !== this.transport && this.transport) return; // the old link during a switch
    this._emit("notification", { method, params });
    this._emit(method, params);
  }

  async _subscribe(sub, t) {
    const res = await this._send(t, "pool.subscribe", { event_id: sub.eventId });
    if (sub.closed || t.closed) {
      if (!t.closed) this._send(t, "pool.unsubscribe", { subscription: res.subscription }).catch(() => {});
      return;
    }
    t.subs.set(res.subscription, sub);
    sub._apply(res.pools, true);
    if (t === this.transport) sub._setLive(true);
  }

  // Authenticates a new transport and re-subscribes on it; false when it did not answer.
  async _prepare(t) {
    t.subs = new Map(); // server subscription id -> Subscription, on this link
    t.onmessage = (data) => this._incoming(t, data);
    t.onclose = (code) => this._closed(t, code);
    if (this.token) {
      try {
        const { user } = await this._send(t, "auth.authenticate", { token: this.token }, this.connectTimeoutMs * 2);
        this.user = user;
        this._emit("authenticated", { user });
      } catch (e) {
        if (e.reason !== "UNAUTHENTICATED") return false;
        this.token = null;
        this.user = null;
        this._emit("token", { token: null });
        this._emit("unauthenticated", { error: e });
      }
    } else {
      // Proves that the link answers (a proxy may accept an upgrade and then drop everything).
      try { await this._send(t, "events.list", { limit: 1 }, this.connectTimeoutMs * 2); } catch (e) { if (e.code === 0) return false; }
    }
    const results = await Promise.allSettled([...this._subs].map((s) => this._subscribe(s, t)));
    if (results.some((r) => r.status === "rejected" && r.reason && r.reason.code === 0)) return false;
    return !t.closed;
  }

  async _open(kind) {
    const t = kind === "websocket" ? await openWebSocket(this.url, this.connectTimeoutMs) : await openLongPoll(this.url, null);
    if (await this._prepare(t)) return t;
    t.onclose = null;
    t.close();
    this._failPending(t, clientError("DISCONNECTED", "Connection lost"));
    throw new Error(`${kind} did not answer`);
  }

  _use(t) {
    const old = this.transport;
    this.transport = t;
    this._attempt = 0;
    this._setState("open");
    for (const w of this._waiters.splice(0)) { clearTimeout(w.timer); w.resolve(); }
    const held = new Set(t.subs.values());
    for (const s of this._subs) {
      if (held.has(s)) s._setLive(true);
      else this._subscribe(s, t).catch(() => {}); // asked for while this link was being set up
    }
    if (old && old !== t) {
      old.onclose = null;
      // Calls still travelling on the old link settle there; then it is closed.
      const drain = () => {
        if ([...this._pending.values()].some((p) => p.transport === old)) setTimeout(drain, 200);
        else { old.close(); }
      };
      drain();
    }
    this._emit("open", { transport: t.kind });
    if (t.kind === "longpoll" && this.mode === "auto") this._scheduleProbe();
  }

  async _connect() {
    this._timer = null;
    if (this._stopped) return;
    this._setState(this._attempt ? "reconnecting" : "connecting");
    let t = null;
    if (this.mode !== "longpoll") {
      try { t = await this._open("websocket"); this.wsWorked = true; } catch (_) { t = null; }
    }
    if (!t && this.mode !== "websocket") {
      try { t = await this._open("longpoll"); } catch (_) { t = null; }
    }
    if (this._stopped) { if (t) t.close(); return; }
    if (!t) { this._scheduleReconnect(); return; }
    this._use(t);
  }

  _closed(t, code) {
    // Calls in flight on a lost link are rejected at once, never left to time out.
    this._failPending(t, clientError("DISCONNECTED", code === 410 ? "Long-poll session expired" : "Connection lost"));
    if (t !== this.transport) return;
    this.transport = null;
    for (const s of this._subs) s._setLive(false);
    if (this._stopped) return;
    if (code === 410) { this._connect(); return; } // a new session at once, then re-subscribe
    this._scheduleReconnect();
  }

  _scheduleReconnect() {
    if (this._timer || this._stopped) return;
    const delay = backoff(this._attempt++);
    this._setState("reconnecting", { retryInMs: Math.round(delay) });
    this._timer = setTimeout(() => this._connect(), delay);
  }

  // On long-poll in "auto" mode, keep trying the WebSocket; switch back when it answers.
  _scheduleProbe() {
    clearTimeout(this._probeTimer);
    const delay = Math.min(this.probeIntervalMs * 2 ** Math.min(this._probeAttempt, 2), 20000) * (0.75 + Math.random() * 0.5);
    this._probeTimer = setTimeout(async () => {
      if (this._stopped || !this.transport || this.transport.kind !== "longpoll") return;
      this._probeAttempt++;
      let ws = null;
      try { ws = await this._open("websocket"); } catch (_) { ws = null; }
      if (ws && !this._stopped && this.transport && this.transport.kind === "longpoll") {
        this._probeAttempt = 0;
        this.wsWorked = true;
        this._use(ws);
      } else {
        if (ws) ws.close();
        if (this.transport && this.transport.kind === "longpoll") this._scheduleProbe();
      }
    }, delay);
  }
}
