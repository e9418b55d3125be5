// The sign-in page: finishes a SMART sign-in coming back here, offers one, or takes
// an API token; a signed-in user goes on to the page of their role.

import { HOME, finishSignIn, smartConfiguration, startSignIn, useToken, whoAmI } from "./session.js";
import { $, onSubmit, say } from "./ui.js";

const SCOPES = {
  patient: "openid fhirUser launch/patient patient/*.read patient/Consent.write offline_access",
  clinician: "openid fhirUser user/*.read user/*.write offline_access",
  auditor: "openid fhirUser system/*.read",
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
