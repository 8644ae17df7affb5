// Self-test of the test provider: node --test tests/provider/selftest.mjs
// Starts provider.js on a free port and drives it with plain fetch (manual redirects, cookies by
// hand), the way the Rust integration tests and a BFF will.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as http from 'node:http';
import { createInterface } from 'node:readline';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

const PROVIDER = fileURLToPath(new URL('./provider.js', import.meta.url));
const API = 'https://api.example.test'; // default resources[0] = default_resource
const OTHER_API = 'https://other-api.example.test';
const REDIRECT_URI = 'http://127.0.0.1:9/bff/callback'; // never followed
const POST_LOGOUT_URI = 'http://127.0.0.1:9/';
const AT_TTL = 120;

// ----------------------------------------------------------------------------------------------
// helpers
// ----------------------------------------------------------------------------------------------

const b64url = (buf) => Buffer.from(buf).toString('base64url');

function decodeJwt(jwt) {
  const [h, p, s] = jwt.split('.');
  assert.ok(s, 'a signed JWT has three parts');
  return {
    header: JSON.parse(Buffer.from(h, 'base64url')),
    payload: JSON.parse(Buffer.from(p, 'base64url')),
  };
}

async function verifyJwt(jwt) {
  const { header, payload } = decodeJwt(jwt);
  assert.equal(header.alg, 'RS256');
  const { keys } = await getJson('/jwks');
  const jwk = keys.find((k) => k.kid === header.kid);
  assert.ok(jwk, `kid ${header.kid} is in the JWKS`);
  const [h, p, s] = jwt.split('.');
  const ok = crypto.verify('RSA-SHA256', Buffer.from(`${h}.${p}`),
    crypto.createPublicKey({ key: jwk, format: 'jwk' }), Buffer.from(s, 'base64url'));
  assert.ok(ok, 'signature verifies against the JWKS');
  assert.equal(payload.iss, issuer);
  return { header, payload };
}

class CookieJar {
  cookies = new Map();

  update(response) {
    for (const line of response.headers.getSetCookie()) {
      const [pair, ...attrs] = line.split(';').map((s) => s.trim());
      const eq = pair.indexOf('=');
      const name = pair.slice(0, eq);
      const value = pair.slice(eq + 1);
      const expired = attrs.some((a) => /^max-age=0$/i.test(a)
        || (/^expires=/i.test(a) && Date.parse(a.slice(8)) <= Date.now()));
      if (expired || value === '') this.cookies.delete(name);
      else this.cookies.set(name, value);
    }
  }

  header() {
    return [...this.cookies].map(([k, v]) => `${k}=${v}`).join('; ');
  }
}

let child;
let issuer;
let stderr = '';
let discovery;

async function call(path, { jar, ...init } = {}) {
  const url = path.startsWith('http') ? path : `${issuer}${path}`;
  const headers = new Headers(init.headers);
  if (jar && jar.cookies.size) headers.set('cookie', jar.header());
  const response = await fetch(url, { redirect: 'manual', ...init, headers });
  jar?.update(response);
  return response;
}

async function getJson(path) {
  const response = await call(path);
  assert.equal(response.status, 200, `GET ${path}`);
  return response.json();
}

