// Buyers over long-poll: the ws-buyers flow through POST /lp (a session per iteration, bound
// to the buyer's token), POST /lp/{session} for calls and GET /lp/{session}?cursor=N for the
// notifications (reservation.updated after a payment). Every request is tagged with a fixed
// URL name, so metrics do not multiply per session. A closed model and an open model run one
// after the other; each iteration closes its session, teardown cancels what is still pending.
//
//   k6 run -e BASE_URL=http://127.0.0.1:4000 -e ADMIN_EMAIL=… -e ADMIN_PASSWORD=… loadtest/k6/longpoll-buyers.js
import { check } from "k6";
import { Rate, Trend } from "k6/metrics";
import { LongPoll, rpc, setupEvent, registerBuyers, cancelPending, quantityFor, EXPECTED, TICKET_TYPES } from "./lib/jsonrpc.js";

const DURATION = __ENV.DURATION || "30s";
const VUS = Number(__ENV.VUS || 20);
const RATE = Number(__ENV.RATE || 20);
const BUYERS = Number(__ENV.BUYERS || 20);
const P95 = Number(__ENV.P95_MS || 1000);

const unexpected = new Rate("unexpected_errors");
const reserveTime = new Trend("reserve_duration", true);

export const options = {
  scenarios: {
    closed_loop: { executor: "constant-vus", vus: VUS, duration: DURATION, exec: "buyer", gracefulStop: "30s" },
    open_model: { executor: "constant-arrival-rate", rate: RATE, timeUnit: "1s", duration: DURATION,
      preAllocatedVUs: VUS, maxVUs: VUS * 4, exec: "buyer", startTime: DURATION, gracefulStop: "30s" },
  },
  thresholds: {
    unexpected_errors: ["rate<0.01"],
    checks: ["rate>0.99"],
    reserve_duration: [`p(95)<${P95}`],
    "http_req_duration{name:POST /lp/{session}}": [`p(95)<${P95}`],
    "http_req_failed{name:POST /lp/{session}}": ["rate<0.01"],
  },
};

export function setup() {
  const event = setupEvent("longpoll-buyers", TICKET_TYPES);
  return { event, buyers: registerBuyers(BUYERS, "lp-buyer") };
}

export function buyer({ event, buyers }) {
  const me = buyers[(__VU * 7 + __ITER) % buyers.length];
  let lp = null;
  let failed = false;
  try {
    lp = new LongPoll(me.token);
    const sub = lp.call("pool.subscribe", { event_id: event.id });
    const pools = new Map(sub.pools.map((p) => [p.ticket_type_id, p.available]));
    const tt = event.ticket_types[Math.floor(Math.random() * event.ticket_types.length)];
    const quantity = quantityFor(tt, pools.get(tt.id));
    if (quantity > 0) {
      const started = Date.now();
      let r = null;
      try {
        r = lp.call("tickets.reserve", { items: [{ ticket_type_id: tt.id, quantity }], idempotency_key: `lp-${__VU}-${__ITER}-${started}` });
      } catch (e) {
        if (!EXPECTED.has(e.reason)) throw e;
      }
      reserveTime.add(Date.now() - started);
      if (r) {
        const roll = Math.random();
        if (roll < 0.6) {
          const paid = lp.call("payments.create", { reservation_id: r.id, payment_token: "tok_ok" });
          check(paid, { "payment succeeded": (x) => x.reservation.status === "paid" });
          // The notification is waiting for the poll, so it returns at once.
          let told = false;
          for (let i = 0; i < 3 && !told; i++) {
            told = lp.poll("10s").some((m) => m.method === "reservation.updated" && m.params.reservation.id === r.id);
          }
          check(told, { "reservation.updated arrives by long-poll": (x) => x });
        } else if (roll < 0.9) {
          const c = lp.call("reservations.cancel", { reservation_id: r.id });
          check(c, { "cancelled": (x) => x.status === "cancelled" });
        } // else: left to expire
      }
    }
    lp.call("pool.unsubscribe", { subscription: sub.subscription });
  } catch (e) {
    failed = true;
    console.warn(`long-poll buyer: ${e.reason || ""} ${e.message}`);
  } finally {
    unexpected.add(failed);
    if (lp) lp.close();
  }
}

export function teardown({ buyers }) {
  console.log(`teardown: cancelled ${cancelPending(buyers)} pending reservations`);
  rpc("events.list", { limit: 1 });
}
