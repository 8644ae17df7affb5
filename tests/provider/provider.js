#!/usr/bin/env node
// Vestibule's test OpenID provider: a real OpenID Connect provider (npm `oidc-provider`) for the
// integration tests, the local demo and the benchmarks. Never use it for anything else: it keeps
// everything in memory, has hard-coded users and exposes unauthenticated /_test/ control endpoints.
//
// Start:   node tests/provider/provider.js --config <file.json>
//     or:  PROVIDER_CONFIG='{"port":0}' node tests/provider/provider.js
//     (no config at all = every default below)
//
// Once listening on 127.0.0.1 it prints exactly one line to stdout:
//     {"ready":true,"issuer":"http://127.0.0.1:PORT","port":PORT}
// Everything else (including oidc-provider's own notices) goes to stderr. SIGTERM/SIGINT exit 0.
//
// Config JSON (every field optional; unknown fields are an error):
//   port                 TCP port on 127.0.0.1; 0 (default) = any free port.
//   access_token_ttl     seconds, default 300. Applies to user access tokens (JWT or opaque) and to
//                        client_credentials tokens.
//   id_token_ttl         seconds, default 3600.
//   refresh_token_ttl    seconds, default 86400. Refresh tokens rotate on every use; replaying a
//                        rotated one is invalid_grant and revokes the whole grant.
//   session_ttl          seconds the provider's own login session lives, default 86400.
//   clients              array of client registrations, default one client:
//                        { "client_id": "vestibule", "client_secret": "vestibule-secret",
//                          "redirect_uris": ["http://127.0.0.1:8080/bff/callback",
//                                            "http://localhost:8080/bff/callback"],
//                          "post_logout_redirect_uris": ["http://127.0.0.1:8080/",
//                                                        "http://localhost:8080/"] }
//                        Fields: client_id, client_secret, redirect_uris, post_logout_redirect_uris,
//                        backchannel_logout_uri, token_endpoint_auth_method (default
//                        client_secret_basic). Any other OpenID client metadata (jwks,
//                        id_token_signed_response_alg, backchannel_logout_session_required, …)
//                        is passed to oidc-provider unchanged. Defaults added: grant_types
//                        authorization_code + refresh_token + client_credentials, response_types
//                        code, backchannel_logout_session_required true (so ID and logout tokens
//                        carry `sid`) when a backchannel_logout_uri is set.
//   resources            array of resource servers (RFC 8707), each either a URL string or
//                        { "url": "...", "scopes": ["api.read", ...] }. Default:
//                        ["https://api.example.test", "https://other-api.example.test"].
//                        Identifiers are matched as exact strings (mind trailing slashes).
//                        Access tokens for a resource are RS256 JWTs (typ at+jwt) with aud = it.
//   default_resource     resource used at the token endpoint when the request names none; default
//                        resources[0]. A login whose authorization request names no resource is
//                        granted every configured resource, so a later refresh_token grant may ask
//                        for any of them with resource=; the code exchange then yields a token for
//                        default_resource. With "resources": [] access tokens are opaque.
//   users                array of { "sub", "password", ...claims }; login is by `sub`. Every other
//                        property is a claim (name, email, roles, realm_access, …). Default alice
//                        (password alice, roles ["beta-tester"], realm_access.roles
//                        ["beta-tester"]) and bob (password bob, roles []).
//   bench_users          integer N: N more users, bench-0 … bench-(N-1), each with password
//                        "bench" and no claims (scripts/bench spreads its many sessions over them,
//                        as many users' are, not all one user's).
//   access_token_claims  user claims copied into user JWT access tokens; default
//                        ["roles", "realm_access"].
//   conform_id_token_claims  true: oidc-provider's conformIdTokenClaims, so that with the code
//                        flow the ID token carries only `sub` (and what the `claims` parameter
//                        asks for) and the scopes' claims come from the userinfo endpoint alone.
//                        Default false (every claim is in the ID token too).
//   dpop_require_nonce   true: every DPoP proof at the token endpoint must carry a server nonce
//                        (RFC 9449 §8; answered 400 use_dpop_nonce with one). Default false.
//                        DPoP itself is always on: a token request with a proof gets a bound
//                        token (token_type DPoP, cnf.jkt in JWT access tokens).
//   par                  false: no pushed authorization request endpoint (RFC 9126). Default true.
//   mtls                 {"cert", "key", "ca"} PEM files: also listen with https (client certificate
//                        requested, checked against ca) and turn on RFC 8705: tls_client_auth,
//                        self_signed_tls_client_auth, certificate-bound access tokens; discovery
//                        names that listener in mtls_endpoint_aliases.
//   acr_values           acr values the provider supports (acr_values_supported); default none.
//                        When set, a login's `acr` is the login form's optional `acr` field if it
//                        is one of them (a test's way of saying "the second factor was given"),
//                        else the first one; ID tokens carry it.
//
// ID token claims: `sub`, `roles`, `realm_access` and any custom user claim come with scope openid;
// name/given_name/family_name/preferred_username with `profile`; email/email_verified with `email`.
//
// Test control endpoints (unauthenticated, JSON), see README.md:
//   GET  /_test/stats         token-endpoint requests by grant type, revocations, back-channel logouts
//   GET  /_test/grants        per login (grant): sub, code and refresh grants, refresh errors, times of
//                             the refreshes, and how many refresh tokens were used once, twice, …
//   POST /_test/reset-stats   (also clears /_test/grants)
//   POST /_test/behaviour     {"token_delay_ms": n, "token_status": 503|null, "token_error": "..."};
//                             replaces the whole behaviour, {} resets it
//   GET  /_test/tokens        latest tokens issued per user sub (?history=1: every issue, oldest first)
//   POST /_test/logout        {"sub": "alice"}: ends alice's provider sessions, sends back-channel
//                             logout tokens, revokes the grants of those sessions
//   POST /_test/rotate-keys   new RS256 signing key becomes the signer; old ones stay in JWKS
//                             ({"drop_old": true} removes them instead)

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

