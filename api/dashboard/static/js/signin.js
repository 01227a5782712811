// Sign in: check the key with a real API call (the cheapest authenticated one), then keep it for this tab.
import { api, ApiError, clearAlerts, getKey, setKey, showError, showNotice } from "./api.js";

const params = new URLSearchParams(location.search);
const reason = params.get("reason");
if (reason === "expired") {
  showError(new ApiError(401, "unauthorized", ""), "You were signed out");
} else if (reason === "signed-out") {
  showNotice("You are signed out: the key was removed from this tab.");
}

// Only local paths: a `next` pointing elsewhere would turn sign-in into an open redirect.
function nextPage() {
  const next = params.get("next") || "/ui/";
  return next.startsWith("/ui/") && !next.startsWith("//") ? next : "/ui/";
}

if (getKey() && !reason) location.replace(nextPage());

const form = document.getElementById("signin-form");
const input = document.getElementById("api-key");
input.focus();

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  clearAlerts();
  const key = input.value.trim();
  if (!key) {
    input.setAttribute("aria-invalid", "true");
    showError(new ApiError(0, "missing_key", "Enter your API key first."));
    return;
  }
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    await api("/v1/models?limit=1", { key });
    setKey(key);
    location.assign(nextPage());
  } catch (e) {
    input.setAttribute("aria-invalid", "true");
    showError(e, "Could not sign in");
  } finally {
    button.disabled = false;
  }
});
