#!/usr/bin/env node
// Benchmark helper for scripts/bench: many real logins, and an exact number of requests.
//
//   node scripts/lib/bench-sessions.mjs login --start URL --cookie NAME --count N
//        [--concurrency C] [--user alice] [--password alice] [--users N [--first-user K]]
//        [--sso] [--out FILE]
//     Logs in N times, each time as a new browser (its own cookie jar) through the whole flow:
//     GET --start (e.g. Vestibule's /bff/login, or a page mod_auth_openidc protects), the
//     redirects to the provider, the provider's login form (POST login + password), the
//     redirects back to the relying party's callback, which exchanges the code at the
//     provider's token endpoint and sets its session cookie. Prints (or writes to FILE) the value
//     of cookie NAME, one line per login. C logins run at once (default 64).
//     --users N: login number i (counting from K, default 0) signs in as bench-((K + i) mod N)
//     with password bench (the provider's `bench_users`) instead of --user: many users' sessions,
//     as a deployment has, each user with a few (Vestibule caps one user's, `max_per_user`).
//     --sso: the browsers share one login at the provider (its session cookie, like one user on
//     many devices that signed in once): the provider then skips the form and asks nothing,
//     everything else is the same flow (authorize, code, callback, token exchange). The first
//     login goes through the form to get that provider session (with --users, one per user).
//
//   node scripts/lib/bench-sessions.mjs requests --url URL --cookie NAME --cookies FILE
//        --count N [--connections C] [--header 'Name: value']...
//     Sends exactly N GET requests over C keep-alive connections (default 32), cycling through
//     the cookie values in FILE; exits 1 if any answer is not 2xx. Used under callgrind, where
//     wrk's fixed duration would not give a fixed number of requests.
//
// Only for the benchmark: no TLS, cookies kept per origin by name (paths and expiry ignored).
import * as fs from 'node:fs';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

const [command, ...rest] = process.argv.slice(2);
const { values: opt } = parseArgs({
  args: rest,
  options: {
    start: { type: 'string' },
    url: { type: 'string' },
    cookie: { type: 'string' },
    cookies: { type: 'string' },
    count: { type: 'string' },
    concurrency: { type: 'string', default: '64' },
    connections: { type: 'string', default: '32' },
    user: { type: 'string', default: 'alice' },
    password: { type: 'string', default: 'alice' },
    users: { type: 'string' },
    'first-user': { type: 'string', default: '0' },
    header: { type: 'string', multiple: true, default: [] },
    sso: { type: 'boolean', default: false },
    out: { type: 'string' },
  },
});

const die = (message) => {
  console.error(`bench-sessions: ${message}`);
  process.exit(1);
};

const agent = new http.Agent({ keepAlive: true, maxSockets: 1024 });

function request(url, { method = 'GET', headers = {}, body } = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method, headers, agent }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString() }));
      res.on('error', reject);
    });
    req.on('error', reject);
    if (body) req.write(body);
    req.end();
  });
}

class Jar {
  constructor(from) {
    this.byOrigin = new Map(from ? [...from.byOrigin].map(([o, m]) => [o, new Map(m)]) : []);
  }
  header(url) {
    const m = this.byOrigin.get(url.origin);
    return m && m.size ? [...m].map(([k, v]) => `${k}=${v}`).join('; ') : undefined;
  }
  take(url, res) {
    const set = res.headers['set-cookie'] ?? [];
    if (!set.length) return;
    if (!this.byOrigin.has(url.origin)) this.byOrigin.set(url.origin, new Map());
    const m = this.byOrigin.get(url.origin);
    for (const line of set) {
      const pair = line.split(';', 1)[0];
      const eq = pair.indexOf('=');
      if (eq < 1) continue;
      const name = pair.slice(0, eq).trim();
      const value = pair.slice(eq + 1).trim();
      const expired = /;\s*max-age=0/i.test(line) || /;\s*expires=Thu, 01 Jan 1970/i.test(line);
      if (expired || value === '') m.delete(name);
      else m.set(name, value);
    }
  }
  value(name) {
    for (const m of this.byOrigin.values()) if (m.has(name)) return m.get(name);
    return undefined;
  }
}

// One browser's login; returns its jar.
async function login(start, jar) {
  let url = new URL(start);
  let method = 'GET';
  let body;
  for (let hops = 0; hops < 20; hops++) {
    // What a browser sends on a navigation (mod_auth_openidc answers 401 to non-HTML requests).
    const headers = { accept: 'text/html,application/xhtml+xml,*/*;q=0.8' };
    const cookie = jar.header(url);
    if (cookie) headers.cookie = cookie;
    if (body) {
      headers['content-type'] = 'application/x-www-form-urlencoded';
      headers['content-length'] = Buffer.byteLength(body);
    }
    const res = await request(url, { method, headers, body });
    jar.take(url, res);
    method = 'GET';
    body = undefined;
    if (res.status >= 300 && res.status < 400 && res.headers.location) {
      url = new URL(res.headers.location, url);
      continue;
    }
    const form = /<form id="login-form" method="post" action="([^"]+)"/.exec(res.body);
    if (res.status === 200 && form) {
      url = new URL(form[1].replace(/&amp;/g, '&'), url);
      method = 'POST';
      body = new URLSearchParams(jar.user ?? { login: opt.user, password: opt.password }).toString();
      continue;
    }
    jar.last = `${res.status} from ${url.origin}${url.pathname}`;
    return jar;
  }
  throw new Error('too many redirects');
}

