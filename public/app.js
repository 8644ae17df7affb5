// Vestibule sample SPA: no tokens here. The browser holds an httpOnly session cookie; the BFF
// answers /bff/* and attaches access tokens to /api/* requests on our behalf.
"use strict";

// Every BFF and API call carries X-CSRF: 1. A custom header cannot be sent cross-site without a
// CORS preflight, which the BFF never grants: that is the CSRF defence.
const CSRF = { "X-CSRF": "1" };
const SIGNED_OUT_ERRORS = ["session_expired", "unauthenticated"];
// Set in this tab once a silent sign-in was tried, so that it is tried once, not in a loop.
const SILENT_TRIED = "vestibule:silent-sign-in-tried";

// When the user (not the protocol) ended a sign-in at the provider, the BFF sends the browser back
// here with ?login_error=<code>: what to say for each.
const LOGIN_ERRORS = {
  access_denied: "Sign-in was cancelled at the identity provider.",
  login_required: "", // silent sign-in: nobody is signed in at the provider; nothing to report
  interaction_required: "Please log in to continue.",
  consent_required: "Please log in to continue.",
  account_selection_required: "Please log in to continue.",
};

// Takes ?login_error off the address bar (so a reload does not show it again) and returns it.
function takeLoginError() {
  const url = new URL(location.href);
  const code = url.searchParams.get("login_error");
  if (code === null) return null;
  url.searchParams.delete("login_error");
  history.replaceState(null, "", url.pathname + url.search + url.hash);
  return code;
}
const loginError = takeLoginError();

const $ = (id) => document.getElementById(id);
let events = null; // the EventSource for /bff/session-events while signed in

function show(view, message) {
  $("logged-out").hidden = view !== "logged-out";
  $("logged-in").hidden = view !== "logged-in";
  $("logout").hidden = view !== "logged-in";
  $("status").textContent = message || "";
}

// The path to come back to after login: a local path, never "//host" (the BFF refuses those).
function returnPath() {
  const path = location.pathname + location.search + location.hash;
  return path.startsWith("/") && !path.startsWith("//") ? path : "/";
}

function showLoggedOut(message) {
  if (events) {
    events.close();
    events = null;
  }
  $("login").href = "/bff/login?returnUrl=" + encodeURIComponent(returnPath());
  show("logged-out", message);
}

function displayName(user) {
  return user.name || user.preferred_username || user.email || user.sub || "unknown user";
}

function showLoggedIn(user) {
  $("user-name").textContent = displayName(user);
  const seconds = Number(user["bff:session_expires_in"]);
  $("session-info").textContent = Number.isFinite(seconds)
    ? `Session ends in ${Math.round(seconds / 60)} min unless you keep using it.`
    : "";
  const logoutUrl = user["bff:logout_url"];
  $("logout").href = typeof logoutUrl === "string" ? logoutUrl : "/";
  const features = Array.isArray(user["bff:features"]) ? user["bff:features"] : [];
  $("beta-panel").hidden = !features.includes("new-dashboard");
  const claims = Object.fromEntries(Object.entries(user).filter(([k]) => !k.startsWith("bff:")));
  $("claims").textContent = JSON.stringify(claims, null, 2);
  show("logged-in");
  watchSession();
}

// The BFF pushes `event: ended` when the session ends elsewhere (logout in another tab,
// back-channel logout from the provider, expiry). EventSource reconnects on its own.
function watchSession() {
  if (events || typeof EventSource === "undefined") return;
  events = new EventSource("/bff/session-events");
  events.addEventListener("ended", () => showLoggedOut("Your session has ended. Please log in again."));
}

async function readJson(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    return { status: response.status, body: text };
  }
}

async function loadUser() {
  try {
    const response = await fetch("/bff/user", {
      headers: CSRF,
      credentials: "same-origin",
      cache: "no-store",
    });
    if (response.status === 401) return signedOut();
    if (!response.ok) throw new Error(`the BFF answered ${response.status}`);
    sessionStorage.removeItem(SILENT_TRIED); // signed in: a later expiry may try again
    showLoggedIn(await response.json());
  } catch (error) {
    showLoggedOut(`Could not check your session (${error.message}). Try reloading the page.`);
  }
}

// No session here. Once per tab, try a silent sign-in first: the provider may still know the user
// (another app, an expired session here). It comes back signed in, or with
// ?login_error=login_required — never stopping at a provider page.
function signedOut() {
  if (loginError === null && !sessionStorage.getItem(SILENT_TRIED)) {
    sessionStorage.setItem(SILENT_TRIED, "1");
    location.assign("/bff/login?prompt=none&returnUrl=" + encodeURIComponent(returnPath()));
    return;
  }
  const message = loginError === null ? "" : LOGIN_ERRORS[loginError] ?? "Sign-in did not complete. Please try again.";
  showLoggedOut(message);
}

// Calls an API through the BFF and prints the answer into `output`.
async function callApi(path, button, output) {
  button.disabled = true;
  output.textContent = "Loading…";
  try {
    const response = await fetch(path, { headers: CSRF, credentials: "same-origin" });
    const body = await readJson(response);
    if (response.status === 401 && SIGNED_OUT_ERRORS.includes(body.error)) {
      return showLoggedOut("Your session has ended. Please log in again.");
    }
    const heading = response.ok ? "" : `HTTP ${response.status}\n`;
    output.textContent = heading + JSON.stringify(body, null, 2);
  } catch (error) {
    output.textContent = `Request failed: ${error.message}`;
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("call-api").addEventListener("click", (e) => callApi("/api/hello", e.currentTarget, $("api-result")));
  $("load-dashboard").addEventListener("click", (e) =>
    callApi("/api/beta/dashboard", e.currentTarget, $("beta-result")),
  );
  loadUser();
});
