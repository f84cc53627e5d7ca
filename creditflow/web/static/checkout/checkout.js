// creditflow hosted checkout: Stripe.js confirms the card on a SetupIntent, creditflow charges it once (or, for a
// setup session, only saves it: the same flow, the server answers "complete" without a charge).
// No build step, no dependencies but Stripe.js (loaded before this file). See creditflow/web/checkout.py.
(function () {
  "use strict";
  var config = JSON.parse(document.getElementById("checkout-config").textContent);
  var form = document.getElementById("payment-form");
  var button = document.getElementById("pay-button");
  var errors = document.getElementById("card-errors");
  var nameInput = document.getElementById("card-name");
  var label = button.textContent;

  if (typeof Stripe !== "function") {
    errors.textContent = "The card form could not be loaded. Check your connection and reload the page.";
    return;
  }
  var stripe = Stripe(config.publishableKey);
  var card = stripe.elements().create("card");
  card.mount("#card-element");
  button.disabled = false;

  function sleep(ms) { return new Promise(function (resolve) { setTimeout(resolve, ms); }); }

  function busy(text) {
    button.disabled = true;
    button.textContent = text;
  }

  function fail(message) {
    errors.textContent = message || "The payment did not go through. Please try again.";
    button.disabled = false;
    button.textContent = label;
  }

  async function post(url, body) {
    var response;
    try {
      response = await fetch(url, {
        method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json", "X-CSRF-Token": config.csrfToken},
        body: JSON.stringify(body || {})
      });
    } catch (err) {
      return {ok: false, data: {error: {message: "Could not reach the server. Check your connection."}}};
    }
    var data = await response.json().catch(function () { return {}; });
    return {ok: response.ok, status: response.status, data: data};
  }

  function errorOf(res) {
    return (res.data && res.data.error && res.data.error.message) || "The payment did not go through.";
  }

  async function pay(setupIntent) {
    var confirmed = {};
    for (var i = 0; i < 120; i++) {
      var res = await post(config.payUrl, {setup_intent: setupIntent.id, payment_method: setupIntent.payment_method});
      if (!res.ok) {
        if (res.status === 503) { await sleep(2000); continue; }  // retried with the same card: charged once
        return fail(errorOf(res));
      }
      var answer = res.data;
      if (answer.status === "complete") {
        busy(config.setup ? "Saved" : "Paid");
        window.location.assign(answer.redirect_url);
        return;
      }
      if (answer.status === "requires_action" && !confirmed[answer.client_secret]) {
        confirmed[answer.client_secret] = true;
        var auth = await stripe.confirmCardPayment(answer.client_secret);
        if (auth.error) { return fail(auth.error.message); }
        continue;
      }
      await sleep(1000);  // processing: ask again (the same charge is joined)
    }
    fail("The payment is taking longer than expected. Reload this page in a minute to see its status.");
  }

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    if (button.disabled) { return; }
    errors.textContent = "";
    busy("Processing\u2026");
    var intent = await post(config.intentUrl, {});
    if (!intent.ok) { return fail(errorOf(intent)); }
    var details = {card: card};
    if (nameInput.value) { details.billing_details = {name: nameInput.value}; }
    var result = await stripe.confirmCardSetup(intent.data.client_secret, {payment_method: details});
    if (result.error) { return fail(result.error.message || "Your card was declined."); }
    await pay(result.setupIntent);
  });
})();
