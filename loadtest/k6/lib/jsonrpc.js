// Shared JSON-RPC 2.0 helpers for the k6 scenarios: one-shot calls over POST /rpc, a
// WebSocket client (ids, replies vs. notifications), a long-poll session, RATE_LIMITED retried
// after data.retry_after_ms, and quantities that respect each ticket type's rule.
import http from "k6/http";
import { sleep } from "k6";
import { Counter } from "k6/metrics";
import { WebSocket } from "k6/experimental/websockets";
import { setTimeout, clearTimeout } from "k6/timers";

export const BASE = (__ENV.BASE_URL || "http://127.0.0.1:4000").replace(/\/+$/, "");
export const WS_URL = BASE.replace(/^http/, "ws") + "/ws";
const MAX_RETRIES = 5;

/** Errors by `data.reason` (or JSON-RPC code), tagged with the method. */
export const rpcErrors = new Counter("rpc_errors");
/** RATE_LIMITED answers that were retried after `retry_after_ms`. */
export const rateLimited = new Counter("rpc_rate_limited_retries");

export class RpcError extends Error {
  constructor(error) {
    super(error.message);
    this.code = error.code;
    this.data = error.data || {};
    this.reason = this.data.reason || String(error.code);
  }
}

// Loopback only: every load test of this project targets this machine.
if (!/^https?:\/\/(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?$/.test(BASE)) {
  throw new Error(`BASE_URL must be a loopback address, not ${BASE}`);
}

const json = (body) => (typeof body === "string" ? JSON.parse(body) : body);

/** One call over POST /rpc; returns the result or throws RpcError. */
export function rpc(method, params = {}, token = null) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  for (let attempt = 0; ; attempt++) {
    const res = http.post(`${BASE}/rpc`, JSON.stringify({ jsonrpc: "2.0", id: 1, method, params }),
      { headers, tags: { name: "/rpc", method } });
    if (res.status !== 200) throw new Error(`${method}: HTTP ${res.status}`);
    const msg = json(res.body);
    if (!msg.error) return msg.result;
    const err = new RpcError(msg.error);
    if (err.reason === "RATE_LIMITED" && attempt < MAX_RETRIES) {
      rateLimited.add(1, { method });
      sleep((err.data.retry_after_ms || 100) / 1000);
      continue;
    }
    rpcErrors.add(1, { method, reason: err.reason });
    throw err;
  }
}

/** A JSON-RPC client over one WebSocket. `call` returns a Promise; notifications go to
 * `onNotification(method, params)`. Calls in flight when the socket closes are rejected. */
export class WsClient {
  constructor(url = WS_URL, { tags = {} } = {}) {
    this.nextId = 1;
    this.pending = new Map();
    this.notifications = [];
    this.waiters = [];
    this.onNotification = (method, params) => {
      this.notifications.push({ method, params });
      for (const w of this.waiters.filter((x) => x.match(method, params))) w.done(true);
    };
    this.ws = new WebSocket(url, null, { tags });
    this.opened = new Promise((resolve, reject) => {
      this.ws.onopen = () => resolve();
      this.ws.onerror = (e) => reject(new Error(`websocket error: ${e.error}`));
    });
    this.ws.onmessage = (e) => this.incoming(e.data);
    this.ws.onclose = () => {
      for (const p of this.pending.values()) { clearTimeout(p.timer); p.reject(new Error("connection closed")); }
      this.pending.clear();
    };
  }

  incoming(data) {
    const msg = JSON.parse(data);
    for (const m of Array.isArray(msg) ? msg : [msg]) {
      if (m.method !== undefined && m.id === undefined) { this.onNotification(m.method, m.params || {}); continue; }
      const p = this.pending.get(m.id);
      if (!p) continue;
      this.pending.delete(m.id);
      clearTimeout(p.timer);
      if (m.error) p.reject(new RpcError(m.error)); else p.resolve(m.result);
    }
  }

  sendOnce(method, params, timeoutMs) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => { this.pending.delete(id); reject(new Error(`${method}: no answer within ${timeoutMs} ms`)); }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.ws.send(JSON.stringify({ jsonrpc: "2.0", id, method, params }));
    });
  }

  async call(method, params = {}, timeoutMs = 10000) {
    await this.opened;
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.sendOnce(method, params, timeoutMs);
      } catch (e) {
        if (e.reason === "RATE_LIMITED" && attempt < MAX_RETRIES) {
          rateLimited.add(1, { method });
          await new Promise((r) => setTimeout(r, e.data.retry_after_ms || 100));
          continue;
        }
        if (e instanceof RpcError) rpcErrors.add(1, { method, reason: e.reason });
        throw e;
      }
    }
  }

  /** Resolves true once a notification matching `match(method, params)` has arrived (also
   * earlier ones), false after `timeoutMs`. */
  waitFor(match, timeoutMs) {
    if (this.notifications.some((n) => match(n.method, n.params))) return Promise.resolve(true);
    return new Promise((resolve) => {
      const w = { match };
      const timer = setTimeout(() => w.done(false), timeoutMs);
      w.done = (ok) => { clearTimeout(timer); this.waiters = this.waiters.filter((x) => x !== w); resolve(ok); };
      this.waiters.push(w);
    });
  }

  close() { this.ws.close(); }
}