async function postJson(path, body) {
  const response = await call(path, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  assert.equal(response.status, 200, `POST ${path}`);
  return response.json();
}

const basic = (id, secret) => `Basic ${Buffer.from(`${encodeURIComponent(id)}:${encodeURIComponent(secret)}`).toString('base64')}`;

async function token(params, { clientId = 'bff', secret = 'bff-secret', post = false } = {}) {
  const body = new URLSearchParams(params);
  const headers = { 'content-type': 'application/x-www-form-urlencoded' };
  if (post) {
    body.set('client_id', clientId);
    body.set('client_secret', secret);
  } else {
    headers.authorization = basic(clientId, secret);
  }
  const response = await call(discovery.token_endpoint, { method: 'POST', headers, body });
  return { status: response.status, headers: response.headers, body: await response.json() };
}

// Authorization code + PKCE login through the HTML form; returns the token response.
async function login(user, password = user, jar = new CookieJar(), extra = {}) {
  const verifier = b64url(crypto.randomBytes(32));
  const state = b64url(crypto.randomBytes(12));
  const nonce = b64url(crypto.randomBytes(12));
  const auth = new URL(discovery.authorization_endpoint);
  auth.search = new URLSearchParams({
    client_id: 'bff',
    response_type: 'code',
    redirect_uri: REDIRECT_URI,
    scope: 'openid profile email offline_access',
    state,
    nonce,
    code_challenge: b64url(crypto.createHash('sha256').update(verifier).digest()),
    code_challenge_method: 'S256',
    ...extra,
  });

  let response = await call(auth.href, { jar });
  assert.equal(response.status, 303, 'authorization request redirects to the interaction');
  const interaction = response.headers.get('location');
  assert.match(interaction, /^\/interaction\/[\w-]+$/);

  response = await call(interaction, { jar });
  assert.equal(response.status, 200);
  const html = await response.text();
  assert.match(html, /name="login"/);
  assert.match(html, /name="password"/);
  assert.match(html, /id="submit"/);
  const action = /<form id="login-form" method="post" action="([^"]+)"/.exec(html)[1];
  assert.equal(action, `${interaction}/login`);

  const form = (pw) => ({
    method: 'POST',
    jar,
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ login: user, password: pw }),
  });
  response = await call(action, form(`${password}-wrong`));
  assert.equal(response.status, 401, 'bad credentials re-render the form');
  assert.match(await response.text(), /id="error"[^>]*>Invalid login or password/);

  response = await call(action, form(password));
  assert.equal(response.status, 303);
  // Resume at the authorization endpoint, then back to the client with a code (no consent page).
  let location = response.headers.get('location');
  for (let hops = 0; !location.startsWith(REDIRECT_URI); hops += 1) {
    assert.ok(hops < 5, 'too many redirects');
    response = await call(location, { jar });
    assert.ok([302, 303].includes(response.status), `redirect expected, got ${response.status}`);
    location = response.headers.get('location');
  }
  const callback = new URL(location);
  assert.equal(callback.searchParams.get('state'), state);
  assert.equal(callback.searchParams.get('iss'), issuer);
  const code = callback.searchParams.get('code');
  assert.ok(code, `code in ${location}`);

  const exchanged = await token({
    grant_type: 'authorization_code', code, redirect_uri: REDIRECT_URI, code_verifier: verifier,
  });
  assert.equal(exchanged.status, 200, JSON.stringify(exchanged.body));
  const idToken = decodeJwt(exchanged.body.id_token).payload;
  assert.equal(idToken.nonce, nonce);
  return { ...exchanged.body, jar };
}

// Relying party back-channel logout receiver
const received = [];
const receiver = http.createServer((req, res) => {
  let body = '';
  req.on('data', (c) => { body += c; });
  req.on('end', () => {
    received.push({ method: req.method, url: req.url, type: req.headers['content-type'], body });
    res.writeHead(200).end();
  });
});

// ----------------------------------------------------------------------------------------------
// lifecycle
// ----------------------------------------------------------------------------------------------

