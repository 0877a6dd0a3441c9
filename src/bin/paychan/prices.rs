//! The proxy's price table, reloaded while it serves: on SIGHUP and from the admin page.
//!
//! Only `[prices]` is reloaded. The file is read and checked whole (a file `serve` would
//! refuse changes nothing), then the table and its description in the terms document are
//! swapped together; a request is priced by the table it found, none is dropped.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use http::Request;
use paychan::MilliSats;
use paychan::server::{Priced, Pricing, RoutePrices};
use serde_json::Value;

use crate::config::Config;

/// A table and its description for the terms, swapped as one.
#[derive(Debug)]
struct Table {
    prices: RoutePrices,
    described: Value,
}

impl Table {
    fn new(prices: RoutePrices) -> Self {
        Self { described: prices.describe(), prices }
    }
}

/// The live price table: the proxy's [`Pricing`], and the terms' description of it.
#[derive(Debug, Clone)]
pub(crate) struct LivePrices(Arc<RwLock<Table>>);

impl LivePrices {
    pub(crate) fn new(prices: RoutePrices) -> Self {
        Self(Arc::new(RwLock::new(Table::new(prices))))
    }

    /// Asks the table now, under the read lock (no copy on the per-request path).
    fn ask<T>(&self, question: impl FnOnce(&RoutePrices) -> T) -> T {
        question(&self.0.read().unwrap_or_else(|p| p.into_inner()).prices)
    }

    /// The terms document's `prices` now.
    pub(crate) fn describe(&self) -> Value {
        self.0.read().unwrap_or_else(|p| p.into_inner()).described.clone()
    }

    fn set(&self, prices: RoutePrices) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Table::new(prices);
    }
}

impl<B> Pricing<B> for LivePrices {
    fn price(&self, request: &Request<B>) -> Option<MilliSats> {
        self.ask(|table| table.price(request))
    }

    fn refuses(&self, request: &Request<B>) -> bool {
        self.ask(|table| table.refuses(request))
    }

    /// One snapshot for both answers: a reload between them could leave a request unpriced by
    /// the old table and not refused by the new one (served free).
    fn priced(&self, request: &Request<B>) -> Priced {
        self.ask(|table| table.priced(request))
    }
}

/// Reloads the prices from the config file, and remembers how the last reload went.
#[derive(Debug)]
pub(crate) struct Reloader {
    path: PathBuf,
    /// Shadow mode as the proxy started: it changes what `unlisted = "refuse"` means, and
    /// takes a restart.
    shadow: bool,
    prices: LivePrices,
    last: Mutex<Option<Result<String, String>>>,
}

impl Reloader {
    pub(crate) fn new(path: PathBuf, shadow: bool, prices: LivePrices) -> Self {
        Self { path, shadow, prices, last: Mutex::default() }
    }

    /// Reads the config file again and swaps in its prices, or changes nothing and says why
    /// (logged, and kept for the admin page).
    pub(crate) fn reload(&self, by: &str) -> Result<String, String> {
        let outcome = self.read().map(|prices| {
            let routes = prices.iter().count();
            self.prices.set(prices);
            format!(
                "prices reloaded from {} ({by}): {routes} route{}; only [prices] is reloaded, \
                 other changes take a restart",
                self.path.display(),
                if routes == 1 { "" } else { "s" }
            )
        });
        match &outcome {
            Ok(done) => tracing::info!("{done}"),
            Err(error) => tracing::error!("{error}"),
        }
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome.clone());
        outcome
    }

    fn read(&self) -> Result<RoutePrices, String> {
        let refused = |why: String| format!("prices not reloaded, nothing changed: {why}");
        let config = Config::load(&self.path).map_err(|e| refused(e.to_string()))?;
        if config.shadow != self.shadow {
            return Err(refused(format!(
                "{}: shadow = {} but the proxy runs with shadow = {}; shadow mode takes a restart",
                self.path.display(),
                config.shadow,
                self.shadow
            )));
        }
        Ok(config.prices)
    }

    /// How the last reload went, if there was one.
    pub(crate) fn last(&self) -> Option<Result<String, String>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Reloads on every SIGHUP until the proxy stops.
pub(crate) fn on_sighup(
    reloader: Arc<Reloader>,
    mut hangups: tokio::signal::unix::Signal,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let _ = reloader.reload("SIGHUP");
        }
    })
}

/// A config with `GET /hello` at `msat`, written to `dir` (for tests).
#[cfg(test)]
pub(crate) fn test_config(dir: &std::path::Path, msat: u64, shadow: bool) -> PathBuf {
    let path = dir.join("paychan.toml");
    let text = format!(
        "network = \"regtest\"\nlisten = \"127.0.0.1:8402\"\nupstream = \"http://127.0.0.1:8080\"\n\
         key_file = \"k\"\nshadow = {shadow}\n\
         payout_address = \"bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080\"\n\
         [chain]\nesplora_url = \"http://127.0.0.1:9\"\n\
         [[prices.routes]]\nmethod = \"GET\"\npath = \"/hello\"\nprice_msat = {msat}\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    /// A config in a fresh folder with `GET /hello` at 1 000 msat, its live prices and their
    /// reloader.
    fn live(name: &str) -> (PathBuf, LivePrices, Reloader) {
        let dir =
            std::env::temp_dir().join(format!("paychan-prices-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = test_config(&dir, 1_000, false);
        let live = LivePrices::new(Config::load(&path).unwrap().prices);
        let reloader = Reloader::new(path.clone(), false, live.clone());
        (path, live, reloader)
    }

    #[test]
    fn a_reload_swaps_the_table_and_its_description() {
        let (path, live, reloader) = live("swap");
        let dir = path.parent().unwrap().to_owned();
        assert_eq!(live.price(&get("/hello")), Some(MilliSats::from_msat(1_000)));
        test_config(&dir, 3_000, false);
        let done = reloader.reload("test").unwrap();
        assert!(done.contains("only [prices]"), "{done}");
        assert_eq!(live.price(&get("/hello")), Some(MilliSats::from_msat(3_000)));
        assert_eq!(live.describe()["routes"][0]["price_msat"], 3_000);
        assert!(live.refuses(&get("/other")), "unlisted routes are refused by default");
        assert_eq!(reloader.last(), Some(Ok(done)));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_bad_file_changes_nothing_and_says_why() {
        let (path, live, reloader) = live("bad");
        let dir = path.parent().unwrap().to_owned();
        let before = live.describe();
        let good = std::fs::read_to_string(&path).unwrap();
        for (bad, says) in [
            (good.replace("method = \"GET\"", "method = \"G T\""), "prices.routes[0].method"),
            (good.replace("path = \"/hello\"", "path = \"hello\""), "must start with /"),
            (good.replace("price_msat = 1000", "price_msat = \"lots\""), "price_msat"),
            (good.replace("shadow = false", "shadow = true"), "shadow mode takes a restart"),
        ] {
            std::fs::write(&path, bad).unwrap();
            let error = reloader.reload("test").unwrap_err();
            assert!(error.contains(says) && error.contains("nothing changed"), "{error}");
            assert_eq!(live.describe(), before);
            assert_eq!(live.price(&get("/hello")), Some(MilliSats::from_msat(1_000)));
            assert_eq!(reloader.last(), Some(Err(error)));
        }
        std::fs::remove_file(&path).unwrap();
        let error = reloader.reload("test").unwrap_err();
        assert!(error.contains("cannot read the config"), "{error}");
        assert_eq!(live.price(&get("/hello")), Some(MilliSats::from_msat(1_000)));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
