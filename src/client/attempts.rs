//! The client's one pay-and-retry loop, [`pay`], shared by every HTTP client integration:
//! send with the current payment; on a 402 from the payer's server pay (top up or open,
//! within the policy) and send again; count and check the final answer. The integrations
//! (a tower service, a reqwest middleware chain) only say how a request is sent and how its
//! answer is read and handed back ([`Exchange`]); [`Retry`] keeps one request's attempts.

use bitcoin::hex::DisplayHex;
use http::HeaderValue;

use super::payer::CurrentPayment;
use super::{ClientError, ClientStore, Payer, RetryBudget, Transport};
use crate::MilliSats;
use crate::wire::Problem;

/// How often one request is sent at most: the first try, then after opening a channel, after
/// a top-up, or with a payment a concurrent request made meanwhile.
const MAX_ATTEMPTS: usize = 4;

/// One request's attempts: which payment each carried, and what the client may still do.
pub(crate) struct Retry<'a, St> {
    payer: &'a Payer<St>,
    budget: RetryBudget,
    attempt: usize,
    sent: Option<CurrentPayment>,
    /// The digest of the receipt the attempt links to (`Payment-Receipt-Prev`).
    prev: Option<[u8; 32]>,
    /// What the attempt says of the unsigned receipts (`Payment-Receipt-Unsigned`).
    unsigned: Option<crate::wire::UnsignedReceipts>,
    /// Whether the request may be answered by a replay: an unsafe method with an
    /// `Idempotency-Key`.
    keyed: bool,
    /// The request's method and path: its route, for the quotes and the count.
    method: http::Method,
    path: String,
}

impl<'a, St: ClientStore> Retry<'a, St> {
    /// One request's attempts; `method`, `path` and `headers` are the request's.
    pub(crate) fn new(
        payer: &'a Payer<St>,
        method: &http::Method,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Self {
        use http::Method;
        let keyed = matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE)
            && headers.contains_key(crate::wire::IDEMPOTENCY_KEY);
        Self {
            payer,
            budget: RetryBudget::default(),
            attempt: 0,
            sent: None,
            prev: None,
            unsigned: None,
            keyed,
            method: method.clone(),
            path: path.to_owned(),
        }
    }

    /// Starts the next attempt: the `Payment-Channel` header it carries, if any.
    ///
    /// # Errors
    ///
    /// [`ClientError::Overcharged`] once the server charged more than the policy allows, or
    /// why the payer's channel cannot be loaded.
    pub(crate) async fn start(&mut self) -> Result<Option<HeaderValue>, ClientError> {
        self.payer.check_trusted()?;
        self.attempt += 1;
        self.sent = self.payer.current().await?;
        (self.prev, self.unsigned) = (None, None);
        if let Some(sent) = &self.sent {
            self.payer.note_send(sent.id);
            self.prev = self.payer.latest_receipt_digest(sent.id);
            self.unsigned = Some(self.payer.unsigned_receipts(sent.id));
        }
        Ok(self.sent.as_ref().map(|sent| sent.header.clone()))
    }