/** A long-poll session. URLs carry the session id, so every request is tagged with a fixed
 * `name` and metrics do not multiply per session. */
export class LongPoll {
  constructor(token = null) {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const res = http.post(`${BASE}/lp`, null, { headers, tags: { name: "POST /lp" } });
    if (res.status !== 201) throw new Error(`POST /lp: HTTP ${res.status}`);
    const info = json(res.body);
    this.path = `${BASE}/lp/${encodeURIComponent(info.session)}`;
    this.cursor = 0;
  }

  call(method, params = {}) {
    for (let attempt = 0; ; attempt++) {
      const res = http.post(this.path, JSON.stringify({ jsonrpc: "2.0", id: 1, method, params }),
        { headers: { "Content-Type": "application/json" }, tags: { name: "POST /lp/{session}", method } });
      if (res.status !== 200) throw new Error(`${method}: HTTP ${res.status}`);
      const msg = json(res.body);
      if (!msg.error) return msg.result;
      const err = new RpcError(msg.error);
      if (err.reason === "RATE_LIMITED" && attempt < MAX_RETRIES) {
        rateLimited.add(1, { method });
        sleep((err.data.retry_after_ms || 100) / 1000);
        continue;
      }
      rpcErrors.add(1, { method, reason: err.reason });
      throw err;
    }
  }

  /** One GET with the current cursor; returns the notifications. A failed poll keeps the
   * cursor, so the next poll returns the same messages (nothing lost, nothing twice). */
  poll(timeout = "30s") {
    const res = http.get(`${this.path}?cursor=${this.cursor}`, { timeout, tags: { name: "GET /lp/{session}" } });
    if (res.status !== 200) return [];
    const body = json(res.body);
    this.cursor = body.cursor;
    return body.messages.map((m) => m.message);
  }

  close() {
    http.del(this.path, null, { tags: { name: "DELETE /lp/{session}" } });
  }
}

/** A quantity that respects the rule at the given availability, or 0 when none does. */
export function quantityFor(ticketType, available) {
  const rule = ticketType.rule || { kind: "any" };
  const want = 1 + Math.floor(Math.random() * 4); // 1 to 4 tickets, as most buyers take
  switch (rule.kind) {
    case "multiple": return Math.min(want, Math.floor(available / rule.of)) * rule.of;
    case "altogether": return available <= 8 ? available : 0; // only small whole pools
    case "avoid_one": {
      let q = Math.min(want, available);
      if (available - q === 1) q = q > 1 ? q - 1 : (available >= 2 ? 2 : 0);
      return q;
    }
    default: return Math.min(want, available);
  }
}

/** Outcomes that are the server doing its job under contention, not failures. */
export const EXPECTED = new Set(["INSUFFICIENT_TICKETS", "RULE_VIOLATION", "RESERVATION_EXPIRED"]);

/** Creates the event the scenario uses (admin login via ADMIN_EMAIL / ADMIN_PASSWORD), or
 * uses EVENT_ID. */
export function setupEvent(name, ticketTypes) {
  if (__ENV.EVENT_ID) return rpc("events.get", { event_id: __ENV.EVENT_ID });
  if (!__ENV.ADMIN_EMAIL) throw new Error("set ADMIN_EMAIL and ADMIN_PASSWORD (an admin account), or EVENT_ID");
  const admin = rpc("auth.login", { email: __ENV.ADMIN_EMAIL, password: __ENV.ADMIN_PASSWORD });
  return rpc("admin.events.create", {
    name: `${name} ${Date.now()}`,
    starts_at: new Date(Date.now() + 30 * 24 * 3600 * 1000).toISOString(),
    venue: "k6",
    ticket_types: ticketTypes,
  }, admin.token);
}

/** Registers `count` buyers (their emails carry the run's id) and returns their tokens. */
export function registerBuyers(count, label) {
  const run = `${Date.now()}-${Math.floor(Math.random() * 1e6)}`;
  const buyers = [];
  for (let i = 0; i < count; i++) {
    const email = `${label}-${run}-${i}@k6.invalid`;
    const password = "k6-buyer-password";
    buyers.push({ email, password, token: rpc("auth.register", { email, password }).token });
  }
  return buyers;
}

/** Cancels every pending reservation the buyers still hold (run in teardown). */
export function cancelPending(buyers) {
  let cancelled = 0;
  for (const b of buyers) {
    const { reservations } = rpc("reservations.list", { status: "pending" }, b.token);
    for (const r of reservations) {
      try { rpc("reservations.cancel", { reservation_id: r.id }, b.token); cancelled++; } catch (e) {
        if (!EXPECTED.has(e.reason) && e.reason !== "RESERVATION_NOT_PENDING") throw e;
      }
    }
  }
  return cancelled;
}

/** The standard ticket types of a scenario's event: each rule once. */
export const TICKET_TYPES = [
  { name: "General", price: { amount: 4900, currency: "EUR" }, capacity: 1000000, rule: { kind: "any" } },
  { name: "Pairs", price: { amount: 9800, currency: "EUR" }, capacity: 200000, rule: { kind: "multiple", of: 2 } },
  { name: "Balcony", price: { amount: 3500, currency: "EUR" }, capacity: 200000, rule: { kind: "avoid_one" } },
  { name: "Table", price: { amount: 30000, currency: "EUR" }, capacity: 6, rule: { kind: "altogether" } },
];
