// Fan-out: many WebSocket subscribers follow one event while a few buyers change it on a fixed
// schedule; each subscriber records the delivery latency of every pool.update as a Trend.
//
// VUs share no memory, so the schedule is the shared knowledge: buyer i owns ticket type i
// and, from the start time chosen in setup, reserves (even ticks) or cancels (odd ticks) at
// start + i·PERIOD/BUYERS + k·PERIOD. A subscriber that sees ticket type i change at time t
// attributes it to the latest tick of buyer i before t. The latency therefore runs from the
// buyer's send to the subscriber's receipt, and is exact while it stays below PERIOD.
//
//   k6 run -e BASE_URL=http://127.0.0.1:4000 -e ADMIN_EMAIL=… -e ADMIN_PASSWORD=… \
//     -e SUBSCRIBERS=500 -e DURATION=30s loadtest/k6/fanout.js
import { check } from "k6";
import { Counter, Rate, Trend } from "k6/metrics";
import { setTimeout } from "k6/timers";
import { WsClient, rpc, setupEvent, registerBuyers, cancelPending } from "./lib/jsonrpc.js";

const DURATION_S = parseInt(__ENV.DURATION || "30s", 10);
const SUBSCRIBERS = Number(__ENV.SUBSCRIBERS || 200);
const BUYER_COUNT = Number(__ENV.FANOUT_BUYERS || 3);
const PERIOD_MS = Number(__ENV.PERIOD_MS || 500);
const P95 = Number(__ENV.P95_MS || 250);
const LEAD_MS = 3000; // subscribers connect and subscribe before the first tick

const delivery = new Trend("pool_update_delivery", true);
const updates = new Counter("pool_updates_received");
const unexpected = new Rate("unexpected_errors");

export const options = {
  scenarios: {
    subscribers: { executor: "per-vu-iterations", vus: SUBSCRIBERS, iterations: 1, exec: "subscriber",
      maxDuration: `${DURATION_S + 30}s` },
    buyers: { executor: "per-vu-iterations", vus: BUYER_COUNT, iterations: 1, exec: "buyer",
      maxDuration: `${DURATION_S + 30}s` },
  },
  thresholds: {
    pool_update_delivery: [`p(95)<${P95}`],
    pool_updates_received: ["count>0"],
    unexpected_errors: ["rate<0.01"],
    checks: ["rate>0.99"],
  },
};

const TYPES = Array.from({ length: BUYER_COUNT }, (_, i) => ({
  name: `Block ${i + 1}`, price: { amount: 1000, currency: "EUR" }, capacity: 100000, rule: { kind: "any" },
}));

export function setup() {
  const event = setupEvent("fanout", TYPES);
  return { event, buyers: registerBuyers(BUYER_COUNT, "fanout-buyer"), start: Date.now() + LEAD_MS };
}

const until = (at) => new Promise((r) => setTimeout(r, Math.max(0, at - Date.now())));
const tickOf = (start, i, k) => start + (i * PERIOD_MS) / BUYER_COUNT + k * PERIOD_MS;
const ticks = Math.floor((DURATION_S * 1000) / PERIOD_MS);

export async function buyer({ event, buyers, start }) {
  const i = __VU - 1 - SUBSCRIBERS >= 0 ? (__VU - 1 - SUBSCRIBERS) % BUYER_COUNT : (__VU - 1) % BUYER_COUNT;
  const me = buyers[i];
  const tt = event.ticket_types[i];
  const ws = new WsClient();
  let held = null;
  try {
    await ws.call("auth.authenticate", { token: me.token });
    for (let k = 0; k < ticks; k++) {
      await until(tickOf(start, i, k));
      if (held) {
        await ws.call("reservations.cancel", { reservation_id: held.id });
        held = null;
      } else {
        held = await ws.call("tickets.reserve", { items: [{ ticket_type_id: tt.id, quantity: 1 }] });
      }
    }
    if (held) await ws.call("reservations.cancel", { reservation_id: held.id });
    unexpected.add(false);
  } catch (e) {
    unexpected.add(true);
    console.warn(`fanout buyer: ${e.reason || ""} ${e.message}`);
  } finally {
    ws.close();
  }
}

export async function subscriber({ event, start }) {
  const index = new Map(event.ticket_types.map((tt, i) => [tt.id, i]));
  const ws = new WsClient();
  const versions = new Map();
  let subscription = null;
  try {
    const sub = await ws.call("pool.subscribe", { event_id: event.id });
    subscription = sub.subscription;
    for (const p of sub.pools) versions.set(p.ticket_type_id, p.version);
    ws.onNotification = (method, params) => {
      if (method !== "pool.update" || params.subscription !== subscription) return;
      const now = Date.now();
      for (const p of params.pools) {
        if (p.version <= (versions.get(p.ticket_type_id) || 0)) continue;
        versions.set(p.ticket_type_id, p.version);
        const i = index.get(p.ticket_type_id);
        const k = Math.floor((now - tickOf(start, i, 0)) / PERIOD_MS);
        if (k < 0) continue;
        updates.add(1);
        delivery.add(now - tickOf(start, i, k));
      }
    };
    // Hold until the buyers are done (plus one period for the last delivery).
    await until(tickOf(start, BUYER_COUNT, ticks) + PERIOD_MS);
    check(true, { "subscribed for the whole run": (x) => x });
    await ws.call("pool.unsubscribe", { subscription });
    unexpected.add(false);
  } catch (e) {
    unexpected.add(true);
    console.warn(`fanout subscriber: ${e.reason || ""} ${e.message}`);
  } finally {
    ws.close();
  }
}

export function teardown({ buyers }) {
  console.log(`teardown: cancelled ${cancelPending(buyers)} pending reservations`);
  rpc("events.list", { limit: 1 });
}