// stdout carries exactly one line, the ready line; oidc-provider prints notices with console.info.
console.log = console.error;
console.info = console.error;

const log = (...args) => console.error('[test-provider]', ...args);

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

const DEFAULT_USERS = [
  {
    sub: 'alice',
    password: 'alice',
    name: 'Alice Liddell',
    given_name: 'Alice',
    family_name: 'Liddell',
    preferred_username: 'alice',
    email: 'alice@example.test',
    email_verified: true,
    roles: ['beta-tester'],
    realm_access: { roles: ['beta-tester'] },
  },
  {
    sub: 'bob',
    password: 'bob',
    name: 'Bob Builder',
    given_name: 'Bob',
    family_name: 'Builder',
    preferred_username: 'bob',
    email: 'bob@example.test',
    email_verified: true,
    roles: [],
    realm_access: { roles: [] },
  },
];

const DEFAULT_CLIENT = {
  client_id: 'vestibule',
  client_secret: 'vestibule-secret',
  redirect_uris: ['http://127.0.0.1:8080/bff/callback', 'http://localhost:8080/bff/callback'],
  post_logout_redirect_uris: ['http://127.0.0.1:8080/', 'http://localhost:8080/'],
};

const CONFIG_KEYS = new Set([
  'port', 'access_token_ttl', 'id_token_ttl', 'refresh_token_ttl', 'session_ttl', 'clients',
  'resources', 'default_resource', 'users', 'access_token_claims', 'conform_id_token_claims',
  'dpop_require_nonce', 'par', 'mtls', 'acr_values', 'bench_users',
]);

const PROFILE_CLAIMS = ['name', 'given_name', 'family_name', 'preferred_username'];
const EMAIL_CLAIMS = ['email', 'email_verified'];

function fail(message) {
  log(`configuration error: ${message}`);
  process.exit(1);
}

function readConfig() {
  let values;
  try {
    ({ values } = parseArgs({ options: { config: { type: 'string' } }, strict: true }));
  } catch (err) {
    log(err.message);
    log('usage: node provider.js [--config <file.json>]   (or JSON in env PROVIDER_CONFIG)');
    process.exit(2);
  }
  let text;
  let origin;
  if (values.config) {
    origin = values.config;
    try {
      text = fs.readFileSync(values.config, 'utf8');
    } catch (err) {
      fail(`cannot read ${values.config}: ${err.message}`);
    }
  } else if (process.env.PROVIDER_CONFIG) {
    origin = 'PROVIDER_CONFIG';
    text = process.env.PROVIDER_CONFIG;
  } else {
    return {};
  }
  try {
    const parsed = JSON.parse(text);
    if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
      fail(`${origin}: expected a JSON object`);
    }
    return parsed;
  } catch (err) {
    return fail(`${origin}: ${err.message}`);
  }
}

function seconds(raw, name, fallback) {
  const value = raw[name] ?? fallback;
  if (!Number.isInteger(value) || value <= 0) fail(`${name} must be a positive integer (seconds)`);
  return value;
}

