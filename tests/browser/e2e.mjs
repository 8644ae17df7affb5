// Browser end-to-end tests: a real headless Chromium (playwright-core, Debian's /usr/bin/chromium)
// against the whole stack on free loopback ports — the test OpenID provider
// (tests/provider/provider.js), the sample API (examples/sample_api.rs) and Vestibule serving the
// sample SPA from public/.
//
//   node --test tests/browser/e2e.mjs
//
// Binaries: $VESTIBULE_BIN and $SAMPLE_API_BIN, else target/debug/vestibule and
// target/debug/examples/sample_api (build them first: cargo build --locked --bins --examples).
// playwright-core comes from tests/provider/node_modules (npm ci --prefix tests/provider); no
// browser is ever downloaded. $CHROMIUM overrides /usr/bin/chromium.
//
// Between Vestibule and the sample API sits a small pass-through ("tap") that records the
// Authorization header of every API request, so the refresh test can prove which access token
// the API received. It forwards everything else unchanged.
//
// The tests share one stack and run in order: alice logs in (context A), the token checks look at
// what context A received, bob logs in (context B), a second tab in context A lives through a
// token refresh, and finally alice logs out.

import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import { createRequire } from 'node:module';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const { chromium } = createRequire(path.join(REPO, 'tests/provider/package.json'))('playwright-core');

const VESTIBULE_BIN = process.env.VESTIBULE_BIN || path.join(REPO, 'target/debug/vestibule');
const SAMPLE_API_BIN = process.env.SAMPLE_API_BIN || path.join(REPO, 'target/debug/examples/sample_api');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

const API_AUDIENCE = 'https://api.example.test';
const CLIENT_ID = 'vestibule';
const ACCESS_TOKEN_TTL = 15; // seconds; short so that the refresh test need not wait long
const REFRESH_SKEW = 5; // seconds; Vestibule refreshes when the token expires within this
const START_DEADLINE_MS = 30_000; // for each part to become ready
const UI_TIMEOUT_MS = 10_000; // for any single browser wait

// ----------------------------------------------------------------------------------------------
// processes
// ----------------------------------------------------------------------------------------------

const runDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vestibule-e2e-'));
const children = []; // { name, child, exited }
let failed = false;

// Backstop: if this process dies without running the after() hook, take the parts with it.
process.on('exit', () => {
  for (const { child, exited } of children) {
    if (!exited.done) try { process.kill(-child.pid, 'SIGKILL'); } catch { /* gone */ }
  }
});

