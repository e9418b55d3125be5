// The sign-in page: finishes a SMART sign-in coming back here, offers one, or takes
// an API token; a signed-in user goes on to the page of their role.

import { HOME, finishSignIn, smartConfiguration, startSignIn, useToken, whoAmI } from "./session.js";
import { $, onSubmit, say } from "./ui.js";

// Decision 0039's scopes. Staff ask for write as well: the role still decides what a
// token may do, and an auditor's "verify now" is a POST.
const SCOPES = {
  patient: "launch/patient patient/*.read patient/Consent.write",
  clinician: "user/*.read user/*.write",
  auditor: "user/*.read user/*.write",
};

async function goHome() {
  const me = await whoAmI();
  if (me) location.replace(HOME[me.role] || "/portal/index.html");
}

async function main() {
  try {
    await finishSignIn();
    await goHome();
  } catch (error) {
    say("#status", error.message, "error");
  }
  onSubmit($("#smart-form"), "#status", async (data) => {
    const config = await smartConfiguration();
    if (!config) {
      say("#status", "This node offers no SMART sign-in; use an API token.", "error");
      return;
    }
    await startSignIn(config, SCOPES[data.get("role")] || SCOPES.patient);
  });
  onSubmit($("#token-form"), "#status", async (data) => {
    useToken(String(data.get("token") || ""));
    $("#token-form").reset();
    const me = await whoAmI();
    if (!me) {
      say("#status", "That token is not valid here.", "error");
      return;
    }
    location.assign(HOME[me.role] || "/portal/index.html");
  });
}

main();