async function loginMany() {
  const count = Number(opt.count);
  const concurrency = Math.max(1, Number(opt.concurrency));
  if (!opt.start || !opt.cookie || !(count > 0)) die('login needs --start, --cookie and --count');
  const users = opt.users === undefined ? 0 : Number(opt.users);
  if (opt.users !== undefined && !(users > 0)) die('--users needs a positive count');
  const firstUser = Number(opt['first-user']);
  // Login number i's user: bench-((K + i) mod N) with --users, else --user.
  const userOf = (i) => (users ? { login: `bench-${(firstUser + i) % users}`, password: 'bench' } : undefined);
  const slotOf = (i) => (users ? (firstUser + i) % users : 0);
  const values = [];
  // The shared provider login with --sso, per user: a browser of that user signs in once.
  const providers = new Map();
  const fresh = (i) => {
    const jar = new Jar(opt.sso ? providers.get(slotOf(i)) : undefined);
    jar.user = userOf(i);
    return jar;
  };
  const keepProvider = (i, jar) => {
    if (!opt.sso || providers.has(slotOf(i))) return;
    // Only the provider's cookies: every later browser is new to the relying party.
    const provider = new Jar(jar);
    provider.byOrigin.delete(new URL(opt.start).origin);
    providers.set(slotOf(i), provider);
  };
  if (opt.sso) {
    const first = await login(opt.start, fresh(0));
    const value = first.value(opt.cookie);
    if (!value) die(`the first login set no cookie ${opt.cookie}`);
    values.push(value);
    keepProvider(0, first);
  }
  let next = values.length;
  let failed = 0;
  const started = Date.now();
  async function worker() {
    while (next < count) {
      const i = next++;
      // A login that fails on the way (a connection reset when a keep-alive connection is
      // closed by its server just as the next request goes out) is started again from the
      // beginning, twice at most: one reset in 90,000 logins ended a whole growth run.
      for (let attempt = 1; ; attempt++) {
        try {
          const jar = await login(opt.start, fresh(i));
          keepProvider(i, jar);
          const value = jar.value(opt.cookie);
          if (value) values.push(value);
          else if (++failed <= 3) console.error(`bench-sessions: no cookie ${opt.cookie} after the login (last answer: ${jar.last})`);
          break;
        } catch (err) {
          if (attempt < 3) {
            console.error(`bench-sessions: login failed (${err.message}); starting it again`);
            continue;
          }
          if (++failed <= 3) console.error(`bench-sessions: login failed: ${err.message}`);
          break;
        }
      }
      if (values.length % 10000 === 0 && values.length) {
        console.error(`bench-sessions: ${values.length} logins, ${((Date.now() - started) / 1000).toFixed(1)} s`);
      }
    }
  }
  await Promise.all(Array.from({ length: concurrency }, worker));
  const seconds = (Date.now() - started) / 1000;
  const cpu = process.cpuUsage();
  console.error(`bench-sessions: ${values.length} logins (${failed} failed) in ${seconds.toFixed(1)} s, ` +
    `${(values.length / seconds).toFixed(0)}/s, concurrency ${concurrency}${opt.sso ? ', provider session shared' : ''}; ` +
    `this helper used ${((cpu.user + cpu.system) / 1000 / Math.max(1, values.length)).toFixed(2)} ms CPU per login`);
  if (failed) process.exitCode = 1;
  const text = values.join('\n') + '\n';
  if (opt.out) fs.writeFileSync(opt.out, text);
  else process.stdout.write(text);
}

async function requests() {
  const count = Number(opt.count);
  const connections = Math.max(1, Number(opt.connections));
  if (!opt.url || !opt.cookie || !opt.cookies || !(count > 0)) die('requests needs --url, --cookie, --cookies and --count');
  const cookies = fs.readFileSync(opt.cookies, 'utf8').split('\n').filter(Boolean);
  if (!cookies.length) die(`no cookies in ${opt.cookies}`);
  const extra = {};
  for (const h of opt.header) {
    const colon = h.indexOf(':');
    extra[h.slice(0, colon).trim()] = h.slice(colon + 1).trim();
  }
  const pool = new http.Agent({ keepAlive: true, maxSockets: connections });
  let sent = 0;
  let bad = 0;
  async function worker() {
    while (sent < count) {
      const i = sent++;
      const status = await new Promise((resolve, reject) => {
        const req = http.request(opt.url, {
          agent: pool,
          headers: { ...extra, cookie: `${opt.cookie}=${cookies[i % cookies.length]}` },
        }, (res) => {
          res.resume();
          res.on('end', () => resolve(res.statusCode));
        });
        req.on('error', reject);
        req.end();
      });
      if (status < 200 || status > 299) bad++;
    }
  }
  await Promise.all(Array.from({ length: connections }, worker));
  pool.destroy();
  console.error(`bench-sessions: ${count} requests, ${bad} not 2xx`);
  if (bad) process.exitCode = 1;
}

try {
  if (command === 'login') await loginMany();
  else if (command === 'requests') await requests();
  else die('usage: bench-sessions.mjs login|requests ... (see the header)');
} finally {
  agent.destroy();
}