    /// The receipt headers this attempt carries, each with its value or `None` (remove it):
    /// `Payment-Receipt-Prev`, the digest of the latest receipt on its channel, which the
    /// server links its receipt to; `Payment-Receipt-Unsigned`, the unsigned receipts held
    /// since the last signed one, and the most the policy accepts.
    pub(crate) fn receipt_headers(&self) -> [(&'static str, Option<HeaderValue>); 2] {
        let value = |text: String| HeaderValue::try_from(text).ok();
        [
            (
                crate::wire::PAYMENT_RECEIPT_PREV,
                self.prev.map(|p| p.to_lower_hex_string()).and_then(value),
            ),
            (
                crate::wire::PAYMENT_RECEIPT_UNSIGNED,
                self.unsigned.map(|u| u.to_string()).and_then(value),
            ),
        ]
    }

    /// The receipt digest this attempt links to.
    pub(crate) fn prev(&self) -> Option<[u8; 32]> {
        self.prev
    }

    /// The payment this attempt carried.
    pub(crate) fn sent(&self) -> Option<&CurrentPayment> {
        self.sent.as_ref()
    }

    /// Whether this attempt is the last: its 402 is returned as the response.
    pub(crate) fn is_last(&self) -> bool {
        self.attempt >= MAX_ATTEMPTS
    }

    /// The attempt, `method path_and_query`, was answered with `status` and `headers`: count
    /// it (a served answer to a priced request is one unit at its quote: the loss bound's
    /// count), check what the server charged (its `Payment-Channel-Balance`, and its signed
    /// `Payment-Receipt` when it sends one) against the policy — an overcharge, a receipt
    /// that does not add up, or a counted answer without a receipt when receipts are required
    /// stops the payer at the next request — then top up ahead of the next request if the
    /// payer is configured to. A refusal here is not this request's failure: the next
    /// request meets it as a typed error.
    pub(crate) async fn answered(
        self,
        status: http::StatusCode,
        headers: &http::HeaderMap,
        path_and_query: &str,
    ) {
        let Some(sent) = &self.sent else { return };
        // A replayed answer charged nothing now; its balance and receipt are the first
        // answer's, already noted. Believed only for a request that could be one: an unsafe
        // method with an `Idempotency-Key` (else a server could skip every check).
        if headers.contains_key(crate::wire::IDEMPOTENT_REPLAYED) && self.keyed {
            return;
        }
        let method = self.method.as_str();
        let balance = balance(headers);
        let receipt = headers.get(crate::wire::PAYMENT_RECEIPT);
        let metered = balance.is_some() || receipt.is_some();
        let route = (method, path_and_query);
        let counted = self.payer.note_served(sent, route, status.as_u16(), metered);
        match receipt {
            Some(receipt) if balance.is_some() || counted => {
                let (value, prev) = (receipt.as_bytes(), self.prev);
                self.payer.note_receipt(sent, value, method, path_and_query, prev);
            }
            Some(_) => {}
            None if counted => self.payer.note_missing_receipt("a paid answer without a receipt"),
            None => {}
        }
        let Some(balance) = balance else { return };
        self.payer.note_answer(sent, balance);
        let _ = self.payer.observe_balance(sent, balance).await;
    }

    /// The attempt met a 402 with `problem`: pay (through `negotiation` when a channel must be
    /// opened) so the next attempt can succeed.
    ///
    /// # Errors
    ///
    /// Why the client cannot or may not pay; the problem itself on the last attempt.
    pub(crate) async fn payment_required<T: Transport + ?Sized>(
        &mut self,
        negotiation: &T,
        status: http::StatusCode,
        headers: &http::HeaderMap,
        body: &[u8],
    ) -> Result<(), ClientError> {
        if let Some(scheme) = foreign_scheme(headers, body) {
            return Err(ClientError::ForeignScheme { scheme });
        }
        let problem = Problem::from_body(status, body);
        if let Some(price) = problem.price_msat {
            self.payer.note_quote(self.method.as_str(), &self.path, price);
        }
        if self.is_last() {
            return Err(problem.into());
        }
        self.payer.handle_402(negotiation, self.sent.as_ref(), problem, &mut self.budget).await
    }
}

/// One request as an HTTP client integration sends it: what the shared [`pay`] loop needs of
/// a tower service or a reqwest middleware chain.
pub(crate) trait Exchange {
    /// The integration's response as sent.
    type Response;
    /// The response handed to the caller.
    type Output;
    /// The integration's error.
    type Error;

    /// Waits until the request can be sent (again): before the attempt counts as a send.
    async fn ready(&mut self) -> Result<(), Self::Error>;

    /// Sends the request (again) with the attempt's payment headers: the response, and
    /// whether the request could be sent once more (not when its body cannot be copied: then
    /// this answer is final).
    async fn send(&mut self, payment: &Attempt) -> Result<(Self::Response, bool), Self::Error>;

    /// The response's status and headers.
    fn head(response: &Self::Response) -> (http::StatusCode, &http::HeaderMap);

    /// The path and query of the request that `response` answers when it came from the
    /// payer's origin; `None` when it did not (a redirect followed elsewhere).
    fn answered_at(&self, response: &Self::Response) -> Option<String>;

    /// Reads a 402's body (bounded).
    async fn read_body(response: Self::Response) -> Result<bytes::Bytes, Self::Error>;

    /// The response handed to the caller, with what its request paid when it came from the
    /// payer's server and carried a payment (a metered stream is paid as it is read).
    fn finish(&self, response: Self::Response, paid: Option<PaidAnswer>) -> Self::Output;