// Starts a part in its own process group, output to runDir/NAME.log. Resolves with the first
// stdout line that parses as JSON with ready: true; rejects if the part exits or the deadline
// passes first.
function startPart(name, command, args, { env = {}, readyLine = true } = {}) {
  const log = fs.createWriteStream(path.join(runDir, `${name}.log`));
  const child = spawn(command, args, {
    cwd: REPO,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  const exited = { done: false };
  const exit = new Promise((resolve) => child.on('exit', (code, signal) => {
    exited.done = true;
    resolve({ code, signal });
  }));
  children.push({ name, child, exited, exit });
  child.stderr.pipe(log, { end: false });
  let buffered = '';
  if (!readyLine) {
    child.stdout.pipe(log, { end: false });
    return;
  }
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${name} not ready within ${START_DEADLINE_MS} ms (${logTail(name)})`)), START_DEADLINE_MS);
    child.on('error', (error) => { clearTimeout(timer); reject(new Error(`${name}: ${error.message}`)); });
    exit.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`${name} exited during start-up (code ${code}, signal ${signal}): ${logTail(name)}`));
    });
    child.stdout.on('data', (chunk) => {
      log.write(chunk);
      buffered += chunk;
      let newline;
      while ((newline = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        try {
          const parsed = JSON.parse(line);
          if (parsed && parsed.ready === true) { clearTimeout(timer); resolve(parsed); }
        } catch { /* not the ready line */ }
      }
    });
  });
}

function logTail(name, lines = 30) {
  try {
    return fs.readFileSync(path.join(runDir, `${name}.log`), 'utf8').split('\n').slice(-lines).join('\n');
  } catch {
    return '(no log)';
  }
}

async function stopAll() {
  await Promise.all(children.map(async ({ child, exited, exit }) => {
    if (exited.done) return;
    try { process.kill(-child.pid, 'SIGTERM'); } catch { return; }
    const killed = await Promise.race([exit.then(() => true), sleep(3000).then(() => false)]);
    if (!killed) try { process.kill(-child.pid, 'SIGKILL'); } catch { /* gone */ }
    await exit;
  }));
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Free loopback ports for the parts whose port must be known before they start (Vestibule's
// public and admin listeners: the provider's client registration names the public one). The
// ports stay held until release(), just before Vestibule binds them, so that nothing started in
// between (our own parts, a parallel run) can take them.
async function reservePorts(count) {
  const servers = await Promise.all(Array.from({ length: count }, () => new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(server));
  })));
  return {
    ports: servers.map((s) => s.address().port),
    release: () => Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve)))),
  };
}

async function waitForHttp200(url, name) {
  const deadline = Date.now() + START_DEADLINE_MS;
  for (;;) {
    const part = children.find((c) => c.name === name);
    if (part?.exited.done) throw new Error(`${name} exited during start-up: ${logTail(name)}`);
    try {
      const response = await fetch(url);
      if (response.status === 200) return;
    } catch { /* not listening yet */ }
    if (Date.now() > deadline) throw new Error(`${url} did not answer 200 within ${START_DEADLINE_MS} ms: ${logTail(name)}`);
    await sleep(100);
  }
}

// The tap: forwards every request to the sample API unchanged and records its Authorization.
const apiCalls = []; // { path, authorization }
function startTap(upstreamPort) {
  const server = http.createServer((req, res) => {
    apiCalls.push({ path: req.url, authorization: req.headers.authorization ?? null });
    const forward = http.request({
      host: '127.0.0.1', port: upstreamPort, method: req.method, path: req.url, headers: req.headers,
    }, (upstream) => {
      res.writeHead(upstream.statusCode, upstream.rawHeaders);
      upstream.pipe(res);
    });
    forward.on('error', () => { res.writeHead(502); res.end(); });
    req.pipe(forward);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)));
}

// ----------------------------------------------------------------------------------------------
// the stack
// ----------------------------------------------------------------------------------------------

let issuer; // the provider's issuer URL
let app; // Vestibule's public origin, http://127.0.0.1:PORT
let adminUrl;
let tap;
let browser;

const toml = (s) => JSON.stringify(s); // TOML basic strings accept JSON's escapes

before(async () => {
  try {
    await setUp();
  } catch (error) {
    failed = true;
    throw error;
  }
});

async function setUp() {
  for (const [what, file] of [['vestibule', VESTIBULE_BIN], ['sample API', SAMPLE_API_BIN], ['Chromium', CHROMIUM]]) {
    assert.ok(fs.existsSync(file), `${what} not found at ${file} (build with cargo build --locked --bins --examples, or set the env var)`);
  }
  const reserved = await reservePorts(2);
  const [appPort, adminPort] = reserved.ports;
  app = `http://127.0.0.1:${appPort}`;
  adminUrl = `http://127.0.0.1:${adminPort}`;
  const clientSecret = crypto.randomBytes(24).toString('base64url');
  const sessionKey = execFileSync(VESTIBULE_BIN, ['keygen']).toString().trim();

  const providerConfig = {
    port: 0,
    access_token_ttl: ACCESS_TOKEN_TTL,
    clients: [{
      client_id: CLIENT_ID,
      client_secret: clientSecret,
      redirect_uris: [`${app}/bff/callback`],
      post_logout_redirect_uris: [`${app}/`],
      backchannel_logout_uri: `${app}/bff/backchannel-logout`,
    }],
    resources: [API_AUDIENCE],
    default_resource: API_AUDIENCE,
  };
  const providerConfigPath = path.join(runDir, 'provider.json');
  fs.writeFileSync(providerConfigPath, JSON.stringify(providerConfig, null, 2), { mode: 0o600 });
  const ready = await startPart('provider', 'node', [path.join(REPO, 'tests/provider/provider.js'), '--config', providerConfigPath]);
  issuer = ready.issuer;

  const api = await startPart('sample-api', SAMPLE_API_BIN, ['--listen', '127.0.0.1:0', '--issuer', issuer, '--audience', API_AUDIENCE]);
  tap = await startTap(Number(api.listen.split(':').pop()));
  const upstream = `http://127.0.0.1:${tap.address().port}`;

  const config = `
[server]
listen = ${toml(`127.0.0.1:${appPort}`)}
public_url = ${toml(app)}
bff_prefix = "/bff"

[admin]
listen = ${toml(`127.0.0.1:${adminPort}`)}

[log]
level = "info"
format = "json"

[oidc]
issuer = ${toml(issuer)}
allow_http_issuer = true
client_id = ${toml(CLIENT_ID)}
client_secret = "\${VESTIBULE_CLIENT_SECRET}"
client_auth = "client_secret_basic"
scopes = ["openid", "profile", "email", "offline_access"]
extra_auth_params = { prompt = "consent" }
roles_claim = "roles"
refresh_skew = "${REFRESH_SKEW}s"
post_logout_redirect = "/"

[session]
store = "memory"
cookie_name = "__Host-vestibule"
cookie_secure = false
same_site = "lax"
idle_timeout = "30m"
absolute_timeout = "12h"
keys = ["\${VESTIBULE_SESSION_KEY}"]

[[routes]]
path = "/api/"
upstream = ${toml(upstream)}
token = "user"

[[routes]]
path = "/api/beta/"
upstream = ${toml(upstream)}
token = "user"
feature = "new-dashboard"
require = { roles = ["beta-tester"] }

[[routes]]
path = "/"
static_dir = ${toml(path.join(REPO, 'public'))}
spa_fallback = "index.html"
auth = "none"

[features.new-dashboard]
public = false
beta = true
role = "beta-tester"
`;
  const configPath = path.join(runDir, 'vestibule.toml');
  fs.writeFileSync(configPath, config, { mode: 0o600 });
  // Vestibule prints no ready line: the admin /readyz says when it is.
  await reserved.release();
  startPart('vestibule', VESTIBULE_BIN, ['--config', configPath], {
    env: { VESTIBULE_SESSION_KEY: sessionKey, VESTIBULE_CLIENT_SECRET: clientSecret },
    readyLine: false,
  });
  await waitForHttp200(`${adminUrl}/readyz`, 'vestibule');

  // playwright launches with a fresh temporary --user-data-dir of its own (it refuses one in args).
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}

after(async () => {
  await browser?.close().catch(() => {});
  await stopAll();
  tap?.close();
  tap?.closeAllConnections();
  if (failed) {
    for (const { name } of children) process.stderr.write(`---- ${name} log (end) ----\n${logTail(name)}\n`);
    process.stderr.write(`e2e: logs kept in ${runDir}\n`);
  } else {
    fs.rmSync(runDir, { recursive: true, force: true });
  }
});

// A test whose failure keeps the logs and prints their ends.
function step(name, fn) {
  test(name, { timeout: 40_000 }, async (t) => {
    try {
      await fn(t);
    } catch (error) {
      failed = true;
      throw error;
    }
  });
}

// ----------------------------------------------------------------------------------------------
// provider control endpoints
// ----------------------------------------------------------------------------------------------

async function providerJson(pathname) {
  const response = await fetch(issuer + pathname);
  assert.equal(response.status, 200, `${pathname} answered ${response.status}`);
  return response.json();
}
const providerTokens = async (sub) => (await providerJson('/_test/tokens'))[sub];
const providerStats = () => providerJson('/_test/stats');
const jwtClaims = (jwt) => JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url'));

// ----------------------------------------------------------------------------------------------
// browser helpers
// ----------------------------------------------------------------------------------------------

// Everything a page receives. Playwright reports each response with its URL, status and all
// headers (Set-Cookie included, redirect hops too). Bodies come from the DevTools protocol: in
// full once a response has finished loading, and as the bytes arrive (streamResourceContent) for
// responses that stay open — an event stream, or a response the page never reads (the SPA ignores
// the body of a 401 from /bff/user, and Chromium then does not finish that response).
const decode = (base64) => Buffer.from(base64, 'base64').toString('latin1');

async function openRecordedPage(context) {
  const page = await context.newPage();
  page.setDefaultTimeout(UI_TIMEOUT_MS);
  const responses = [];
  page.on('response', (response) => {
    const entry = { url: response.url(), status: response.status(), headers: null };
    entry.headersDone = response.allHeaders().then((h) => { entry.headers = h; }, () => { entry.headers = response.headers(); });
    responses.push(entry);
  });
  const bodies = new Map(); // requestId -> { url, streamed, streamError, full, fullError, pending }
  const cdp = await context.newCDPSession(page);
  cdp.on('Network.responseReceived', ({ requestId, response }) => {
    const body = { url: response.url, streamed: '', full: null, pending: [] };
    bodies.set(requestId, body);
    body.pending.push(cdp.send('Network.streamResourceContent', { requestId }).then(
      ({ bufferedData }) => { body.streamed = decode(bufferedData) + body.streamed; },
      (error) => { body.streamError = error.message; },
    ));
  });
  cdp.on('Network.dataReceived', ({ requestId, data }) => {
    const body = bodies.get(requestId);
    if (body && data) body.streamed += decode(data);
  });
  cdp.on('Network.loadingFinished', ({ requestId }) => {
    const body = bodies.get(requestId);
    if (!body) return;
    body.pending.push(cdp.send('Network.getResponseBody', { requestId }).then(
      (got) => { body.full = got.base64Encoded ? decode(got.body) : got.body; },
      (error) => { body.fullError = error.message; },
    ));
  });
  await cdp.send('Network.enable');
  return { page, responses, bodies };
}

// Everything the page received so far, as one list of { where, text }.
async function received(recorded) {
  const parts = [];
  for (const entry of recorded.responses) {
    await entry.headersDone;
    parts.push({ where: `URL ${entry.url}`, text: entry.url });
    parts.push({ where: `headers of ${entry.url}`, text: JSON.stringify(entry.headers) });
  }
  for (const body of recorded.bodies.values()) {
    await Promise.all(body.pending);
    assert.ok(body.full !== null || !body.streamError,
      `the body of ${body.url} was read (${body.streamError}; ${body.fullError ?? 'not finished'})`);
    parts.push({ where: `body of ${body.url}`, text: body.full ?? body.streamed });
  }
  return parts;
}

// The places a token could hide in: the whole token and, for a JWT, its payload and signature
// (the header is the same for every token of the key).
function needles(tokens) {
  const out = [];
  for (const [kind, token] of Object.entries(tokens)) {
    assert.ok(typeof token === 'string' && token.length >= 20, `the provider reports a ${kind}`);
    out.push({ kind, part: 'whole', value: token });
    const segments = token.split('.');
    if (segments.length === 3) {
      out.push({ kind, part: 'payload', value: segments[1] });
      out.push({ kind, part: 'signature', value: segments[2] });
    }
  }
  return out;
}

async function assertNoTokens(recorded, tokens) {
  const { page } = recorded;
  const storage = await page.evaluate(() => ({
    cookie: document.cookie,
    localStorage: JSON.stringify(Object.entries(localStorage)),
    sessionStorage: JSON.stringify(Object.entries(sessionStorage)),
  }));
  const places = [
    { where: 'document.cookie', text: storage.cookie },
    { where: 'localStorage', text: storage.localStorage },
    { where: 'sessionStorage', text: storage.sessionStorage },
    ...(await received(recorded)),
  ];
  const found = [];
  for (const { where, text } of places) {
    for (const { kind, part, value } of needles(tokens)) {
      if (text.includes(value)) found.push(`${kind} (${part}) in ${where}`);
    }
  }
  assert.deepEqual(found, [], 'no token may reach the browser');
  return places.length;
}

// Signs in by the provider's form. The sample app tries a silent sign-in once per tab before it
// shows its login link (the tests at the end cover that); here the tab starts as if it had
// tried, so that no page is navigated away from before the recorder has read every body.
async function login(recorded, user) {
  const { page } = recorded;
  await page.addInitScript(() => sessionStorage.setItem('vestibule:silent-sign-in-tried', '1'));
  await page.goto(`${app}/`);
  await page.locator('#logged-out').waitFor({ state: 'visible' });
  await page.locator('#login').click();
  await page.waitForURL((url) => url.href.startsWith(`${issuer}/interaction/`));
  await page.fill('input[name="login"]', user);
  await page.fill('input[name="password"]', user);
  await Promise.all([page.waitForURL(`${app}/`), page.click('#submit')]);
  await page.locator('#logged-in').waitFor({ state: 'visible' });
}

// Clicks #call-api and answers the API result shown in #api-result, parsed.
async function callApi(page) {
  const [response] = await Promise.all([
    page.waitForResponse((r) => r.url() === `${app}/api/hello`),
    page.click('#call-api'),
  ]);
  await response.finished();
  await page.locator('#call-api:enabled').waitFor();
  const text = await page.locator('#api-result').textContent();
  assert.equal(response.status(), 200, `GET /api/hello answered ${response.status()}: ${text}`);
  return JSON.parse(text);
}

// ----------------------------------------------------------------------------------------------
// the tests
// ----------------------------------------------------------------------------------------------

let alice; // { context, tab: recorded page } — alice's browser, used until she logs out
let aliceTokens; // the tokens the provider issued at her login

step('alice logs in through the provider form and calls the API', async () => {
  const context = await browser.newContext();
  const tab = await openRecordedPage(context);
  alice = { context, tab };
  await login(tab, 'alice');
  assert.equal(await tab.page.locator('#user-name').textContent(), 'Alice Liddell');

  const result = await callApi(tab.page);
  assert.equal(result.sub, 'alice');
  assert.equal(result.message, 'Hello, alice');
  assert.deepEqual(result.roles, ['beta-tester']);
  assert.equal(result.aud, API_AUDIENCE);
  const shown = await tab.page.locator('#api-result').textContent();
  assert.match(shown, /beta-tester/);
});

step('no token reaches the browser; the session cookie is HttpOnly', async (t) => {
  assert.ok(alice, 'needs the login test');
  const issued = await providerTokens('alice');
  assert.equal(issued.grant_type, 'authorization_code');
  aliceTokens = {
    'access token': issued.access_token,
    'refresh token': issued.refresh_token,
    'ID token': issued.id_token,
  };
  // These are the tokens Vestibule really holds: the API received exactly this access token.
  const hello = apiCalls.filter((c) => c.path === '/api/hello');
  assert.equal(hello.at(-1)?.authorization, `Bearer ${issued.access_token}`);

  const places = await assertNoTokens(alice.tab, aliceTokens);
  assert.ok(places > 10, `checked ${places} places`);
  t.diagnostic(`no token in ${places} places (storage, URLs, headers, bodies)`);

  // The proxy's own cookies, as the browser stores them: every one HttpOnly, the session among them.
  const appCookies = (await alice.context.cookies(app)).filter((c) => !c.name.startsWith('_session')
    && !c.name.startsWith('_interaction'));
  const setByApp = new Set();
  for (const entry of alice.tab.responses.filter((r) => r.url.startsWith(`${app}/`))) {
    for (const line of (entry.headers['set-cookie'] || '').split('\n').filter(Boolean)) {
      setByApp.add(line.slice(0, line.indexOf('=')));
    }
  }
  assert.ok(setByApp.size > 0, 'Vestibule set a cookie');
  const session = appCookies.filter((c) => setByApp.has(c.name));
  assert.ok(session.length >= 1, `the session cookie is stored (set: ${[...setByApp]}, stored: ${appCookies.map((c) => c.name)})`);
  for (const cookie of session) assert.equal(cookie.httpOnly, true, `cookie ${cookie.name} is HttpOnly`);
  t.diagnostic(`Vestibule's cookies in the jar: ${session.map((c) => `${c.name} (HttpOnly, SameSite=${c.sameSite})`).join(', ')}`);
  const visible = await alice.tab.page.evaluate(() => document.cookie);
  for (const cookie of session) assert.ok(!visible.includes(cookie.name), `${cookie.name} is not in document.cookie`);
});

step('the beta panel shows for alice and not for bob', async () => {
  assert.ok(alice, 'needs the login test');
  assert.equal(await alice.tab.page.locator('#beta-panel').isVisible(), true, 'alice sees the beta panel');

  const context = await browser.newContext();
  try {
    const bob = await openRecordedPage(context);
    const { page } = bob;
    await login(bob, 'bob');
    assert.equal(await page.locator('#user-name').textContent(), 'Bob Builder');
    assert.equal(await page.locator('#beta-panel').isVisible(), false, 'bob does not see the beta panel');
    const result = await callApi(page);
    assert.equal(result.sub, 'bob');
    assert.deepEqual(result.roles, []);
    const issued = await providerTokens('bob');
    await assertNoTokens(bob, { 'access token': issued.access_token, 'refresh token': issued.refresh_token, 'ID token': issued.id_token });
  } finally {
    await context.close();
  }
});

step('a second tab shares the session and both keep working through a token refresh', async (t) => {
  assert.ok(alice && aliceTokens, 'needs the login and token tests');
  const first = await providerTokens('alice');
  assert.equal(first.access_token, aliceTokens['access token'], 'no refresh happened yet');
  const statsBefore = await providerStats();

  const second = await openRecordedPage(alice.context);
  await second.page.goto(`${app}/`);
  await second.page.locator('#logged-in').waitFor({ state: 'visible' });
  assert.equal(await second.page.locator('#user-name').textContent(), 'Alice Liddell');

  // Wait until the access token expires within the refresh skew (plus a margin).
  const refreshDue = (jwtClaims(first.access_token).exp - REFRESH_SKEW + 1) * 1000;
  await sleep(Math.max(0, refreshDue - Date.now()));
  const callsBefore = apiCalls.length;

  const [a, b] = await Promise.all([callApi(alice.tab.page), callApi(second.page)]);

  const statsAfter = await providerStats();
  const refreshes = statsAfter.refresh_token - statsBefore.refresh_token;
  const refreshErrors = statsAfter.token_errors.refresh_token - statsBefore.token_errors.refresh_token;
  assert.ok(refreshes >= 1, `refresh grants happened (${refreshes})`);
  assert.equal(refreshErrors, 0, 'no refresh grant failed');
  t.diagnostic(`refresh grants during the two calls: ${refreshes}`);

  const latest = await providerTokens('alice');
  assert.equal(latest.grant_type, 'refresh_token');
  assert.notEqual(latest.access_token, first.access_token);
  assert.notEqual(latest.refresh_token, first.refresh_token);

  // Which tokens the API received for the two calls: tokens issued by the refresh, not the old one.
  const history = await providerJson('/_test/tokens?history=1');
  const refreshed = new Set(history.filter((h) => h.sub === 'alice' && h.grant_type === 'refresh_token'
    && h.issued_at >= first.issued_at).map((h) => h.access_token));
  const calls = apiCalls.slice(callsBefore).filter((c) => c.path === '/api/hello');
  assert.equal(calls.length, 2);
  for (const call of calls) {
    const token = call.authorization?.replace(/^Bearer /, '');
    assert.notEqual(token, first.access_token, 'the API did not get the old access token');
    assert.ok(refreshed.has(token), 'the API got an access token from a refresh grant');
  }
  assert.equal(calls[0].authorization, calls[1].authorization, 'both tabs used the same, single refreshed token');
  assert.equal(calls[0].authorization, `Bearer ${latest.access_token}`);

  // The API results carry the new token's data.
  const claims = jwtClaims(latest.access_token);
  for (const result of [a, b]) {
    assert.equal(result.sub, claims.sub);
    assert.equal(result.aud, claims.aud);
    assert.deepEqual(result.roles, claims.roles);
  }

  // And the new tokens stay out of both tabs too.
  const newTokens = { 'access token': latest.access_token, 'refresh token': latest.refresh_token, 'ID token': latest.id_token };
  await assertNoTokens(alice.tab, newTokens);
  await assertNoTokens(second, newTokens);
  await second.page.close();
});

step('logout returns to the app logged out; the API then answers 401', async (t) => {
  assert.ok(alice, 'needs the login test');
  const { page } = alice.tab;
  const visited = [];
  page.on('framenavigated', (frame) => { if (frame === page.mainFrame()) visited.push(frame.url()); });
  const endSession = `${issuer}/session/end`;
  await Promise.all([
    page.waitForURL((url) => url.href.startsWith(`${endSession}?`)),
    page.click('#logout'),
  ]);
  // The provider's sign-out page submits itself and returns to the app.
  await page.waitForURL(`${app}/`);
  await page.locator('#logged-out').waitFor({ state: 'visible' });
  // The way out went through the provider's end-session endpoint and back to the app.
  assert.ok(visited.some((u) => u.startsWith(endSession)), `visited ${visited.join(' -> ')}`);
  assert.equal(page.url(), `${app}/`);
  assert.equal(await page.locator('#logged-in').isVisible(), false);
  const status = await page.evaluate(async () => (await fetch('/api/hello', { headers: { 'X-CSRF': '1' } })).status);
  assert.equal(status, 401);

  // Not asserted: RP-initiated logout sends the browser to the provider with id_token_hint, so the
  // ID token does pass through the browser at logout (in the redirect's Location and the URL).
  const idTokens = (await providerJson('/_test/tokens?history=1'))
    .filter((h) => h.sub === 'alice').map((h) => h.id_token).filter(Boolean);
  if (visited.some((u) => idTokens.some((idToken) => u.includes(idToken)))) {
    t.diagnostic('note: the logout redirect carries the ID token as id_token_hint');
  }
  await alice.context.close();
});

// Every URL the page's main frame requests from now on, redirect hops included.
function navigations(page) {
  const visited = [];
  page.on('request', (request) => {
    if (request.isNavigationRequest() && request.frame() === page.mainFrame()) visited.push(request.url());
  });
  return visited;
}

step('a first visit tries a silent sign-in and, with nobody signed in at the provider, shows the login', async () => {
  const context = await browser.newContext();
  try {
    const { page } = await openRecordedPage(context);
    const visited = navigations(page);
    await page.goto(`${app}/?tab=2`);
    await page.locator('#logged-out').waitFor({ state: 'visible' });
    const silent = visited.find((u) => u.startsWith(`${app}/bff/login?`));
    assert.ok(silent, `the app tried a silent sign-in: ${visited.join(' -> ')}`);
    assert.equal(new URL(silent).searchParams.get('prompt'), 'none');
    assert.ok(visited.some((u) => u === `${app}/?tab=2&login_error=login_required`),
      `the BFF came back with login_required: ${visited.join(' -> ')}`);
    assert.ok(!visited.some((u) => u.startsWith(`${issuer}/interaction/`)), 'no provider page was shown');
    assert.equal(page.url(), `${app}/?tab=2`, 'the flag is taken off the address bar');
    assert.equal(await page.locator('#status').textContent(), '');
    // Once per tab: a reload does not try again.
    const before = visited.length;
    await page.reload();
    await page.locator('#logged-out').waitFor({ state: 'visible' });
    assert.ok(!visited.slice(before).some((u) => u.includes('/bff/login')), `no second silent sign-in: ${visited.slice(before)}`);
  } finally {
    await context.close();
  }
});

step('cancelling at the provider login page returns to the app, which says so', async () => {
  const context = await browser.newContext();
  try {
    const { page } = await openRecordedPage(context);
    await page.goto(`${app}/`);
    await page.locator('#logged-out').waitFor({ state: 'visible' });
    const visited = navigations(page);
    await page.locator('#login').click();
    await page.waitForURL((url) => url.href.startsWith(`${issuer}/interaction/`));
    await Promise.all([page.waitForURL(`${app}/`), page.click('#cancel')]);
    await page.locator('#logged-out').waitFor({ state: 'visible' });
    assert.ok(visited.some((u) => u === `${app}/?login_error=access_denied`),
      `the BFF sent the browser back with access_denied: ${visited.join(' -> ')}`);
    assert.equal(page.url(), `${app}/`);
    assert.equal(await page.locator('#status').textContent(), 'Sign-in was cancelled at the identity provider.');
    assert.equal(await page.locator('#logged-in').isVisible(), false);
    // And signing in again works from there.
    await page.locator('#login').click();
    await page.waitForURL((url) => url.href.startsWith(`${issuer}/interaction/`));
    await page.fill('input[name="login"]', 'bob');
    await page.fill('input[name="password"]', 'bob');
    await Promise.all([page.waitForURL(`${app}/`), page.click('#submit')]);
    await page.locator('#logged-in').waitFor({ state: 'visible' });
  } finally {
    await context.close();
  }
});

step('with a provider session, a silent sign-in signs the app in without any page', async () => {
  const context = await browser.newContext();
  try {
    const first = await openRecordedPage(context);
    await login(first, 'bob');
    await first.page.close();
    // The app's session is gone (it expired, say); the provider's is not. Cookies ignore ports:
    // the provider's cookies for 127.0.0.1 stay in the jar, Vestibule's session cookie goes.
    const ours = (await context.cookies(app)).filter((c) => c.name === 'vestibule');
    assert.equal(ours.length, 1, 'the session cookie is in the jar');
    await context.clearCookies({ name: 'vestibule' });
    const { page } = await openRecordedPage(context);
    const visited = navigations(page);
    await page.goto(`${app}/#claims`);
    await page.locator('#logged-in').waitFor({ state: 'visible' });
    assert.equal(await page.locator('#user-name').textContent(), 'Bob Builder');
    const silent = visited.find((u) => u.startsWith(`${app}/bff/login?`));
    assert.ok(silent, `the app tried a silent sign-in: ${visited.join(' -> ')}`);
    assert.equal(new URL(silent).searchParams.get('prompt'), 'none');
    assert.ok(!visited.some((u) => u.startsWith(`${issuer}/interaction/`)), `no provider page: ${visited.join(' -> ')}`);
    assert.equal(page.url(), `${app}/#claims`, 'back where the app was');
  } finally {
    await context.close();
  }
});
