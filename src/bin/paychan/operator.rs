//! The operator console: the channels in the proxy's store, a close, a report.

use paychan::MilliSats;
use paychan::bitcoin::bip32::Xpriv;
use paychan::chain::ChainBackend;
use paychan::channel::ChannelState;
use paychan::settlement::{CloseOutcome, close_now};
use paychan::store::{ChannelRecord, ChannelStore};
use paychan::wire::ChannelId;

use crate::Error;
use crate::chain::Chain;

/// One line per channel: id, state, paid, spent, balance, expiry (and what nodes lease).
fn line(record: &ChannelRecord) -> String {
    let leased = match record.leased.to_msat() {
        0 => String::new(),
        leased => format!("  leased {leased} msat"),
    };
    format!(
        "{}  {:<8} paid {:>12} msat  spent {:>12} msat  balance {:>12} msat  expiry {}{leased}",
        record.id(),
        record.state.as_str(),
        record.paid().to_msat(),
        record.spent.to_msat(),
        record.balance().to_msat(),
        record.channel.params().expiry,
    )
}

/// `paychan channels [--state S]`.
pub(crate) async fn channels<St: ChannelStore>(
    store: &St,
    state: Option<ChannelState>,
) -> Result<(), Error> {
    for state in ChannelState::ALL.into_iter().filter(|s| state.is_none_or(|wanted| wanted == *s)) {
        for record in store.list(state).await? {
            println!("{}", line(&record));
        }
    }
    Ok(())
}

/// `paychan channel <id>`: the channel as JSON (its snapshot).
pub(crate) async fn channel<St: ChannelStore>(store: &St, id: ChannelId) -> Result<(), Error> {
    let record = store.load(id).await?.ok_or_else(|| format!("no channel {id}"))?;
    let snapshot = record.snapshot(MilliSats::ZERO, MilliSats::ZERO);
    println!("{}", serde_json::to_string_pretty(&snapshot)?);
    Ok(())
}

/// `paychan close <id>`: runs the closing procedure once (the settlement task's own,
/// `paychan::settlement::close_now`); a close the chain does not take stays queued, and the
/// proxy's settlement task retries it.
pub(crate) async fn close<St: ChannelStore>(
    store: &St,
    chain: &Chain,
    master: &Xpriv,
    id: ChannelId,
) -> Result<(), Error> {
    println!("{}", close_once(store, chain, master, id).await?);
    Ok(())
}

/// Runs the closing procedure once on channel `id` (`paychan close`, and the admin page's
/// close): what it did, or why the channel cannot be closed.
pub(crate) async fn close_once<St: ChannelStore>(
    store: &St,
    chain: &Chain,
    master: &Xpriv,
    id: ChannelId,
) -> Result<String, Error> {
    let outcome =
        close_now(store, chain, master, id).await?.ok_or_else(|| format!("no channel {id}"))?;
    match outcome {
        CloseOutcome::Closed { close, .. } => Ok(format!(
            "closed {id}: {} pays {} sat to the payout address",
            close.compute_txid(),
            paychan::channel::server_amount(&close).to_sat()
        )),
        CloseOutcome::Queued { error, .. } => {
            Ok(format!("close of {id} queued ({error}); the proxy's settlement task retries it"))
        }
        CloseOutcome::Failed => Err(format!(
            "channel {id} cannot be closed (no payment to close with, or its funding is spent or \
             gone): it is failed"
        )
        .into()),
        CloseOutcome::NotClosable(state) => {
            Err(format!("channel {id} is {}: nothing to close", state.as_str()).into())
        }
        outcome => Err(format!("channel {id}: {outcome:?}").into()),
    }
}

/// `paychan report`: channels by state, revenue paid and settled, open allocations, and the
/// channels that expire within a day.
pub(crate) async fn report<St: ChannelStore>(
    store: &St,
    chain: Option<&Chain>,
) -> Result<(), Error> {
    let tip = match chain {
        Some(chain) => Some(chain.tip().await?.height),
        None => None,
    };
    let (mut paid, mut settled, mut allocated) =
        (MilliSats::ZERO, MilliSats::ZERO, MilliSats::ZERO);
    let mut soon = Vec::new();
    for state in ChannelState::ALL {
        let records = store.list(state).await?;
        println!("{:<8} {}", state.as_str(), records.len());
        for record in &records {
            if state != ChannelState::Failed {
                paid = paid.saturating_add(record.paid());
            }
            match state {
                ChannelState::Settled => settled = settled.saturating_add(record.paid()),
                ChannelState::Open | ChannelState::Pending => {
                    allocated = allocated.saturating_add(record.unspent());
                    let close_by = record.snapshot(MilliSats::ZERO, MilliSats::ZERO).close_by;
                    if tip.is_some_and(|tip| close_by <= tip + 144) {
                        soon.push((record.id(), close_by));
                    }
                }
                _ => {}
            }
        }
    }
    println!("revenue paid     {} msat", paid.to_msat());
    println!("revenue settled  {} msat", settled.to_msat());
    println!("open allocations {} msat (prepaid, not yet served)", allocated.to_msat());
    match tip {
        Some(tip) => {
            println!("closing within 144 blocks of tip {tip}: {}", soon.len());
            for (id, close_by) in soon {
                println!("  {id} closes by height {close_by}");
            }
        }
        None => println!("(no chain: expiries not checked)"),
    }
    Ok(())
}
