// Buyers over WebSocket: log in (or authenticate with a token), subscribe to the event, reserve
// a realistic quantity under each ticket type's rule, then pay, cancel, fail a payment, or let
// the reservation expire. A closed model (constant VUs in a loop) and an open model
// (constant-arrival-rate) run one after the other; teardown cancels what is still pending.
//
//   k6 run -e BASE_URL=http://127.0.0.1:4000 -e ADMIN_EMAIL=… -e ADMIN_PASSWORD=… loadtest/k6/ws-buyers.js
import { check } from "k6";
import { Rate, Trend } from "k6/metrics";
import { WsClient, rpc, setupEvent, registerBuyers, cancelPending, quantityFor, EXPECTED, TICKET_TYPES } from "./lib/jsonrpc.js";

const DURATION = __ENV.DURATION || "30s";
const VUS = Number(__ENV.VUS || 20);
const RATE = Number(__ENV.RATE || 20);
const BUYERS = Number(__ENV.BUYERS || 20);

const unexpected = new Rate("unexpected_errors");
const reserveTime = new Trend("reserve_duration", true);
const outcomes = { pay: 0.55, declined: 0.15, cancel: 0.2 }; // the rest is left to expire

export const options = {
  scenarios: {
    closed_loop: { executor: "constant-vus", vus: VUS, duration: DURATION, exec: "buyer", gracefulStop: "10s" },
    open_model: { executor: "constant-arrival-rate", rate: RATE, timeUnit: "1s", duration: DURATION,
      preAllocatedVUs: VUS, maxVUs: VUS * 4, exec: "buyer", startTime: DURATION, gracefulStop: "10s" },
  },
  thresholds: {
    unexpected_errors: ["rate<0.01"],
    checks: ["rate>0.99"],
    reserve_duration: [`p(95)<${__ENV.P95_MS || 1000}`],
    ws_connecting: [`p(95)<${__ENV.P95_MS || 1000}`],
  },
};

export function setup() {
  const event = setupEvent("ws-buyers", TICKET_TYPES);
  return { event, buyers: registerBuyers(BUYERS, "ws-buyer") };
}

export async function buyer({ event, buyers }) {
  const me = buyers[(__VU * 7 + __ITER) % buyers.length];
  const ws = new WsClient(undefined, { tags: { scenario_transport: "websocket" } });
  let failed = false;
  try {
    // One in ten logs in with the password (Argon2id on the server); the others reuse the token.
    if (Math.random() < 0.1) await ws.call("auth.login", { email: me.email, password: me.password });
    else await ws.call("auth.authenticate", { token: me.token });
    const sub = await ws.call("pool.subscribe", { event_id: event.id });
    const pools = new Map(sub.pools.map((p) => [p.ticket_type_id, p.available]));
    const tt = event.ticket_types[Math.floor(Math.random() * event.ticket_types.length)];
    const quantity = quantityFor(tt, pools.get(tt.id));
    if (quantity > 0) {
      const started = Date.now();
      let r = null;
      try {
        r = await ws.call("tickets.reserve", { items: [{ ticket_type_id: tt.id, quantity }], idempotency_key: `${__VU}-${__ITER}-${started}` });
      } catch (e) {
        if (!EXPECTED.has(e.reason)) throw e;
      }
      reserveTime.add(Date.now() - started);
      if (r) {
        check(r, { "reservation is pending": (x) => x.status === "pending" });
        const roll = Math.random();
        if (roll < outcomes.pay) {
          const paid = await ws.call("payments.create", { reservation_id: r.id, payment_token: "tok_ok" });
          check(paid, { "payment succeeded": (x) => x.reservation.status === "paid" });
          const told = await ws.waitFor((m, p) => m === "reservation.updated" && p.reservation.id === r.id, 5000);
          check(told, { "reservation.updated arrives": (x) => x });
        } else if (roll < outcomes.pay + outcomes.declined) {
          try { await ws.call("payments.create", { reservation_id: r.id, payment_token: "tok_declined" }); } catch (e) {
            check(e, { "tok_declined is PAYMENT_DECLINED": (x) => x.reason === "PAYMENT_DECLINED" });
          }
          await ws.call("reservations.cancel", { reservation_id: r.id });
        } else if (roll < outcomes.pay + outcomes.declined + outcomes.cancel) {
          const c = await ws.call("reservations.cancel", { reservation_id: r.id });
          check(c, { "cancelled": (x) => x.status === "cancelled" });
        } // else: left to expire (teardown cancels what the TTL has not released yet)
      }
    }
    await ws.call("pool.unsubscribe", { subscription: sub.subscription });
  } catch (e) {
    failed = true;
    console.warn(`ws buyer: ${e.reason || ""} ${e.message}`);
  } finally {
    unexpected.add(failed);
    ws.close();
  }
}

export function teardown({ buyers }) {
  const cancelled = cancelPending(buyers);
  console.log(`teardown: cancelled ${cancelled} pending reservations`);
  rpc("events.list", { limit: 1 }); // the server still answers
}
