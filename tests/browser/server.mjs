// Starts the real ticket-api binary on a random loopback port with a fresh data folder, and
// stops it. Shared by the browser tests and the k6 smoke runs.
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "../..");

/** The binary: $TICKET_API_BIN, else the release build, else the debug build. */
export function binary() {
  if (process.env.TICKET_API_BIN) return process.env.TICKET_API_BIN;
  for (const profile of ["release", "debug"]) {
    const path = join(root, "target", profile, "ticket-api");
    if (existsSync(path)) return path;
  }
  throw new Error("no ticket-api binary: run `cargo build --release` first");
}

async function healthy(base, deadline) {
  while (Date.now() < deadline) {
    try {
      const r = await fetch(`${base}/health`);
      if (r.ok) return true;
    } catch (_) { /* not listening yet */ }
    await new Promise((r) => setTimeout(r, 100));
  }
  return false;
}

/** Starts a demo server; resolves with {base, stop()}. Retries on another port if one is taken. */
export async function startServer({ ttl = "15m", extraArgs = [] } = {}) {
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = 20000 + Math.floor(Math.random() * 40000);
    const dir = mkdtempSync(join(tmpdir(), "ticket-api-browser-"));
    const child = spawn(binary(), ["--demo", "--listen", `127.0.0.1:${port}`, "--data-dir", join(dir, "data"),
      "--reservation-ttl", ttl, ...extraArgs], { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, RUST_LOG: "warn" } });
    let stderr = "";
    child.stderr.on("data", (d) => { stderr += d; });
    let exited = false;
    child.on("exit", () => { exited = true; });
    const base = `http://127.0.0.1:${port}`;
    const up = await healthy(base, Date.now() + 20000);
    if (up && !exited) {
      return {
        base,
        stderr: () => stderr,
        async stop() {
          if (!exited) {
            const gone = new Promise((r) => child.once("exit", r));
            child.kill("SIGTERM");
            const timer = setTimeout(() => child.kill("SIGKILL"), 15000);
            await gone;
            clearTimeout(timer);
          }
          rmSync(dir, { recursive: true, force: true });
        },
      };
    }
    child.kill("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
    if (!/address|in use/i.test(stderr)) throw new Error(`server did not start:\n${stderr}`);
  }
  throw new Error("no free port found");
}
