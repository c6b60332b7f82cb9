// The bundled page and /client.js in headless Chromium (Debian's, driven by playwright-core),
// against the real server. Every wait is on a condition with a deadline.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { startServer } from "./server.mjs";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const SHORT_TTL_S = 4;
let server, shortServer, browser;

before(async () => {
  [server, shortServer] = await Promise.all([startServer(), startServer({ ttl: `${SHORT_TTL_S}s` })]);
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
      // Playwright gives every launch a fresh profile of its own (a --user-data-dir here is refused).
      "--no-first-run", "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  if (browser) await browser.close();
  await Promise.all([server, shortServer].filter(Boolean).map((s) => s.stop()));
});

let userCount = 0;
const email = () => `buyer-${process.pid}-${Date.now()}-${++userCount}@example.com`;

/** A fresh context and page; `blockWebSocket` refuses upgrades while `ws.blocked` is true. */
async function openPage(base, { path = "/", blockWebSocket = false } = {}) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 }, colorScheme: "light" });
  const ws = { blocked: blockWebSocket, attempts: 0, waiters: [] };
  // Resolves once the page has tried `n` upgrades, or rejects after `timeout` ms.
  ws.waitAttempts = (n, timeout) => new Promise((resolve, reject) => {
    if (ws.attempts >= n) { resolve(); return; }
    const timer = setTimeout(() => reject(new Error(`${ws.attempts} upgrade attempts, expected ${n}`)), timeout);
    ws.waiters.push({ n, resolve: () => { clearTimeout(timer); resolve(); } });
  });
  if (blockWebSocket) {
    await context.routeWebSocket(/\/ws(\?|$)/, (route) => {
      ws.attempts++;
      for (const w of ws.waiters.filter((x) => ws.attempts >= x.n)) w.resolve();
      if (ws.blocked) route.close({ code: 1011, reason: "blocked" });
      else route.connectToServer();
    });
  }
  const page = await context.newPage();
  const seen = { notFound: [], sent: [], pageErrors: [] };
  page.on("response", (r) => { if (r.status() === 404) seen.notFound.push(r.url()); });
  page.on("pageerror", (e) => seen.pageErrors.push(String(e)));
  page.on("websocket", (socket) => socket.on("framesent", (f) => seen.sent.push(String(f.payload))));
  page.on("request", (r) => { if (r.method() === "POST" && /\/lp\//.test(r.url())) seen.sent.push(r.postData() || ""); });
  await page.goto(base + path);
  return { context, page, ws, seen };
}

const badge = (page, text, timeout = 15000) => page.locator("#conn", { hasText: text }).waitFor({ timeout });

async function register(page) {
  await page.fill("#email", email());
  await page.fill("#password", "correct horse battery");
  await page.click("#register");
  await page.locator("#whoami").waitFor({ timeout: 15000 });
}

async function openEvent(page, name) {
  await page.locator("#event-list button", { hasText: name }).click();
  await page.locator("#detail-h", { hasText: name }).waitFor({ timeout: 10000 });
  await page.locator("#live-flag", { hasText: "Live availability" }).waitFor({ timeout: 10000 });
}

const row = (page, ticket) => page.locator("#reserve-form tbody tr", { hasText: ticket });
const available = async (page, ticket) => Number(await row(page, ticket).locator(".avail .n").textContent());

async function reserve(page, ticket, quantity) {
  await row(page, ticket).locator("input").fill(String(quantity));
  await page.click("#reserve-btn");
  await page.locator("#reserve-msg", { hasText: "Reserved!" }).waitFor({ timeout: 10000 });
  return page.locator("#mine li.res.fresh");
}

const sentCount = (seen, method) => seen.sent.filter((s) => s.includes(`"method":"${method}"`)).length;

/** Register, pick, reserve, countdown, pay declined then ok, reserve again and cancel. */
async function buyerFlow(page) {
  await register(page);
  await openEvent(page, "Aurora Nights");
  const before = await available(page, "General admission");
  const card = await reserve(page, "General admission", 2);
  await card.locator(".badge", { hasText: "pending" }).waitFor();
  const countdown = card.locator(".countdown");
  const first = await countdown.textContent();
  assert.match(first, /^\d+:\d\d$/);
  await page.waitForFunction((f) => document.querySelector("#mine li.res.fresh .countdown").textContent !== f, first, { timeout: 5000 });
  await page.waitForFunction((n) => document.querySelector('#reserve-form tr[data-row] .avail .n').textContent === String(n), before - 2, { timeout: 5000 });

  await card.locator("select[data-role=token]").selectOption("tok_declined");
  await card.locator("[data-role=pay]").click();
  await page.locator("#mine li.res.fresh .msg", { hasText: "declined" }).waitFor({ timeout: 10000 });
  await page.locator("#mine li.res.fresh .badge", { hasText: "pending" }).waitFor();

  await page.locator("#mine li.res.fresh select[data-role=token]").selectOption("tok_ok");
  await page.locator("#mine li.res.fresh [data-role=pay]").click();
  await page.locator("#mine li.res.fresh .badge", { hasText: "paid" }).waitFor({ timeout: 10000 });

  const second = await reserve(page, "General admission", 1);
  await page.waitForFunction((n) => document.querySelector('#reserve-form tr[data-row] .avail .n').textContent === String(n), before - 3, { timeout: 5000 });
  await second.locator("[data-role=cancel]").click();
  await page.locator("#mine li.res.fresh .badge", { hasText: "cancelled" }).waitFor({ timeout: 10000 });
  await page.waitForFunction((n) => document.querySelector('#reserve-form tr[data-row] .avail .n').textContent === String(n), before - 2, { timeout: 5000 });
}

test("the whole buyer flow over WebSocket, and the screenshot", async () => {
  const { context, page, seen } = await openPage(server.base);
  await badge(page, "Live · WebSocket");
  await buyerFlow(page);
  // A pending reservation on the screenshot shows the countdown.
  await reserve(page, "Front row pair", 2);
  await page.locator("#reserve-msg", { hasText: "Reserved!" }).waitFor();
  mkdirSync(join(root, "docs"), { recursive: true });
  await page.screenshot({ path: join(root, "docs", "screenshot.png") });
  assert.deepEqual(seen.pageErrors, []);
  await context.close();
});

test("the whole buyer flow with WebSocket blocked (long-poll)", async () => {
  const { context, page, ws, seen } = await openPage(server.base, { blockWebSocket: true });
  await badge(page, "Live · Long-poll");
  assert.ok(ws.attempts >= 1, "an upgrade was tried first");
  await buyerFlow(page);
  assert.ok(sentCount(seen, "tickets.reserve") >= 2);
  assert.deepEqual(seen.pageErrors, []);
  await context.close();
});

test("WebSocket blocked then unblocked: back on WebSocket within 30 s", async () => {
  const { context, page, ws } = await openPage(server.base, { blockWebSocket: true });
  await badge(page, "Live · Long-poll");
  // The page keeps probing in the background: wait for a refused probe, then unblock.
  await ws.waitAttempts(2, 20000); // the page probes the WebSocket again while on long-poll
  ws.blocked = false;
  const unblockedAt = Date.now();
  await badge(page, "Live · WebSocket", 30000);
  console.log(`back on WebSocket ${Date.now() - unblockedAt} ms after the unblock (${ws.attempts} upgrade attempts)`);
  // Still live after the switch: a reservation elsewhere moves the numbers here.
  await openEvent(page, "City Marathon");
  const before = await available(page, "Runner bib");
  const other = await openPage(server.base);
  await badge(other.page, "Live · WebSocket");
  await register(other.page);
  await openEvent(other.page, "City Marathon");
  await reserve(other.page, "Runner bib", 5);
  await page.waitForFunction((n) => [...document.querySelectorAll("#reserve-form tbody tr")]
    .some((tr) => tr.textContent.includes("Runner bib") && tr.querySelector(".avail .n").textContent === String(n)), before - 5, { timeout: 5000 });
  await other.context.close();
  await context.close();
});

test("a reservation in one browser changes the availability shown in another within 1 s", async () => {
  const a = await openPage(server.base);
  const b = await openPage(server.base, { path: "/?transport=longpoll" });
  await badge(a.page, "Live · WebSocket");
  await badge(b.page, "Live · Long-poll");
  await register(a.page);
  await openEvent(a.page, "Rust in Production");
  await openEvent(b.page, "Rust in Production");
  const before = await available(b.page, "Workshop seat");
  await reserve(a.page, "Workshop seat", 3);
  const answered = Date.now();
  await b.page.waitForFunction((n) => [...document.querySelectorAll("#reserve-form tbody tr")]
    .some((tr) => tr.textContent.includes("Workshop seat") && tr.querySelector(".avail .n").textContent === String(n)), before - 3, { timeout: 1000 });
  console.log(`seen in the other browser ${Date.now() - answered} ms after the reservation was shown`);
  // And back when it is cancelled.
  await a.page.locator("#mine li.res.fresh [data-role=cancel]").click();
  await b.page.waitForFunction((n) => [...document.querySelectorAll("#reserve-form tbody tr")]
    .some((tr) => tr.textContent.includes("Workshop seat") && tr.querySelector(".avail .n").textContent === String(n)), before, { timeout: 1000 });
  await a.context.close();
  await b.context.close();
});

test("a short TTL: the countdown reaches zero, the reservation expires and the tickets come back", async () => {
  const { context, page } = await openPage(shortServer.base);
  await badge(page, "Live · WebSocket");
  await register(page);
  await openEvent(page, "Aurora Nights");
  const before = await available(page, "Balcony");
  const card = await reserve(page, "Balcony", 4);
  await card.locator(".countdown").waitFor();
  await page.waitForFunction((n) => [...document.querySelectorAll("#reserve-form tbody tr")]
    .some((tr) => tr.textContent.includes("Balcony") && tr.querySelector(".avail .n").textContent === String(n)), before - 4, { timeout: 5000 });
  await page.waitForFunction(() => {
    const c = document.querySelector("#mine li.res.fresh .countdown");
    return c && c.textContent === "0:00";
  }, null, { timeout: (SHORT_TTL_S + 5) * 1000, polling: 100 }).catch(async (e) => {
    // The expiry may already have replaced the countdown; that is checked below.
    if (!(await page.locator("#mine li.res.fresh .badge", { hasText: "expired" }).count())) throw e;
  });
  await page.locator("#mine li.res.fresh .badge", { hasText: "expired" }).waitFor({ timeout: 15000 });
  await page.locator("#notices", { hasText: "expired" }).waitFor({ timeout: 5000 });
  await page.waitForFunction((n) => [...document.querySelectorAll("#reserve-form tbody tr")]
    .some((tr) => tr.textContent.includes("Balcony") && tr.querySelector(".avail .n").textContent === String(n)), before, { timeout: 5000 });
  await context.close();
});

test("clicking the event that is already open does not subscribe again", async () => {
  const { context, page, seen } = await openPage(server.base);
  await badge(page, "Live · WebSocket");
  await openEvent(page, "Chef's Table");
  const subscribes = sentCount(seen, "pool.subscribe");
  const unsubscribes = sentCount(seen, "pool.unsubscribe");
  for (let i = 0; i < 3; i++) await page.locator("#event-list button", { hasText: "Chef's Table" }).click();
  await page.locator("#live-flag", { hasText: "Live availability" }).waitFor();
  // A probe through the same socket settles that everything the clicks caused was sent.
  await page.evaluate(() => window.ticketClient.call("events.list", { limit: 1 }));
  assert.equal(sentCount(seen, "pool.subscribe"), subscribes, "no new subscription per click");
  assert.equal(sentCount(seen, "pool.unsubscribe"), unsubscribes);
  // Another event: the old subscription is dropped first.
  await openEvent(page, "City Marathon");
  await page.evaluate(() => window.ticketClient.call("events.list", { limit: 1 }));
  assert.equal(sentCount(seen, "pool.subscribe"), subscribes + 1);
  assert.equal(sentCount(seen, "pool.unsubscribe"), unsubscribes + 1);
  await context.close();
});

test("a quantity that breaks the rule is explained and refused before sending", async () => {
  const { context, page, seen } = await openPage(server.base);
  await badge(page, "Live · WebSocket");
  await register(page);
  await openEvent(page, "Aurora Nights");
  await row(page, "Front row pair").locator("input").fill("3");
  await page.click("#reserve-btn");
  await page.locator("#reserve-msg", { hasText: "multiples of 2" }).waitFor({ timeout: 5000 });
  assert.equal(await row(page, "Front row pair").locator("input").getAttribute("aria-invalid"), "true");
  assert.equal(sentCount(seen, "tickets.reserve"), 0, "nothing was sent");
  // A valid quantity goes through.
  await reserve(page, "Front row pair", 4);
  assert.equal(sentCount(seen, "tickets.reserve"), 1);
  await context.close();
});

test("no favicon 404 and no missing resource on load", async () => {
  const { context, page, seen } = await openPage(server.base);
  await badge(page, "Live · WebSocket");
  await page.locator("#event-list button").first().waitFor();
  const icon = await page.evaluate(() => document.querySelector("link[rel=icon]")?.href || "");
  assert.match(icon, /^data:image\/svg\+xml/);
  assert.deepEqual(seen.notFound, []);
  await context.close();
});
