// Helpers of scripts/soak (node 20, no packages). Never prints a cookie or token value.
//
//   node soak.mjs upstream PORT
//       JSON API upstream on 127.0.0.1:PORT. Answers 401 invalid_token to a request whose Bearer
//       JWT is missing or past its `exp`; GET /_upstream/stats counts them.
//   node soak.mjs login BASE ISSUER COUNT SPREAD OUT
//       logs users soak-001..COUNT in through BASE/bff/login and the provider's form (password =
//       login), evenly over SPREAD seconds (so their tokens expire at different times), at most 8
//       at a time; writes one session cookie value per line to OUT (mode 0600).
//   node soak.mjs load COOKIES RATE SECONDS OUT BASE...
//       GET /api/items at RATE requests/s (open loop) for SECONDS; request n goes to session
//       n % sessions on BASE[floor(n / sessions) % bases], so each session alternates replicas.
//       Appends one JSON line per second to OUT: {t, sent, status: {"200": n, "503 store_unavailable": n, "conn": n, ...},
//       p50, p99, max} (latencies in ms of the requests that finished in that second).
//   node soak.mjs check COOKIES BASE...
//       every session on every replica (32 sessions at a time; a 5xx or refused connection is
//       asked again up to 5 times, 1 s apart); prints {"sessions", "ok", "lost", "statuses"}.
import * as fs from 'node:fs';
import * as http from 'node:http';

const [command, ...args] = process.argv.slice(2);
// Many sockets per replica: 200 browsers have connections of their own, so requests of a session
// that waits for its refresh must not hold up the others in a shared queue.
const agent = new http.Agent({ keepAlive: true, maxSockets: 1024 });
const TIMEOUT_MS = 30_000;
let reusedRetries = 0; // requests sent again after a reused connection turned out closed

// One request; resolves {status, headers, body} or {status: "conn" | "timeout"}. Like a browser,
// it tries once more when a reused keep-alive connection turns out closed (the
// server closed it while idle just as the request went out).
function request(url, { method = 'GET', headers = {}, body } = {}, retried = false) {
  return new Promise((resolve) => {
    const req = http.request(url, { method, headers, agent, timeout: TIMEOUT_MS }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString() }));
      res.on('error', () => resolve({ status: 'conn' }));
    });
    let timedOut = false;
    req.on('timeout', () => { timedOut = true; req.destroy(); resolve({ status: 'timeout' }); });
    req.on('error', () => {
      if (timedOut) return;
      if (req.reusedSocket && !retried) {
        reusedRetries += 1;
        resolve(request(url, { method, headers, body }, true));
      }
      else resolve({ status: 'conn' });
    });
    req.end(body);
  });
}

// GET /api/items as the session; the status, with Vestibule's error code when it made the error
// ("503 provider_unavailable").
async function api(base, cookie) {
  const reply = await request(`${base}/api/items`, { headers: { cookie: `vestibule=${cookie}`, 'x-csrf': '1' } });
  let code;
  if (reply.status !== 200 && typeof reply.status === 'number') {
    try { code = JSON.parse(reply.body).error; } catch { /* not one of Vestibule's errors */ }
  }
  return { ...reply, status: code ? `${reply.status} ${code}` : reply.status };
}

// ---- upstream ----------------------------------------------------------------------------------
function upstream(port) {
  const stats = { requests: 0, missing_token: 0, expired_token: 0 };
  const body = JSON.stringify({ id: 42, name: 'widget', tags: ['a', 'b', 'c'], price: 9.99 });
  http.createServer((req, res) => {
    if (req.url === '/_upstream/stats') return res.end(JSON.stringify(stats));
    stats.requests += 1;
    const bearer = /^Bearer (.+)$/.exec(req.headers.authorization ?? '')?.[1];
    let exp = 0;
    try { exp = JSON.parse(Buffer.from(bearer.split('.')[1], 'base64url')).exp; } catch { /* no JWT */ }
    if (!bearer || !(exp * 1000 > Date.now())) {
      stats[bearer ? 'expired_token' : 'missing_token'] += 1;
      res.writeHead(401, { 'www-authenticate': 'Bearer error="invalid_token"' });
      return res.end();
    }
    res.writeHead(200, { 'content-type': 'application/json' });
    return res.end(body);
  }).listen(port, '127.0.0.1', () => console.log(`upstream ready on ${port}`));
}

// ---- login -------------------------------------------------------------------------------------
// A browser in miniature: one cookie jar for all ports (like a browser on 127.0.0.1), redirects
// followed by hand.
async function loginOne(base, issuer, user) {
  const jar = new Map();
  const send = async (url, init = {}) => {
    const headers = { ...init.headers, accept: 'text/html' };
    if (jar.size) headers.cookie = [...jar].map(([k, v]) => `${k}=${v}`).join('; ');
    const reply = await request(url, { ...init, headers });
    for (const line of [reply.headers?.['set-cookie'] ?? []].flat()) {
      const [pair, ...attrs] = line.split(';');
      const at = pair.indexOf('=');
      const name = pair.slice(0, at).trim();
      const gone = at < 0 || pair.slice(at + 1) === '' || attrs.some((a) => /^\s*max-age=0\s*$/i.test(a));
      if (gone) jar.delete(name); else jar.set(name, pair.slice(at + 1));
    }
    return reply;
  };
  const follow = async (start, init) => {
    let url = start;
    let reply = await send(url, init);
    for (let hops = 0; reply.status >= 300 && reply.status < 400 && hops < 20; hops += 1) {
      url = new URL(reply.headers.location, url).href;
      if (url.startsWith(base) && !url.startsWith(`${base}/bff/`)) return { reply, url };
      reply = await send(url);
    }
    return { reply, url };
  };
  const form = await follow(`${base}/bff/login?returnUrl=/`);
  const uid = /\/interaction\/([^/?]+)$/.exec(new URL(form.url).pathname)?.[1];
  if (!uid || form.reply.status !== 200) throw new Error(`${user}: no login form (status ${form.reply.status})`);
  const done = await follow(`${issuer}/interaction/${uid}/login`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ login: user, password: user }).toString(),
  });
  const cookie = jar.get('vestibule');
  if (!cookie) throw new Error(`${user}: no session cookie after the callback (status ${done.reply.status})`);
  const check = await api(base, cookie);
  if (check.status !== 200) throw new Error(`${user}: the API answered ${check.status} after login`);
  return cookie;
}