    /// The integration's error for a refusal of the client.
    fn error(error: ClientError) -> Self::Error;
}

/// What the request a final answer answers paid with.
pub(crate) struct PaidAnswer {
    /// The payment it carried.
    pub(crate) sent: CurrentPayment,
    /// The receipt it linked to.
    pub(crate) prev: Option<[u8; 32]>,
    /// Its path and query.
    pub(crate) path: String,
}

/// The payment headers of one attempt.
pub(crate) struct Attempt {
    /// The `Payment-Channel` header, if the client has a channel.
    pub(crate) channel: Option<HeaderValue>,
    /// The receipt headers, each with its value or `None` (removed).
    pub(crate) receipts: [(&'static str, Option<HeaderValue>); 2],
}

impl Attempt {
    /// Sets the attempt's headers on `headers`, replacing any the caller set.
    pub(crate) fn apply(&self, headers: &mut http::HeaderMap) {
        headers.remove(crate::wire::PAYMENT_CHANNEL);
        if let Some(header) = &self.channel {
            headers.insert(crate::wire::PAYMENT_CHANNEL, header.clone());
        }
        for (name, value) in &self.receipts {
            headers.remove(*name);
            if let Some(value) = value {
                headers.insert(*name, value.clone());
            }
        }
    }
}

/// The client's one pay loop: sends the request with the current payment; on a 402 from the
/// payer's origin pays (top-up or open, within the policy, through `negotiation`) and sends
/// it again; counts and checks the final answer. An answer from another origin (a redirect
/// followed) drives no payment and is returned as it is.
/// `retry` holds the request's attempts (made from its method, path and headers before they
/// were handed to `exchange`).
pub(crate) async fn pay<St, E, T>(
    mut retry: Retry<'_, St>,
    mut exchange: E,
    negotiation: &T,
) -> Result<E::Output, E::Error>
where
    St: ClientStore,
    E: Exchange,
    T: Transport + ?Sized,
{
    loop {
        // Ready first: an attempt counts as a send (the overcharge check allows so much per
        // send), so one that could not be sent must not start.
        exchange.ready().await?;
        let channel = retry.start().await.map_err(E::error)?;
        let attempt = Attempt { channel, receipts: retry.receipt_headers() };
        let (response, again) = exchange.send(&attempt).await?;
        // The origin guard: only the payer's server's answers are counted or paid.
        let Some(at) = exchange.answered_at(&response) else {
            return Ok(exchange.finish(response, None));
        };
        let (status, headers) = E::head(&response);
        if status != http::StatusCode::PAYMENT_REQUIRED || retry.is_last() || !again {
            let (sent, prev) = (retry.sent().cloned(), retry.prev());
            retry.answered(status, headers, &at).await;
            let paid = sent.map(|sent| PaidAnswer { sent, prev, path: at });
            return Ok(exchange.finish(response, paid));
        }
        let headers = headers.clone();
        let body = E::read_body(response).await?;
        retry.payment_required(negotiation, status, &headers, &body).await.map_err(E::error)?;
    }
}

/// The `Payment-Channel-Balance` of a served request.
pub(crate) fn balance(headers: &http::HeaderMap) -> Option<MilliSats> {
    let value = headers.get(crate::wire::PAYMENT_CHANNEL_BALANCE)?;
    value.to_str().ok()?.parse().ok().map(MilliSats::from_msat)
}

/// The payment scheme a 402 asks for when it is not paychan's ([`steps::foreign_scheme`]),
/// from its `WWW-Authenticate` challenges and its body.
///
/// [`steps::foreign_scheme`]: crate::client::steps::foreign_scheme
pub(crate) fn foreign_scheme(headers: &http::HeaderMap, body: &[u8]) -> Option<String> {
    let challenges: Vec<&str> = headers
        .get_all(http::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    crate::client::steps::foreign_scheme(&challenges, body)
}

#[cfg(test)]
mod tests {
    use super::foreign_scheme;

    #[test]
    fn a_402_of_another_scheme_is_named() {
        let with = |challenge: &str| {
            let mut headers = http::HeaderMap::new();
            headers.append(http::header::WWW_AUTHENTICATE, challenge.parse().unwrap());
            headers
        };
        let none = http::HeaderMap::new();
        let ours = r#"Payment method="bitcoin-channel", intent="session", terms="/t""#;
        assert_eq!(foreign_scheme(&with(ours), b""), None);
        // Several offered, joined as a browser joins them: ours among them is enough.
        let joined = r#"Payment method="tempo", intent="charge", Payment method="bitcoin-channel""#;
        assert_eq!(foreign_scheme(&with(joined), b""), None);
        for spelled in [
            r#"Payment METHOD="bitcoin-channel""#,
            r#"Payment method = "bitcoin-channel""#,
            "Payment method=bitcoin-channel",
        ] {
            assert_eq!(foreign_scheme(&with(spelled), b""), None, "{spelled}");
        }
        // A paychan problem document is ours whatever the header says.
        let ours_body = br#"{"type":"urn:paychan:problem:payment-required","status":402}"#;
        assert_eq!(foreign_scheme(&with(r#"L402 macaroon="x""#), ours_body), None);
        assert_eq!(
            foreign_scheme(&with(r#"L402 macaroon="AGI", invoice="lnbc1""#), b"").as_deref(),
            Some("L402")
        );
        assert_eq!(
            foreign_scheme(&with(r#"LSAT macaroon="AGI", invoice="lnbc1""#), b"").as_deref(),
            Some("L402")
        );
        assert_eq!(
            foreign_scheme(&with(r#"Payment method="tempo", intent="charge""#), b"").as_deref(),
            Some(r#"Payment method="tempo""#)
        );
        let x402 = br#"{"x402Version":1,"accepts":[{"scheme":"exact","network":"base"}]}"#;
        assert_eq!(foreign_scheme(&none, x402).as_deref(), Some("x402"));
        let problem = br#"{"type":"urn:paychan:problem:payment-required","status":402}"#;
        assert_eq!(foreign_scheme(&none, problem), None, "a paychan problem without a challenge");
        assert_eq!(foreign_scheme(&none, b"not json"), None);
    }
}