function normaliseConfig(raw) {
  for (const key of Object.keys(raw)) {
    if (!CONFIG_KEYS.has(key)) fail(`unknown field "${key}" (known: ${[...CONFIG_KEYS].join(', ')})`);
  }

  const port = raw.port ?? 0;
  if (!Number.isInteger(port) || port < 0 || port > 65535) fail('port must be an integer 0..65535');

  for (const key of ['resources', 'users', 'clients', 'access_token_claims']) {
    if (raw[key] !== undefined && !Array.isArray(raw[key])) fail(`${key} must be an array`);
  }
  const resources = (raw.resources ?? ['https://api.example.test', 'https://other-api.example.test'])
    .map((r, i) => {
      const entry = typeof r === 'string' ? { url: r } : r;
      if (!entry || typeof entry.url !== 'string' || !URL.canParse(entry.url)) {
        fail(`resources[${i}] must be an absolute URL or {"url": ..., "scopes": [...]}`);
      }
      const scopes = entry.scopes ?? [];
      if (!Array.isArray(scopes) || !scopes.every((s) => typeof s === 'string' && s)) {
        fail(`resources[${i}].scopes must be an array of strings`);
      }
      return { url: entry.url, scopes };
    });
  const resourceUrls = resources.map((r) => r.url);
  const defaultResource = raw.default_resource ?? resourceUrls[0];
  if (defaultResource !== undefined && !resourceUrls.includes(defaultResource)) {
    fail(`default_resource ${defaultResource} is not one of resources`);
  }

  const users = [...(raw.users ?? DEFAULT_USERS)];
  if (!Array.isArray(users) || !users.every((u) => u && typeof u.sub === 'string' && u.sub && typeof u.password === 'string')) {
    fail('users must be an array of {"sub": string, "password": string, ...claims}');
  }
  const benchUsers = raw.bench_users ?? 0;
  if (!Number.isInteger(benchUsers) || benchUsers < 0 || benchUsers > 1000000) {
    fail('bench_users must be an integer from 0 to 1000000');
  }
  for (let i = 0; i < benchUsers; i++) users.push({ sub: `bench-${i}`, password: 'bench' });

  const clients = (raw.clients ?? [DEFAULT_CLIENT]).map((c, i) => {
    if (!c || typeof c.client_id !== 'string') fail(`clients[${i}].client_id is required`);
    const meta = {
      grant_types: ['authorization_code', 'refresh_token', 'client_credentials'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
      redirect_uris: [],
      ...c,
    };
    if (meta.backchannel_logout_uri && meta.backchannel_logout_session_required === undefined) {
      meta.backchannel_logout_session_required = true;
    }
    return meta;
  });

  const mtls = raw.mtls;
  if (mtls !== undefined && !(mtls && ['cert', 'key', 'ca'].every((k) => typeof mtls[k] === 'string'))) {
    fail('mtls must be {"cert": PEM file, "key": PEM file, "ca": PEM file of the client CA}');
  }
  const acrValues = raw.acr_values ?? [];
  if (!Array.isArray(acrValues) || !acrValues.every((a) => typeof a === 'string' && a)) {
    fail('acr_values must be an array of strings');
  }

  const accessTokenClaims = raw.access_token_claims ?? ['roles', 'realm_access'];
  if (!Array.isArray(accessTokenClaims)) fail('access_token_claims must be an array of claim names');

  return {
    port,
    accessTokenTtl: seconds(raw, 'access_token_ttl', 300),
    idTokenTtl: seconds(raw, 'id_token_ttl', 3600),
    refreshTokenTtl: seconds(raw, 'refresh_token_ttl', 86400),
    sessionTtl: seconds(raw, 'session_ttl', 86400),
    clients,
    resources,
    defaultResource,
    users: new Map(users.map((u) => [u.sub, u])),
    accessTokenClaims,
    conformIdTokenClaims: raw.conform_id_token_claims === true,
    dpopRequireNonce: raw.dpop_require_nonce === true,
    par: raw.par !== false,
    mtls,
    acrValues,
  };
}

const config = normaliseConfig(readConfig());

// ---------------------------------------------------------------------------------------------
// Storage: an in-memory adapter of our own. oidc-provider's bundled MemoryAdapter is an LRU capped
// at 1000 entries, which silently evicts sessions and refresh tokens under benchmark load. This one
// only forgets entries when they expire; it also lets /_test/logout find a user's sessions.
// ---------------------------------------------------------------------------------------------

class Store {
  entries = new Map(); // "Model:id" -> { payload, expiresAt (ms) | undefined }

  byGrant = new Map(); // grantId -> Set<"Model:id">

  sessionUids = new Map(); // session uid -> session id

  userCodes = new Map(); // user code -> id

  get(key) {
    const entry = this.entries.get(key);
    if (!entry) return undefined;
    if (entry.expiresAt !== undefined && entry.expiresAt <= Date.now()) {
      this.delete(key);
      return undefined;
    }
    return entry.payload;
  }

  set(model, id, payload, expiresIn) {
    const key = `${model}:${id}`;
    if (this.entries.has(key)) this.delete(key);
    const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : undefined;
    this.entries.set(key, { payload, expiresAt });
    if (payload.grantId) {
      if (!this.byGrant.has(payload.grantId)) this.byGrant.set(payload.grantId, new Set());
      this.byGrant.get(payload.grantId).add(key);
    }
    if (model === 'Session' && payload.uid) this.sessionUids.set(payload.uid, id);
    if (payload.userCode) this.userCodes.set(payload.userCode, id);
  }

  delete(key) {
    const entry = this.entries.get(key);
    if (!entry) return;
    this.entries.delete(key);
    const { payload } = entry;
    const id = key.slice(key.indexOf(':') + 1);
    if (payload.grantId) {
      const members = this.byGrant.get(payload.grantId);
      members?.delete(key);
      if (members?.size === 0) this.byGrant.delete(payload.grantId);
    }
    if (key.startsWith('Session:') && this.sessionUids.get(payload.uid) === id) {
      this.sessionUids.delete(payload.uid);
    }
    if (payload.userCode && this.userCodes.get(payload.userCode) === id) {
      this.userCodes.delete(payload.userCode);
    }
  }

  revokeGrant(grantId, model) {
    for (const key of [...(this.byGrant.get(grantId) ?? [])]) {
      if (!model || key.startsWith(`${model}:`)) this.delete(key);
    }
    if (!model) this.delete(`Grant:${grantId}`);
  }

  sessionsOf(accountId) {
    const found = [];
    for (const key of [...this.entries.keys()]) {
      if (!key.startsWith('Session:')) continue;
      const payload = this.get(key);
      if (payload?.accountId === accountId) found.push({ key, payload });
    }
    return found;
  }

  sweep() {
    for (const key of [...this.entries.keys()]) this.get(key);
  }
}

const store = new Store();
setInterval(() => store.sweep(), 30_000).unref();

class Adapter {
  constructor(model) {
    this.model = model;
  }

  async upsert(id, payload, expiresIn) {
    store.set(this.model, id, payload, expiresIn);
  }

  async find(id) {
    return store.get(`${this.model}:${id}`);
  }

  async findByUid(uid) {
    const id = store.sessionUids.get(uid);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode(userCode) {
    const id = store.userCodes.get(userCode);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const payload = store.get(`${this.model}:${id}`);
    if (payload) payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    store.delete(`${this.model}:${id}`);
  }

  async revokeByGrantId(grantId) {
    store.revokeGrant(grantId, this.model);
  }
}

// ---------------------------------------------------------------------------------------------
// Signing keys (RS256, generated at start-up; kid = RFC 7638 thumbprint, stable per key)
// ---------------------------------------------------------------------------------------------

function newSigningKey() {
  // Node 20 can deadlock when a KeyObject returned by generateKeyPairSync is exported as JWK (a GC
  // run during the export destroys the key-generation job, which waits on the mutex the export
  // holds; seen about one start in ten). Taking the key out as PEM and re-importing avoids it.
  const { privateKey: pem } = crypto.generateKeyPairSync('rsa', {
    modulusLength: 2048,
    publicKeyEncoding: { type: 'spki', format: 'pem' },
    privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
  });
  const jwk = crypto.createPrivateKey(pem).export({ format: 'jwk' });
  const thumbprint = crypto.createHash('sha256')
    .update(JSON.stringify({ e: jwk.e, kty: jwk.kty, n: jwk.n }))
    .digest('base64url');
  return { ...jwk, kid: thumbprint, alg: 'RS256', use: 'sig' };
}

let signingKeys = [newSigningKey()]; // the first one signs
const cookieKeys = [crypto.randomBytes(32).toString('base64url')];

// ---------------------------------------------------------------------------------------------
// Test state: stats, behaviour, captured tokens
// ---------------------------------------------------------------------------------------------

function freshStats() {
  return {
    authorization_code: 0,
    refresh_token: 0,
    client_credentials: 0,
    other_grants: 0,
    token_errors: { authorization_code: 0, refresh_token: 0, client_credentials: 0, other: 0 },
    revocations: 0,
    introspections: 0,
    backchannel_logouts_sent: 0,
    backchannel_logout_errors: 0,
  };
}

let stats = freshStats();
let behaviour = {};

// Per-grant (per-login) refresh counters for soak runs. A refresh token stands for one access-token
// lifetime (they rotate together), so its number of uses is the number of refresh grants per expiry.
// Keyed by a hash of the refresh token; no token value is kept or shown.
let grantStats = new Map(); // grantId -> { sub, authorization_code, refresh_token, ..., uses: Map }
let refreshTokenGrant = new Map(); // sha256(refresh token) -> grantId
const tokenHash = (value) => crypto.createHash('sha256').update(String(value)).digest('base64url');

function grantEntry(grantId, sub) {
  let entry = grantStats.get(grantId);
  if (!entry) {
    entry = { sub, authorization_code: 0, refresh_token: 0, refresh_token_errors: 0, refreshed_at: [], uses: new Map() };
    grantStats.set(grantId, entry);
  }
  return entry;
}

function countGrantUse(ctx, grantType, ok) {
  if (grantType !== 'authorization_code' && grantType !== 'refresh_token') return;
  let grantId = ctx.oidc?.entities?.Grant?.jti;
  const presented = grantType === 'refresh_token' ? tokenHash(ctx.oidc?.params?.refresh_token) : undefined;
  if (presented) grantId ??= refreshTokenGrant.get(presented);
  if (!grantId) return;
  const entry = grantEntry(grantId, ctx.oidc?.entities?.Account?.accountId);
  entry.sub ??= ctx.oidc?.entities?.Account?.accountId;
  if (grantType === 'authorization_code') {
    if (ok) entry.authorization_code += 1;
  } else {
    entry.uses.set(presented, (entry.uses.get(presented) ?? 0) + 1);
    if (ok) {
      entry.refresh_token += 1;
      entry.refreshed_at.push(Date.now());
    } else {
      entry.refresh_token_errors += 1;
    }
  }
  if (ok && ctx.body?.refresh_token) refreshTokenGrant.set(tokenHash(ctx.body.refresh_token), grantId);
}

function grantReport() {
  return [...grantStats.values()].map(({ uses, ...entry }) => {
    const histogram = {};
    for (const n of uses.values()) histogram[n] = (histogram[n] ?? 0) + 1;
    return { ...entry, uses_per_refresh_token: histogram };
  });
}
const latestTokens = new Map(); // sub (or "client:<id>") -> token set
const tokenHistory = []; // bounded list of every token response

const KNOWN_GRANTS = new Set(['authorization_code', 'refresh_token', 'client_credentials']);

function countGrant(grantType, ok) {
  const known = KNOWN_GRANTS.has(grantType);
  if (known) stats[grantType] += 1;
  else stats.other_grants += 1;
  if (!ok) stats.token_errors[known ? grantType : 'other'] += 1;
}

// ---------------------------------------------------------------------------------------------
// oidc-provider configuration
// ---------------------------------------------------------------------------------------------

const resourceByUrl = new Map(config.resources.map((r) => [r.url, r]));

// Claims by scope. Custom user claims (anything not listed here) ride on `openid` so they always
// reach the ID token, like roles and realm_access.
const userClaimNames = new Set();
for (const user of config.users.values()) {
  for (const name of Object.keys(user)) if (name !== 'password' && name !== 'sub') userClaimNames.add(name);
}
const openidClaims = ['sub', 'roles', 'realm_access',
  ...[...userClaimNames].filter((c) => ![...PROFILE_CLAIMS, ...EMAIL_CLAIMS, 'roles', 'realm_access'].includes(c))];
const CLAIMS = {
  openid: openidClaims,
  profile: PROFILE_CLAIMS,
  email: EMAIL_CLAIMS,
};
const OIDC_SCOPES = new Set(['openid', 'offline_access', ...Object.keys(CLAIMS)]);

function userClaims(user) {
  const { password, ...claims } = user;
  return claims;
}

const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ({
  '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
}[c]));

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head>
<body>
<h1>${escapeHtml(title)}</h1>
${body}
</body>
</html>
`;
}

// Outgoing requests (back-channel logout). The library's SSRF guard refuses loopback and private
// addresses; tests run their relying parties on 127.0.0.1, so loopback targets bypass the guard.
const LOOPBACK_HOSTS = new Set(['127.0.0.1', 'localhost', '[::1]']);
async function outgoingFetch(url, options) {
  const target = new URL(url);
  if (LOOPBACK_HOSTS.has(target.hostname)) delete options.dispatcher;
  const isLogout = options.body instanceof URLSearchParams && options.body.has('logout_token');
  try {
    const response = await fetch(url, options);
    if (isLogout) {
      if (response.status === 200 || response.status === 204) stats.backchannel_logouts_sent += 1;
      else stats.backchannel_logout_errors += 1;
    }
    return response;
  } catch (err) {
    if (isLogout) stats.backchannel_logout_errors += 1;
    throw err;
  }
}

function providerConfiguration() {
  return {
    adapter: Adapter,
    clients: config.clients,
    acrValues: config.acrValues,
    jwks: { keys: signingKeys },
    cookies: { keys: cookieKeys },
    claims: CLAIMS,
    conformIdTokenClaims: config.conformIdTokenClaims,
    async findAccount(ctx, sub) {
      const user = config.users.get(sub);
      if (!user) return undefined;
      return {
        accountId: sub,
        async claims() {
          return { ...userClaims(user), sub };
        },
      };
    },
    async extraTokenClaims(ctx, token) {
      if (!token.accountId) return undefined;
      const user = config.users.get(token.accountId);
      if (!user) return undefined;
      const extra = {};
      for (const name of config.accessTokenClaims) {
        if (user[name] !== undefined) extra[name] = user[name];
      }
      return extra;
    },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      dPoP: {
        enabled: true,
        nonceSecret: crypto.randomBytes(32),
        requireNonce: () => config.dpopRequireNonce,
      },
      pushedAuthorizationRequests: { enabled: config.par },
      introspection: { enabled: true },
      revocation: { enabled: true },
      backchannelLogout: { enabled: true },
      rpInitiatedLogout: {
        enabled: true,
        async logoutSource(ctx, form) {
          // The library's confirmation form (hidden xsrf) plus logout=yes; a browser submits it
          // by itself, a script POSTs /session/end/confirm with xsrf and logout=yes.
          ctx.body = page('Sign out', `${form.replace('</form>', '<input type="hidden" name="logout" value="yes"/></form>')}
<button type="submit" id="sign-out" form="op.logoutForm">Sign out</button>
<script>document.getElementById('op.logoutForm').submit();</script>`);
        },
        async postLogoutSuccessSource(ctx) {
          ctx.body = page('Signed out', '<p id="signed-out">You are signed out of the test provider.</p>');
        },
      },
      resourceIndicators: {
        enabled: true,
        async defaultResource(ctx, client, oneOf) {
          if (oneOf) {
            return oneOf.includes(config.defaultResource) ? config.defaultResource : oneOf[0];
          }
          if (ctx.oidc.route === 'token') {
            // code and refresh_token grants fall back to what was granted (useGrantedResource);
            // client_credentials gets the default resource.
            return ctx.oidc.params.grant_type === 'client_credentials' ? config.defaultResource : undefined;
          }
          // Authorization request without resource=: grant every resource.
          return config.resources.length ? config.resources.map((r) => r.url) : undefined;
        },
        async useGrantedResource() {
          return true;
        },
        async getResourceServerInfo(ctx, indicator) {
          const resource = resourceByUrl.get(indicator);
          if (!resource) throw new errors.InvalidTarget(`unknown resource ${indicator}`);
          return {
            audience: resource.url,
            scope: resource.scopes.join(' '),
            accessTokenFormat: 'jwt',
            accessTokenTTL: config.accessTokenTtl,
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    interactions: {
      url: (ctx, interaction) => `/interaction/${interaction.uid}`,
    },
    responseTypes: ['code'],
    pkce: { required: () => true },
    issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
    rotateRefreshToken: true,
    ttl: {
      AccessToken: config.accessTokenTtl,
      ClientCredentials: config.accessTokenTtl,
      AuthorizationCode: 60,
      IdToken: config.idTokenTtl,
      RefreshToken: config.refreshTokenTtl,
      Interaction: 3600,
      Session: config.sessionTtl,
      Grant: Math.max(config.sessionTtl, config.refreshTokenTtl),
    },
    routes: {
      authorization: '/auth',
      end_session: '/session/end',
      introspection: '/token/introspection',
      jwks: '/jwks',
      revocation: '/token/revocation',
      token: '/token',
      userinfo: '/me',
    },
    fetch: outgoingFetch,
    async renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = page('Error', `<pre id="error">${escapeHtml(out.error)}: ${escapeHtml(out.error_description ?? '')}</pre>`);
    },
  };
}


// ---------------------------------------------------------------------------------------------
// Token endpoint wrapper (behaviour, stats, token capture) as Koa middleware on the provider
// ---------------------------------------------------------------------------------------------

async function readBody(req, limit = 1 << 20) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw Object.assign(new Error('body too large'), { status: 413 });
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

async function tokenEndpointMiddleware(ctx, next) {
  const { path, method } = ctx;
  if (method === 'POST' && path === '/token') {
    if (behaviour.token_delay_ms) await sleep(behaviour.token_delay_ms);
    if (behaviour.token_status) {
      const body = new URLSearchParams(await readBody(ctx.req));
      countGrant(body.get('grant_type'), false);
      ctx.status = behaviour.token_status;
      ctx.set('Cache-Control', 'no-store');
      if (behaviour.token_status === 503) ctx.set('Retry-After', '1');
      ctx.body = {
        error: behaviour.token_error
          ?? (behaviour.token_status === 503 ? 'temporarily_unavailable' : 'server_error'),
        error_description: 'simulated by /_test/behaviour',
      };
      return;
    }
    await next();
    const grantType = ctx.oidc?.params?.grant_type;
    const ok = ctx.status === 200;
    countGrant(grantType, ok);
    countGrantUse(ctx, grantType, ok);
    // A token for a resource without scopes comes back with "scope": ""; leave it out instead.
    if (ok && ctx.body && typeof ctx.body === 'object' && ctx.body.scope === '') delete ctx.body.scope;
    if (ok && ctx.body && typeof ctx.body === 'object' && ctx.body.access_token) {
      const owner = ctx.oidc.entities.Account?.accountId ?? `client:${ctx.oidc.client?.clientId}`;
      const record = {
        sub: owner,
        client_id: ctx.oidc.client?.clientId,
        grant_type: grantType,
        issued_at: new Date().toISOString(),
        access_token: ctx.body.access_token,
        refresh_token: ctx.body.refresh_token,
        id_token: ctx.body.id_token,
      };
      latestTokens.set(owner, record);
      tokenHistory.push(record);
      if (tokenHistory.length > 10_000) tokenHistory.shift();
    }
    return;
  }
  await next();
  if (method === 'POST' && path === '/token/revocation' && ctx.status === 200) stats.revocations += 1;
  if (method === 'POST' && path === '/token/introspection' && ctx.status === 200) stats.introspections += 1;
}

// ---------------------------------------------------------------------------------------------
// Provider instance (rebuilt on key rotation; all state lives in `store`, so nothing is lost)
// ---------------------------------------------------------------------------------------------

let issuer;
let provider;
let providerHandler;

// RFC 8705 (config `mtls`): a second listener, https with a client certificate requested (not
// required), serves the same provider; discovery names it in `mtls_endpoint_aliases`. Client
// certificate authentication (`tls_client_auth` checked against the `ca`, and
// `self_signed_tls_client_auth`) and certificate-bound access tokens are on.
let mtlsOrigin;

function peerCertificate(ctx) {
  const peer = ctx.req.socket.getPeerCertificate?.();
  if (!peer || !peer.raw) return undefined;
  return new crypto.X509Certificate(peer.raw);
}

function withMtls(configuration) {
  if (!config.mtls) return configuration;
  configuration.features.mTLS = {
    enabled: true,
    certificateBoundAccessTokens: true,
    tlsClientAuth: true,
    selfSignedTlsClientAuth: true,
    getCertificate: peerCertificate,
    certificateAuthorized: (ctx) => ctx.req.socket.authorized === true,
    certificateSubjectMatches(ctx, property, expected) {
      const cert = peerCertificate(ctx);
      return property === 'tls_client_auth_subject_dn' && cert?.subject === expected;
    },
  };
  configuration.clientAuthMethods = [
    'none', 'client_secret_basic', 'client_secret_post', 'client_secret_jwt', 'private_key_jwt',
    'tls_client_auth', 'self_signed_tls_client_auth',
  ];
  configuration.discovery = {
    ...configuration.discovery,
    mtls_endpoint_aliases: {
      token_endpoint: `${mtlsOrigin}/token`,
      revocation_endpoint: `${mtlsOrigin}/token/revocation`,
      introspection_endpoint: `${mtlsOrigin}/token/introspection`,
      userinfo_endpoint: `${mtlsOrigin}/me`,
      pushed_authorization_request_endpoint: `${mtlsOrigin}/request`,
    },
  };
  return configuration;
}

function buildProvider() {
  const p = new Provider(issuer, withMtls(providerConfiguration()));
  p.use(tokenEndpointMiddleware);
  p.on('server_error', (ctx, err) => log('server_error', err));
  p.on('backchannel.error', (ctx, err, client) => log(`back-channel logout to ${client.clientId} failed: ${err.message}`));
  provider = p;
  providerHandler = p.callback();
}

// ---------------------------------------------------------------------------------------------
// Login interaction: /interaction/:uid (form), /interaction/:uid/login, /interaction/:uid/abort
// ---------------------------------------------------------------------------------------------

function send(res, status, body, type = 'application/json') {
  const text = type === 'application/json' ? `${JSON.stringify(body)}\n` : body;
  res.writeHead(status, {
    'Content-Type': `${type}; charset=utf-8`,
    'Content-Length': Buffer.byteLength(text),
    'Cache-Control': 'no-store',
  });
  res.end(text);
}

function loginForm(uid, clientId, { login = '', error } = {}) {
  return page('Sign in', `<p>Signing in to <code>${escapeHtml(clientId)}</code> at the Vestibule test provider.</p>
${error ? `<p id="error" role="alert">${escapeHtml(error)}</p>\n` : ''}<form id="login-form" method="post" action="/interaction/${escapeHtml(uid)}/login">
<p><label for="login">Login</label> <input id="login" name="login" autocomplete="username" autofocus value="${escapeHtml(login)}"></p>
<p><label for="password">Password</label> <input id="password" name="password" type="password" autocomplete="current-password"></p>
<p><button type="submit" id="submit">Sign in</button></p>
</form>
<form method="post" action="/interaction/${escapeHtml(uid)}/abort"><button type="submit" id="cancel">Cancel</button></form>`);
}

// Grants everything the authorization request asked for: consent is automatic.
async function grantEverything(details, accountId) {
  const { params } = details;
  let grant;
  if (details.grantId) grant = await provider.Grant.find(details.grantId);
  if (!grant) grant = new provider.Grant({ accountId, clientId: params.client_id });

  const requested = String(params.scope ?? '').split(' ').filter(Boolean);
  grant.addOIDCScope(requested.filter((s) => OIDC_SCOPES.has(s)).join(' '));

  if (params.claims) {
    try {
      const claims = JSON.parse(params.claims);
      const names = [...Object.keys(claims.id_token ?? {}), ...Object.keys(claims.userinfo ?? {})];
      if (names.length) grant.addOIDCClaims(names);
    } catch {
      // invalid claims parameter is rejected by the library before we get here
    }
  }

  let resources = params.resource;
  if (resources === undefined) resources = config.resources.map((r) => r.url);
  if (!Array.isArray(resources)) resources = [resources];
  for (const url of resources) {
    const known = resourceByUrl.get(url);
    grant.addResourceScope(url, known ? requested.filter((s) => known.scopes.includes(s)).join(' ') : '');
  }
  return grant.save();
}

async function handleInteraction(req, res, url) {
  const match = /^\/interaction\/([^/]+)(?:\/(login|abort))?$/.exec(url.pathname);
  if (!match) return send(res, 404, { error: 'not_found' });
  const [, uid, action] = match;

  let details;
  try {
    details = await provider.interactionDetails(req, res);
  } catch (err) {
    return send(res, 400, page('Error', `<p id="error">Login session not found or expired (${escapeHtml(err.message)}). Start the login again.</p>`), 'text/html');
  }
  if (details.uid !== uid) {
    return send(res, 400, page('Error', '<p id="error">This login page does not belong to your browser session.</p>'), 'text/html');
  }
  const clientId = details.params.client_id;

  if (!action) {
    if (req.method !== 'GET') return send(res, 405, { error: 'method_not_allowed' });
    if (details.prompt.name === 'login') {
      return send(res, 200, loginForm(uid, clientId), 'text/html');
    }
    // Already signed in at the provider; only consent is missing: grant it without asking.
    const grantId = await grantEverything(details, details.session.accountId);
    return provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
  }

  if (req.method !== 'POST') return send(res, 405, { error: 'method_not_allowed' });
  const form = new URLSearchParams(await readBody(req));

  if (action === 'abort') {
    return provider.interactionFinished(req, res, {
      error: 'access_denied',
      error_description: 'End-User aborted interaction',
    }, { mergeWithLastSubmission: false });
  }

  const login = form.get('login') ?? '';
  const password = form.get('password') ?? '';
  const user = config.users.get(login);
  const expected = Buffer.from(user?.password ?? '');
  const given = Buffer.from(password);
  const ok = user && expected.length === given.length && crypto.timingSafeEqual(expected, given);
  if (!ok) {
    return send(res, 401, loginForm(uid, clientId, { login, error: 'Invalid login or password.' }), 'text/html');
  }
  const grantId = await grantEverything(details, login);
  const askedAcr = form.get('acr');
  const acr = config.acrValues.includes(askedAcr) ? askedAcr : config.acrValues[0];
  return provider.interactionFinished(req, res, {
    login: { accountId: login, ...(acr ? { acr } : {}) },
    consent: { grantId },
  }, { mergeWithLastSubmission: false });
}

// ---------------------------------------------------------------------------------------------
// /_test/ control endpoints
// ---------------------------------------------------------------------------------------------

async function readJson(req) {
  const text = await readBody(req);
  if (!text.trim()) return {};
  const value = JSON.parse(text);
  if (value === null || typeof value !== 'object' || Array.isArray(value)) throw new Error('expected a JSON object');
  return value;
}

async function logoutUser(sub) {
  const sessions = store.sessionsOf(sub);
  const grants = new Set();
  const deliveries = [];
  for (const { payload } of sessions) {
    for (const [clientId, authorization] of Object.entries(payload.authorizations ?? {})) {
      if (authorization.grantId) grants.add(authorization.grantId);
      const client = await provider.Client.find(clientId);
      if (client?.backchannelLogoutUri) {
        deliveries.push(client.backchannelLogout(sub, authorization.sid).then(
          () => ({ client_id: clientId, sid: authorization.sid, ok: true }),
          (err) => {
            log(`back-channel logout to ${clientId} failed: ${err.message}`);
            return { client_id: clientId, sid: authorization.sid, ok: false, error: err.message };
          },
        ));
      }
    }
  }
  const results = await Promise.all(deliveries);
  for (const grantId of grants) store.revokeGrant(grantId);
  for (const { key } of sessions) store.delete(key);
  return { sessions_ended: sessions.length, grants_revoked: grants.size, backchannel_logouts: results };
}

async function handleTest(req, res, url) {
  const route = `${req.method} ${url.pathname}`;
  switch (route) {
    case 'GET /_test/stats':
      return send(res, 200, stats);
    case 'POST /_test/reset-stats':
      stats = freshStats();
      grantStats = new Map();
      refreshTokenGrant = new Map();
      return send(res, 200, stats);
    case 'GET /_test/grants':
      return send(res, 200, { grants: grantReport() });
    case 'GET /_test/behaviour':
      return send(res, 200, behaviour);
    case 'POST /_test/behaviour': {
      const body = await readJson(req);
      const next = {};
      if (body.token_delay_ms != null) {
        if (!Number.isInteger(body.token_delay_ms) || body.token_delay_ms < 0) {
          return send(res, 400, { error: 'token_delay_ms must be a non-negative integer' });
        }
        next.token_delay_ms = body.token_delay_ms;
      }
      if (body.token_status != null) {
        if (!Number.isInteger(body.token_status) || body.token_status < 200 || body.token_status > 599) {
          return send(res, 400, { error: 'token_status must be an HTTP status code or null' });
        }
        next.token_status = body.token_status;
      }
      if (body.token_error != null) next.token_error = String(body.token_error);
      behaviour = next;
      return send(res, 200, behaviour);
    }
    case 'GET /_test/tokens':
      if (url.searchParams.has('history')) return send(res, 200, tokenHistory);
      return send(res, 200, Object.fromEntries(latestTokens));
    case 'POST /_test/logout': {
      const body = await readJson(req);
      if (typeof body.sub !== 'string' || !body.sub) return send(res, 400, { error: 'sub is required' });
      return send(res, 200, await logoutUser(body.sub));
    }
    case 'POST /_test/rotate-keys': {
      const body = await readJson(req);
      const key = newSigningKey();
      signingKeys = body.drop_old ? [key] : [key, ...signingKeys];
      buildProvider();
      log(`signing key rotated: ${key.kid} now signs; JWKS kids ${signingKeys.map((k) => k.kid).join(', ')}`);
      return send(res, 200, { kid: key.kid, kids: signingKeys.map((k) => k.kid) });
    }
    default:
      return send(res, 404, { error: 'not_found', endpoints: [
        'GET /_test/stats', 'GET /_test/grants', 'POST /_test/reset-stats', 'GET|POST /_test/behaviour', 'GET /_test/tokens',
        'POST /_test/logout', 'POST /_test/rotate-keys'] });
  }
}

// ---------------------------------------------------------------------------------------------
// HTTP server
// ---------------------------------------------------------------------------------------------

const server = http.createServer(async (req, res) => {
  let url;
  try {
    url = new URL(req.url, issuer);
  } catch {
    return send(res, 400, { error: 'bad_request' });
  }
  try {
    if (url.pathname.startsWith('/_test/')) return await handleTest(req, res, url);
    if (url.pathname.startsWith('/interaction/')) return await handleInteraction(req, res, url);
    return providerHandler(req, res);
  } catch (err) {
    log(`error handling ${req.method} ${url.pathname}:`, err);
    if (!res.headersSent) return send(res, err.status ?? (err instanceof SyntaxError ? 400 : 500), { error: err.message });
    res.destroy();
    return undefined;
  }
});
server.keepAliveTimeout = 65_000;

server.on('error', (err) => {
  log(`cannot listen: ${err.message}`);
  process.exit(1);
});

server.listen(config.port, '127.0.0.1', async () => {
  const { port } = server.address();
  issuer = `http://127.0.0.1:${port}`;
  if (config.mtls) {
    const mtlsServer = https.createServer({
      cert: fs.readFileSync(config.mtls.cert),
      key: fs.readFileSync(config.mtls.key),
      ca: fs.readFileSync(config.mtls.ca),
      requestCert: true,
      rejectUnauthorized: false,
    }, server.listeners('request')[0]);
    await new Promise((resolve) => { mtlsServer.listen(0, '127.0.0.1', resolve); });
    mtlsOrigin = `https://127.0.0.1:${mtlsServer.address().port}`;
    log(`mutual TLS endpoints at ${mtlsOrigin}`);
  }
  try {
    buildProvider();
  } catch (err) {
    log('cannot configure oidc-provider:', err);
    process.exit(1);
  }
  log(`issuer ${issuer}; clients ${config.clients.map((c) => c.client_id).join(', ')}; resources ${config.resources.map((r) => r.url).join(', ') || '(none)'}`);
  process.stdout.write(`${JSON.stringify({ ready: true, issuer, port })}\n`);
});

function shutdown(signal) {
  log(`${signal}: shutting down`);
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