before(async () => {
  await new Promise((resolve) => { receiver.listen(0, '127.0.0.1', resolve); });
  const config = {
    port: 0,
    access_token_ttl: AT_TTL,
    clients: [
      {
        client_id: 'bff',
        client_secret: 'bff-secret',
        redirect_uris: [REDIRECT_URI],
        post_logout_redirect_uris: [POST_LOGOUT_URI],
        backchannel_logout_uri: `http://127.0.0.1:${receiver.address().port}/bff/backchannel-logout`,
      },
      {
        client_id: 'svc',
        client_secret: 'svc-secret',
        token_endpoint_auth_method: 'client_secret_post',
        grant_types: ['client_credentials'],
        response_types: [],
      },
    ],
  };
  child = spawn(process.execPath, [PROVIDER], {
    env: { ...process.env, PROVIDER_CONFIG: JSON.stringify(config) },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  child.stderr.on('data', (d) => { stderr += d; });
  const lines = createInterface({ input: child.stdout });
  const ready = await Promise.race([
    new Promise((resolve) => { lines.once('line', resolve); }),
    new Promise((_, reject) => { setTimeout(() => reject(new Error(`provider did not start:\n${stderr}`)), 10_000).unref(); }),
    new Promise((_, reject) => { child.once('exit', (c) => reject(new Error(`provider exited ${c}:\n${stderr}`))); }),
  ]);
  const parsed = JSON.parse(ready);
  assert.equal(parsed.ready, true);
  assert.equal(parsed.issuer, `http://127.0.0.1:${parsed.port}`);
  ({ issuer } = parsed);
  lines.on('line', (l) => assert.fail(`unexpected stdout line: ${l}`));
});

after(async () => {
  receiver.close();
  if (child && child.exitCode === null) {
    const exited = new Promise((resolve) => { child.once('exit', (code, signal) => resolve({ code, signal })); });
    child.kill('SIGTERM');
    const { code } = await exited;
    assert.equal(code, 0, 'clean exit on SIGTERM');
  }
});

// ----------------------------------------------------------------------------------------------
// tests (run in order, sharing state)
// ----------------------------------------------------------------------------------------------

let alice;

test('discovery document', async () => {
  discovery = await getJson('/.well-known/openid-configuration');
  assert.equal(discovery.issuer, issuer);
  assert.deepEqual(discovery.code_challenge_methods_supported, ['S256']);
  assert.equal(discovery.backchannel_logout_supported, true);
  for (const endpoint of ['token_endpoint', 'jwks_uri', 'end_session_endpoint',
    'revocation_endpoint', 'introspection_endpoint']) {
    assert.ok(discovery[endpoint]?.startsWith(issuer), endpoint);
  }
  assert.ok(discovery.grant_types_supported.includes('client_credentials'));
});

test('authorization code + PKCE login as alice, client_secret_basic', async () => {
  alice = await login('alice');
  assert.equal(alice.token_type, 'Bearer');
  assert.equal(alice.expires_in, AT_TTL);
  assert.ok(alice.refresh_token);

  const { payload: id } = await verifyJwt(alice.id_token);
  assert.equal(id.sub, 'alice');
  assert.equal(id.aud, 'bff');
  assert.equal(id.name, 'Alice Liddell');
  assert.equal(id.email, 'alice@example.test');
  assert.deepEqual(id.roles, ['beta-tester']);
  assert.deepEqual(id.realm_access, { roles: ['beta-tester'] });
  assert.ok(id.sid, 'sid in the ID token (client has a back-channel logout URI)');

  const { header, payload: at } = await verifyJwt(alice.access_token);
  assert.equal(header.typ, 'at+jwt');
  assert.equal(at.aud, API);
  assert.equal(at.sub, 'alice');
  assert.equal(at.client_id, 'bff');
  assert.deepEqual(at.roles, ['beta-tester']);
  assert.deepEqual(at.realm_access, { roles: ['beta-tester'] });
  assert.equal(at.exp - at.iat, AT_TTL);
});

let rotatedAway;

test('refresh with resource= another API: new audience, rotated refresh token', async () => {
  const refreshed = await token({ grant_type: 'refresh_token', refresh_token: alice.refresh_token, resource: OTHER_API });
  assert.equal(refreshed.status, 200, JSON.stringify(refreshed.body));
  const { payload: at } = await verifyJwt(refreshed.body.access_token);
  assert.equal(at.aud, OTHER_API);
  assert.deepEqual(at.roles, ['beta-tester']);
  assert.ok(refreshed.body.refresh_token);
  assert.notEqual(refreshed.body.refresh_token, alice.refresh_token, 'refresh token rotated');
  assert.equal(decodeJwt(refreshed.body.id_token).payload.name, 'Alice Liddell');

  // and without resource= the default resource again
  const again = await token({ grant_type: 'refresh_token', refresh_token: refreshed.body.refresh_token });
  assert.equal(again.status, 200, JSON.stringify(again.body));
  assert.equal(decodeJwt(again.body.access_token).payload.aud, API);

  const tokens = await getJson('/_test/tokens');
  assert.equal(tokens.alice.access_token, again.body.access_token);
  assert.equal(tokens.alice.refresh_token, again.body.refresh_token);
  assert.equal(tokens.alice.id_token, again.body.id_token);

  rotatedAway = alice.refresh_token;
  alice = { ...alice, ...again.body };
});

test('reusing a rotated refresh token is invalid_grant (and revokes the grant)', async () => {
  const reused = await token({ grant_type: 'refresh_token', refresh_token: rotatedAway });
  assert.equal(reused.status, 400);
  assert.equal(reused.body.error, 'invalid_grant');
  const current = await token({ grant_type: 'refresh_token', refresh_token: alice.refresh_token });
  assert.equal(current.body.error, 'invalid_grant', 'whole grant revoked after replay');
});

let bobRefreshToken;

test('concurrent refreshes with one refresh token: exactly one wins', async () => {
  const bob = await login('bob');
  bobRefreshToken = bob.refresh_token;
  const results = await Promise.all([1, 2, 3].map(() => token({ grant_type: 'refresh_token', refresh_token: bob.refresh_token })));
  assert.deepEqual(results.map((r) => r.status).sort(), [200, 400, 400]);
  assert.ok(results.filter((r) => r.status === 400).every((r) => r.body.error === 'invalid_grant'));
});

test('grant stats: refresh grants per login and uses of each refresh token', async () => {
  const { grants } = await getJson('/_test/grants');
  const of = (sub) => grants.filter((g) => g.sub === sub);
  assert.equal(of('alice').length, 1, JSON.stringify(grants));
  assert.equal(of('bob').length, 1, JSON.stringify(grants));
  const [a] = of('alice');
  assert.equal(a.authorization_code, 1);
  assert.equal(a.refresh_token, 2);
  assert.equal(a.refresh_token_errors, 2, 'the replay and the refresh after the revocation');
  assert.equal(a.refreshed_at.length, 2);
  // first refresh token: used, then replayed; second: used once; third: revoked, tried once
  assert.deepEqual(a.uses_per_refresh_token, { 1: 2, 2: 1 });
  const [b] = of('bob');
  assert.equal(b.refresh_token, 1);
  assert.equal(b.refresh_token_errors, 2);
  assert.deepEqual(b.uses_per_refresh_token, { 3: 1 }, 'one refresh token, three concurrent uses');
  assert.ok(!JSON.stringify(grants).includes(bobRefreshToken), 'no token values');
});

test('stats count the token-endpoint grants', async () => {
  const stats = await getJson('/_test/stats');
  assert.equal(stats.authorization_code, 2);
  assert.equal(stats.refresh_token, 4 + 3);
  assert.equal(stats.token_errors.refresh_token, 2 + 2);
  assert.equal(stats.client_credentials, 0);
  const reset = await postJson('/_test/reset-stats', {});
  assert.equal(reset.refresh_token, 0);
  assert.deepEqual((await getJson('/_test/grants')).grants, [], 'reset-stats clears the grant stats');
});

test('behaviour: token_status 503 and token_delay_ms', async () => {
  assert.deepEqual(await postJson('/_test/behaviour', { token_status: 503 }), { token_status: 503 });
  const down = await token({ grant_type: 'client_credentials' }, { clientId: 'svc', secret: 'svc-secret', post: true });
  assert.equal(down.status, 503);
  assert.equal(down.body.error, 'temporarily_unavailable');
  assert.equal(down.headers.get('retry-after'), '1');

  await postJson('/_test/behaviour', { token_delay_ms: 300 });
  const started = Date.now();
  const slow = await token({ grant_type: 'client_credentials' }, { clientId: 'svc', secret: 'svc-secret', post: true });
  assert.equal(slow.status, 200);
  assert.ok(Date.now() - started >= 300, 'delayed');

  assert.deepEqual(await postJson('/_test/behaviour', {}), {});
  const stats = await getJson('/_test/stats');
  assert.equal(stats.client_credentials, 2);
  assert.equal(stats.token_errors.client_credentials, 1);
});

test('client_credentials with and without a resource', async () => {
  const svc = { clientId: 'svc', secret: 'svc-secret', post: true };
  const other = await token({ grant_type: 'client_credentials', resource: OTHER_API }, svc);
  assert.equal(other.status, 200, JSON.stringify(other.body));
  const { payload } = await verifyJwt(other.body.access_token);
  assert.equal(payload.aud, OTHER_API);
  assert.equal(payload.sub, 'svc');
  assert.equal(payload.roles, undefined);

  const dflt = await token({ grant_type: 'client_credentials' }, svc);
  assert.equal(decodeJwt(dflt.body.access_token).payload.aud, API);

  const unknown = await token({ grant_type: 'client_credentials', resource: 'https://nope.example.test' }, svc);
  assert.equal(unknown.status, 400);
  assert.equal(unknown.body.error, 'invalid_target');

  const tokens = await getJson('/_test/tokens');
  assert.equal(tokens['client:svc'].access_token, dflt.body.access_token);
});

test('existing provider session: no login form; prompt=consent is answered automatically', async () => {
  const jar = new CookieJar();
  await login('alice', 'alice', jar);
  const authorize = async (extra) => {
    const verifier = b64url(crypto.randomBytes(32));
    const auth = new URL(discovery.authorization_endpoint);
    auth.search = new URLSearchParams({
      client_id: 'bff', response_type: 'code', redirect_uri: REDIRECT_URI, scope: 'openid profile offline_access',
      code_challenge: b64url(crypto.createHash('sha256').update(verifier).digest()), code_challenge_method: 'S256',
      ...extra,
    });
    let location = auth.href;
    const visited = [];
    while (!location.startsWith(REDIRECT_URI)) {
      assert.ok(visited.length < 6, `too many redirects: ${visited}`);
      const response = await call(location, { jar });
      assert.ok([302, 303].includes(response.status), `${location} answered ${response.status}`);
      visited.push(new URL(location, issuer).pathname);
      location = response.headers.get('location');
    }
    const code = new URL(location).searchParams.get('code');
    const exchanged = await token({ grant_type: 'authorization_code', code, redirect_uri: REDIRECT_URI, code_verifier: verifier });
    assert.equal(exchanged.status, 200, JSON.stringify(exchanged.body));
    return { visited, tokens: exchanged.body };
  };
  const silent = await authorize({});
  assert.deepEqual(silent.visited, ['/auth'], 'straight back with a code');
  assert.equal(decodeJwt(silent.tokens.id_token).payload.sub, 'alice');
  const consent = await authorize({ prompt: 'consent', resource: OTHER_API });
  assert.equal(consent.visited[1].startsWith('/interaction/'), true, 'consent interaction visited');
  assert.equal(decodeJwt(consent.tokens.access_token).payload.aud, OTHER_API, 'resource named in the request');
  assert.equal(consent.tokens.scope, undefined, 'empty scope left out of the token response');
  // a login that named one resource cannot refresh into another (RFC 8707)
  const refused = await token({ grant_type: 'refresh_token', refresh_token: consent.tokens.refresh_token, resource: API });
  assert.equal(refused.body.error, 'invalid_target');
});

test('cancel on the login page returns access_denied to the client', async () => {
  const jar = new CookieJar();
  const auth = new URL(discovery.authorization_endpoint);
  auth.search = new URLSearchParams({
    client_id: 'bff', response_type: 'code', redirect_uri: REDIRECT_URI, scope: 'openid', state: 's1',
    code_challenge: b64url(crypto.randomBytes(32)), code_challenge_method: 'S256',
  });
  let response = await call(auth.href, { jar });
  const interaction = response.headers.get('location');
  response = await call(`${interaction}/abort`, { method: 'POST', jar });
  assert.equal(response.status, 303);
  response = await call(response.headers.get('location'), { jar });
  const back = new URL(response.headers.get('location'));
  assert.equal(back.origin + back.pathname, REDIRECT_URI);
  assert.equal(back.searchParams.get('error'), 'access_denied');
  assert.equal(back.searchParams.get('state'), 's1');
});

test('revocation of a refresh token', async () => {
  const bob = await login('bob');
  assert.deepEqual(decodeJwt(bob.id_token).payload.roles, []);
  assert.equal(decodeJwt(bob.id_token).payload.name, 'Bob Builder');
  const response = await call(discovery.revocation_endpoint, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded', authorization: basic('bff', 'bff-secret') },
    body: new URLSearchParams({ token: bob.refresh_token, token_type_hint: 'refresh_token' }),
  });
  assert.equal(response.status, 200);
  const refresh = await token({ grant_type: 'refresh_token', refresh_token: bob.refresh_token });
  assert.equal(refresh.body.error, 'invalid_grant');
  assert.equal((await getJson('/_test/stats')).revocations, 1);
});

test('/_test/logout sends a signed back-channel logout token and ends the grant', async () => {
  received.length = 0;
  const fresh = await login('alice');
  const { sid } = decodeJwt(fresh.id_token).payload;

  const result = await postJson('/_test/logout', { sub: 'alice' });
  // alice has three provider sessions by now (one per cookie jar above): one logout token each
  assert.equal(result.sessions_ended, 3);
  assert.equal(received.length, 3);
  assert.ok(result.backchannel_logouts.every((d) => d.ok));
  const delivery = received.find((d) => decodeJwt(new URLSearchParams(d.body).get('logout_token')).payload.sid === sid);
  assert.ok(delivery, 'a logout token for the latest session');
  assert.equal(delivery.method, 'POST');
  assert.equal(delivery.url, '/bff/backchannel-logout');
  assert.equal(delivery.type, 'application/x-www-form-urlencoded');
  const logoutToken = new URLSearchParams(delivery.body).get('logout_token');
  assert.ok(logoutToken, 'body has a logout_token');
  const { header, payload } = await verifyJwt(logoutToken);
  assert.equal(header.typ, 'logout+jwt');
  assert.equal(payload.aud, 'bff');
  assert.equal(payload.sub, 'alice');
  assert.equal(payload.sid, sid);
  assert.ok(payload.jti);
  assert.equal(payload.nonce, undefined);
  assert.deepEqual(payload.events, { 'http://schemas.openid.net/event/backchannel-logout': {} });

  const refresh = await token({ grant_type: 'refresh_token', refresh_token: fresh.refresh_token });
  assert.equal(refresh.body.error, 'invalid_grant', 'tokens of the ended session are revoked');
  assert.equal((await getJson('/_test/stats')).backchannel_logouts_sent, 3);

  // the provider session is gone: a new authorization request asks for the login form again
  const again = await call(`${discovery.authorization_endpoint}?${new URLSearchParams({
    client_id: 'bff', response_type: 'code', redirect_uri: REDIRECT_URI, scope: 'openid',
    code_challenge: b64url(crypto.randomBytes(32)), code_challenge_method: 'S256',
  })}`, { jar: fresh.jar });
  assert.match(again.headers.get('location'), /^\/interaction\//);
});

test('RP-initiated logout with id_token_hint sends back-channel logout', async () => {
  received.length = 0;
  const bob = await login('bob');
  const jar = bob.jar;
  const endSession = new URL(discovery.end_session_endpoint);
  endSession.search = new URLSearchParams({
    id_token_hint: bob.id_token, post_logout_redirect_uri: POST_LOGOUT_URI, state: 'bye',
  });
  let response = await call(endSession.href, { jar });
  assert.equal(response.status, 200);
  const html = await response.text();
  const xsrf = /name="xsrf" value="([^"]+)"/.exec(html)[1];
  assert.match(html, /name="logout" value="yes"/);
  response = await call(`${issuer}/session/end/confirm`, {
    method: 'POST',
    jar,
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ xsrf, logout: 'yes' }),
  });
  assert.equal(response.status, 303);
  assert.equal(response.headers.get('location'), `${POST_LOGOUT_URI}?state=bye`);
  assert.equal(received.length, 1);
  const logoutToken = new URLSearchParams(received[0].body).get('logout_token');
  assert.equal(decodeJwt(logoutToken).payload.sub, 'bob');
});

test('key rotation keeps old keys in JWKS, signs with the new one, sessions survive', async () => {
  const before = await login('alice');
  const oldKid = decodeJwt(before.id_token).header.kid;
  const rotated = await postJson('/_test/rotate-keys', {});
  assert.notEqual(rotated.kid, oldKid);
  assert.deepEqual(rotated.kids, [rotated.kid, oldKid]);
  const { keys } = await getJson('/jwks');
  assert.deepEqual(keys.map((k) => k.kid), [rotated.kid, oldKid]);

  await verifyJwt(before.id_token); // old tokens still verify
  const refreshed = await token({ grant_type: 'refresh_token', refresh_token: before.refresh_token });
  assert.equal(refreshed.status, 200, JSON.stringify(refreshed.body));
  assert.equal((await verifyJwt(refreshed.body.id_token)).header.kid, rotated.kid);
  assert.equal((await verifyJwt(refreshed.body.access_token)).header.kid, rotated.kid);
});