async function login(base, issuer, count, spreadSeconds, out) {
  const cookies = new Array(count);
  const started = Date.now();
  let next = 0;
  const worker = async () => {
    while (next < count) {
      const i = next++;
      const due = started + (i * spreadSeconds * 1000) / count;
      if (due > Date.now()) await new Promise((r) => { setTimeout(r, due - Date.now()); });
      cookies[i] = await loginOne(base, issuer, `soak-${String(i + 1).padStart(3, '0')}`);
    }
  };
  await Promise.all(Array.from({ length: 8 }, worker));
  fs.writeFileSync(out, `${cookies.join('\n')}\n`, { mode: 0o600 });
  console.log(`logged in ${count} sessions`);
}

// ---- load --------------------------------------------------------------------------------------
const readCookies = (file) => fs.readFileSync(file, 'utf8').split('\n').filter(Boolean);

function percentile(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}

async function load(cookieFile, rate, seconds, out, bases) {
  const cookies = readCookies(cookieFile);
  const started = Date.now();
  const end = started + seconds * 1000;
  let sent = 0;
  let inFlight = 0;
  // Per wall-clock second: requests sent in it, and statuses and latencies of those finished in it.
  const buckets = new Map();
  const bucket = (ms = Date.now()) => {
    const t = Math.floor(ms / 1000);
    if (!buckets.has(t)) buckets.set(t, { sent: 0, status: {}, latencies: [] });
    return buckets.get(t);
  };
  const flush = (before) => {
    for (const [t, b] of [...buckets].sort((x, y) => x[0] - y[0])) {
      if (t >= before) break;
      const lat = b.latencies.sort((x, y) => x - y);
      const line = { t, sent: b.sent, status: b.status, in_flight: inFlight, reused_retries: reusedRetries,
        p50: percentile(lat, 50), p99: percentile(lat, 99), max: lat.at(-1) ?? null };
      fs.appendFileSync(out, `${JSON.stringify(line)}\n`);
      buckets.delete(t);
    }
  };
  const count = (status) => { const b = bucket().status; b[status] = (b[status] ?? 0) + 1; };
  const fire = (n, due) => {
    const cookie = cookies[n % cookies.length];
    const base = bases[Math.floor(n / cookies.length) % bases.length];
    inFlight += 1;
    bucket().sent += 1;
    api(base, cookie).then(({ status }) => {
      inFlight -= 1;
      count(status);
      bucket().latencies.push(Date.now() - due); // from when it was due: no coordinated omission
    });
  };
  while (Date.now() < end) {
    const due = Math.floor(((Date.now() - started) / 1000) * rate);
    for (; sent < due; sent += 1) {
      if (inFlight >= 4096) count('skipped');
      else fire(sent, started + (sent / rate) * 1000);
    }
    flush(Math.floor(Date.now() / 1000));
    await new Promise((r) => { setTimeout(r, 5); });
  }
  while (inFlight > 0 && Date.now() < end + TIMEOUT_MS) await new Promise((r) => { setTimeout(r, 50); });
  flush(Infinity);
}

// ---- check -------------------------------------------------------------------------------------
async function check(cookieFile, bases) {
  const cookies = readCookies(cookieFile);
  const statuses = {};
  let lost = 0;
  let next = 0;
  const worker = async () => {
    while (next < cookies.length) {
      await checkOne(cookies[next++]);
    }
  };
  const checkOne = async (cookie) => {
    let works = true;
    for (const base of bases) {
      let { status } = await api(base, cookie);
      // A 401 is a lost session; anything else (503 while a part recovers) is asked again.
      for (let tries = 0; status !== 200 && !String(status).startsWith('401') && tries < 5; tries += 1) {
        await new Promise((r) => { setTimeout(r, 1000); });
        ({ status } = await api(base, cookie));
      }
      statuses[status] = (statuses[status] ?? 0) + 1;
      if (status !== 200) works = false;
    }
    if (!works) lost += 1;
  };
  await Promise.all(Array.from({ length: 32 }, worker));
  console.log(JSON.stringify({ sessions: cookies.length, ok: cookies.length - lost, lost, statuses }));
}

const run = {
  upstream: () => upstream(Number(args[0])),
  login: () => login(args[0], args[1], Number(args[2]), Number(args[3]), args[4]),
  load: () => load(args[0], Number(args[1]), Number(args[2]), args[3], args.slice(4)),
  check: () => check(args[0], args.slice(1)),
}[command];
if (!run) {
  console.error('usage: node soak.mjs upstream|login|load|check ... (see the header)');
  process.exit(2);
}
Promise.resolve(run()).then(() => { if (command !== 'upstream') process.exit(0); }, (err) => {
  console.error(`soak.mjs ${command}: ${err.message}`);
  process.exit(1);
});
